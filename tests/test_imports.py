"""`import rescompress` stays light; heavy backends load only where they are used."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["tensorflow", "tensorrt", "torch_tensorrt", "litert_torch", "ai_edge_litert", "ai_edge_quantizer", "onnx2tf",
         "tf_keras", "jax", "neural_compressor", "matplotlib", "ray"]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_rescompress_is_light():
    loaded = _modules_after("import rescompress")
    assert not loaded & {*HEAVY, "torch", "onnxruntime"}


def test_cli_and_pipeline_import_no_backend():
    loaded = _modules_after("import rescompress.cli, rescompress.pipeline, rescompress.recipe, rescompress.export, "
                            "rescompress.sweep, rescompress.distributed")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
