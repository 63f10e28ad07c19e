"""Run reports: report.json (the record) and report.md, report.html, plots/*.png rendered from it.

The format is documented field by field in `rescompress/report/schema.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rescompress.fileio import atomic_write_json, atomic_write_text
from rescompress.report.html import render_html
from rescompress.report.markdown import build_document, render_markdown
from rescompress.report.plots import plot_accuracy_vs_latency, plot_filename
from rescompress.report.schema import (
    LATENCY_SOURCES,
    SCHEMA_VERSION,
    STATUSES,
    latency_accuracy,
    load_report,
    pareto_front,
    validate_report,
)

__all__ = [
    "LATENCY_SOURCES", "SCHEMA_VERSION", "STATUSES", "build_document", "latency_accuracy", "load_report",
    "pareto_front", "plot_accuracy_vs_latency", "plot_filename", "render_all", "render_html",
    "render_markdown", "validate_report", "write_report",
]


def _render(report: Mapping[str, Any], run_dir: Path) -> dict[str, Path]:
    plots = plot_accuracy_vs_latency(report, run_dir / "plots")
    links = {key: path.relative_to(run_dir).as_posix() for key, path in plots.items()}
    return {
        "json": run_dir / "report.json",
        "md": atomic_write_text(run_dir / "report.md", render_markdown(report, links)),
        "html": atomic_write_text(run_dir / "report.html", render_html(report, plots)),
        "plot": plots["all"],
    }


def write_report(report: Mapping[str, Any], run_dir: Path) -> dict[str, Path]:
    """Validate `report`, write run_dir/report.json, then render report.md, report.html and plots/."""
    validate_report(report)
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "report.json", report)
    return _render(report, run_dir)


def render_all(run_dir: Path) -> dict[str, Path]:
    """Re-render report.md, report.html and plots/ from run_dir/report.json."""
    run_dir = Path(run_dir)
    return _render(load_report(run_dir / "report.json"), run_dir)
