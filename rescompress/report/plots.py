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
MARKER_SIZE = 42  # points^2, as scatter's `s`
LABEL_FONTSIZE = 7.5
LABEL_GAP = 4.0  # points between a marker and its label
LABEL_STEP = 9.0  # points between stacked label slots (one line of 7.5 pt text plus a gap)
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


def _draw_device(ax: Any, points: list[tuple[float, float, str, str]], color: str) -> list[tuple[float, float, str]]:
    """Points (marker per latency source) and the device's Pareto front as a step line; returns the labels
    to place, (x, y, text) per point, once the axes' layout is final (`_place_labels`)."""
    for source, marker in MARKERS.items():
        xs = [p[0] for p in points if p[3] == source]
        ys = [p[1] for p in points if p[3] == source]
        if xs:
            hollow = source == "estimated"
            ax.scatter(xs, ys, marker=marker, s=MARKER_SIZE, zorder=3, linewidths=1.4, edgecolors=color,
                       facecolors="none" if hollow else color)
    front = sorted((points[i][0], points[i][1]) for i in pareto_front([(p[0], p[1]) for p in points]))
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=color,
                linestyle="--", linewidth=1.1, alpha=0.8, zorder=2)
    return [(x, y, name) for x, y, name, _ in points]


def _candidates(max_rings: int = 12) -> list[tuple[float, float, str, str]]:
    """Label positions around a point, nearest first: (dx, dy) in points with the text's alignment. Beside the
    point on either side, then stacked further up and down (those get a leader line)."""
    out = []
    for ring in range(max_rings + 1):
        dy = LABEL_GAP + ring * LABEL_STEP
        for dx, ha in ((LABEL_GAP, "left"), (-LABEL_GAP, "right")):
            out += [(dx, dy, ha, "bottom"), (dx, -dy, ha, "top")]
        if ring == 0:
            out += [(LABEL_GAP + 2, 0.0, "left", "center"), (-LABEL_GAP - 2, 0.0, "right", "center")]
    return out


def _place_labels(ax: Any, labels: list[tuple[float, float, str]]) -> list[Any]:
    """Annotate each point with its label where the text overlaps no other label, no marker and stays inside
    the axes: the first free position of `_candidates`, measured with the Agg renderer's text extents.
    Call after the layout is final (tight_layout), since the extents are in display pixels."""
    from matplotlib.transforms import Bbox

    if not labels:
        return []
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    ax.get_xlim(), ax.get_ylim()  # settle the autoscaled limits before mapping data to pixels
    frame = ax.get_window_extent(renderer)
    px = fig.dpi / 72.0
    marker_r = (MARKER_SIZE ** 0.5) / 2 * px + 1.0
    centres = [tuple(ax.transData.transform((x, y))) for x, y, _ in labels]
    markers = [Bbox.from_extents(cx - marker_r, cy - marker_r, cx + marker_r, cy + marker_r) for cx, cy in centres]
    placed: list[Any] = []
    texts = []
    # left to right, and top down where points share a latency
    order = sorted(range(len(labels)), key=lambda i: (centres[i][0], -centres[i][1]))
    for i in order:
        x, y, name = labels[i]
        best = None
        for dx, dy, ha, va in _candidates():
            text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                               fontsize=LABEL_FONTSIZE, color="#333", zorder=4, gid="point-label",
                               annotation_clip=False)
            box = text.get_window_extent(renderer).padded(1.0)
            clashes = sum(box.overlaps(b) for b in placed) + sum(
                box.overlaps(m) for j, m in enumerate(markers) if j != i)
            outside = not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1)
            cost = (clashes + (1 if outside else 0), abs(dy))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box, dy)
            else:
                text.remove()
            if cost[0] == 0:
                break
        _, text, box, dy = best
        if abs(dy) > LABEL_GAP + LABEL_STEP / 2:  # stacked away from its point: draw the leader
            text.remove()
            text = ax.annotate(name, (x, y), xytext=text.xyann, textcoords="offset points", ha=text.get_ha(),
                               va=text.get_va(), fontsize=LABEL_FONTSIZE, color="#333", zorder=4,
                               gid="point-label", annotation_clip=False,
                               arrowprops={"arrowstyle": "-", "color": "#999", "linewidth": 0.6,
                                           "shrinkA": 0, "shrinkB": marker_r / px})
        placed.append(box)
        texts.append(text)
    return texts


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


def _layout(fig: Any, ax: Any, labels: list[tuple[float, float, str]]) -> None:
    """Final layout, then the point labels placed in it (they are measured in display pixels)."""
    fig.tight_layout()
    _place_labels(ax, labels)


def device_figure(report: Mapping[str, Any], device: Mapping[str, Any], color: str = "C0") -> Any:
    """One device's plot as a laid-out matplotlib Figure (Agg canvas), labels placed."""
    fig, ax = _new_axes()
    points = _points(device)
    labels = _draw_device(ax, points, color)
    budget = device.get("accuracy_budget_pt")
    default_budget = report["recipe"].get("accuracy_budget_pt")
    _finish(ax, points, report, default_budget if budget is None else budget,
            f"{device['name']}: accuracy vs latency", [])
    _layout(fig, ax, labels)
    return fig


def combined_figure(report: Mapping[str, Any]) -> Any:
    """All devices in one plot, as a laid-out Figure."""
    devices = report["devices"]
    colors = [f"C{i % 10}" for i in range(len(devices))]
    fig, ax = _new_axes()
    per_device = [_points(device) for device in devices]
    labels = [label for points, color in zip(per_device, colors) for label in _draw_device(ax, points, color)]
    _finish(ax, [p for points in per_device for p in points], report, report["recipe"].get("accuracy_budget_pt"),
            "All devices: accuracy vs latency", [(d["name"], c) for d, c in zip(devices, colors)])
    _layout(fig, ax, labels)
    return fig


def _write(fig: Any, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def plot_accuracy_vs_latency(report: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the combined plot (key "all") and one plot per device (key: device name) into `out_dir`."""
    out_dir = Path(out_dir)
    devices = report["devices"]
    paths: dict[str, Path] = {}
    used: set[str] = set()
    for i, device in enumerate(devices):
        name = plot_filename(device["name"])
        stem, n = name[:-4], 2
        while name in used:  # two device names that slug to the same file
            name, n = f"{stem}-{n}.png", n + 1
        used.add(name)
        paths[device["name"]] = _write(device_figure(report, device, f"C{i % 10}"), out_dir / name)
    paths[ALL_DEVICES] = _write(combined_figure(report), out_dir / plot_filename(None))
    return paths
