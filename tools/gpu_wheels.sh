#!/usr/bin/env bash
# Download, here (with network), what tools/gpu_check.sh installs on a CUDA machine without network:
# the wheels listed in tools/gpu_packages.txt for CPython 3.12 on manylinux x86_64 (no torch: the machine
# has its own), plus scikit-learn's 1,797 digits as wheels/digits.npz (the tests' small data set; the
# scikit-learn and scipy wheels alone are ~50 MB, over what can be carried). Everything lands in wheels/
# (git-ignored); the total must stay under 64 MiB, the most a device run carries.
#
#   bash tools/gpu_wheels.sh            # then carry wheels/ along with the check
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=wheels
mkdir -p "$DEST"
grep -v '^\s*#' tools/gpu_packages.txt | awk 'NF {print $1}' | while read -r spec; do
    name=${spec%%==*}
    norm=$(echo "$name" | tr 'A-Z-' 'a-z_')
    if ls "$DEST" | tr 'A-Z-' 'a-z_' | grep -q "^${norm}-${spec##*==}-"; then
        continue  # already downloaded
    fi
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --abi cp312 --abi abi3 --abi none \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_28_x86_64 --platform any -d "$DEST" "$spec"
done
"$PY" - <<'PY'
import numpy as np
from sklearn.datasets import load_digits

d = load_digits()
np.savez_compressed("wheels/digits.npz", images=d.images.astype(np.float64), target=d.target.astype(np.int64),
                    target_names=d.target_names.astype(np.int64))
PY
total=$(du -cb "$DEST"/* | tail -1 | cut -f1)
echo "wheels/: $(ls "$DEST" | wc -l) files, $((total / 1024 / 1024)) MiB"
if [ "$total" -ge $((64 * 1024 * 1024)) ]; then
    echo "wheels/ is over 64 MiB: drop a tier from tools/gpu_packages.txt" >&2
    exit 1
fi
