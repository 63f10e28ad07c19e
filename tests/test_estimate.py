"""The estimated latency: layer table, roofline, calibration on published figures only, and its checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rescompress.bench.estimate import (
    DEFAULTS,
    calibrate,
    estimate_latency,
    figure_errors,
    free_parameters,
    holdout_errors,
    kernels,
    leave_one_out_errors,
    layer_table,
    reference_layers,
)
from rescompress.devices import DeviceProfile, available_devices, load_device
from rescompress.models import build_model
from rescompress.profile import count_macs

ORIN = "orin-gpu-tensorrt"
X224 = torch.zeros(1, 3, 224, 224)


@pytest.fixture(scope="module")
def shipped() -> list[DeviceProfile]:
    return [load_device(str(p)) for p in available_devices().values()]


def by_name(devices: list[DeviceProfile], name: str) -> DeviceProfile:
    return next(d for d in devices if d.name == name)


def test_estimate_module_imports_no_torch():
    code = ("import sys, json, rescompress.bench.estimate; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'scipy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_resnet18_layer_table_matches_torch_flop_counter():
    model = build_model("resnet18")
    layers = layer_table(model, X224)
    macs = sum(layer.macs for layer in layers)
    assert macs == count_macs(model, X224)
    assert abs(macs - 1.82e9) / 1.82e9 < 0.005  # the known 1.82 GMACs
    kinds = [layer.kind for layer in layers]
    assert (kinds.count("conv"), kinds.count("add"), kinds.count("pool"), kinds.count("linear")) == (20, 8, 2, 1)
    assert sum(layer.weight_elems for layer in layers if layer.kind in ("conv", "linear")) == \
        sum(p.numel() for n, p in model.named_parameters() if "bn" not in n and "downsample.1" not in n)
    # each residual add is fused into the epilogue of the conv before it: 20 convs + 2 pools + fc are launched
    assert len(kernels(layers)) == 23


def test_batch_scales_activations_not_weights():
    one, four = layer_table(build_model("resnet_tiny"), torch.zeros(1, 3, 32, 32)), \
        layer_table(build_model("resnet_tiny"), torch.zeros(4, 3, 32, 32))
    assert [a.macs * 4 for a in one] == [b.macs for b in four]
    assert [a.weight_elems for a in one] == [b.weight_elems for b in four]
    assert four[0].batch == 4


def test_pruned_model_is_estimated_faster(shipped):
    from rescompress.compress.prune import prune_model
    from rescompress.models.resnet import BasicBlock, ResNet

    orin = by_name(shipped, "jetson-agx-orin")
    dense = build_model("resnet18")
    pruned = build_model("resnet18")
    prune_model(pruned, torch.zeros(1, 3, 64, 64), importance="l2", scope="uniform", channel_ratio=0.5, round_to=8)
    by_hand = ResNet(BasicBlock, (2, 2, 2, 2), (32, 64, 128, 256), num_classes=1000, in_channels=3, stem="imagenet")
    t = {}
    for name, model in (("dense", dense), ("pruned", pruned), ("by_hand", by_hand)):
        layers = layer_table(model, X224)
        assert sum(layer.macs for layer in layers) == count_macs(model, X224)  # the real modules' channel counts
        est = estimate_latency(orin, "tensorrt", "fp16", layers, devices=shipped)
        assert est.latency is not None, est.message
        t[name] = est.latency["p50_ms"]
    assert t["pruned"] < 0.8 * t["dense"]
    assert t["by_hand"] < 0.8 * t["dense"]


def test_int8_faster_than_fp16_faster_than_fp32_on_orin(shipped):
    layers = list(reference_layers("resnet50"))
    for name in ("jetson-agx-orin", "jetson-orin-nano"):
        dev = by_name(shipped, name)
        ms = {p: estimate_latency(dev, "tensorrt", p, layers, devices=shipped).latency["p50_ms"]
              for p in ("int8", "fp16", "fp32")}
        assert ms["int8"] < ms["fp16"] < ms["fp32"], (name, ms)


def test_estimate_says_where_it_comes_from(shipped):
    est = estimate_latency(by_name(shipped, "jetson-orin-nano"), "tensorrt", "int8",
                           list(reference_layers("resnet50")), devices=shipped)
    lat = est.latency
    assert lat["source"] == "estimated" and lat["group"] == ORIN and lat["batch"] == 1
    assert len(lat["calibrated_on"]) == 6
    assert any(c.startswith("jetson-agx-orin resnet50 tensorrt int8 0.640 ms (MLCommons") for c in lat["calibrated_on"])
    rows = figure_errors(ORIN, shipped)
    int8 = [r for r in rows if (r["runtime"], r["precision"]) == ("tensorrt", "int8")]
    assert len(int8) == 2  # the MLPerf figures: the fp16 ones do not check an int8 estimate
    assert lat["check_max_abs_error_pct"] == pytest.approx(max(abs(r["error_pct"]) for r in int8))
    assert lat["check"] == f"out of sample on 2 published tensorrt int8 figure(s) of group {ORIN}"
    assert {(r["use"], r["check"]) for r in rows} == {("calibrate", "leave-one-out")} and len(rows) == 6
    assert all(r["error_pct"] == pytest.approx((r["estimated_ms"] - r["published_ms"]) / r["published_ms"] * 100)
               for r in rows)
    assert calibrate(ORIN, shipped).describe()["fitted"] == ["efficiency", "layer_us"]


def test_an_estimate_without_figures_of_its_runtime_and_precision_is_unchecked(shipped):
    """The Cortex-A group holds only Raspberry Pi TFLite fp16 figures: they check a Pi TFLite fp16 estimate,
    not an Orin CPU onnxruntime int8 one."""
    layers = list(reference_layers("resnet50"))
    orin_cpu = estimate_latency(by_name(shipped, "jetson-agx-orin"), "onnxruntime", "int8", layers,
                                devices=shipped).latency
    assert orin_cpu["group"] == "arm-cortex-a-cpu" and orin_cpu["p50_ms"] > 0
    assert "check_max_abs_error_pct" not in orin_cpu
    assert orin_cpu["check"].startswith("unchecked: no published figure of this runtime/precision (onnxruntime int8)")
    pi = by_name(shipped, "raspberry-pi-5")
    assert "check_max_abs_error_pct" not in estimate_latency(pi, "tflite", "int8", layers, devices=shipped).latency
    pi_fp16 = estimate_latency(pi, "tflite", "fp16", layers, devices=shipped).latency
    loo = [r["error_pct"] for r in figure_errors("arm-cortex-a-cpu", shipped)]
    assert len(loo) == 2 and pi_fp16["check_max_abs_error_pct"] == pytest.approx(max(map(abs, loo)))
    assert pi_fp16["check"].startswith("out of sample on 2 published tflite fp16 figure(s)")


def test_a_figure_that_was_only_fitted_on_does_not_check_its_estimate():
    board = DeviceProfile.model_validate({
        "name": "board", "runtimes": {"tflite": {"unit": "cpu", "estimate_group": "one-board"}},
        "compute": {"cpu": {"peak_tops": {"fp32": 0.1, "fp16": 0.2, "int8": 0.4}, "memory_gbps": 10}},
        "published": [{"model": "resnet18", "runtime": "tflite", "precision": "fp16", "latency_ms": 50.0,
                       "source": "a benchmark"}]})
    lat = estimate_latency(board, "tflite", "fp16", list(reference_layers("resnet18")), devices=[board]).latency
    assert "check_max_abs_error_pct" not in lat and lat["check"].startswith("unchecked: the group's only published")


def _with_figure(devices: list[DeviceProfile], device: str, model: str, precision: str, **update):
    out = []
    for d in devices:
        if d.name == device:
            figs = [f.model_copy(update=update) if (f.model, f.precision) == (model, precision) else f
                    for f in d.published]
            d = d.model_copy(update={"published": figs})
        out.append(d)
    return out


def _row(rows: list[dict], device: str, model: str) -> dict:
    (row,) = [r for r in rows if (r["device"], r["model"]) == (device, model)]
    return row


def test_calibration_never_reads_holdout_figures(shipped):
    held = _with_figure(shipped, "jetson-orin-nano", "resnet50", "fp16", use="holdout")
    base = calibrate(ORIN, held)
    assert {f.use for f in base.figures} == {"calibrate"} and len(base.figures) == 5
    nano = by_name(held, "jetson-orin-nano")
    nano_r50 = next(f for f in nano.published if f.model == "resnet50")
    changed = _with_figure(held, "jetson-orin-nano", "resnet50", "fp16", latency_ms=nano_r50.latency_ms * 3)
    assert calibrate(ORIN, changed).params == base.params
    # the estimate does not move either; only the reported check does
    layers = list(reference_layers("resnet18"))
    a = estimate_latency(nano, "tensorrt", "fp16", layers, devices=held)
    b = estimate_latency(by_name(changed, "jetson-orin-nano"), "tensorrt", "fp16", layers, devices=changed)
    assert a.latency["p50_ms"] == b.latency["p50_ms"]
    assert _row(holdout_errors(ORIN, held), "jetson-orin-nano", "resnet50")["check"] == "holdout"
    assert _row(holdout_errors(ORIN, changed), "jetson-orin-nano", "resnet50")["error_pct"] != \
        _row(holdout_errors(ORIN, held), "jetson-orin-nano", "resnet50")["error_pct"]

    calibration_changed = _with_figure(shipped, "jetson-orin-nx", "resnet50", "int8", latency_ms=1.082 * 1.3)
    assert calibrate(ORIN, calibration_changed).params != calibrate(ORIN, shipped).params


def test_leave_one_out_never_reads_the_figure_it_checks(shipped):
    base = _row(leave_one_out_errors(ORIN, shipped), "jetson-orin-nano", "resnet18")
    changed = _with_figure(shipped, "jetson-orin-nano", "resnet18", "fp16", latency_ms=6.0)
    moved = _row(leave_one_out_errors(ORIN, changed), "jetson-orin-nano", "resnet18")
    assert moved["estimated_ms"] == pytest.approx(base["estimated_ms"])  # fitted on the other five only
    assert moved["published_ms"] == 6.0 and moved["error_pct"] != base["error_pct"]
    assert moved["fit_error_pct"] != base["fit_error_pct"]  # the full fit does read it


def test_free_parameters_keep_a_degree_of_freedom(shipped):
    assert [free_parameters(n) for n in (1, 2, 3, 6)] == [["efficiency"], ["efficiency"],
                                                          ["efficiency", "layer_us"], ["efficiency", "layer_us"]]
    for group in ("arm-cortex-a-cpu", "snapdragon-hexagon-tflite"):
        cal = calibrate(group, shipped)
        assert len(cal.figures) == 2 and cal.fitted == ["efficiency"]
        assert {k: v for k, v in cal.params.items() if k != "efficiency"} == \
            {k: v for k, v in DEFAULTS.items() if k != "efficiency"}
        assert 0 < cal.params["efficiency"] <= 1.0
    assert calibrate(ORIN, shipped).params["efficiency"] <= 1.0


# The bar: ResNet-18 and ResNet-50 on AGX Orin and Orin Nano within 30 % of published figures, each estimated by
# a fit that did not use it.
@pytest.mark.parametrize("device", ["jetson-agx-orin", "jetson-orin-nano"])
@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_orin_out_of_sample_errors_within_30_pct(shipped, device, model):
    row = _row(figure_errors(ORIN, shipped), device, model) if device == "jetson-orin-nano" else \
        next(r for r in figure_errors(ORIN, shipped) if (r["device"], r["model"], r["precision"]) == (device, model, "fp16"))
    assert row["check"] == "leave-one-out" and row["precision"] == "fp16"
    assert abs(row["error_pct"]) <= 30.0, row


def test_clear_messages_when_nothing_to_estimate_from(shipped):
    layers = list(reference_layers("resnet18"))
    host = by_name(shipped, "host-cpu")
    assert "no compute unit" in estimate_latency(host, "onnxruntime", "fp32", layers, devices=shipped).message

    orin = by_name(shipped, "jetson-agx-orin")
    no_group = orin.model_copy(update={"runtimes": {**orin.runtimes, "tensorrt": orin.runtimes["tensorrt"].model_copy(
        update={"estimate_group": None})}})
    est = estimate_latency(no_group, "tensorrt", "fp16", layers, devices=shipped)
    assert est.latency is None and "no estimate group" in est.message and "tensorrt" in est.message

    board = DeviceProfile.model_validate({
        "name": "board", "runtimes": {"tflite": {"precisions": ["fp32"], "unit": "cpu", "estimate_group": "lonely"}},
        "compute": {"cpu": {"peak_tops": {"fp32": 0.1}, "memory_gbps": 10}}})
    est = estimate_latency(board, "tflite", "int8", layers, devices=[board])
    assert est.latency is None and "no peak_tops for int8" in est.message and "cpu" in est.message
    est = estimate_latency(board, "tflite", "fp32", layers, devices=[board])
    assert est.latency is None and "'lonely'" in est.message and "use: calibrate" in est.message
    assert "no runtime 'tensorrt'" in estimate_latency(board, "tensorrt", "fp32", layers, devices=[board]).message


def test_an_estimate_far_outside_the_calibration_sizes_says_so(shipped):
    orin = by_name(shipped, "jetson-agx-orin")
    small = layer_table(build_model("resnet20", num_classes=10, in_channels=1, small_input=True),
                        torch.zeros(1, 1, 32, 32))
    note = estimate_latency(orin, "tensorrt", "int8", small, devices=shipped).latency["extrapolated"]
    assert note.startswith("extrapolated: 40.5M MACs per image, against 1.81-4.09G") and "measure on the device" in note
    inside = estimate_latency(orin, "tensorrt", "int8", list(reference_layers("resnet34")), devices=shipped)
    assert "extrapolated" not in inside.latency


def test_a_figure_for_an_unknown_model_is_skipped_with_its_reason(shipped):
    from rescompress.devices import PublishedLatency

    pi = by_name(shipped, "raspberry-pi-5")
    odd = PublishedLatency(model="resnet99", runtime="tflite", precision="fp16", latency_ms=10.0, source="a blog")
    devices = [d for d in shipped if d.name != pi.name] + [pi.model_copy(update={"published": [*pi.published, odd]})]
    cal = calibrate("arm-cortex-a-cpu", devices)
    assert len(cal.figures) == 2 and "'resnet99', which is not a registry model" in cal.skipped[0]
    assert len(figure_errors("arm-cortex-a-cpu", devices)) == 2
