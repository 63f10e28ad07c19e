"""ONNX export (torch.onnx dynamo exporter, opset >= 18), run in onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
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


def ort_runner(path: Path, threads: Optional[int]) -> Callable[[np.ndarray], np.ndarray]:
    """An onnxruntime CPU session as a numpy callable. Spinning is off so that one session's idle
    threads do not steal cores from the next measurement."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: x})[0]

    return run


def export_onnx(model, example, cfg: OnnxConfig, out_path: Path, *, spec, from_stage: str) -> Artifact:
    import torch

    from rescompress.fileio import atomic_write

    model = model.eval()
    if cfg.dynamic_batch and example.shape[0] < 2:
        example = example.repeat(2, 1, 1, 1)  # a batch of 1 would be specialised away by torch.export
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if cfg.dynamic_batch else None

    def write(tmp: Path) -> None:
        quiet = io.StringIO()
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(quiet), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.onnx.export(model, (example,), str(tmp), dynamo=True, opset_version=cfg.opset,
                                  input_names=["input"], output_names=["logits"], dynamic_shapes=dynamic,
                                  external_data=False, verbose=False)
        finally:
            logging.getLogger("torch.onnx").setLevel(level)

    atomic_write(out_path, write)
    return Artifact(name=f"onnx-{cfg.precision}", target="onnx", precision=cfg.precision, path=out_path,
                    input_spec=spec, runtime=f"onnxruntime {ort_version()}", from_stage=from_stage,
                    load_runner=ort_runner)


TARGETS.add("onnx", TargetSpec(name="onnx", config=OnnxConfig, export=export_onnx, precisions=("fp32", "int8"),
                               runtime="onnxruntime", summary="ONNX (opset >= 18) run in onnxruntime"))
