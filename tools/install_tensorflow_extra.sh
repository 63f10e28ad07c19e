#!/usr/bin/env bash
# The part of the `tensorflow` extra pip cannot resolve: tf-keras (which onnx2tf imports) requires the
# `tensorflow` package, while rescompress installs `tensorflow-cpu` (same modules, no CUDA). Installing
# tf-keras without its dependencies keeps tensorflow-cpu.
#   usage: tools/install_tensorflow_extra.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
PYTHON="${1:-.venv/bin/python}"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps "tf-keras==2.21.0"
"$PYTHON" -c "import tf_keras, onnx2tf" 2>/dev/null || { echo "tf-keras or onnx2tf does not import" >&2; exit 1; }
