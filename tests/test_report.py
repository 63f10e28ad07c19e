"""Report writing: schema validation, Markdown/HTML/PNG rendering, the Pareto front."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from rescompress.errors import RescompressError
from rescompress.report import (
    pareto_front,
    plot_accuracy_vs_latency,
    render_all,
    render_html,
    render_markdown,
    validate_report,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _latency(source: str, p50: float, **extra: Any) -> dict[str, Any]:
    return {"source": source, "p50_ms": p50, "p90_ms": round(p50 * 1.1, 4), "p99_ms": round(p50 * 1.5, 4),
            "mean_ms": round(p50 * 1.02, 4), "batch": 1, **extra}


def make_report() -> dict[str, Any]:
    """A realistic quickstart report: 2 devices, torch + 4 exported artifacts (one deferred, one failed)."""
    measured = {"warmup": 20, "runs": 200, "threads": 2}
    return {
        "schema_version": 1,
        "rescompress_version": "0.1.0",
        "recipe": {"name": "quickstart", "path": "recipes/quickstart.yaml", "accuracy_budget_pt": 1.0},
        "run": {"dir": "runs/quickstart-20261123-140000", "started": "2026-11-23T14:00:00+00:00",
                "finished": "2026-11-23T14:01:33+00:00", "seconds": 93.2},
        "dataset": {"name": "digits", "num_classes": 10, "sizes": {"train": 1257, "val": 180, "test": 360},
                    "input_spec": {"channels": 1, "height": 16, "width": 16, "mean": [0.3], "std": [0.4],
                                   "layout": "NCHW"},
                    "source": "scikit-learn load_digits"},
        "model": {"name": "resnet20", "weights": None},
        "stages": [
            {"name": "baseline", "kind": "train", "top1": 0.981, "val_top1": 0.983, "params": 272474,
             "macs": 40812544, "size_bytes": 1101234, "seconds": 61.0, "checkpoint": "checkpoints/00-baseline.pt",
             "notes": []},
            {"name": "ptq", "kind": "ptq", "top1": 0.975, "val_top1": None, "params": 272474, "macs": 40812544,
             "size_bytes": 1101234, "seconds": 4.2, "checkpoint": "checkpoints/01-ptq.pt",
             "notes": ["calibrated on 256 training images"]},
        ],
        "artifacts": [
            {"name": "torch-fp32", "target": "torch", "precision": "fp32", "from_stage": "baseline",
             "path": "checkpoints/00-baseline.pt", "status": "ok", "message": "", "size_bytes": 1101234,
             "runtime": "torch 2.13.0", "top1": 0.981, "parity": None, "lint": []},
            {"name": "onnx-fp32", "target": "onnx", "precision": "fp32", "from_stage": "baseline",
             "path": "artifacts/onnx-fp32.onnx", "status": "ok", "message": "", "size_bytes": 1090000,
             "runtime": "onnxruntime 1.31.1", "top1": 0.981,
             "parity": {"max_abs_diff": 2.1e-6, "top1_agreement": 1.0, "reference": "torch-fp32"}, "lint": []},
            {"name": "onnx-int8", "target": "onnx", "precision": "int8", "from_stage": "ptq",
             "path": "artifacts/onnx-int8.onnx", "status": "ok", "size_bytes": 310000,
             "runtime": "onnxruntime 1.31.1", "top1": 0.975,
             "parity": {"max_abs_diff": 0.12, "top1_agreement": 0.989, "reference": "torch-fp32"},
             "lint": [{"target": "tensorrt", "rule": "trt-add-qdq", "node": "/layer2/Add_1", "severity": "warning",
                       "message": "residual Add input is not quantized", "fix": "quantize both Add inputs"}],
             "lint_checked": {"onnxruntime": {"passed": True, "errors": 0, "warnings": 0, "checked": "21 QLinearConv"},
                              "tensorrt": {"passed": True, "errors": 0, "warnings": 1, "checked": "70 nodes"}}},
            {"name": "tensorrt-int8", "target": "tensorrt", "precision": "int8", "from_stage": "ptq",
             "path": "artifacts/tensorrt-int8.onnx", "status": "deferred",
             "message": "engine build deferred: run `trtexec --onnx=tensorrt-int8.onnx --stronglyTyped "
                        "--saveEngine=tensorrt-int8.engine` on the device",
             "size_bytes": 312000, "runtime": None, "top1": None, "parity": None, "lint": []},
            {"name": "tflite-int8", "target": "tflite", "precision": "int8", "from_stage": "ptq", "path": None,
             "status": "failed", "message": "litert-torch is not installed: pip install 'rescompress[tflite]'",
             "size_bytes": None, "runtime": None, "top1": None},
        ],
        "devices": [
            {"name": "host-cpu", "description": "this machine, measured", "accuracy_budget_pt": 1.0,
             "results": [
                 {"artifact": "torch-fp32", "runtime": "torch", "top1": 0.981, "delta_top1_pt": 0.0,
                  "size_bytes": 1101234, "latency": _latency("measured", 0.93, **measured), "status": "ok",
                  "message": ""},
                 {"artifact": "onnx-fp32", "runtime": "onnxruntime", "top1": 0.981, "delta_top1_pt": 0.0,
                  "size_bytes": 1090000, "latency": _latency("measured", 0.41, **measured), "status": "ok",
                  "message": ""},
                 {"artifact": "onnx-int8", "runtime": "onnxruntime", "top1": 0.975, "delta_top1_pt": -0.6,
                  "size_bytes": 310000, "latency": _latency("measured", 0.137, **measured), "status": "ok",
                  "message": ""},
                 {"artifact": "tflite-int8", "runtime": None, "top1": None, "delta_top1_pt": None,
                  "size_bytes": None, "latency": None, "status": "failed", "message": "artifact export failed"},
             ],
             "recommendation": {"artifact": "onnx-int8", "reason": "fastest within 1.0 pt of the baseline"}},
            {"name": "jetson-orin-nano", "description": "Jetson Orin Nano 8GB, 15W", "accuracy_budget_pt": 0.5,
             "results": [
                 {"artifact": "onnx-fp32", "runtime": "onnxruntime", "top1": 0.981, "delta_top1_pt": 0.0,
                  "size_bytes": 1090000, "latency": _latency("estimated", 0.322), "status": "ok"},
                 {"artifact": "onnx-int8", "runtime": "onnxruntime", "top1": 0.975, "delta_top1_pt": -0.6,
                  "size_bytes": 310000, "latency": _latency("measured-remote", 4.05, power_mode="15W", **measured),
                  "status": "ok"},
                 {"artifact": "tensorrt-int8", "runtime": "tensorrt", "top1": None, "delta_top1_pt": None,
                  "size_bytes": 312000, "latency": None, "status": "deferred",
                  "message": "no TensorRT reachable; build the engine on the device"},
             ],
             "recommendation": {"artifact": "onnx-fp32", "reason": "fastest within 0.5 pt of the baseline"},
             "provenance": {
                 "latency": {"tensorrt": "estimated", "onnxruntime": "measured-remote"},
                 "device": {"python": "3.10.12", "onnxruntime": "1.18.0", "power_mode": "NV Power Mode: 15W"},
                 "power_mode_command": "nvpmodel -q",
                 "estimates": {"orin-gpu-tensorrt": {
                     "parameters": {"efficiency": 0.31, "layer_us": 4.2},
                     "figures": [
                         {"device": "jetson-agx-orin", "model": "resnet50", "runtime": "tensorrt", "precision": "int8",
                          "use": "calibrate", "published_ms": 0.64, "estimated_ms": 0.66, "error_pct": 3.1,
                          "statistic": "p90", "source": "MLPerf Inference v3.1"},
                         {"device": "jetson-orin-nano", "model": "resnet18", "runtime": "tensorrt", "precision": "fp16",
                          "use": "holdout", "check": "holdout", "published_ms": 2.0, "estimated_ms": 1.7, "error_pct": -15.0,
                          "statistic": "mean", "source": "NetsPresso docs"}]}}}},
        ],
        "provenance": {"python": "3.11.7", "platform": "Linux-6.8-x86_64", "processor": "x86_64", "cpu_count": 2,
                       "torch": "2.13.0", "onnxruntime": "1.31.1", "onnx": "1.23.2", "numpy": "2.1.3"},
    }


@pytest.fixture
def report() -> dict[str, Any]:
    return make_report()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    run_dir = tmp_path_factory.mktemp("run")
    return write_report(make_report(), run_dir), run_dir


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


# --- writing --------------------------------------------------------------------------------------

def test_write_report_writes_every_file(written: tuple[dict[str, Path], Path]) -> None:
    paths, run_dir = written
    assert set(paths) == {"json", "md", "html", "plot"}
    assert paths["json"] == run_dir / "report.json"
    assert paths["plot"] == run_dir / "plots" / "accuracy_vs_latency.png"
    for name in ("report.json", "report.md", "report.html", "plots/accuracy_vs_latency.png",
                 "plots/accuracy_vs_latency_host-cpu.png", "plots/accuracy_vs_latency_jetson-orin-nano.png"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob(".*.tmp*"))


def test_report_json_round_trips(written: tuple[dict[str, Path], Path]) -> None:
    paths, _ = written
    assert json.loads(paths["json"].read_text(encoding="utf-8")) == make_report()


def test_pngs_are_png(written: tuple[dict[str, Path], Path]) -> None:
    _, run_dir = written
    pngs = sorted((run_dir / "plots").glob("*.png"))
    assert len(pngs) == 3
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_render_all_rerenders_from_json(tmp_path: Path, written: tuple[dict[str, Path], Path]) -> None:
    _, run_dir = written
    (tmp_path / "report.json").write_bytes((run_dir / "report.json").read_bytes())
    paths = render_all(tmp_path)
    assert paths["md"].read_text(encoding="utf-8") == (run_dir / "report.md").read_text(encoding="utf-8")
    assert paths["plot"].read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "report.html").is_file()


def test_render_all_without_report_json(tmp_path: Path) -> None:
    with pytest.raises(RescompressError, match=r"report\.json not found: give the run directory"):
        render_all(tmp_path)


def test_render_all_with_broken_json(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text('{"schema_version": 1,', encoding="utf-8")
    with pytest.raises(RescompressError, match=r"report\.json is not valid JSON"):
        render_all(tmp_path)


def test_write_report_rejects_invalid_before_writing(tmp_path: Path, report: dict[str, Any]) -> None:
    del report["devices"][0]["results"][1]["status"]
    with pytest.raises(RescompressError, match=r"devices\[0\]\.results\[1\]\.status is missing"):
        write_report(report, tmp_path)
    assert not (tmp_path / "report.json").exists()


def test_unfinished_run_and_unplottable_device_render(tmp_path: Path, report: dict[str, Any]) -> None:
    del report["run"]["finished"], report["run"]["seconds"]
    report["devices"] = [{"name": "galaxy-s24", "results": [
        {"artifact": "tensorrt-int8", "status": "skipped", "latency": None}]}]
    paths = write_report(report, tmp_path)
    text = paths["md"].read_text(encoding="utf-8")
    assert "(unfinished)" in text
    assert "- **Recommendation:** none" in text
    assert (tmp_path / "plots" / "accuracy_vs_latency_galaxy-s24.png").read_bytes()[:8] == PNG_SIGNATURE


# --- Markdown -------------------------------------------------------------------------------------

def _table_rows(markdown: str, after_heading: str) -> list[list[str]]:
    """The data rows of the first table after a heading, as stripped cells."""
    section = markdown.split(after_heading, 1)[1]
    lines = [line for line in section.split("\n\n")[2 if after_heading.startswith("## Device") else 1]
             .splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]


def test_markdown_tables(report: dict[str, Any]) -> None:
    text = render_markdown(report)
    assert text.startswith("# rescompress report: quickstart\n")
    for heading in ("## Recommendations", "## Stages", "## Artifacts", "## Device: host-cpu",
                    "## Device: jetson-orin-nano", "## Provenance"):
        assert heading in text
    stages = _table_rows(text, "## Stages")
    assert stages[0] == ["baseline", "train", "98.10", "98.30", "272.5K", "40.8M", "1.1 MB", "61.0"]
    assert stages[1][3] == "—"
    artifacts = {row[0]: row for row in _table_rows(text, "## Artifacts")}
    assert artifacts["onnx-fp32"][8:10] == ["2.1e-06 vs torch-fp32", "100.00"]
    assert artifacts["tensorrt-int8"][4] == "deferred"
    assert artifacts["onnx-int8"][12] == "onnxruntime: passes; tensorrt: passes (1 warning)"
    assert "tensorrt-int8 (deferred): engine build deferred: run `trtexec" in text
    assert "tflite-int8 (failed): litert-torch is not installed" in text
    assert "onnx-int8: [warning] tensorrt trt-add-qdq at /layer2/Add_1: residual Add input is not quantized (fix: quantize both Add inputs)" in text
    assert "- ptq: calibrated on 256 training images" in text


def test_markdown_devices_star_recommendation(report: dict[str, Any]) -> None:
    text = render_markdown(report)
    host = {row[1]: row for row in _table_rows(text, "## Device: host-cpu")}
    # onnx-int8 is fastest, onnx-fp32 is as accurate as torch-fp32 and faster: those two are the front.
    assert [name for name, row in host.items() if row[0] == "★"] == ["onnx-fp32", "onnx-int8"]
    assert host["onnx-int8"][3] == "97.50"
    assert host["onnx-int8"][5:12] == ["-0.60", "—", "0.137", "0.151", "0.205", "310.0 kB", "measured"]
    assert host["onnx-int8"][12] == "batch 1 · 2 threads · 20 warm-up + 200 runs"
    assert host["tflite-int8"][7:12] == ["—", "—", "—", "—", "—"]
    assert "- tflite-int8 (failed): artifact export failed" in text
    assert ("- **Recommendation:** onnx-int8: fastest within 1.0 pt of the baseline "
            "(top-1 97.50 %, p50 0.137 ms measured)") in text
    jetson = {row[1]: row for row in _table_rows(text, "## Device: jetson-orin-nano")}
    assert jetson["onnx-int8"][11] == "measured-remote" and "power mode 15W" in jetson["onnx-int8"][12]
    assert jetson["onnx-fp32"][0] == "★" and jetson["onnx-int8"][0] == ""
    recs = {row[0]: row for row in _table_rows(text, "## Recommendations")}
    assert recs["jetson-orin-nano"][1:7] == ["onnx-fp32", "98.10", "+0.00", "—", "0.322", "estimated"]


def test_markdown_device_provenance_and_estimate_check(report: dict[str, Any]) -> None:
    text = render_markdown(report)
    section = text.split("## Device: jetson-orin-nano", 1)[1]
    assert "- **Latency per runtime:** tensorrt: estimated, onnxruntime: measured-remote" in section
    assert "- **Device power_mode:** NV Power Mode: 15W" in section
    assert "Estimate group orin-gpu-tensorrt: efficiency 0.31, layer_us 4.2" in section
    rows = {(r[0], r[1]): r for r in _table_rows(section, "the full fit for held-out ones.")}
    assert rows[("jetson-orin-nano", "resnet18")][4:9] == ["holdout", "2.00", "mean", "1.70", "-15.0"]
    assert rows[("jetson-agx-orin", "resnet50")][4] == "calibrate"
    host = text.split("## Device: host-cpu", 1)[1].split("## Device:", 1)[0]
    assert "Estimate group" not in host


def test_markdown_every_latency_has_its_source(report: dict[str, Any]) -> None:
    lines = render_markdown(report).splitlines()
    for device in report["devices"]:
        for result in device["results"]:
            latency = result["latency"]
            if latency is None:
                continue
            for key in ("p50_ms", "p90_ms", "p99_ms"):
                value = f"{latency[key]:.3f}" if latency[key] < 1 else f"{latency[key]:.2f}"
                rows = [line for line in lines if f"| {value} |" in line]
                assert rows, (device["name"], result["artifact"], key)
                assert all(f"| {latency['source']} |" in row for row in rows)


def test_markdown_links_plots_and_escapes(report: dict[str, Any]) -> None:
    report["artifacts"][1]["message"] = "a|b <b>bold</b>\nnext"
    report["artifacts"][1]["status"] = "skipped"
    text = render_markdown(report, {"all": "plots/accuracy_vs_latency.png"})
    assert "![Accuracy vs p50 latency, all devices](plots/accuracy_vs_latency.png)" in text
    assert "onnx-fp32 (skipped): a|b &lt;b>bold&lt;/b> next" in text
    assert "<b>" not in text


# --- HTML -----------------------------------------------------------------------------------------

def test_html_self_contained_and_parseable(written: tuple[dict[str, Path], Path]) -> None:
    paths, _ = written
    page = paths["html"].read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(page)
    parser.close()
    assert parser.tags.count("img") == 3
    assert parser.tags.count("table") == 6  # recommendations, stages, artifacts, 2 devices, 1 estimate check
    assert page.count('<img src="data:image/png;base64,') == 3
    assert "<link" not in page and "<script" not in page and "http://" not in page
    text = "".join(parser.text)
    assert "fastest within 1.0 pt of the baseline" in text and "★" in text


def test_html_escapes_text(tmp_path: Path, report: dict[str, Any]) -> None:
    report["artifacts"][1]["name"] = "<script>alert(1)</script>"
    report["devices"][0]["results"][1]["artifact"] = "<script>alert(1)</script>"
    report["devices"][1]["name"] = 'a"&<b>'
    plots = plot_accuracy_vs_latency(report, tmp_path)
    page = render_html(report, plots)
    assert "<script" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Device: a&quot;&amp;&lt;b&gt;" in page
    HTMLParser().feed(page)


# --- validation -----------------------------------------------------------------------------------

def test_fixture_is_valid(report: dict[str, Any]) -> None:
    validate_report(report)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["artifacts"][0].pop("name"), r"^report\.json: artifacts\[0\]\.name is missing"),
        (lambda r: r.pop("provenance"), r"^report\.json: provenance is missing$"),
        (lambda r: r["stages"][0].pop("macs"), r"stages\[0\]\.macs is missing"),
        (lambda r: r["artifacts"][2].update(status="broken"),
         r"artifacts\[2\]\.status is 'broken'; expected one of ok, deferred, failed, skipped"),
        (lambda r: r["devices"][1]["results"][0]["latency"].update(source="guessed"),
         r"devices\[1\]\.results\[0\]\.latency\.source is 'guessed'; expected one of measured, "
         r"measured-remote, estimated"),
        (lambda r: r["devices"][0]["results"][0].update(top1=98.1),
         r"devices\[0\]\.results\[0\]\.top1 is 98\.1; expected a fraction in \[0, 1\]"),
        (lambda r: r["stages"][0].update(params="272k"), r"stages\[0\]\.params is '272k'; expected a finite number"),
        (lambda r: r["devices"][0].update(results=None), r"devices\[0\]\.results is null"),
        (lambda r: r["devices"][0]["results"][0].update(artifact="nope"),
         r"devices\[0\]\.results\[0\]\.artifact 'nope' is not the name of any entry in artifacts"),
        (lambda r: r["devices"][0]["recommendation"].update(artifact="tensorrt-int8"),
         r"devices\[0\]\.recommendation\.artifact 'tensorrt-int8' is not among this device's results"),
        (lambda r: r["artifacts"][2]["lint"][0].update(severity="fatal"),
         r"artifacts\[2\]\.lint\[0\]\.severity is 'fatal'; expected one of error, warning, info"),
        (lambda r: r["artifacts"][1].update(name="torch-fp32"),
         r"artifacts\[1\]\.name 'torch-fp32' repeats artifacts\[0\]\.name"),
        (lambda r: r["stages"].reverse(), r"stages\[0\]\.name is 'ptq'; the first stage must be 'baseline'"),
        (lambda r: r["devices"][0]["results"][0]["latency"].update(p50_ms=float("nan")),
         r"latency\.p50_ms is nan; expected a finite number"),
    ],
)
def test_validate_report_names_the_field(report: dict[str, Any], mutate: Any, message: str) -> None:
    mutate(report)
    with pytest.raises(RescompressError, match=message):
        validate_report(report)


def test_validate_report_lists_every_problem(report: dict[str, Any]) -> None:
    del report["artifacts"][0]["name"], report["devices"][1]["results"][2]["status"]
    with pytest.raises(RescompressError, match=r"artifacts\[0\]\.name is missing; .*"
                                               r"devices\[1\]\.results\[2\]\.status is missing"):
        validate_report(report)


def test_validate_report_rejects_numpy_numbers(report: dict[str, Any]) -> None:
    np = pytest.importorskip("numpy")
    report["stages"][0]["top1"] = np.float32(0.98)
    with pytest.raises(RescompressError, match=r"stages\[0\]\.top1 is .*\(numpy\.float32\); expected a fraction"):
        validate_report(report)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_validate_report_rejects_unknown_schema_version(report: dict[str, Any], version: Any) -> None:
    report["schema_version"] = version
    with pytest.raises(RescompressError, match=r"schema_version .* is not supported; this rescompress reads "
                                               r"schema_version 1"):
        validate_report(report)


def test_validate_report_rejects_non_object() -> None:
    with pytest.raises(RescompressError, match=r"the top level is \[\]; expected an object"):
        validate_report([])  # type: ignore[arg-type]


def test_optional_fields_may_be_absent(report: dict[str, Any]) -> None:
    minimal = copy.deepcopy(report)
    for key in ("val_top1", "notes", "kind", "seconds", "checkpoint"):
        minimal["stages"][0].pop(key)
    for artifact in minimal["artifacts"]:
        for key in ("parity", "lint", "message", "top1", "runtime", "size_bytes", "path", "from_stage"):
            artifact.pop(key, None)
    for device in minimal["devices"]:
        device.pop("recommendation")
        device.pop("description")
    minimal["model"].pop("weights")
    minimal["dataset"] = {"name": "digits"}
    minimal["run"] = {"dir": "runs/x", "started": "2026-11-23T14:00:00"}
    validate_report(minimal)
    assert "—" in render_markdown(minimal)


# --- Pareto front ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("rows", "front"),
    [
        ([], set()),
        ([(1.0, 0.9)], {0}),
        ([(1.0, 0.9), (2.0, 0.95), (0.5, 0.8)], {0, 1, 2}),  # a trade-off curve
        ([(1.0, 0.9), (2.0, 0.85)], {0}),  # slower and worse
        ([(1.0, 0.9), (1.0, 0.9)], {0, 1}),  # exact tie: neither dominates
        ([(1.0, 0.9), (1.0, 0.85)], {0}),  # same speed, less accurate
        ([(1.0, 0.9), (1.5, 0.9)], {0}),  # same accuracy, slower
        ([(None, 0.99), (1.0, None), (2.0, 0.5)], {2}),  # unknowns are left out
    ],
)
def test_pareto_front(rows: list[tuple[float | None, float | None]], front: set[int]) -> None:
    assert pareto_front(rows) == front


# --- lean import ----------------------------------------------------------------------------------

def test_import_does_not_load_matplotlib() -> None:
    code = "import rescompress.report, sys; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_markdown_shows_a_top1_that_failed_and_an_unchecked_estimate(report: dict[str, Any]) -> None:
    trt = next(a for a in report["artifacts"] if a["name"] == "tensorrt-int8")
    trt.update(top1=None, top1_status="failed", top1_message="proxy: onnxruntime: InvalidGraph: bad node")
    jetson = next(d for d in report["devices"] if d["name"] == "jetson-orin-nano")
    row = next(r for r in jetson["results"] if r["artifact"] == "tensorrt-int8")
    row.update(top1_status="failed", top1_message=trt["top1_message"])
    estimated = next(r for r in jetson["results"] if (r.get("latency") or {}).get("source") == "estimated")
    estimated["latency"].pop("check_max_abs_error_pct", None)
    estimated["latency"]["check"] = "unchecked: no published figure of this runtime/precision (tensorrt int8)"
    validate_report(report)
    text = render_markdown(report)
    artifacts = {r[0]: r for r in _table_rows(text, "## Artifacts")}
    assert artifacts["tensorrt-int8"][5] == "failed" and "InvalidGraph: bad node" in artifacts["tensorrt-int8"][7]
    assert "tensorrt-int8: no top-1: proxy: onnxruntime: InvalidGraph: bad node" in text
    device = {r[1]: r for r in _table_rows(text, "## Device: jetson-orin-nano")}
    assert device["tensorrt-int8"][3] == "failed"
    assert device[estimated["artifact"]][11] == "estimated (unchecked)"
