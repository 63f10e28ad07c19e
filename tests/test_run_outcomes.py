"""What a finished run tells its user: the TensorRT proxy top-1 is the QDQ graph's own, every failure is a
typed entry of report.json, and `rescompress run` exits 1 when anything it was asked for failed."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from rescompress.cli import app
from rescompress.pipeline import Runner, execute, failures, prepare_new
from rescompress.report import validate_report
from tests.conftest import TINY_RECIPE, write_recipe


def _tiny(**changes) -> dict:
    data = copy.deepcopy(TINY_RECIPE)
    data.update(changes)
    return data


ONE_EPOCH = {"epochs": 1, "batch_size": 64, "lr": 0.05}


def _cli_run(tmp_path, data: dict):
    """`rescompress run` of `data` through the CLI: its result, run directory and report.json."""
    recipe = write_recipe(tmp_path / "r.yaml", data)
    result = CliRunner().invoke(app, ["run", str(recipe), "--out", str(tmp_path / "runs")])
    (run_dir,) = (tmp_path / "runs").iterdir()
    return result, run_dir, json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def tensorrt_run(tmp_path_factory):
    """One run of a PTQ model in TensorRT's layout, exported as an int8 ONNX and as a (deferred) TensorRT
    engine: the same QDQ graph twice."""
    from rich.console import Console

    tmp = tmp_path_factory.mktemp("trt")
    data = _tiny(stages=[{"ptq": {"scheme": "tensorrt", "calibration_batches": 2}}],
                 export=[{"onnx": {"precision": "int8"}}, {"tensorrt": {"precision": "int8"}}],
                 devices=["jetson-orin-nano", "host-cpu"])
    plan, run_dir, manifest = prepare_new(write_recipe(tmp / "r.yaml", data), tmp / "runs")
    return execute(plan, run_dir, manifest, Console(quiet=True)), run_dir


def test_the_tensorrt_proxy_runs_the_qdq_graph_as_written(tensorrt_run):
    report, _ = tensorrt_run
    validate_report(report)
    arts = {a["name"]: a for a in report["artifacts"]}
    trt, onnx = arts["tensorrt-int8"], arts["onnx-int8"]
    assert trt["status"] == "deferred" and onnx["status"] == "ok"
    assert trt["top1_source"].startswith("proxy:") and "unfused" in trt["top1_source"]
    # the engine's ONNX and the int8 ONNX are the same graph from the same model: same predictions, same logits
    assert trt["top1"] == onnx["top1"] and trt["val_top1"] == onnx["val_top1"]
    assert trt["parity"]["reference"] == onnx["parity"]["reference"] == "torch-int8"
    assert trt["parity"]["max_abs_diff"] == pytest.approx(onnx["parity"]["max_abs_diff"], abs=1e-6)
    assert trt["parity"]["top1_agreement"] == onnx["parity"]["top1_agreement"]


def test_device_results_carry_validation_top1_and_the_choice_is_made_on_it(tensorrt_run):
    report, _ = tensorrt_run
    baseline = report["stages"][0]
    for device in report["devices"]:
        for r in device["results"]:
            if r.get("top1") is None:
                continue
            assert r["delta_top1_pt"] == pytest.approx((r["top1"] - baseline["top1"]) * 100, abs=1e-3)
            assert r["delta_val_top1_pt"] == pytest.approx((r["val_top1"] - baseline["val_top1"]) * 100, abs=1e-3)
        rec = device["recommendation"]
        if rec is not None:
            assert rec["selected_on"] == "validation" and "not used to choose" in rec["reason"]


def test_a_deferred_engine_is_not_a_failure(tensorrt_run):
    report, _ = tensorrt_run
    assert failures(report) == []


def test_a_lint_error_ends_the_run_with_exit_1_and_a_full_report(tmp_path, monkeypatch):
    """The onnxruntime lint finds an int8 layer it cannot fuse (injected as the lint's own finding: the run's
    handling of a lint error is under test; the rules have their tests in test_lint.py)."""
    import rescompress.export.lint as lint

    real = lint.lint_file

    def with_an_error(path, target, *args, **kwargs):
        result = real(path, target, *args, **kwargs)
        result.findings.append(lint.Finding("ort-unfused", "error", "/layer1/Conv", "left in float", "fuse it"))
        return result

    monkeypatch.setattr(lint, "lint_file", with_an_error)
    result, run_dir, report = _cli_run(tmp_path, _tiny(train=ONE_EPOCH))
    assert result.exit_code == 1, result.output
    validate_report(report)
    assert (run_dir / "report.md").is_file() and (run_dir / "report.html").is_file()
    assert "failure(s)" in result.output and "onnx-fp32: onnxruntime lint: 1 error(s) (ort-unfused)" in result.output
    assert failures(report) == ["onnx-fp32: onnxruntime lint: 1 error(s) (ort-unfused)"]


def test_an_int8_onnx_in_onnxruntimes_layout_is_not_judged_as_a_tensorrt_file(tmp_path):
    """A recipe that lists a Jetson and ships onnxruntime's int8 layout: the file runs in onnxruntime (on the
    host and on the Jetson's CPU), so it is linted for onnxruntime only, and the run succeeds."""
    data = _tiny(stages=[{"ptq": {"scheme": "onnxruntime", "calibration_batches": 2}}],
                 export=[{"onnx": {"precision": "int8"}}], devices=["host-cpu", "jetson-orin-nano"])
    result, _, report = _cli_run(tmp_path, data)
    assert result.exit_code == 0, result.output
    onnx = next(a for a in report["artifacts"] if a["name"] == "onnx-int8")
    assert list(onnx["lint_checked"]) == ["onnxruntime"] and onnx["lint_checked"]["onnxruntime"]["passed"]


def test_a_failed_export_ends_the_run_with_exit_1_and_a_full_report(tmp_path, monkeypatch):
    """The ONNX exporter breaks on the model (injected here: the handling of any exporter error is under
    test, not the exporter)."""
    import dataclasses

    from rescompress.export import TARGETS

    def broken(*args, **kwargs):
        raise RuntimeError("the exporter met an operator it does not know")

    monkeypatch.setitem(TARGETS._items, "onnx", dataclasses.replace(TARGETS.get("onnx"), export=broken))
    result, run_dir, report = _cli_run(tmp_path, _tiny(train=ONE_EPOCH))
    assert result.exit_code == 1, result.output
    validate_report(report)
    onnx = next(a for a in report["artifacts"] if a["name"] == "onnx-fp32")
    assert onnx["status"] == "failed" and "operator it does not know" in onnx["message"]
    assert "onnx-fp32: export failed" in result.output
    assert (run_dir / "report.md").is_file()


def test_a_run_where_everything_worked_exits_0(tmp_path):
    result, _, _ = _cli_run(tmp_path, _tiny(train=ONE_EPOCH))
    assert result.exit_code == 0, result.output
    assert "failure(s)" not in result.output


def test_a_proxy_that_cannot_run_is_a_typed_failure(tmp_path, digits_small):
    from rescompress.export import Artifact

    bad = tmp_path / "tensorrt-int8.onnx"
    bad.write_bytes(b"not an onnx file")
    art = Artifact(name="tensorrt-int8", target="tensorrt", precision="int8", path=bad,
                   input_spec=digits_small.input_spec, runtime="TensorRT (not built)", status="deferred")
    x = np.zeros((4, 1, 8, 8), np.float32)
    row = Runner._proxy_accuracy(Runner.__new__(Runner), art, {"top1": (x, np.zeros(4, np.int64))}, None)
    assert row["top1"] is None and row["top1_status"] == "failed" and row["top1_message"].startswith("proxy:")
    report = {"artifacts": [{"name": "tensorrt-int8", "status": "deferred", **row}], "devices": []}
    assert failures(report) == [f"tensorrt-int8: top-1 not measured: {row['top1_message']}"]


def test_a_crashed_lint_is_an_error_finding(tmp_path, digits_small):
    from rescompress.export import Artifact

    art = Artifact(name="onnx-fp32", target="onnx", precision="fp32", path=tmp_path / "m.onnx",
                   input_spec=digits_small.input_spec, runtime="onnxruntime")
    art.add_lint_crash("onnxruntime", ValueError("bad graph"))
    assert art.lint_checked["onnxruntime"]["status"] == "crashed" and not art.lint_checked["onnxruntime"]["passed"]
    (finding,) = art.lint
    assert finding["rule"] == "lint-crashed" and finding["severity"] == "error" and "bad graph" in finding["message"]
    report = {"artifacts": [art.to_report()], "devices": []}
    assert failures(report) == ["onnx-fp32: onnxruntime lint: 1 error(s) (lint-crashed)"]


def test_the_pipeline_records_a_lint_crash(tmp_path, monkeypatch):
    import rescompress.export.lint as lint

    def crash(path, target, *args, **kwargs):
        raise ValueError("the graph could not be read")

    monkeypatch.setattr(lint, "lint_file", crash)
    result, run_dir, report = _cli_run(tmp_path, _tiny(train=ONE_EPOCH))
    assert result.exit_code == 1, result.output
    onnx = next(a for a in report["artifacts"] if a["name"] == "onnx-fp32")
    assert onnx["lint_checked"]["onnxruntime"]["status"] == "crashed"
    assert any(f["rule"] == "lint-crashed" for f in onnx["lint"])
    assert "onnxruntime: CRASHED" in (run_dir / "report.md").read_text()


def test_a_shadowing_local_profile_is_printed_before_the_plan(tmp_path, monkeypatch):
    import shutil

    from rescompress.devices import BUILTIN_DIR

    (tmp_path / "devices").mkdir()
    shutil.copyfile(BUILTIN_DIR / "host-cpu.yaml", tmp_path / "devices" / "host-cpu.yaml")
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", _tiny())
    result = CliRunner().invoke(app, ["run", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: device 'host-cpu': using" in text and "shadows the built-in profile" in text
    assert text.index("warning:") < text.index("plan is valid")


def test_resume_keeps_the_exports_and_runs_them_as_exported(tensorrt_run):
    """The unfused QDQ reference and the deferred engine come back from the manifest with the same runner
    and details: the resumed report's accuracy figures are the first run's."""
    from rich.console import Console

    from rescompress.pipeline import prepare_resume

    report, run_dir = tensorrt_run
    files = {p.name: p.stat().st_mtime_ns for p in (run_dir / "artifacts").iterdir()}
    plan, _, manifest = prepare_resume(run_dir)
    again = execute(plan, run_dir, manifest, Console(quiet=True))
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "artifacts").iterdir()} == files
    before, after = ({a["name"]: a for a in r["artifacts"]} for r in (report, again))
    for name in ("onnx-int8", "tensorrt-int8"):
        for key in ("status", "runtime", "top1", "val_top1", "top1_source", "parity", "lint_checked", "details"):
            assert after[name][key] == before[name][key], (name, key)
