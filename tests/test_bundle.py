"""Bundles: what each holds, and that its predict.py runs with numpy, Pillow and the runtime alone and agrees
with `rescompress predict`.

One small recipe runs once per session (`bundle_run`): the tiny ResNet on digits, ptq in the tensorrt scheme,
exported to onnx fp32/int8, tflite fp32/int8 (where the tflite extra is installed) and a deferred tensorrt int8.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import TINY_RECIPE, write_recipe

ROOT = Path(__file__).resolve().parents[1]
HAS_LITERT = importlib.util.find_spec("litert_torch") is not None
needs_litert = pytest.mark.skipif(not HAS_LITERT, reason="needs the 'tflite' extra: pip install 'rescompress[tflite]'")

ONNX_BUNDLES = ["onnx-fp32", "onnx-int8"]
TFLITE_BUNDLES = ["tflite-fp32", "tflite-int8"]
EXAMPLE_BUNDLES = [pytest.param(n, marks=[pytest.mark.slow]) for n in ONNX_BUNDLES] + [
    pytest.param(n, marks=[pytest.mark.slow, pytest.mark.tflite, needs_litert]) for n in TFLITE_BUNDLES]

_CACHE: dict = {}


def check_bundles_tool():
    """tools/check_bundles.py as a module: the clean venv builder the tests and the tool share."""
    if "tool" not in _CACHE:
        spec = importlib.util.spec_from_file_location("check_bundles", ROOT / "tools" / "check_bundles.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CACHE["tool"] = module
    return _CACHE["tool"]


def build_run(tmp_path_factory) -> dict:
    """Run the recipe (once per session: the run is found again under the session's base temp folder, also
    by test_predict.py), make sure its bundles exist, and write test digits as PNG files."""
    base = tmp_path_factory.getbasetemp() / "bundle_run"
    done = base / "done.json"
    if done.is_file():
        paths = json.loads(done.read_text())
        return {**{k: Path(v) for k, v in paths.items() if k != "pngs"}, "pngs": [Path(p) for p in paths["pngs"]],
                "report": json.loads((Path(paths["run_dir"]) / "report.json").read_text())}
    from PIL import Image
    from rich.console import Console

    from rescompress.bundle import write_bundles
    from rescompress.data import load_dataset
    from rescompress.pipeline import execute, prepare_new

    shutil.rmtree(base, ignore_errors=True)  # a run that an earlier test process left unfinished
    base.mkdir()
    data = copy.deepcopy(TINY_RECIPE)
    export = [{"onnx": {"precision": "fp32"}}, {"onnx": {"precision": "int8"}}, {"tensorrt": {"precision": "int8"}}]
    if HAS_LITERT:
        export += [{"tflite": {"precision": "fp32"}}, {"tflite": {"precision": "int8"}}]
    data.update(train={"epochs": 15, "batch_size": 64, "lr": 0.1, "threads": 1},
                stages=[{"ptq": {"scheme": "tensorrt", "calibration_batches": 2}}], export=export)
    plan, run_dir, manifest = prepare_new(write_recipe(base / "bundles.yaml", data), base / "runs")
    report = execute(plan, run_dir, manifest, Console(quiet=True))
    if not (run_dir / "bundles").is_dir():  # a pipeline that writes bundles itself has done this already
        write_bundles(run_dir, report)
    images = base / "images"
    images.mkdir()
    digits = load_dataset("digits", seed=0)
    pngs = []
    for i in range(4):
        pngs.append(images / f"digit{i}-label{int(digits.test.labels[i])}.png")
        Image.fromarray(digits.test.images[i, 0].numpy()).save(pngs[-1])
    (images / "notes.txt").write_text("not an image\n")
    paths = {"run_dir": str(run_dir), "images": str(images), "image": str(pngs[0]), "pngs": [str(p) for p in pngs]}
    done.write_text(json.dumps(paths))
    return {"run_dir": run_dir, "report": report, "images": images, "image": pngs[0], "pngs": pngs}


def clean_python(tmp_path_factory, runtime: str) -> Path:
    """A venv (one per runtime per session) with only numpy, Pillow and the runtime."""
    venvs = tmp_path_factory.getbasetemp() / "clean_venvs"
    venvs.mkdir(exist_ok=True)
    return check_bundles_tool().clean_venv(venvs / runtime, runtime)


@pytest.fixture(scope="module")
def bundle_run(tmp_path_factory) -> dict:
    return build_run(tmp_path_factory)


def predict_cli(target: Path, image: Path, *extra: str):
    from rescompress.cli import app

    return CliRunner().invoke(app, ["predict", str(target), str(image), *extra])


# ---------------------------------------------------------------- what a bundle holds


@pytest.mark.slow
def test_every_deployable_artifact_gets_a_bundle_and_references_none(bundle_run):
    run_dir = bundle_run["run_dir"]
    names = {p.name for p in (run_dir / "bundles").iterdir()}
    expected = set(ONNX_BUNDLES) | {"tensorrt-int8"} | (set(TFLITE_BUNDLES) if HAS_LITERT else set())
    assert names == expected  # no torch-fp32/torch-int8: they are references, not deployables
    for name in names:
        files = {p.name for p in (run_dir / "bundles" / name).iterdir()}
        assert {"preprocess.json", "labels.txt", "model_card.md", "predict.py"} <= files
        assert not any(f.startswith(".") for f in files)
    assert not [p for p in (run_dir / "bundles").iterdir() if p.name.startswith(".")]  # no temporary folders


@pytest.mark.slow
def test_preprocess_json_describes_the_input_and_the_files_tensors(bundle_run):
    import onnx

    run_dir, report = bundle_run["run_dir"], bundle_run["report"]
    spec = report["dataset"]["input_spec"]
    for name in ONNX_BUNDLES:
        bundle = run_dir / "bundles" / name
        pre = json.loads((bundle / "preprocess.json").read_text())
        assert pre["bundle_schema_version"] == 1 and pre["runtime"] == "onnxruntime"
        assert pre["artifact"] == f"{name}.onnx" and (bundle / pre["artifact"]).read_bytes() == \
            (run_dir / "artifacts" / f"{name}.onnx").read_bytes()
        assert pre["color"] == "L" and pre["crop"] == {"height": spec["height"], "width": spec["width"]}
        assert pre["resize"] is None and pre["interpolation"] == "bilinear" and pre["scale"] == {"divide_by": 255.0}
        assert pre["mean"] == spec["mean"] and pre["std"] == spec["std"] and pre["layout"] == "NCHW"
        graph = onnx.load(str(bundle / pre["artifact"]), load_external_data=False).graph
        assert pre["input"]["name"] == graph.input[0].name and pre["output"]["name"] == graph.output[0].name
        assert pre["input"]["dtype"] == "float32" and pre["input"]["quantization"] is None
        assert pre["num_classes"] == 10
        assert (bundle / "labels.txt").read_text().splitlines() == [str(i) for i in range(10)]
    # the tensorrt-layout int8 ONNX was measured unfused; the example runs it the same way
    assert json.loads((run_dir / "bundles/onnx-int8/preprocess.json").read_text())["graph_optimization"] == "disabled"
    assert "graph_optimization" not in json.loads((run_dir / "bundles/onnx-fp32/preprocess.json").read_text())


@pytest.mark.slow
@pytest.mark.tflite
@needs_litert
def test_tflite_int8_bundle_records_the_input_and_output_quantization(bundle_run):
    from ai_edge_litert.interpreter import Interpreter

    bundle = bundle_run["run_dir"] / "bundles" / "tflite-int8"
    pre = json.loads((bundle / "preprocess.json").read_text())
    it = Interpreter(model_path=str(bundle / pre["artifact"]))
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert pre["runtime"] == "litert" and pre["input"]["name"] == inp["name"] and pre["output"]["name"] == out["name"]
    assert pre["input"]["dtype"] == "int8" and pre["output"]["dtype"] == "int8"
    assert pre["input"]["quantization"] == {"scale": pytest.approx(inp["quantization"][0], rel=1e-7),
                                            "zero_point": inp["quantization"][1]}
    assert pre["output"]["quantization"]["scale"] == pytest.approx(out["quantization"][0], rel=1e-7)
    fp32 = json.loads((bundle.parent / "tflite-fp32" / "preprocess.json").read_text())
    assert fp32["input"]["dtype"] == "float32" and fp32["input"]["quantization"] is None


@pytest.mark.slow
def test_model_card_says_where_it_came_from_what_it_measured_and_how_to_run_it(bundle_run):
    report = bundle_run["report"]
    card = (bundle_run["run_dir"] / "bundles" / "onnx-fp32" / "model_card.md").read_text()
    row = next(a for a in report["artifacts"] if a["name"] == "onnx-fp32")
    assert "recipe: `tiny`" in card and "model: `resnet_tiny`" in card
    assert "| baseline | train |" in card and "| 01-ptq | ptq |" in card  # the stages
    assert f"test top-1 {100 * row['top1']:.2f} %" in card
    host = next(r for r in report["devices"][0]["results"] if r["artifact"] == "onnx-fp32")
    assert f"| host-cpu | {host['latency']['p50_ms']:.3g} ms |" in card and "| measured |" in card
    assert "| onnxruntime | passed | 0 | 0 |" in card  # lint
    assert "pip install numpy pillow onnxruntime" in card and "python predict.py IMAGE.png" in card


@pytest.mark.slow
def test_deferred_tensorrt_bundle_ships_the_onnx_and_the_build_command(bundle_run):
    from rescompress import deploy

    bundle = bundle_run["run_dir"] / "bundles" / "tensorrt-int8"
    row = next(a for a in bundle_run["report"]["artifacts"] if a["name"] == "tensorrt-int8")
    pre = json.loads((bundle / "preprocess.json").read_text())
    command = row["details"]["build_commands"]["any"]
    assert row["status"] == "deferred"
    assert pre["runtime"] == "tensorrt" and pre["artifact"] == "tensorrt-int8.onnx"
    assert pre["engine"] == "tensorrt-int8.engine" and pre["build_command"] == command
    assert (bundle / "tensorrt-int8.onnx").is_file() and not (bundle / "tensorrt-int8.engine").exists()
    card = (bundle / "model_card.md").read_text()
    assert command in card and "--saveEngine=tensorrt-int8.engine" in card and "--stronglyTyped" in card
    example = (bundle / "predict.py").read_text()
    compile(example, "predict.py", "exec")
    assert 'need("tensorrt"' in example and "execute_async_v3" in example
    with pytest.raises(deploy.BundleError, match=r"no engine yet: build it on the device.*trtexec --onnx=tensorrt-int8.onnx"):
        deploy.load(bundle)
    # the ONNX itself runs in onnxruntime with the bundle's preprocessing
    assert deploy.load(bundle / "tensorrt-int8.onnx")(bundle_run["image"]).shape == (1, 10)


@pytest.mark.slow
def test_write_bundles_skips_references_and_failures_and_replaces_an_old_bundle(bundle_run, tmp_path):
    from rescompress.bundle import write_bundles

    run_dir = tmp_path / "run"
    shutil.copytree(bundle_run["run_dir"], run_dir, ignore=shutil.ignore_patterns("bundles"))
    report = copy.deepcopy(bundle_run["report"])
    report["artifacts"].append({**next(a for a in report["artifacts"] if a["name"] == "onnx-fp32"),
                                "name": "onnx-broken", "status": "failed"})
    report["artifacts"].append({**next(a for a in report["artifacts"] if a["name"] == "onnx-fp32"),
                                "name": "onnx-gone", "path": "artifacts/missing.onnx"})
    (run_dir / "bundles" / "onnx-fp32").mkdir(parents=True)
    (run_dir / "bundles" / "onnx-fp32" / "stale.txt").write_text("from an earlier write")
    written = write_bundles(run_dir, report)
    assert set(written) == {p.name for p in (bundle_run["run_dir"] / "bundles").iterdir()}
    assert written["onnx-fp32"] == "bundles/onnx-fp32"
    assert not (run_dir / "bundles" / "onnx-fp32" / "stale.txt").exists()
    assert sorted(p.name for p in (run_dir / "bundles").iterdir()) == sorted(written)


def test_write_bundles_copies_an_onnx_external_data_file(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from rescompress.bundle import write_bundles

    weight = numpy_helper.from_array(np.eye(4, 3, dtype=np.float32).reshape(4, 3), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    (tmp_path / "artifacts").mkdir()
    onnx.save_model(model, str(tmp_path / "artifacts" / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    spec = {"channels": 1, "height": 2, "width": 2, "mean": [0.5], "std": [0.25]}
    report = {"artifacts": [{"name": "m", "target": "onnx", "precision": "fp32", "path": "artifacts/m.onnx",
                             "status": "ok", "input_spec": spec}],
              "dataset": {"num_classes": 3, "class_names": ["cat", "dog", "fox"]}}
    assert write_bundles(tmp_path, report) == {"m": "bundles/m"}
    bundle = tmp_path / "bundles" / "m"
    assert (bundle / "m.onnx.data").read_bytes() == (tmp_path / "artifacts" / "m.onnx.data").read_bytes()
    assert (bundle / "labels.txt").read_text() == "cat\ndog\nfox\n"
    assert "- `m.onnx.data`" in (bundle / "model_card.md").read_text()


# ---------------------------------------------------------------- the example, in a clean venv


@pytest.mark.slow
def test_clean_venv_has_numpy_pillow_and_the_runtime_but_no_torch_or_rescompress(tmp_path_factory):
    python = clean_python(tmp_path_factory, "onnxruntime")
    env = check_bundles_tool().clean_env()
    ok = subprocess.run([str(python), "-s", "-c", "import numpy, PIL.Image, onnxruntime; print(onnxruntime.__file__)"],
                        capture_output=True, text=True, env=env, cwd="/")
    assert ok.returncode == 0, ok.stderr
    for module in ("torch", "rescompress", "onnx", "ai_edge_litert"):
        proc = subprocess.run([str(python), "-s", "-c", f"import {module}"], capture_output=True, text=True, env=env,
                              cwd="/")
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, module


@pytest.mark.parametrize("name", EXAMPLE_BUNDLES)
def test_bundle_example_in_a_clean_venv_agrees_with_rescompress_predict(bundle_run, tmp_path_factory, name):
    tool = check_bundles_tool()
    bundle = bundle_run["run_dir"] / "bundles" / name
    runtime = json.loads((bundle / "preprocess.json").read_text())["runtime"]
    python = clean_python(tmp_path_factory, runtime)
    if runtime == "litert":
        probe = subprocess.run([str(python), "-s", "-c", "import torch"], capture_output=True, env=tool.clean_env())
        assert probe.returncode != 0  # the LiteRT venv has no torch either
    ours, out = tool.run_example(python, bundle, bundle_run["pngs"])
    assert ours is not None, out
    result = predict_cli(bundle, bundle_run["images"], "--json", "--top", "5")
    assert result.exit_code == 0, result.output
    theirs = {r["image"]: r["top"] for r in json.loads(result.output)["images"]}
    assert set(theirs) == {str(p) for p in bundle_run["pngs"]}  # the folder's images; notes.txt is not one
    for png in bundle_run["pngs"]:
        top5 = ours[str(png.resolve())]
        assert len(top5) == 5
        assert top5[0][0] == theirs[str(png)][0]["label"]
        assert top5[0][1] == pytest.approx(theirs[str(png)][0]["score"], abs=1e-4)  # printed to 4 decimals


def _example_module():
    """The preprocessing every predict.py carries, as a module (common.py)."""
    from importlib import resources

    source = resources.files("rescompress.bundle_examples").joinpath("common.py").read_text()
    namespace: dict = {"__file__": str(ROOT / "predict.py"), "__name__": "example"}
    exec(compile(source, "common.py", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("size, fmt, channels, resize, interpolation", [
    ((300, 200), "JPEG", 3, 37, "bilinear"),  # shrunk a lot: Pillow's JPEG draft decoding is used
    ((41, 29), "PNG", 1, None, "bicubic"),  # the whole image resized, aspect ratio not kept
    ((64, 80), "PNG", 3, 36, "lanczos"),
])
def test_example_preprocessing_equals_the_eval_transform(tmp_path, size, fmt, channels, resize, interpolation):
    from PIL import Image

    from rescompress.data import InputSpec
    from rescompress.data.transforms import EvalTransform
    from rescompress.deploy import Preprocessing, preprocess_from_spec

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
    path = tmp_path / f"img.{fmt.lower()}"
    Image.fromarray(pixels).save(path, format=fmt)
    spec = InputSpec(channels=channels, height=32, width=32, mean=(0.4,) * channels, std=(0.2,) * channels,
                     resize=resize, interpolation=interpolation)
    pre = preprocess_from_spec(spec)
    pre["input"] = {"dtype": "float32", "quantization": None}
    expected = EvalTransform(32, channels, resize, interpolation)(str(path))  # how a run reads an image file
    example = _example_module()
    np.testing.assert_array_equal(example["load_image"](str(path), pre), expected)
    np.testing.assert_array_equal(Preprocessing.from_dict(pre).pixels(str(path)), expected)
    normalised = spec.normalize_numpy(expected[None])
    np.testing.assert_array_equal(example["model_input"](str(path), pre), normalised)  # bit for bit
    np.testing.assert_array_equal(Preprocessing.from_dict(pre).batch(str(path)), normalised)


def test_example_quantizes_an_int8_input_as_the_litert_runner_does(tmp_path):
    from PIL import Image

    example = _example_module()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(tmp_path / "g.png")
    pre = {"color": "L", "resize": None, "crop": {"height": 8, "width": 8}, "interpolation": "bilinear",
           "scale": {"divide_by": 255.0}, "mean": [0.3], "std": [0.4], "layout": "NHWC",
           "input": {"dtype": "int8", "quantization": {"scale": 0.0125, "zero_point": -3}}}
    x = example["model_input"](str(tmp_path / "g.png"), pre)
    assert x.dtype == np.int8 and x.shape == (1, 8, 8, 1)
    f = ((np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8) * 4) / np.float32(255) - np.float32(0.3)) / np.float32(0.4)
    expected = np.clip(np.round(f.transpose(0, 2, 3, 1) / 0.0125 - 3), -128, 127).astype(np.int8)
    np.testing.assert_array_equal(x, expected)
    assert example["logits_of"](np.array([[10, -2]], np.int8), {"output": {"quantization": {
        "scale": 0.5, "zero_point": 2}}}).tolist() == [[4.0, -2.0]]


@pytest.mark.slow
def test_check_bundles_tool_reports_agreement_and_fails_on_a_mismatch(bundle_run, tmp_path, tmp_path_factory):
    tool = check_bundles_tool()
    run_dir = tmp_path / "run"
    shutil.copytree(bundle_run["run_dir"], run_dir,
                    ignore=shutil.ignore_patterns("tflite-*", "tensorrt-*", "onnx-int8*", "checkpoints"))
    work = tmp_path_factory.mktemp("check_work")
    (work / "venv-onnxruntime").symlink_to(clean_python(tmp_path_factory, "onnxruntime").parents[1])
    image = bundle_run["image"]
    rows = tool.check(run_dir, image, [image], work)
    assert [(r["bundle"], r["status"], r["agree"]) for r in rows] == [("onnx-fp32", "ok", 1)]
    # an example that prints the wrong class names disagrees with rescompress predict: the tool says so
    example = run_dir / "bundles" / "onnx-fp32" / "predict.py"
    text = example.read_text()
    assert "name = labels[i] if i < len(labels) else str(i)" in text
    example.write_text(text.replace("name = labels[i] if", "name = labels[(i + 1) % len(labels)] if"))
    assert tool.main([str(run_dir), str(image)]) == 1
