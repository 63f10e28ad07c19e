"""Accuracy measured on the device itself: recipes run against boards behind the tests' real sshd on
127.0.0.1, whose runner evaluates the packed test and validation images through each artifact. The
hardware is this machine, so each device top-1 must equal the host's; a board that lacks its runtime gives a
status and the report is still written. TensorRT's path runs against a fake trtexec (no GPU here): no real
engine is built."""

from __future__ import annotations

import copy
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from rescompress.bench.device_eval import build_eval_set, pack_for, score, stratified_subset
from rescompress.pipeline import execute, prepare_new
from rescompress.report import validate_report
from tests import fake_adb
from tests.conftest import TINY_RECIPE, write_recipe
from tests.fake_trtexec import GPU, HEADER, VERSION, fake_trtexec
from tests.remote_device import python_without, sshd  # noqa: F401 (sshd: a fixture)

LITERT_MODULES = ("ai_edge_litert", "tflite_runtime", "tensorflow")


def board(tmp_path: Path, sshd, name: str, runtimes: dict, **ssh) -> str:
    """A device profile reached over the test sshd, with this venv's Python as the device's."""
    workdir = tmp_path / f"{name} workdir"
    workdir.mkdir()
    conn = sshd.connection(workdir).model_dump()
    conn.update(ssh)
    path = tmp_path / f"{name}.yaml"
    extra = {k: conn.pop(k) for k in ("trtexec",) if k in conn}
    path.write_text(yaml.safe_dump({"name": name, "runtimes": runtimes, "connection": {"ssh": conn}, **extra}))
    return str(path)


def phone_profile(tmp_path: Path, name: str, **config) -> tuple[str, "fake_adb.FakePhone"]:
    """A phone reached through the fake adb (no phone or adbd is reachable here)."""
    phone = fake_adb.install(tmp_path / name)
    if config:
        phone.configure(**config)
    conn = phone.connection(delegates=["xnnpack", "gpu"]).model_dump()
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "runtimes": {"tflite": {}}, "connection": {"adb": conn}}))
    return str(path), phone


def run(tmp_path: Path, recipe: dict):
    from rich.console import Console

    plan, run_dir, manifest = prepare_new(write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path / "runs")
    return execute(plan, run_dir, manifest, Console(quiet=True)), run_dir


def results(report: dict, device: str) -> dict:
    return {r["artifact"]: r for r in next(d for d in report["devices"] if d["name"] == device)["results"]}


# ------------------------------------------------------------------------------------------------ units

def test_stratified_subset_keeps_class_shares():
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    idx = stratified_subset(labels, 10, seed=0)
    assert len(idx) == 10 and list(np.bincount(labels[idx])) == [4, 3, 2, 1]
    assert np.all(np.diff(idx) > 0)
    assert list(stratified_subset(labels, None)) == list(range(100))
    assert list(stratified_subset(labels, 500)) == list(range(100))


def test_score_compares_device_and_host_on_the_same_images(digits_small, tmp_path):
    spec = digits_small.input_spec
    eval_set = build_eval_set({"val_top1": digits_small.val, "top1": digits_small.test}, spec, 20, tmp_path)
    assert eval_set.subset and eval_set.describe().startswith("20 of ")
    images = np.load(eval_set.path)
    assert images.shape == (40, *spec.shape) and images.dtype == np.float32
    n_test = len(digits_small.test)
    rng = np.random.default_rng(0)
    host = {"top1": rng.standard_normal((n_test, 10)).astype(np.float32),
            "val_top1": rng.standard_normal((len(digits_small.val), 10)).astype(np.float32)}
    device = np.concatenate([host["val_top1"][eval_set.indices["val_top1"]], host["top1"][eval_set.indices["top1"]]])
    device[-1] = -device[-1]  # one prediction differs
    out = score(device, eval_set, host)
    assert out["val_top1"]["agreement"] == 1.0 and out["val_top1"]["delta_pt"] == 0
    assert out["top1"]["agreement"] == pytest.approx(19 / 20) and out["top1"]["of"] == n_test
    with pytest.raises(ValueError, match="logits of shape"):
        score(device[:5], eval_set, host)


# ------------------------------------------------------------------------------- recipes over ssh

@pytest.mark.slow
@pytest.mark.tflite
def test_device_top1_over_ssh_equals_the_host_top1(sshd, tmp_path):
    """Two boards (onnxruntime, LiteRT) return each artifact's top-1 measured on the board; a third lacks
    LiteRT and gives its status, and the report is still written. Two phones behind the fake adb: one
    measures with benchmark_model (XNNPACK, then the GPU delegate) and evaluates through its output dump;
    on the other the GPU delegate fails."""
    pytest.importorskip("litert_torch", reason="needs the 'tflite' extra: pip install 'rescompress[tflite]'")
    ort_board = board(tmp_path, sshd, "board-ort", {"onnxruntime": {}})
    litert_board = board(tmp_path, sshd, "board-litert", {"tflite": {}})
    bare_board = board(tmp_path, sshd, "board-no-litert", {"tflite": {}},
                       python=shlex.join(python_without(tmp_path, *LITERT_MODULES)))
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe.update(stages=[{"ptq": {"scheme": "tflite", "calibration_batches": 2}}],
                  export=[{"onnx": {"precision": "fp32"}}, {"tflite": {"precision": "fp32"}},
                          {"tflite": {"precision": "int8"}}],
                  devices=[ort_board, litert_board, bare_board])

    recipe["report"] = {**recipe["report"], "device_eval_images": None}
    report, run_dir = run(tmp_path, recipe)
    validate_report(json.loads((run_dir / "report.json").read_text()))
    host = {a["name"]: a for a in report["artifacts"]}

    checked = 0
    for device, names in (("board-ort", ["onnx-fp32"]), ("board-litert", ["tflite-fp32", "tflite-int8"])):
        rows = results(report, device)
        for name in names:
            r = rows[name]
            ev = r["device_eval"]
            assert ev["status"] == "ok", ev
            assert r["top1_source"] == "device" and r["host_top1"] == host[name]["top1"]
            assert ev["subset"] is False and ev["splits"]["top1"]["images"] == report["dataset"]["sizes"]["test"]
            for key in ("top1", "val_top1"):
                split = ev["splits"][key]
                assert split["device_top1"] == split["host_top1"] == host[name][key]
                assert split["agreement"] == 1.0 and split["delta_pt"] == 0
                assert r[key] == pytest.approx(host[name][key])
            checked += 1
    assert checked == 3
    assert results(report, "board-litert")["tflite-int8"]["device_eval"]["method"].startswith(
        ("ai-edge-litert", "tflite-runtime", "tensorflow"))

    missing = results(report, "board-no-litert")["tflite-fp32"]
    assert missing["remote_status"] == "runtime-missing" and "ai-edge-litert" in missing["message"]
    assert missing["device_eval"]["status"] == "runtime-missing" and missing["top1_source"] != "device"
    packed = np.load(run_dir / "device_eval" / "images_tflite-int8.npy")
    assert packed.dtype == np.int8 and packed.shape[1:] == (1, 8, 8)  # quantized with the model's own input scale

    md = (run_dir / "report.md").read_text()
    assert "device top-1" in md.lower() and "board-no-litert" in md
    for workdir in tmp_path.glob("* workdir"):
        assert list(workdir.iterdir()) == [], f"{workdir.name}: the device's temporary directory is removed"


@pytest.mark.slow
@pytest.mark.tflite
def test_phones_over_adb_measure_latency_and_top1(tmp_path):
    """Two phones behind the fake adb (no phone or adbd is reachable here): one measures with benchmark_model
    (XNNPACK, then the GPU delegate) and evaluates a stratified subset through benchmark_model's output dump;
    on the other the GPU delegate fails, which is its status and not the run's end."""
    pytest.importorskip("litert_torch", reason="needs the 'tflite' extra: pip install 'rescompress[tflite]'")
    phone, fake_phone = phone_profile(tmp_path, "phone")
    bad_phone, _ = phone_profile(tmp_path, "phone-gpu-fails", fail="gpu")
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe.update(stages=[{"ptq": {"scheme": "tflite", "calibration_batches": 2}}],
                  export=[{"tflite": {"precision": "int8"}}], devices=[phone, bad_phone])
    recipe["report"] = {**recipe["report"], "device_eval_images": 10}
    report, run_dir = run(tmp_path, recipe)
    validate_report(json.loads((run_dir / "report.json").read_text()))
    on_phone = results(report, "phone")["tflite-int8"]
    ev = on_phone["device_eval"]
    assert ev["status"] == "ok" and ev["subset"] is True and on_phone["top1_source"] == "device"
    for split in ev["splits"].values():  # the same LiteRT on the same CPU: the same predictions
        assert split["images"] == 10 and split["device_top1"] == split["host_top1"] and split["agreement"] == 1.0
    assert on_phone["latency"]["host"] == f"adb:{fake_phone.serial}" and on_phone["latency"]["statistic"] in ("p50", "mean")
    assert on_phone["latency"]["delegate"] == "xnnpack" and "p50_ms" in on_phone["latency"]["delegates"]["gpu"]
    assert on_phone["device_eval"]["method"].startswith("benchmark_model")
    facts = next(d for d in report["devices"] if d["name"] == "phone")["provenance"]["device"]
    assert facts["android_version"] == "14" and "SM8650" in facts["soc"]
    gpu_fails = results(report, "phone-gpu-fails")["tflite-int8"]
    assert gpu_fails["remote_status"] == "ok" and gpu_fails["latency"]["delegates"]["gpu"]["status"] == "failed"
    assert "GPU delegate" in gpu_fails["latency"]["delegates"]["gpu"]["message"]
    assert any(f["use_gpu"] == "true" for f in fake_phone.benchmark_calls() if "use_gpu" in f)
    assert fake_phone.leftovers() == []
    md = (run_dir / "report.md").read_text()
    assert "never on a real phone" in md and f"adb:{fake_phone.serial}" in md


@pytest.mark.slow
def test_a_subset_is_stratified_and_the_device_figure_is_paired(sshd, tmp_path):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["devices"] = [board(tmp_path, sshd, "board-ort", {"onnxruntime": {}})]
    recipe["report"] = {**recipe["report"], "device_eval_images": 30}
    report, run_dir = run(tmp_path, recipe)
    r = results(report, "board-ort")["onnx-fp32"]
    ev = r["device_eval"]
    assert ev["status"] == "ok" and ev["subset"] is True
    assert ev["splits"]["top1"]["images"] == 30 and ev["images"].startswith("30 of ")
    assert r["top1"] == pytest.approx(r["host_top1"] + ev["splits"]["top1"]["delta_pt"] / 100)
    assert np.load(run_dir / "device_eval" / "images.npy").shape[0] == 60


# ---------------------------------------------------------------------------------------- TensorRT

@pytest.mark.slow
def test_trtexec_builds_times_and_evaluates_on_the_device(sshd, tmp_path):
    """A Jetson-like board whose trtexec is the fake: the deferred engine is built there with the command the
    report prints, timed, and run on the packed images through --loadInputs/--exportOutput; the engine file
    comes back with the TensorRT version and GPU trtexec reported. No real engine is built: the fake answers
    from onnxruntime on the same ONNX, so the device top-1 equals the host's proxy top-1."""
    fake, log = fake_trtexec(tmp_path)
    jetson = board(tmp_path, sshd, "jetson-fake", {"tensorrt": {"precisions": ["fp16", "int8"]}}, trtexec=str(fake))
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe.update(export=[{"tensorrt": {"precision": "fp16", "max_batch": 16}}], devices=[jetson])
    report, run_dir = run(tmp_path, recipe)
    art = next(a for a in report["artifacts"] if a["name"] == "tensorrt-fp16")
    assert art["status"] == "deferred" and art["top1_source"].startswith("proxy")
    r = results(report, "jetson-fake")["tensorrt-fp16"]
    assert r["remote_status"] == "ok" and r["latency"]["source"] == "measured-remote"
    assert r["device_eval"]["status"] == "ok" and r["top1_source"] == "device"
    test = r["device_eval"]["splits"]["top1"]
    assert test["device_top1"] == test["host_top1"] == art["top1"] and test["agreement"] == 1.0

    engine = r["engine"]
    assert engine["tensorrt_version"] == VERSION and engine["gpu"] == GPU
    saved = run_dir / engine["path"]
    assert saved.is_file() and saved.read_bytes().startswith(HEADER)
    assert engine["build_command"] == art["details"]["build_commands"]["jetson-fake"]  # the command it prints

    calls = [json.loads(line)["argv"] for line in log.read_text().splitlines()]
    build = [c for c in calls if any(a.startswith("--onnx=") for a in c)]
    evals = [c for c in calls if any(a.startswith("--loadInputs=") for a in c)]
    assert len(build) == 1 and "--fp16" in build[0] and "--maxShapes=input:16x1x8x8" in build[0]
    n = report["dataset"]["sizes"]["test"] + report["dataset"]["sizes"]["val"]
    assert len(evals) == -(-n // 16)  # chunks of at most the profile's max batch
    assert all("--exportOutput=eval_chunk.json" in c and "--iterations=1" in c for c in evals)
    md = (run_dir / "report.md").read_text()
    assert "engines/jetson-fake" in md and r["message"].startswith("engine built on jetson-fake")


@pytest.mark.slow
def test_trtexec_out_of_memory_is_a_status(sshd, tmp_path):
    fake, _ = fake_trtexec(tmp_path, oom=True)
    jetson = board(tmp_path, sshd, "jetson-oom", {"tensorrt": {"precisions": ["fp16"]}}, trtexec=str(fake))
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe.update(export=[{"tensorrt": {"precision": "fp16"}}], devices=[jetson])
    report, run_dir = run(tmp_path, recipe)
    r = results(report, "jetson-oom")["tensorrt-fp16"]
    assert r["remote_status"] == "out-of-memory" and "OutOfMemory" in r["message"]
    assert r["device_eval"]["status"] == "out-of-memory"
    assert (run_dir / "report.md").is_file()


def test_pack_for_onnx_is_the_float_file(digits_small, tmp_path):
    from rescompress.export.artifact import Artifact

    eval_set = build_eval_set({"top1": digits_small.test}, digits_small.input_spec, 10, tmp_path)
    art = Artifact(name="m", target="onnx", precision="fp32", path=tmp_path / "m.onnx",
                   input_spec=digits_small.input_spec, runtime="onnxruntime")
    assert pack_for(art, eval_set, tmp_path) == eval_set.path


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
