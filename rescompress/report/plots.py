"""Accuracy-vs-latency plots (PNG): one per device and one with all devices.

matplotlib is imported inside the plotting function and always renders with the Agg canvas, without
pyplot, so importing this module is cheap and never touches a display or the global backend.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rescompress.fileio import atomic_write
from rescompress.report.markdown import ALL_DEVICES
from rescompress.report.schema import latency_accuracy, pareto_front

FIGSIZE = (7.0, 4.5)
DPI = 110
MARKERS = {"measured": "o", "measured-remote": "s", "estimated": "^"}
PLOT_STEM = "accuracy_vs_latency"


def plot_filename(device: str | None) -> str:
    """'accuracy_vs_latency.png' for the combined plot, 'accuracy_vs_latency_<device>.png' per device."""
    if device is None:
        return f"{PLOT_STEM}.png"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", device).strip("._") or "device"
    return f"{PLOT_STEM}_{slug}.png"


def _points(device: Mapping[str, Any]) -> list[tuple[float, float, str, str]]:
    """(p50 ms, top-1 %, artifact, latency source) of each result with both numbers."""
    out = []
    for result in device["results"]:
        latency_ms, top1 = latency_accuracy(result)
        if latency_ms is not None and top1 is not None and latency_ms > 0:
            out.append((latency_ms, 100.0 * top1, result["artifact"], result["latency"]["source"]))
    return out


def _draw_device(ax: Any, points: list[tuple[float, float, str, str]], color: str, x_max: float,
                 label_dy: float = 4) -> None:
    """Points (marker per latency source), their labels, and the device's Pareto front as a step line."""
    for source, marker in MARKERS.items():
        xs = [p[0] for p in points if p[3] == source]
        ys = [p[1] for p in points if p[3] == source]
        if xs:
            hollow = source == "estimated"
            ax.scatter(xs, ys, marker=marker, s=42, zorder=3, linewidths=1.4, edgecolors=color,
                       facecolors="none" if hollow else color)
    for x, y, name, _ in points:
        right = x >= x_max  # the slowest point is labelled on its left, so the label stays inside the axes
        ax.annotate(name, (x, y), xytext=(-5 if right else 5, label_dy), textcoords="offset points",
                    ha="right" if right else "left", fontsize=7.5, color="#333")
    front = sorted((points[i][0], points[i][1]) for i in pareto_front([(p[0], p[1]) for p in points]))
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=color,
                linestyle="--", linewidth=1.1, alpha=0.8, zorder=2)


def _finish(ax: Any, points: list[tuple[float, float, str, str]], report: Mapping[str, Any],
            budget_pt: float | None, title: str, devices: list[tuple[str, str]]) -> None:
    """Axes, scale, baseline and budget lines, and one legend outside the axes on the right."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_title(title, fontsize=11)
    ax.set_xlabel("p50 latency, ms")
    ax.set_ylabel("top-1, %")
    ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=color, marker="o", linestyle="--", label=name) for name, color in devices]
    handles += [Line2D([], [], linestyle="", marker=MARKERS[s], color="#444", label=s,
                       markerfacecolor="none" if s == "estimated" else "#444")
                for s in MARKERS if any(p[3] == s for p in points)]
    if points:
        handles.append(Line2D([], [], linestyle="--", color="#444", label="Pareto front"))
    baselines = [s for s in report["stages"] if s["name"] == "baseline" or s["name"].endswith("/baseline")]
    if len(baselines) > 1:  # a sweep over training: each trial has its own baseline, and no one line fits all
        handles.append(Line2D([], [], linestyle="", label=f"{len(baselines)} baselines: Δ per trial in the report"))
    elif report["stages"]:
        base = 100.0 * report["stages"][0]["top1"]
        ax.axhline(base, color="#777", linestyle=":", linewidth=1)
        handles.append(Line2D([], [], color="#777", linestyle=":", label=f"baseline {base:.2f} %"))
        if budget_pt is not None:
            ax.axhline(base - budget_pt, color="#c44", linestyle=":", linewidth=1)
            handles.append(Line2D([], [], color="#c44", linestyle=":", label=f"budget −{budget_pt:g} pt"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5, frameon=False)
    if not points:
        ax.text(0.5, 0.5, "no result has both a latency and a top-1", transform=ax.transAxes,
                ha="center", va="center", color="#777")
        return
    xs = [p[0] for p in points]
    if max(xs) / min(xs) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.12, y=0.12)


def _new_axes() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def plot_accuracy_vs_latency(report: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the combined plot (key "all") and one plot per device (key: device name) into `out_dir`."""
    out_dir = Path(out_dir)
    devices = report["devices"]
    colors = [f"C{i % 10}" for i in range(len(devices))]
    default_budget = report["recipe"].get("accuracy_budget_pt")
    paths: dict[str, Path] = {}
    used: set[str] = set()

    for device, color in zip(devices, colors):
        fig, ax = _new_axes()
        points = _points(device)
        _draw_device(ax, points, color, max((p[0] for p in points), default=0.0))
        budget = device.get("accuracy_budget_pt")
        _finish(ax, points, report, default_budget if budget is None else budget,
                f"{device['name']}: accuracy vs latency", [])
        name = plot_filename(device["name"])
        stem, n = name[:-4], 2
        while name in used:  # two device names that slug to the same file
            name, n = f"{stem}-{n}.png", n + 1
        used.add(name)
        paths[device["name"]] = _save(fig, out_dir / name)

    fig, ax = _new_axes()
    per_device = [_points(device) for device in devices]
    all_points = [p for points in per_device for p in points]
    x_max = max((p[0] for p in all_points), default=0.0)
    for i, (points, color) in enumerate(zip(per_device, colors)):
        _draw_device(ax, points, color, x_max, label_dy=4 if i % 2 == 0 else -11)
    _finish(ax, all_points, report, default_budget, "All devices: accuracy vs latency",
            [(d["name"], c) for d, c in zip(devices, colors)])
    paths[ALL_DEVICES] = _save(fig, out_dir / plot_filename(None))
    return paths
