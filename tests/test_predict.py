"""`rescompress.load` and `rescompress predict`: bundles, bare artifacts, the input forms, and the errors a
user meets (exit 2, one clear message). The run is test_bundle.py's, made once per session."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.remote_device import python_without
from tests.test_bundle import ROOT, build_run, needs_litert, predict_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle_run(tmp_path_factory) -> dict:
    return build_run(tmp_path_factory)


def test_load_a_bundle_and_the_bare_artifact_alike_on_every_input_form(bundle_run):
    from PIL import Image

    import rescompress

    run_dir, image = bundle_run["run_dir"], bundle_run["image"]
    bundle = rescompress.load(run_dir / "bundles" / "onnx-fp32")
    bare = rescompress.load(run_dir / "artifacts" / "onnx-fp32.onnx")  # preprocessing from ../report.json
    assert bundle.labels == bare.labels == [str(i) for i in range(10)]
    assert bundle.preprocess["crop"] == {"height": 8, "width": 8} and bundle.runtime == "onnxruntime"
    assert "report.json" in bare.source and "preprocess.json" in bundle.source

    from_path = bundle(image)
    assert from_path.shape == (1, 10) and from_path.dtype == np.float32
    np.testing.assert_array_equal(bare(str(image)), from_path)
    with Image.open(image) as pil:
        np.testing.assert_array_equal(bundle(pil), from_path)
        pixels = np.array(pil)
    np.testing.assert_array_equal(bundle(pixels), from_path)  # a uint8 (H, W) image
    np.testing.assert_array_equal(bundle(pixels[..., None]), from_path)  # (H, W, 1)
    batch = bundle.inputs([image, image])
    assert batch.shape == (2, 1, 8, 8) and batch.dtype == np.float32
    np.testing.assert_array_equal(bundle(batch)[1], from_path[0])  # an already preprocessed NCHW batch

    top = bundle.predict([image, pixels], top=3)
    assert len(top) == 2 and top[0] == top[1] and len(top[0]) == 3
    assert top[0][0][0] == str(int(from_path.argmax())) and 0 < top[0][0][1] <= 1
    assert [s for _, s in top[0]] == sorted((s for _, s in top[0]), reverse=True)


def test_load_a_run_checkpoint_agrees_with_its_onnx_export(bundle_run):
    import rescompress

    run_dir = bundle_run["run_dir"]
    torch_model = rescompress.load(run_dir / "checkpoints" / "00-baseline.pt")
    onnx_model = rescompress.load(run_dir / "artifacts" / "onnx-fp32.onnx")
    assert torch_model.runtime == "torch"
    np.testing.assert_allclose(torch_model(bundle_run["pngs"]), onnx_model(bundle_run["pngs"]), atol=1e-4)


@needs_litert
@pytest.mark.tflite
def test_load_a_bare_int8_tflite_file(bundle_run):
    import rescompress

    run_dir = bundle_run["run_dir"]
    bare = rescompress.load(run_dir / "artifacts" / "tflite-int8.tflite")
    bundled = rescompress.load(run_dir / "bundles" / "tflite-int8")
    assert bare.runtime == "litert"
    np.testing.assert_array_equal(bare(bundle_run["pngs"]), bundled(bundle_run["pngs"]))


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Ship an artifact: bundles, `rescompress predict`, `rescompress.load`", 1)[1]
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section shows one Python example"
    return blocks[0]


def test_readme_load_example_runs(bundle_run, tmp_path, monkeypatch, capsys):
    code = _readme_example()
    assert "rescompress.load(" in code
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart-20261203-120000").symlink_to(bundle_run["run_dir"])
    shutil.copy(bundle_run["image"], tmp_path / "digit.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert re.search(r"\('\d', 0\.\d+\)", out), out  # (label, score) pairs printed


# ---------------------------------------------------------------- bad input: exit 2, one clear message


def test_predict_prints_a_table_for_a_folder(bundle_run):
    result = predict_cli(bundle_run["run_dir"] / "bundles" / "onnx-int8", bundle_run["images"], "--top", "2")
    assert result.exit_code == 0, result.output
    for png in bundle_run["pngs"]:
        assert png.name in result.output
    assert "notes.txt" not in result.output


@pytest.mark.parametrize("case, match", [
    ("missing-model", r"error: .*nothing\.onnx does not exist; give a bundle directory"),
    ("missing-image", r"error: image .*nope\.png does not exist"),
    ("not-an-image", r"error: .*notes\.txt is not an image file Pillow can read"),
    ("empty-folder", r"error: no image files \(.*\) directly in .*empty \(subfolders are not searched\)"),
    ("newer-bundle", r"error: .* was written by a newer rescompress \(bundle_schema_version 99; .*upgrade"),
    ("no-preprocessing", r"error: no preprocessing found for .*lonely\.onnx"),
])
def test_predict_bad_input_exits_2_with_one_clear_message(bundle_run, tmp_path, case, match):
    run_dir, image = bundle_run["run_dir"], bundle_run["image"]
    model, target = run_dir / "bundles" / "onnx-fp32", image
    if case == "missing-model":
        model = run_dir / "artifacts" / "nothing.onnx"
    elif case == "missing-image":
        target = tmp_path / "nope.png"
    elif case == "not-an-image":
        target = bundle_run["images"] / "notes.txt"
    elif case == "empty-folder":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        shutil.copy(image, tmp_path / "empty" / "sub" / "x.png")
        target = tmp_path / "empty"
    elif case == "newer-bundle":
        model = tmp_path / "bundle"
        shutil.copytree(run_dir / "bundles" / "onnx-fp32", model)
        pre = json.loads((model / "preprocess.json").read_text())
        (model / "preprocess.json").write_text(json.dumps({**pre, "bundle_schema_version": 99}))
    elif case == "no-preprocessing":
        model = tmp_path / "lonely.onnx"
        shutil.copy(run_dir / "artifacts" / "onnx-fp32.onnx", model)
    result = predict_cli(model, target)
    assert result.exit_code == 2, result.output
    assert re.search(match, " ".join(result.output.split())), result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("blocked, bundle, match", [
    ("onnxruntime", "onnx-fp32", r"needs onnxruntime, which cannot be imported here .*core dependency of "
                                 r"rescompress: pip install 'rescompress'"),
    pytest.param("ai_edge_litert", "tflite-fp32", r"needs ai_edge_litert\.interpreter, which cannot be imported "
                                                  r"here .*pip install 'rescompress\[tflite\]'",
                 marks=[needs_litert, pytest.mark.tflite]),
])
def test_predict_names_the_install_when_the_runtime_is_missing(bundle_run, tmp_path, blocked, bundle, match):
    script = tmp_path / "predict_cli.py"
    script.write_text("from rescompress.cli import main\nmain()\n")
    proc = subprocess.run([*python_without(tmp_path, blocked), str(script), "predict",
                           str(bundle_run["run_dir"] / "bundles" / bundle), str(bundle_run["image"])],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(match, " ".join(proc.stderr.split())), proc.stderr
    assert "Traceback" not in proc.stderr
