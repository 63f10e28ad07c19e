"""ONNX export (torch.onnx dynamo exporter, opset >= 18), run in onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rescompress.export import TARGETS, TargetSpec
from rescompress.export.artifact import Artifact


class OnnxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    precision: Literal["fp32", "int8"] = Field(
        "fp32", description="int8 exports the qat/ptq model as a QDQ graph in the layout of its scheme")
    opset: int = Field(18, ge=18, le=23)
    dynamic_batch: bool = True


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def ort_runner(path: Path, threads: Optional[int], *, optimize: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """An onnxruntime CPU session as a numpy callable. Spinning is off so that one session's idle
    threads do not steal cores from the next measurement. `optimize=False` runs the graph as written
    (no QDQ fusion: every DequantizeLinear -> float op -> QuantizeLinear computed exactly)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: x})[0]

    return run


def _strip_node_metadata(path: Path) -> None:
    """The exporter records a Python stack trace on every node; for a small int8 model that is most of
    the file. A deployment artifact keeps the graph, weights and model-level metadata only."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(path))


def export_onnx(model, example, cfg: OnnxConfig, out_path: Path, *, spec, from_stage: str, devices=(),
                calibration=None) -> Artifact:
    import torch

    from rescompress.fileio import atomic_write

    model = model.eval()
    if cfg.dynamic_batch and example.shape[0] < 2:
        example = example.repeat(2, 1, 1, 1)  # a batch of 1 would be specialised away by torch.export
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if cfg.dynamic_batch else None

    def write(tmp: Path) -> None:
        from rescompress.console import loggers_at

        with loggers_at(logging.ERROR, "torch.onnx"), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(model, (example,), str(tmp), dynamo=True, opset_version=cfg.opset,
                              input_names=["input"], output_names=["logits"], dynamic_shapes=dynamic,
                              external_data=False, verbose=False)
        _strip_node_metadata(tmp)

    runtime, runner, accuracy_only, details = f"onnxruntime {ort_version()}", ort_runner, "", {}
    if cfg.precision == "int8":
        from rescompress.compress.qgraph import is_quantized, scheme_of

        if not is_quantized(model):
            raise ValueError("an int8 ONNX export needs the int8 model a qat or ptq stage produces")
        scheme = scheme_of(model)
        details["scheme"] = scheme
        if scheme != "onnxruntime":
            # onnxruntime's fused int8 kernels only suit its own layout (on x86 without VNNI they saturate
            # int16 sums); a graph laid out for TensorRT or LiteRT is judged with its Q/DQ computed as written
            runtime += f" (unfused QDQ reference for the {scheme} layout)"
            runner = partial(ort_runner, optimize=False)
            accuracy_only = (f"{scheme}-layout int8 run by onnxruntime without fusion: its top-1 is the QDQ "
                             f"graph's, its speed is not {scheme}'s")
    atomic_write(out_path, write)
    return Artifact(name=f"onnx-{cfg.precision}", target="onnx", precision=cfg.precision, path=out_path,
                    input_spec=spec, runtime=runtime, from_stage=from_stage, load_runner=runner,
                    accuracy_only=accuracy_only, details=details)


def _reload(details: dict) -> Callable:
    """The runner of an ONNX this target wrote: fused, except a QDQ graph in another runtime's layout."""
    return ort_runner if details.get("scheme") in (None, "onnxruntime") else partial(ort_runner, optimize=False)


TARGETS.add("onnx", TargetSpec(name="onnx", config=OnnxConfig, export=export_onnx, precisions=("fp32", "int8"),
                               suffix=".onnx", runtime="onnxruntime", summary="ONNX (opset >= 18) run in onnxruntime",
                               reload=_reload))
