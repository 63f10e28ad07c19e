"""The report as a list of plain-text blocks, and its Markdown rendering.

`build_document` decides what the report says; `render_markdown` and `render_html` only decide how it
looks, so the two files always carry the same tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from rescompress.report.schema import latency_accuracy, pareto_front

MISSING = "—"
STAR = "★"
ALL_DEVICES = "all"  # plot key of the combined figure


# --- blocks ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Fields:
    """Labelled values, e.g. the run summary."""
    items: list[tuple[str, str]]


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: frozenset[int] = field(default_factory=frozenset)  # right-aligned columns


@dataclass(frozen=True)
class Figure:
    key: str  # plot key: "all" or a device name
    caption: str


Block = Union[Heading, Paragraph, Fields, Bullets, Table, Figure]


# --- formatting -----------------------------------------------------------------------------------

def fmt_pct(fraction: float | None) -> str:
    """0.981 -> '98.10'."""
    return MISSING if fraction is None else f"{100.0 * fraction:.2f}"


def fmt_pt(points: float | None) -> str:
    """Signed percentage points: -0.5 -> '-0.50'."""
    return MISSING if points is None else f"{points:+.2f}"


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return MISSING
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_count(n: float | None) -> str:
    """40812544 -> '40.8M'."""
    if n is None:
        return MISSING
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{n:g}"


def fmt_bytes(n: float | None) -> str:
    """1101234 -> '1.1 MB' (decimal units)."""
    if n is None:
        return MISSING
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:g} B"


def fmt_seconds(s: float | None) -> str:
    return MISSING if s is None else f"{s:.1f}"


def fmt_text(value: Any) -> str:
    return MISSING if value is None or value == "" else str(value)


def fmt_setup(latency: Mapping[str, Any] | None) -> str:
    """How a latency was taken: 'batch 1 · 2 threads · 20 warm-up + 200 runs'."""
    if not latency:
        return MISSING
    parts = []
    if latency.get("batch") is not None:
        parts.append(f"batch {latency['batch']}")
    if latency.get("threads") is not None:
        parts.append(f"{latency['threads']} threads")
    runs, warmup = latency.get("runs"), latency.get("warmup")
    if runs is not None:
        parts.append(f"{warmup} warm-up + {runs} runs" if warmup is not None else f"{runs} runs")
    if latency.get("power_mode") is not None:
        parts.append(f"power mode {latency['power_mode']}")
    return " · ".join(parts) or MISSING


# --- the document ---------------------------------------------------------------------------------

def _summary(report: Mapping[str, Any]) -> Fields:
    recipe, run, data, model = (report[k] for k in ("recipe", "run", "dataset", "model"))
    recipe_text = recipe["name"] + (f" ({recipe['path']})" if recipe.get("path") else "")
    if recipe.get("accuracy_budget_pt") is not None:
        recipe_text += f", accuracy budget {recipe['accuracy_budget_pt']:g} pt"
    if run.get("finished"):
        finished = run["finished"] + (f" ({run['seconds']:.1f} s)" if run.get("seconds") is not None else "")
    else:
        finished = f"{MISSING} (unfinished)"
    data_parts = [data["name"]]
    if data.get("num_classes") is not None:
        data_parts.append(f"{data['num_classes']} classes")
    if data.get("sizes"):
        data_parts.append(" / ".join(f"{k} {v}" for k, v in data["sizes"].items()))
    spec = data.get("input_spec") or {}
    if all(spec.get(k) is not None for k in ("channels", "height", "width")):
        layout = f" {spec['layout']}" if spec.get("layout") else ""
        data_parts.append(f"input {spec['channels']}×{spec['height']}×{spec['width']}{layout}")
    items = [
        ("Recipe", recipe_text),
        ("Run", run["dir"]),
        ("Started", run["started"]),
        ("Finished", finished),
        ("Dataset", ", ".join(data_parts)),
    ]
    if data.get("source"):
        items.append(("Data source", data["source"]))
    if data.get("eval_transform"):
        items.append(("Eval transform", data["eval_transform"]))
    stream = data.get("streaming")
    if stream:
        text = f"streamed from disk by {stream.get('workers')} worker(s), {stream.get('files')} files indexed"
        if stream.get("skipped_files"):
            text += (f"; {stream['skipped_files']} unreadable file(s) skipped (data.on_corrupt: skip), e.g. "
                     f"{(stream.get('skipped_examples') or [''])[0]}")
        items.append(("Data loading", text))
    weights = model.get("weights")
    items.append(("Model", f"{model['name']} ({'weights ' + weights if weights else 'trained in this run'})"))
    source = model.get("import")
    if source:
        items.append(("Imported from", f"{fmt_text(source.get('architecture'))} ({fmt_text(source.get('format'))}); "
                                       f"input: {fmt_text(source.get('preprocessing'))}"))
        parity = source.get("parity") or {}
        if parity.get("max_abs_diff") is not None:
            text = (f"max |Δlogit| {parity['max_abs_diff']:.2g} against {fmt_text(parity.get('source_runtime'))} on "
                    f"{parity.get('n')} {parity.get('inputs', '')} images")
            if parity.get("top1_agreement") is not None:
                text += f", top-1 agreement {fmt_pct(parity['top1_agreement'])} %"
            items.append(("Import parity", text))
        if source.get("top1") is not None:
            items.append(("Source model top-1", f"{fmt_pct(source['top1'])} % test, {fmt_pct(source.get('val_top1'))} "
                                                f"% val, measured in {fmt_text(source.get('runtime'))}"))
        elif source.get("top1_message"):
            items.append(("Source model top-1", f"{MISSING} ({source.get('top1_status')}: {source['top1_message']})"))
    items.append(("rescompress", report["rescompress_version"]))
    return Fields(items)


def _stages(report: Mapping[str, Any]) -> list[Block]:
    rows = [
        [s["name"], fmt_text(s.get("kind")), fmt_pct(s["top1"]), fmt_pct(s.get("val_top1")),
         fmt_count(s["params"]), fmt_count(s["macs"]), fmt_bytes(s["size_bytes"]), fmt_seconds(s.get("seconds"))]
        for s in report["stages"]
    ]
    blocks: list[Block] = [
        Heading(2, "Stages"),
        Table(["Stage", "Kind", "Top-1 %", "Val top-1 %", "Params", "MACs", "Size", "Time s"],
              rows, frozenset(range(2, 8))),
    ]
    notes = [f"{s['name']}: {note}" for s in report["stages"] for note in s.get("notes") or []]
    if notes:
        blocks.append(Bullets(notes))
    return blocks


def _trials(sweep: Mapping[str, Any] | None) -> list[Block]:
    """A merged sweep report: what each trial changed, and how it ended."""
    if not sweep or not sweep.get("trials"):
        return []
    rows = [[t["id"], ", ".join(f"{k}={v}" for k, v in (t.get("overrides") or {}).items()) or "(as written)",
             fmt_text(t.get("status")), fmt_seconds(t.get("seconds")), fmt_text(t.get("run_dir")),
             fmt_text(t.get("message"))] for t in sweep["trials"]]
    return [Heading(2, "Trials"),
            Paragraph(f"Backend {fmt_text(sweep.get('backend'))}. Artifacts above are named trial/artifact; each "
                      f"trial's Δ pt is against its own baseline (stages named trial/baseline where trials "
                      f"trained different ones); each trial's own report is in its run directory."),
            Table(["Trial", "Overrides", "Status", "Time s", "Run dir", "Message"], rows, frozenset({3}))]


def _time(run: Mapping[str, Any]) -> list[Block]:
    """Wall time per pipeline step, and how much of it went to training epochs."""
    steps = run.get("steps") or []
    total = sum(s["seconds"] for s in steps)
    if not steps or total <= 0:
        return []
    train = sum(s.get("train_seconds") or 0.0 for s in steps)
    rows = [[s["step"], fmt_seconds(s["seconds"]), fmt_seconds(s.get("train_seconds")),
             f"{100 * s['seconds'] / total:.1f}"] for s in steps]
    rows.append(["total", fmt_seconds(total), fmt_seconds(train), "100.0"])
    return [Heading(2, "Time"),
            Paragraph(f"{total:.1f} s in all; {100 * (total - train) / total:.1f} % outside "
                      f"training epochs (pruning analysis, calibration, int8 conversion, export, measurement). "
                      f"A step resumed after an interruption counts its time since the resume."),
            Table(["Step", "Seconds", "In training s", "Share %"], rows, frozenset({1, 2, 3}))]


def _lint_summary(artifact: Mapping[str, Any]) -> str:
    """Per lint target: "passes" or its error and warning counts."""
    checked = artifact.get("lint_checked") or {}
    if not checked:
        return MISSING
    parts = []
    for target, c in checked.items():
        counts = ((c.get("errors", 0), "error"), (c.get("warnings", 0), "warning"))
        found = ", ".join(f"{n} {word}{'s' if n > 1 else ''}" for n, word in counts if n)
        if c.get("status") == "crashed":
            parts.append(f"{target}: CRASHED")
            continue
        parts.append(f"{target}: {'passes' if c.get('passed') else 'FAILS'}" + (f" ({found})" if found else ""))
    return "; ".join(parts)


def _top1(row: Mapping[str, Any], key: str = "top1") -> str:
    """A top-1 cell: the percentage, or "failed" when the runtime could not compute it."""
    if row.get(key) is None and row.get("top1_status") == "failed":
        return "failed"
    return fmt_pct(row.get(key))


def _measured_on(row: Mapping[str, Any]) -> str:
    if row.get("top1_status") == "failed":
        return fmt_text(row.get("top1_message"))
    return fmt_text(row.get("top1_source")) if row.get("top1") is not None else MISSING


def _artifacts(report: Mapping[str, Any]) -> list[Block]:
    source = report["model"].get("import") or {}
    source_top1 = source.get("top1")
    rows = []
    for a in report["artifacts"]:
        parity = a.get("parity") or {}
        diff = parity.get("max_abs_diff")
        diff_text = MISSING if diff is None else f"{diff:.2g}"
        if diff is not None and parity.get("reference"):
            diff_text += f" vs {parity['reference']}"
        rows.append([
            a["name"], a["target"], a["precision"], fmt_text(a.get("from_stage")), a["status"],
            _top1(a), _top1(a, "val_top1"), _measured_on(a), diff_text, fmt_pct(parity.get("top1_agreement")),
            fmt_bytes(a.get("size_bytes")), fmt_text(a.get("runtime")), _lint_summary(a),
        ])
        if source_top1 is not None:
            top1 = a.get("top1")
            rows[-1].insert(6, fmt_pt(None if top1 is None else (top1 - source_top1) * 100))
    columns = ["Artifact", "Target", "Precision", "From stage", "Status", "Top-1 %", "Val top-1 %",
               "Top-1 measured on", "Parity max|Δ|", "Agreement %", "Size", "Runtime", "Lint"]
    numeric = {5, 6, 8, 9, 10}
    if source_top1 is not None:
        label = {"keras": "Keras", "onnx": "ONNX"}.get(source.get("format") or "", "Source")
        columns.insert(6, f"Δ vs {label} pt")
        numeric = {5, 6, 7, 9, 10, 11}
    blocks: list[Block] = [Heading(2, "Artifacts"), Table(columns, rows, frozenset(numeric))]
    if source_top1 is not None:
        blocks.append(Paragraph(f"{columns[6]}: each artifact's test top-1 minus the original {label} model's, "
                                f"{fmt_pct(source_top1)} %, measured in {fmt_text(source.get('runtime'))} on the same "
                                "test images."))
    bundles = [f"{a['name']}: `{a['bundle']}/`" for a in report["artifacts"] if a.get("bundle")]
    if bundles:
        blocks += [Paragraph("Bundles to ship (each: the artifact, preprocess.json, labels.txt, model_card.md, and "
                             "predict.py, which needs only numpy, Pillow and the runtime):"), Bullets(bundles)]
    elif report.get("bundles_message"):
        blocks.append(Paragraph(fmt_text(report["bundles_message"])))
    problems = [f"{a['name']} ({a['status']}): {fmt_text(a.get('message'))}"
                for a in report["artifacts"] if a["status"] != "ok"]
    problems += [f"{a['name']}: no top-1: {fmt_text(a.get('top1_message'))}"
                 for a in report["artifacts"] if a.get("top1_status") == "failed"]
    if problems:
        blocks += [Heading(3, "Artifacts not ok"), Bullets(problems)]
    findings = [
        f"{a['name']}: [{f['severity']}] {f.get('target', '')} {f['rule']}"
        + (f" at {f['node']}" if f.get("node") else "")
        + f": {f['message']}"
        + (f" (fix: {f['fix']})" if f.get("fix") else "")
        for a in report["artifacts"] for f in a.get("lint") or []
    ]
    if findings:
        blocks += [Heading(3, "Lint findings"), Bullets(findings)]
    return blocks


def _recommended(device: Mapping[str, Any]) -> Mapping[str, Any] | None:
    rec = device.get("recommendation")
    if not rec:
        return None
    return next((r for r in device["results"] if r["artifact"] == rec["artifact"]), None)


def _recommendations(report: Mapping[str, Any]) -> list[Block]:
    rows = []
    for d in report["devices"]:
        rec, result = d.get("recommendation"), _recommended(d) or {}
        latency = result.get("latency") or {}
        rows.append([
            d["name"], rec["artifact"] if rec else "none", fmt_pct(result.get("top1")),
            fmt_pt(result.get("delta_top1_pt")), fmt_pt(result.get("delta_val_top1_pt")), fmt_ms(latency.get("p50_ms")),
            fmt_text(latency.get("source")), fmt_text(result.get("top1_source")),
            fmt_text(rec.get("reason") if rec else None),
        ])
    return [
        Heading(2, "Recommendations"),
        Table(["Device", "Artifact", "Top-1 %", "Δ pt", "Val Δ pt", "p50 ms", "Latency source", "Top-1 measured on",
               "Reason"], rows, frozenset({2, 3, 4, 5})),
        Paragraph("Each recommendation is chosen on validation top-1 (Val Δ pt, measured in the artifact's runtime); "
                  "the test top-1 beside it was not used to choose."),
        Figure(ALL_DEVICES, "Accuracy vs p50 latency, all devices"),
    ]


def _latency_label(latency: Mapping[str, Any]) -> str:
    """The latency source, with where it came from: the remote host, or the estimate's calibration group."""
    source = fmt_text(latency.get("source"))
    if latency.get("source") == "measured-remote" and latency.get("host"):
        statistic = "; p50 is the mean: benchmark_model printed no median" if latency.get("statistic") == "mean" else ""
        return f"{source} ({latency['host']}{statistic})"
    if latency.get("source") == "estimated":
        parts = [latency["group"]] if latency.get("group") else []
        if latency.get("check_max_abs_error_pct") is not None:
            parts.append(f"±{latency['check_max_abs_error_pct']:.0f} % out of sample")
        elif str(latency.get("check", "")).startswith("unchecked"):
            parts.append("unchecked")
        return f"{source} ({'; '.join(parts)})" if parts else source
    return source


def _device(device: Mapping[str, Any]) -> list[Block]:
    results = device["results"]
    front = pareto_front([latency_accuracy(r) for r in results])
    rows = []
    for i, r in enumerate(results):
        latency = r.get("latency") or {}
        rows.append([
            STAR if i in front else "", r["artifact"], fmt_text(r.get("runtime")), _top1(r), _measured_on(r),
            fmt_pt(r.get("delta_top1_pt")), fmt_pt(r.get("delta_val_top1_pt")), fmt_ms(latency.get("p50_ms")), fmt_ms(latency.get("p90_ms")),
            fmt_ms(latency.get("p99_ms")), fmt_bytes(r.get("size_bytes")), _latency_label(latency) if latency else MISSING,
            fmt_setup(latency), r["status"],
        ])
    intro = [fmt_text(device.get("description"))]
    if device.get("accuracy_budget_pt") is not None:
        intro.append(f"accuracy budget {device['accuracy_budget_pt']:g} pt below the baseline")
    blocks: list[Block] = [
        Heading(2, f"Device: {device['name']}"),
        Paragraph(" · ".join(intro)),
        Table(["Pareto", "Artifact", "Runtime", "Top-1 %", "Top-1 measured on", "Δ pt", "Val Δ pt", "p50 ms",
               "p90 ms", "p99 ms", "Size", "Latency source", "Setup", "Status"], rows,
              frozenset({3, 5, 6, 7, 8, 9, 10})),
        Paragraph(f"{STAR} on the accuracy-vs-latency Pareto front: no other result here is both at least "
                  "as fast (p50) and at least as accurate. Δ pt is test top-1 minus the baseline's torch test top-1; "
                  "Val Δ pt the same on the validation split, which the recommendation is chosen on. "
                  "Latency sources: measured (this host), measured-remote (on the device, over ssh), estimated "
                  "(roofline calibrated on published figures; its out-of-sample error on them is in the "
                  "provenance below)."),
    ]
    messages = [f"{r['artifact']} ({r['status']}): {fmt_text(r.get('message'))}"
                for r in results if r["status"] != "ok" or r.get("message")]
    if messages:
        blocks.append(Bullets(messages))
    blocks += _device_top1(results)
    engines = [f"{r['artifact']}: built on {fmt_text(e.get('built_on'))} with TensorRT {fmt_text(e.get('tensorrt_version'))} "
               f"for {fmt_text(e.get('gpu'))}: " + (f"`{e['path']}`" if e.get("path") else fmt_text(e.get("message")))
               for r in results if (e := r.get("engine"))]
    if engines:
        blocks += [Heading(3, "Engines built on the device"), Bullets(engines)]
    rec = device.get("recommendation")
    if rec:
        result = _recommended(device) or {}
        latency = result.get("latency") or {}
        detail = ", ".join(part for part in (
            f"top-1 {fmt_pct(result.get('top1'))} %" if result.get("top1") is not None else "",
            f"p50 {fmt_ms(latency.get('p50_ms'))} ms {latency['source']}" if latency.get("p50_ms") is not None else "",
        ) if part)
        text = rec["artifact"] + (f": {rec['reason']}" if rec.get("reason") else "")
        fields = [("Recommendation", text + (f" ({detail})" if detail else ""))]
        if rec.get("bundle"):
            fields.append(("Bundle to ship", f"`{rec['bundle']}/` (the artifact, preprocess.json, labels.txt, "
                                             "model_card.md, predict.py)"))
        blocks.append(Fields(fields))
    else:
        blocks.append(Fields([("Recommendation", "none")]))
    blocks.append(Figure(device["name"], f"Accuracy vs p50 latency on {device['name']}"))
    blocks += _device_provenance(device.get("provenance") or {})
    return blocks


def _device_top1(results: list) -> list[Block]:
    """Top-1 measured on the device beside the host's, on the same images, per artifact it ran."""
    rows = []
    for r in results:
        ev = r.get("device_eval")
        if not ev:
            continue
        splits = ev.get("splits") or {}
        test, val = splits.get("top1") or {}, splits.get("val_top1") or {}
        images = ", ".join(f"{e['images']}/{e['of']}" for e in (val, test) if e)
        rows.append([r["artifact"], fmt_pct(test.get("device_top1")), fmt_pct(test.get("host_top1")),
                     fmt_pt(test.get("delta_pt")), fmt_pct(test.get("agreement")), fmt_pct(val.get("device_top1")),
                     fmt_pct(val.get("host_top1")), images or MISSING, ev.get("status") or MISSING,
                     fmt_text(ev.get("method") or ev.get("message"))])
    if not rows:
        return []
    return [Heading(3, "Top-1 on the device"),
            Table(["Artifact", "Device top-1 %", "Host top-1 %", "Δ pt", "Agreement %", "Device val %", "Host val %",
                   "Images (val, test)", "Status", "How"], rows, frozenset({1, 2, 3, 4, 5, 6})),
            Paragraph("The device ran the packed validation and test images through each artifact itself; the host "
                      "figures are the same runtime's on this host, on the same images. Where the device measured it, "
                      "Top-1 % above is the device's (measured on: device); with a subset of the images, it is the "
                      "host's whole-split top-1 moved by the device−host difference on that subset. The "
                      "recommendation uses these figures.")]


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "/".join(map(str, value))
    return str(value)


def _device_provenance(provenance: Mapping[str, Any]) -> list[Block]:
    """How this device's latencies were taken; for estimates, the calibration and its held-out error."""
    if not provenance:
        return []
    items = [("Latency per runtime", ", ".join(f"{rt}: {how}" for rt, how in (provenance.get("latency") or {}).items()))]
    if provenance.get("connection"):
        items.append(("Connection", provenance["connection"]))
    if provenance.get("profile"):
        p = provenance["profile"]
        items.append(("Profile", f"{p.get('path')} (sha256 {str(p.get('sha256'))[:12]}…"
                                 f"{', built in' if p.get('builtin') else ', not a built-in profile'})"))
    if provenance.get("adb"):
        adb = provenance["adb"]
        items.append(("Phone (adb)", f"serial {adb.get('serial')}, `{adb.get('benchmark_model')}` with "
                                     f"{', '.join(adb.get('delegates') or [])}; rescompress's adb path has been "
                                     f"tested against {adb.get('tested_on') or 'a fake adb only'}"))
    for key, value in (provenance.get("device") or {}).items():
        items.append((f"Device {key}", fmt_text(value)))
    if provenance.get("power_mode_command") and not (provenance.get("device") or {}).get("power_mode"):
        items.append(("Power mode", f"not read (it is read by `{provenance['power_mode_command']}` on the device, "
                                    f"over ssh)"))
    blocks: list[Block] = [Heading(3, "Provenance"), Fields(items)]
    for group, check in (provenance.get("estimates") or {}).items():
        params = check.get("parameters") or {}
        blocks.append(Paragraph(f"Estimate group {group}: "
                                + ", ".join(f"{k} {_number(v)}" for k, v in params.items())))
        rows = [[f["device"], f["model"], f["runtime"], f["precision"], fmt_text(f.get("check") or f.get("use")),
                 fmt_ms(f["published_ms"]), fmt_text(f.get("statistic")), fmt_ms(f.get("estimated_ms")),
                 MISSING if f.get("error_pct") is None else f"{f['error_pct']:+.1f}", f["source"]]
                for f in check.get("figures") or []]
        if rows:
            blocks.append(Paragraph("Each published figure beside the estimate of a fit that did not use it: "
                                    "leave-one-out for calibration figures, the full fit for held-out ones."))
            blocks.append(Table(["Device", "Model", "Runtime", "Precision", "Check", "Published ms", "Statistic",
                                 "Estimated ms", "Error %", "Source"], rows, frozenset({5, 7, 8})))
    return blocks


def build_document(report: Mapping[str, Any]) -> list[Block]:
    """What the report says, in order, as plain-text blocks (expects a validated report)."""
    blocks: list[Block] = [Heading(1, f"rescompress report: {report['recipe']['name']}"), _summary(report)]
    if report["devices"]:
        blocks += _recommendations(report)
    blocks += _stages(report) + _artifacts(report)
    for device in report["devices"]:
        blocks += _device(device)
    blocks += _trials(report.get("sweep"))
    blocks += _time(report["run"])
    provenance = report["provenance"]
    blocks += [Heading(2, "Provenance"), Fields([(str(k), fmt_text(v)) for k, v in provenance.items()])]
    return blocks


# --- Markdown -------------------------------------------------------------------------------------

def _md(text: str) -> str:
    """Inline text made safe for Markdown: no raw HTML, no line breaks."""
    return " ".join(text.replace("<", "&lt;").split())


def _md_cell(text: str) -> str:
    return _md(text).replace("|", "\\|")


def _md_table(table: Table) -> str:
    align = ["---:" if i in table.numeric else "---" for i in range(len(table.headers))]
    lines = [table.headers, align, *table.rows]
    return "\n".join("| " + " | ".join(_md_cell(c) if line is not align else c for c in line) + " |"
                     for line in lines)


def _md_block(block: Block, plots: Mapping[str, str]) -> str:
    if isinstance(block, Heading):
        return "#" * block.level + " " + _md(block.text)
    if isinstance(block, Paragraph):
        return _md(block.text)
    if isinstance(block, Fields):
        return "\n".join(f"- **{_md(label)}:** {_md(value)}" for label, value in block.items)
    if isinstance(block, Bullets):
        return "\n".join(f"- {_md(item)}" for item in block.items)
    if isinstance(block, Table):
        return _md_table(block)
    link = plots.get(block.key)
    return f"![{_md(block.caption)}]({link.replace(' ', '%20')})" if link else ""


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> str:
    """The report as Markdown; `plots` maps plot keys to image links (relative paths) to include."""
    parts = (_md_block(block, plots or {}) for block in build_document(report))
    return "\n\n".join(part for part in parts if part) + "\n"
