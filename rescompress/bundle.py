"""A bundle per deployable artifact: everything needed to run it on its device, in one folder.

`runs/<run>/bundles/<artifact>/` holds
- the model file (an ONNX's external-data files too; for TensorRT the ONNX the engine is built from, and the
  engine where it was built here),
- `preprocess.json`: how an image file becomes the model's input (resize, crop, interpolation, colour, scale,
  mean/std, layout, input dtype and int8 quantization, tensor names), read by `rescompress.load` and by
- `predict.py`: a runnable example that needs only numpy, Pillow and the runtime,
- `labels.txt`: one class name per line, in output order,
- `model_card.md`: where the model came from, what it measured per runtime and device, its lint, and the
  exact command that builds or runs it.

The torch-* artifacts of a run get no bundle: they are the accuracy references the exports are compared
with, not something a device runs.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from rescompress.deploy import (BUNDLE_SCHEMA_VERSION, LABELS, PREPROCESS, TARGET_RUNTIMES, class_names,
                                preprocess_from_spec)
from rescompress.fileio import atomic_write_json, atomic_write_text, current_umask

BUNDLES = "bundles"
CARD = "model_card.md"
EXAMPLE = "predict.py"
BUNDLED_STATUSES = ("ok", "deferred")
PIP = {"onnxruntime": "numpy pillow onnxruntime", "litert": "numpy pillow ai-edge-litert",
       "tensorrt": "numpy pillow tensorrt cupy-cuda12x"}


def bundleable(row: dict) -> bool:
    """An exported artifact with a file, ok or deferred (a deferred TensorRT export ships its ONNX)."""
    return (row.get("target") in ("onnx", "tflite", "tensorrt") and row.get("status") in BUNDLED_STATUSES
            and bool(row.get("path")) and bool(row.get("input_spec")))


def write_bundles(run_dir: Path, report: dict) -> dict[str, str]:
    """Write `bundles/<artifact>/` for each deployable artifact of a finished run's `report`; returns artifact
    name -> bundle folder relative to `run_dir`. torch-* references get none; nor does an artifact whose file
    is missing."""
    run_dir = Path(run_dir)
    out: dict[str, str] = {}
    for row in report.get("artifacts") or []:
        if not bundleable(row) or not (run_dir / row["path"]).is_file():
            continue
        rel = f"{BUNDLES}/{row['name']}"
        write_bundle(run_dir, report, row, run_dir / rel)
        out[row["name"]] = rel
    return out


def write_bundle(run_dir: Path, report: dict, row: dict, dest: Path) -> Path:
    """One artifact's bundle at `dest`, built in a temporary folder beside it and then moved into place, so
    that a crash leaves the previous bundle or none, never half of one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        _fill(run_dir, report, row, tmp)
        os.chmod(tmp, 0o777 & ~current_umask())
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _fill(run_dir: Path, report: dict, row: dict, out: Path) -> None:
    src = run_dir / row["path"]
    runtime = TARGET_RUNTIMES[row["target"]]
    files = [src]
    onnx_file = src if src.suffix == ".onnx" else None
    if row["target"] == "tensorrt" and src.suffix != ".onnx":  # a built engine: ship its ONNX too
        sibling = src.with_name((row.get("details") or {}).get("onnx") or src.with_suffix(".onnx").name)
        if sibling.is_file():
            files.append(sibling)
            onnx_file = sibling
    if onnx_file is not None:
        files += _external_data(onnx_file)
    for f in files:
        shutil.copy2(f, out / f.name)
    pre = preprocess(report, row, src, onnx_file)
    labels = class_names(report)
    atomic_write_json(out / PREPROCESS, pre)
    atomic_write_text(out / LABELS, "".join(f"{name}\n" for name in labels))
    atomic_write_text(out / EXAMPLE, example_script(runtime, row))
    atomic_write_text(out / CARD, model_card(report, row, pre, [f.name for f in files]))


def _external_data(onnx_path: Path) -> list[Path]:
    """The external-data files an ONNX model's tensors live in (relative to its folder)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names |= {e.value for e in tensor.external_data if e.key == "location"}
    return [onnx_path.parent / n for n in sorted(names) if (onnx_path.parent / n).is_file()]


# ---------------------------------------------------------------- preprocess.json


def preprocess(report: dict, row: dict, model_file: Path, onnx_file: Optional[Path]) -> dict[str, Any]:
    """preprocess.json of one artifact: the image steps from its input spec, and the tensors read from the file."""
    from rescompress.deploy import _runner_options

    runtime = TARGET_RUNTIMES[row["target"]]
    details = row.get("details") or {}
    io_file = model_file if model_file.suffix in (".onnx", ".tflite") else onnx_file
    if io_file is None:
        raise FileNotFoundError(f"{model_file.name}: no ONNX beside the engine to read its tensor names from")
    inp, out = tflite_io(io_file) if io_file.suffix == ".tflite" else onnx_io(io_file)
    steps = preprocess_from_spec(row["input_spec"])
    if row["target"] == "tflite":
        steps["layout"] = str(details.get("layout") or steps["layout"]).upper()
    pre: dict[str, Any] = {
        "bundle_schema_version": BUNDLE_SCHEMA_VERSION,
        "name": row["name"],
        "artifact": model_file.name if row["target"] != "tensorrt" or model_file.suffix == ".onnx"
        else (onnx_file.name if onnx_file else model_file.name),
        "target": row["target"],
        "precision": row.get("precision"),
        "runtime": runtime,
        "runtime_version": row.get("runtime"),
        **steps,
        "input": inp,
        "output": out,
        "num_classes": int((report.get("dataset") or {}).get("num_classes") or 0) or len(class_names(report)),
    }
    if row["target"] == "tensorrt":
        pre["engine"] = model_file.name if model_file.suffix in (".engine", ".plan") \
            else model_file.with_suffix(".engine").name
        pre["build_command"] = _build_command(row, onnx_file, pre)
    if _runner_options(row).get("graph_optimization"):
        pre["graph_optimization"] = "disabled"  # how onnxruntime ran it when its top-1 was measured
    return pre


def onnx_io(path: Path) -> tuple[dict, dict]:
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}

    def tensor(value) -> dict:
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        return {"name": value.name, "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type)), "shape": dims,
                "quantization": None}

    inputs = [v for v in graph.input if v.name not in initializers]
    return tensor(inputs[0]), tensor(graph.output[0])


def tflite_io(path: Path) -> tuple[dict, dict]:
    import numpy as np

    from rescompress.export.tflite import litert_interpreter

    it = litert_interpreter(path, delegates=False)

    def tensor(d: dict) -> dict:
        scale, zero_point = d["quantization"]
        return {"name": d["name"], "dtype": np.dtype(d["dtype"]).name, "shape": [int(s) for s in d["shape"]],
                "quantization": {"scale": float(scale), "zero_point": int(zero_point)} if scale else None}

    return tensor(it.get_input_details()[0]), tensor(it.get_output_details()[0])


def _build_command(row: dict, onnx_file: Optional[Path], pre: dict) -> str:
    """The trtexec line that builds the engine, run in the bundle folder."""
    commands = (row.get("details") or {}).get("build_commands") or {}
    if commands:
        return next(iter(commands.values()))
    from rescompress.export.tensorrt import TensorRTConfig, trtexec_command

    cfg = TensorRTConfig(**{k: v for k, v in ((row.get("details") or {}).get("build_config") or {}).items()
                            if k in ("precision", "max_batch", "workspace_mib")})
    chw = tuple(int(d) for d in pre["input"]["shape"][1:])
    return trtexec_command(cfg, onnx_file.name if onnx_file else pre["artifact"], pre["engine"], chw)


# ---------------------------------------------------------------- predict.py


def example_script(runtime: str, row: dict) -> str:
    """The bundle's predict.py: a header, the shared preprocessing, and the runtime's `open_model`."""
    templates = resources.files("rescompress.bundle_examples")
    common = templates.joinpath("common.py").read_text(encoding="utf-8")
    body = templates.joinpath(f"predict_{runtime}.py").read_text(encoding="utf-8")
    needs = {"onnxruntime": "onnxruntime", "litert": "LiteRT (ai-edge-litert; tflite-runtime or TensorFlow also do)",
             "tensorrt": "TensorRT and CuPy, on an NVIDIA GPU"}[runtime]
    header = (f'"""Print the top-5 classes of image files with {row["name"]}, run by {needs}.\n\n'
              f"    python predict.py IMAGE [IMAGE ...]\n\n"
              f"Needs only numpy, Pillow and the runtime; reads preprocess.json and labels.txt beside it. The\n"
              f"preprocessing is the one the model was evaluated with in rescompress. Written by rescompress.\n"
              f'"""\n')
    return f"{header}\n{common.rstrip()}\n\n\n{body.lstrip()}"


# ---------------------------------------------------------------- model_card.md


def _pct(x: Any) -> str:
    return f"{100.0 * x:.2f} %" if isinstance(x, (int, float)) else "—"


def _ms(x: Any) -> str:
    return f"{x:.3g} ms" if isinstance(x, (int, float)) else "—"


def _cell(x: Any) -> str:
    return str(x if x not in (None, "") else "—").replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]


def _version(text: Optional[str]) -> Optional[str]:
    m = re.search(r"\d+\.\d+(?:\.\d+)?", text or "")
    return m.group(0) if m else None


def model_card(report: dict, row: dict, pre: dict, files: list[str]) -> str:
    name = row["name"]
    recipe, model, dataset = report.get("recipe") or {}, report.get("model") or {}, report.get("dataset") or {}
    lines = [f"# {name}", "",
             f"{row.get('target')} {row.get('precision') or ''} artifact of the rescompress run of recipe "
             f"`{recipe.get('name', '?')}`, exported from stage `{row.get('from_stage') or '?'}`; status "
             f"**{row.get('status')}**.", ""]
    if row.get("status") == "deferred" and row.get("message"):
        lines += [f"> {row['message']}", ""]
    lines += ["## Files", ""]
    lines += [f"- `{f}`" for f in files]
    if pre.get("engine") and pre["engine"] not in files:
        lines.append(f"- `{pre['engine']}`: not built yet (see *Build and run*)")
    lines += [f"- `{PREPROCESS}`: preprocessing and tensors (bundle_schema_version {pre['bundle_schema_version']})",
              f"- `{LABELS}`: {pre['num_classes']} class names, one per line in output order",
              f"- `{EXAMPLE}`: a runnable example (numpy, Pillow and the runtime only)", ""]

    lines += ["## Where it came from", ""]
    lines.append(f"- recipe: `{recipe.get('name', '?')}`" + (f" ({recipe['path']})" if recipe.get("path") else ""))
    arch = model.get("arch") or {}
    lines.append(f"- model: `{model.get('name', '?')}`"
                 + (f" ({', '.join(f'{k}={v}' for k, v in arch.items() if k != 'name')})" if arch else ""))
    source = model.get("import") or {}
    if source:
        lines.append(f"- imported from `{source.get('path') or '?'}` ({source.get('format') or '?'}, source run by "
                     f"{source.get('runtime') or '?'}; its top-1 here {_pct(source.get('top1'))})")
    else:
        weights = model.get("weights")
        lines.append(f"- weights: `{weights}`" if weights else "- weights: none (trained from scratch by the run)")
    lines.append(f"- dataset: {dataset.get('name', '?')} ({dataset.get('num_classes', '?')} classes)")
    lines.append(f"- rescompress {report.get('rescompress_version', '?')}, report schema "
                 f"{report.get('schema_version', '?')}")
    stages = report.get("stages") or []
    if stages:
        lines += ["", "Stages, in order:", ""]
        lines += _table(["stage", "kind", "precision", "test top-1", "val top-1", "MACs", "params"],
                        [[s.get("name"), s.get("kind"), s.get("precision"), _pct(s.get("top1")), _pct(s.get("val_top1")),
                          f"{s['macs']:,}" if isinstance(s.get("macs"), int) else None,
                          f"{s['params']:,}" if isinstance(s.get("params"), int) else None] for s in stages])
    lines.append("")

    lines += ["## Preprocessing", "", pre.get("transform") or "", "",
              f"Input `{pre['input']['name']}` {pre['input']['dtype']} {pre['input'].get('shape')}, layout "
              f"{pre['layout']}" + (f", quantized with scale {pre['input']['quantization']['scale']:.6g} and zero "
                                    f"point {pre['input']['quantization']['zero_point']}"
                                    if pre["input"].get("quantization") else "")
              + f"; output `{pre['output']['name']}` {pre['output']['dtype']}"
              + (f" (dequantize with scale {pre['output']['quantization']['scale']:.6g}, zero point "
                 f"{pre['output']['quantization']['zero_point']})" if pre["output"].get("quantization") else "")
              + ".", ""]

    lines += _accuracy(report, row)
    lines += _latency(report, row)
    lines += _lint(row)
    lines += _commands(row, pre)
    return "\n".join(lines).rstrip() + "\n"


def _results(report: dict, name: str) -> list[tuple[dict, dict]]:
    return [(d, r) for d in report.get("devices") or [] for r in d.get("results") or [] if r.get("artifact") == name]


def _accuracy(report: dict, row: dict) -> list[str]:
    lines = ["## Accuracy", ""]
    lines.append(f"On its own runtime ({row.get('runtime') or '?'}): test top-1 {_pct(row.get('top1'))}, validation "
                 f"top-1 {_pct(row.get('val_top1'))}" + (f", measured with {row['top1_source']}"
                                                         if row.get("top1_source") else "") + ".")
    parity = row.get("parity") or {}
    if parity:
        lines.append(f"Against {parity.get('reference', 'its reference')}: max |Δlogit| "
                     f"{parity.get('max_abs_diff', float('nan')):.3g}, top-1 agreement "
                     f"{_pct(parity.get('top1_agreement'))}.")
    rows = []
    for device, r in _results(report, row["name"]):
        ev = r.get("device_eval") or {}
        where = "the device" if r.get("top1_source") == "device" else (r.get("top1_source") or "—")
        rows.append([device.get("name"), r.get("runtime"), _pct(r.get("top1")), _pct(r.get("val_top1")), where,
                     _pct(r.get("host_top1")) if r.get("top1_source") == "device" else "—",
                     f"{ev.get('status')}: {ev.get('message') or ''}".strip(": ") if ev else "—"])
    if rows:
        lines += ["", "Per device (host = measured on the machine that ran the recipe):", ""]
        lines += _table(["device", "runtime", "test top-1", "val top-1", "measured on", "host top-1",
                         "on-device evaluation"], rows)
    return lines + [""]


def _latency(report: dict, row: dict) -> list[str]:
    rows = []
    for device, r in _results(report, row["name"]):
        lat = r.get("latency") or {}
        recommended = (device.get("recommendation") or {}).get("artifact") == row["name"]
        rows.append([device.get("name"), _ms(lat.get("p50_ms")), _ms(lat.get("p90_ms")),
                     lat.get("source") or "not measured", lat.get("statistic"), lat.get("host"),
                     lat.get("runtime_version"),
                     ("**recommended**: " + (device.get("recommendation") or {}).get("reason", "")) if recommended
                     else (r.get("message") or r.get("status"))])
    if not rows:
        return []
    return (["## Latency", "",
             "Source: `measured` on this host, `measured-remote` on the device over ssh, `estimated` from the "
             "device profile.", ""]
            + _table(["device", "p50", "p90", "source", "statistic", "host", "runtime", "note"], rows) + [""])


def _lint(row: dict) -> list[str]:
    checked = row.get("lint_checked") or {}
    lines = ["## Lint", ""]
    if not checked:
        return lines + ["Not linted.", ""]
    lines += _table(["target", "status", "errors", "warnings", "checked"],
                    [[t, c.get("status") or ("passed" if c.get("passed") else "failed"), c.get("errors"),
                      c.get("warnings"), c.get("checked")] for t, c in checked.items()])
    findings = row.get("lint") or []
    if findings:
        lines += ["", "Findings:", ""]
        lines += [f"- {f.get('target', '')} {f.get('severity', '')} `{f.get('rule', '')}`"
                  f"{' at ' + f['node'] if f.get('node') else ''}: {f.get('message', '')}"
                  f"{' — fix: ' + f['fix'] if f.get('fix') else ''}" for f in findings]
    return lines + [""]


def _commands(row: dict, pre: dict) -> list[str]:
    runtime = pre["runtime"]
    lines = ["## Build and run", ""]
    if runtime == "tensorrt":
        commands = (row.get("details") or {}).get("build_commands") or {"any": pre["build_command"]}
        built = bool(pre.get("engine")) and pre["engine"] != pre["artifact"] and row.get("status") == "ok"
        lines.append(("The engine was built here on " + str((row.get('details') or {}).get('gpu')) + "; it runs only "
                      "on that GPU and TensorRT version. To build it for another, run in this folder:") if built
                     else "Build the engine on the device (TensorRT engines are specific to the GPU and TensorRT "
                          "version), in this folder:")
        lines.append("")
        for device, command in commands.items():
            lines += [f"{'any TensorRT host' if device == 'any' else device}:", "", "```sh", command, "```", ""]
        if pre.get("precision") == "int8":
            lines += ["TensorRT 8.x (JetPack 5 and 6.0) has no `--stronglyTyped`: use `--int8 --fp16` there.", ""]
    tested = _version(row.get("runtime"))
    lines += ["Run the example on an image (numpy, Pillow and the runtime only):", "", "```sh",
              f"pip install {PIP[runtime]}" + (f"   # measured with {row.get('runtime')}" if tested else ""),
              f"python {EXAMPLE} IMAGE.png", "```", "",
              "With rescompress installed: `rescompress predict . IMAGE.png`, or in Python "
              "`rescompress.load(\".\").predict(\"IMAGE.png\")`.", ""]
    return lines
