"""Accuracy-vs-latency plots: point labels never overlap each other or a marker, and stay inside the axes."""

from __future__ import annotations

import copy
import itertools

import pytest
from matplotlib.text import Text

from rescompress.report.plots import combined_figure, device_figure, plot_accuracy_vs_latency
from tests.test_report import PNG_SIGNATURE, make_report


def _labels(fig):
    """(text, bounding box of the text alone, in display pixels) of each point label."""
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = []
    for t in ax.texts:
        if t.get_gid() == "point-label":
            t.update_positions(renderer)  # where the annotation puts its text; the leader line is left out
            labels.append((t.get_text(), Text.get_window_extent(t, renderer)))
    return labels


def _crowded_report():
    """The quickstart's case: onnx-int8 and onnx-fp32 almost on the same spot, plus a cluster of near twins."""
    report = copy.deepcopy(make_report())
    host = report["devices"][0]["results"]
    by_name = {r["artifact"]: r for r in host}
    by_name["onnx-fp32"]["latency"]["p50_ms"], by_name["onnx-fp32"]["top1"] = 0.410, 0.9810
    by_name["onnx-int8"]["latency"]["p50_ms"], by_name["onnx-int8"]["top1"] = 0.405, 0.9805
    for i in range(4):
        host.append({**copy.deepcopy(by_name["onnx-fp32"]), "artifact": f"tflite-int8-variant{i}",
                     "top1": 0.9806 + 0.0001 * i})
    return report


def _assert_apart(fig, expected):
    labels = _labels(fig)
    assert sorted(name for name, _ in labels) == sorted(expected)
    frame = fig.axes[0].get_window_extent(fig.canvas.get_renderer())
    for (a, box_a), (b, box_b) in itertools.combinations(labels, 2):
        assert not box_a.overlaps(box_b), f"labels {a!r} and {b!r} overlap: {box_a} / {box_b}"
    for name, box in labels:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, name
    return labels


def test_labels_of_close_points_do_not_overlap_in_a_device_plot():
    report = _crowded_report()
    device = report["devices"][0]
    fig = device_figure(report, device)
    expected = ["torch-fp32", "onnx-fp32", "onnx-int8"] + [f"tflite-int8-variant{i}" for i in range(4)]
    labels = _assert_apart(fig, expected)
    # and none covers a marker: each point's centre lies outside every label box
    ax = fig.axes[0]
    for r in device["results"]:
        if r.get("latency") and r.get("top1") is not None:
            x, y = ax.transData.transform((r["latency"]["p50_ms"], 100 * r["top1"]))
            assert not any(box.contains(x, y) for _, box in labels), r["artifact"]


def test_labels_do_not_overlap_in_the_combined_plot():
    report = _crowded_report()
    report["devices"][1]["results"][0]["latency"]["p50_ms"] = 0.41  # the Jetson's onnx-fp32 beside the host's
    fig = combined_figure(report)
    names = [r["artifact"] for d in report["devices"] for r in d["results"]
             if r.get("latency") and r.get("top1") is not None]
    _assert_apart(fig, names)


def test_plots_are_still_written_as_png(tmp_path):
    paths = plot_accuracy_vs_latency(_crowded_report(), tmp_path)
    assert set(paths) == {"host-cpu", "jetson-orin-nano", "all"}
    for path in paths.values():
        assert path.read_bytes()[:8] == PNG_SIGNATURE
