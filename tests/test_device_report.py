"""The per-device report: a recipe over several devices labels every latency with its source, estimates
devices it cannot reach, and still writes the report when a device's connection fails."""

from __future__ import annotations

import copy
import json
import socket

import pytest
import yaml

from rescompress.devices import available_devices
from rescompress.pipeline import execute, prepare_new
from rescompress.report import validate_report
from tests.conftest import TINY_RECIPE, write_recipe
from tests.remote_device import keygen, python_without, sshd  # noqa: F401 (sshd: a fixture)

pytestmark = pytest.mark.slow


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remote_profile(tmp_path, name: str, ssh: dict, **fields) -> str:
    """The Raspberry Pi profile with an ssh connection: its estimates stay available as the fallback."""
    data = yaml.safe_load(available_devices()["raspberry-pi-5"].read_text(encoding="utf-8"))
    data.update(name=name, connection={"ssh": ssh}, **fields)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def run_recipe(tmp_path, devices: list[str], export=None):
    from rich.console import Console

    data = copy.deepcopy(TINY_RECIPE)
    data["devices"] = devices
    if export is not None:
        data["export"] = export
    plan, run_dir, manifest = prepare_new(write_recipe(tmp_path / "tiny.yaml", data), tmp_path / "runs")
    return execute(plan, run_dir, manifest, Console(quiet=True)), run_dir


def test_unreachable_device_is_a_status_and_the_report_is_written(tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text("", encoding="utf-8")
    pi = remote_profile(tmp_path, "pi-offline", {"host": "127.0.0.1", "port": closed_port(), "user": "pi",
                                                "known_hosts": str(known), "connect_timeout_s": 5})
    report, run_dir = run_recipe(tmp_path, ["host-cpu", "raspberry-pi-5", pi])
    validate_report(json.loads((run_dir / "report.json").read_text()))
    by_name = {d["name"]: d for d in report["devices"]}
    assert list(by_name) == ["host-cpu", "raspberry-pi-5", "pi-offline"]

    host = {r["artifact"]: r for r in by_name["host-cpu"]["results"]}
    assert host["onnx-fp32"]["latency"]["source"] == "measured"
    assert host["onnx-fp32"]["top1_source"].startswith("onnxruntime") and "this host" in host["onnx-fp32"]["top1_source"]

    pi_rows = {r["artifact"]: r for r in by_name["raspberry-pi-5"]["results"]}
    est = pi_rows["onnx-fp32"]["latency"]
    assert est["source"] == "estimated" and est["p50_ms"] > 0 and est["group"] == "arm-cortex-a-cpu"
    assert pi_rows["torch-fp32"]["latency"] is None  # a reference: torch does not run on the Pi
    assert by_name["raspberry-pi-5"]["recommendation"]["artifact"] == "onnx-fp32"
    checks = by_name["raspberry-pi-5"]["provenance"]["estimates"]["arm-cortex-a-cpu"]["figures"]
    assert {f["check"] for f in checks} == {"leave-one-out"} and len(checks) == 2

    offline = {r["artifact"]: r for r in by_name["pi-offline"]["results"]}["onnx-fp32"]
    assert offline["remote_status"] == "unreachable"
    assert "refused" in offline["message"] and "latency estimated instead" in offline["message"]
    assert offline["latency"]["source"] == "estimated"
    assert offline["latency"]["p50_ms"] == pytest.approx(est["p50_ms"])
    assert "unreachable" in by_name["pi-offline"]["provenance"]["connection"]

    md = (run_dir / "report.md").read_text()
    assert "estimated (arm-cortex-a-cpu; unchecked)" in md and "measured-remote failed (unreachable)" in md
    assert "leave-one-out" in md and "NetsPresso" in md
    for device in report["devices"]:  # every latency says where it came from
        for r in device["results"]:
            assert r["latency"] is None or r["latency"]["source"] in ("measured", "estimated")


def test_a_recipe_measures_on_a_device_over_ssh(sshd, tmp_path):
    """One run, three boards behind a real sshd: one answers, one refuses the key, one lacks onnxruntime."""
    import shlex
    import sys

    workdir = tmp_path / "device dir"
    workdir.mkdir()
    base = {"host": "127.0.0.1", "port": sshd.port, "user": sshd.connection(workdir).user,
            "key": str(sshd.client_key), "known_hosts": str(sshd.known_hosts), "python": sys.executable,
            "workdir": str(workdir), "connect_timeout_s": 5}
    ok = remote_profile(tmp_path, "board", base, power_mode_command="/bin/echo MODE_15W")
    wrong_key = remote_profile(tmp_path, "board-wrong-key", {**base, "key": str(keygen(tmp_path / "stranger"))})
    no_ort = remote_profile(tmp_path, "board-no-ort", {
        **base, "python": shlex.join(python_without(tmp_path, "onnxruntime"))})

    report, run_dir = run_recipe(tmp_path, ["host-cpu", ok, wrong_key, no_ort])
    by_name = {d["name"]: d for d in report["devices"]}
    row = {r["artifact"]: r for r in by_name["board"]["results"]}["onnx-fp32"]
    lat = row["latency"]
    assert row["remote_status"] == "ok" and lat["source"] == "measured-remote"
    assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] and lat["runs"] == 10 and lat["warmup"] == 2
    assert lat["power_mode"] == "MODE_15W" and lat["host"].endswith(f"@127.0.0.1:{sshd.port}")
    facts = by_name["board"]["provenance"]["device"]
    assert facts["runtime"] == "onnxruntime" and facts["runtime_version"] and facts["power_mode"] == "MODE_15W"
    assert list(workdir.iterdir()) == [], "the device's temporary directory is removed"

    refused = {r["artifact"]: r for r in by_name["board-wrong-key"]["results"]}["onnx-fp32"]
    assert refused["remote_status"] == "auth-failed" and refused["latency"]["source"] == "estimated"
    assert "did not accept" in refused["message"]

    missing = {r["artifact"]: r for r in by_name["board-no-ort"]["results"]}["onnx-fp32"]
    assert missing["remote_status"] == "runtime-missing" and "pip install onnxruntime" in missing["message"]
    assert missing["latency"]["source"] == "estimated"

    validate_report(json.loads((run_dir / "report.json").read_text()))
    md = (run_dir / "report.md").read_text()
    assert f"measured-remote ({lat['host']})" in md and "power mode MODE_15W" in md
    assert "measured-remote failed (auth-failed)" in md and "measured-remote failed (runtime-missing)" in md


def test_the_report_names_each_profile_file_and_labels_unchecked_estimates(tmp_path):
    import hashlib

    from rescompress.devices import BUILTIN_DIR

    data = yaml.safe_load(available_devices()["raspberry-pi-5"].read_text(encoding="utf-8"))
    data["name"] = "my-pi"
    mine = tmp_path / "my-pi.yaml"
    mine.write_text(yaml.safe_dump(data), encoding="utf-8")
    report, run_dir = run_recipe(tmp_path, ["host-cpu", str(mine)])
    validate_report(json.loads((run_dir / "report.json").read_text()))
    by_name = {d["name"]: d for d in report["devices"]}
    host = BUILTIN_DIR / "host-cpu.yaml"
    assert by_name["host-cpu"]["provenance"]["profile"] == {
        "path": str(host.resolve()), "sha256": hashlib.sha256(host.read_bytes()).hexdigest(), "builtin": True}
    assert by_name["my-pi"]["provenance"]["profile"] == {
        "path": str(mine.resolve()), "sha256": hashlib.sha256(mine.read_bytes()).hexdigest(), "builtin": False}

    # the group's figures are TFLite fp16: they give no error bar to an onnxruntime fp32 estimate
    lat = {r["artifact"]: r for r in by_name["my-pi"]["results"]}["onnx-fp32"]["latency"]
    assert lat["source"] == "estimated" and lat["p50_ms"] > 0
    assert "check_max_abs_error_pct" not in lat and lat["check"].startswith("unchecked: no published figure")
    md = (run_dir / "report.md").read_text()
    assert "estimated (arm-cortex-a-cpu; unchecked)" in md
    assert f"{mine.resolve()} (sha256 {hashlib.sha256(mine.read_bytes()).hexdigest()[:12]}…, not a built-in profile)" in md
