"""TFLite / LiteRT export, run in the LiteRT interpreter (`ai_edge_litert`).

Two converters:
- `litert_torch` (default, extra `tflite`): converts the torch model directly. An int8 export converts the
  PT2E model a qat/ptq stage produced, so the quantization parameters it learned are the ones that ship.
  fp16 stores the float model's weights in half precision (ai-edge-quantizer).
- `onnx2tf` (extra `tensorflow`): TensorFlow's converter over the ONNX export. int8 is post-training
  quantization calibrated on real training images; it does not see the QAT parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from rescompress.errors import BackendMissingError
from rescompress.export import TARGETS, TargetSpec
from rescompress.export.artifact import Artifact


class TFLiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    converter: Literal["litert_torch", "onnx2tf"] = Field(
        "litert_torch", description="litert_torch converts the torch/PT2E model (int8 keeps QAT's parameters); "
                                    "onnx2tf goes through TensorFlow from the ONNX export")
    layout: Literal["nchw", "nhwc"] = Field(
        "nchw", description="the input layout: nhwc is what cameras and Android pipelines hand over, with "
                            "no Transpose in the graph")
    calibration_batches: int = Field(8, gt=0, description="onnx2tf int8 only: batches of training images "
                                                            "its post-training quantization calibrates on")

    @property
    def name_suffix(self) -> str:
        """Sets the artifact's name apart from the default litert_torch NCHW one."""
        return ("-onnx2tf" if self.converter == "onnx2tf" else "") + ("-nhwc" if self.layout == "nhwc" else "")


def _source(cfg: TFLiteConfig) -> str:
    """litert_torch converts the qat/ptq model for int8; onnx2tf always starts from the float model."""
    return "int8" if cfg.precision == "int8" and cfg.converter == "litert_torch" else "fp32"


def _requires(cfg: TFLiteConfig) -> tuple[str, str]:
    return ("litert_torch", "tflite") if cfg.converter == "litert_torch" else ("onnx2tf", "tensorflow")


def require(module: str, extra: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendMissingError(f"{what} needs {module}, which is not installed ({exc}): "
                                  f"pip install 'rescompress[{extra}]'") from None


def litert_version() -> str:
    return dist_version("ai-edge-litert")


def litert_interpreter(path: Path, threads: Optional[int] = None, *, delegates: bool = True):
    """An allocated LiteRT interpreter: with XNNPACK (the CPU delegate phones use for fp32 and int8) unless
    `delegates` is False, which keeps every operator visible (for the lint)."""
    interp = require("ai_edge_litert.interpreter", "tflite", "running a .tflite model")
    resolver = (interp.OpResolverType.AUTO if delegates
                else interp.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it = interp.Interpreter(model_path=str(path), num_threads=threads or None,
                            experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    return it


def export_tflite(model, example, cfg: TFLiteConfig, out_path: Path, *, spec, from_stage: str, devices=(),
                  calibration: Optional[Callable[[int], np.ndarray]] = None) -> Artifact:
    """Convert `model` to a .tflite file at `out_path` (batch 1, the phone's shape) and wrap it."""
    from rescompress.fileio import atomic_write

    details: dict = {"converter": cfg.converter, "layout": cfg.layout}
    if cfg.converter == "litert_torch":
        convert = _litert_torch_int8 if cfg.precision == "int8" else _litert_torch_float
        atomic_write(out_path, lambda tmp: convert(model, example[:1], cfg, tmp, details))
        details["converter_version"] = dist_version("litert-torch")
    else:
        atomic_write(out_path, lambda tmp: _onnx2tf(model, example[:1], cfg, tmp, details, calibration))
        details["converter_version"] = (f"onnx2tf {dist_version('onnx2tf')}, "
                                        f"tensorflow {dist_version('tensorflow-cpu')}")
    if spec is not None and cfg.layout == "nhwc":
        spec = dataclasses.replace(spec, layout="NHWC")  # what the file takes; the runner still takes NCHW
    return Artifact(name=f"tflite-{cfg.precision}{cfg.name_suffix}", target="tflite", precision=cfg.precision,
                    path=out_path, input_spec=spec, runtime=f"litert {litert_version()} (XNNPACK)",
                    from_stage=from_stage, load_runner=partial(tflite_runner, nhwc=cfg.layout == "nhwc"),
                    details=details)


def dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def litert_torch_module():
    return require("litert_torch", "tflite", "the tflite target (converter litert_torch)")


def _channel_last(lt, model, cfg: TFLiteConfig):
    return lt.to_channel_last_io(model, args=[0]).eval() if cfg.layout == "nhwc" else model


def _sample(example, cfg: TFLiteConfig):
    return example.permute(0, 2, 3, 1).contiguous() if cfg.layout == "nhwc" else example


def _litert_torch_float(model, example, cfg: TFLiteConfig, tmp: Path, details: dict) -> None:
    from rescompress.compress.qgraph import is_quantized

    if is_quantized(model):
        raise ValueError("a float tflite export needs a float model, got the int8 PT2E model")
    lt = litert_torch_module()
    with quiet_converter():
        edge = lt.convert(_channel_last(lt, model.eval(), cfg), (_sample(example, cfg),))
        if cfg.precision == "fp32":
            edge.export(str(tmp))
            return
        float_path = tmp.with_name(tmp.name + ".fp32")
        edge.export(str(float_path))
        try:
            _fp16_weights(float_path, tmp)
        finally:
            float_path.unlink(missing_ok=True)
    details["fp16"] = "weights stored in float16 (ai-edge-quantizer float casting), computed in float32"


def _fp16_weights(src: Path, dest: Path) -> None:
    """Conv and fully-connected weights stored as float16 (half the file; XNNPACK computes in float)."""
    aeq = require("ai_edge_quantizer.quantizer", "tflite", "tflite fp16")
    quantizer = aeq.Quantizer(str(src))
    quantizer.load_quantization_recipe([{
        "regex": ".*", "operation": "*", "algorithm_key": "float_casting",
        "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"}, "compute_precision": "FLOAT",
                      "explicit_dequantize": True, "skip_checks": False, "min_weight_elements": 0}}])
    dest.write_bytes(bytes(quantizer.quantize().quantized_model))


def _litert_torch_int8(model, example, cfg: TFLiteConfig, tmp: Path, details: dict) -> None:
    from rescompress.compress.qgraph import is_quantized, scheme_of

    if not is_quantized(model):
        raise ValueError("a tflite int8 export with litert_torch needs the int8 model a qat or ptq stage "
                         "produces (or converter: onnx2tf, which quantizes after training)")
    lt = litert_torch_module()
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    # The quantizer only tells the converter that the graph carries static Q/DQ to fuse into integer
    # kernels; the graph's own scales and zero points (QAT's or calibration's) are the ones converted.
    marker = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    static = QuantConfig(pt2e_quantizer=marker)
    with quiet_converter():
        edge = lt.convert(_channel_last(lt, unfold_int8_weights(model), cfg), (_sample(example, cfg),),
                          quant_config=static)
        edge.export(str(tmp))
    details["scheme"] = scheme_of(model)
    details["quantization"] = "the PT2E model's own scales and zero points (QAT or calibration)"


def _onnx2tf(model, example, cfg: TFLiteConfig, tmp: Path, details: dict,
             calibration: Optional[Callable[[int], np.ndarray]]) -> None:
    import tempfile

    from rescompress.compress.qgraph import is_quantized
    from rescompress.export.onnx import OnnxConfig, export_onnx

    onnx2tf = require("onnx2tf", "tensorflow", "the tflite target with converter onnx2tf")
    if is_quantized(model):
        raise ValueError("converter onnx2tf converts the float model; its int8 is post-training quantization")
    if cfg.precision == "int8" and calibration is None:
        raise ValueError("onnx2tf int8 needs calibration images")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        onnx_path = work / "model.onnx"
        export_onnx(model, example, OnnxConfig(precision="fp32", dynamic_batch=False), onnx_path, spec=None,
                    from_stage="")
        kwargs = {}
        if cfg.precision == "int8":
            images = calibration(cfg.calibration_batches * 32)
            if cfg.layout == "nhwc":
                images = images.transpose(0, 2, 3, 1)  # calibration data comes in the converted model's layout
            np.save(work / "calibration.npy", images.astype(np.float32))
            stats = (1, 1, 1, images.shape[-1]) if cfg.layout == "nhwc" else (1, images.shape[1], 1, 1)
            kwargs = {"output_integer_quantized_tflite": True, "quant_type": "per-channel",
                      "custom_input_op_name_np_data_path": [[
                          "input", str(work / "calibration.npy"), np.zeros(stats, np.float32),
                          np.ones(stats, np.float32)]]}
            details["quantization"] = (f"post-training, calibrated on {len(images)} training images; "
                                       f"the QAT parameters are not used")
        with quiet_converter():
            onnx2tf.convert(input_onnx_file_path=str(onnx_path), output_folder_path=str(work / "tf"),
                            keep_ncw_or_nchw_or_ncdhw_input_names=["input"] if cfg.layout == "nchw" else None,
                            copy_onnx_input_output_names_to_tflite=True, non_verbose=True, verbosity="error",
                            **kwargs)
        produced = {"fp32": "model_float32.tflite", "fp16": "model_float16.tflite",
                    "int8": "model_full_integer_quant.tflite"}[cfg.precision]
        if not (work / "tf" / produced).is_file():
            made = ", ".join(p.name for p in (work / "tf").glob("*.tflite")) or "nothing"
            raise RuntimeError(f"onnx2tf did not write {produced} (it wrote {made})")
        tmp.write_bytes((work / "tf" / produced).read_bytes())


_CONVERTER_LOGGERS = ("litert_torch",)


@contextlib.contextmanager
def quiet_converter():
    """The converters print progress trees and TensorFlow banners, and litert-torch logs each lowering step;
    a run's log keeps rescompress's lines. Inside the block only: the loggers' levels are restored after."""
    from rescompress.console import loggers_at

    with loggers_at(logging.ERROR, *_CONVERTER_LOGGERS), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tflite_runner(path: Path, threads: Optional[int], *, nhwc: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """The LiteRT interpreter as a numpy callable on normalised NCHW float batches.

    An int8-io model gets its input quantized and its output dequantized with the model's own parameters.
    The model has batch 1 (what a phone runs); a larger batch is run image by image.
    """
    it = litert_interpreter(path, threads)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    in_scale, in_zp = inp["quantization"]
    out_scale, out_zp = out["quantization"]
    in_dtype = np.dtype(inp["dtype"])
    info = np.iinfo(in_dtype) if in_dtype.kind in "iu" else None

    def one(x: np.ndarray) -> np.ndarray:
        if nhwc:
            x = x.transpose(0, 2, 3, 1)
        if info is not None:
            x = np.clip(np.round(x / in_scale + in_zp), info.min, info.max)
        it.set_tensor(inp["index"], np.ascontiguousarray(x, dtype=in_dtype))
        it.invoke()
        y = it.get_tensor(out["index"])
        return (y.astype(np.float32) - out_zp) * out_scale if out_scale else y.astype(np.float32, copy=True)

    def run(x: np.ndarray) -> np.ndarray:
        if len(x) == 1:
            return one(x)
        return np.concatenate([one(x[i:i + 1]) for i in range(len(x))])

    return run


def unfold_int8_weights(gm):
    """A copy of a PT2E model whose int8 weight constants are float again, each behind the quantize op
    that reproduces them exactly.

    convert_pt2e stores weights as int8 constants feeding `dequantize`. LiteRT's lowering types a tensor as
    quantized only where a `quantize` op produced it, so it wants `float weight -> quantize -> dequantize`.
    Dequantizing and requantizing with the same scale gives back the same integers, so the shipped weights
    are bit for bit the ones QAT/PTQ chose.
    """
    import copy

    import torch

    qd = torch.ops.quantized_decomposed
    pairs = {qd.dequantize_per_channel.default: qd.quantize_per_channel.default,
             qd.dequantize_per_tensor.default: qd.quantize_per_tensor.default}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecation, raised while copying
        gm = copy.deepcopy(gm)
    graph = gm.graph
    for i, node in enumerate(list(graph.nodes)):
        if node.op != "call_function" or node.target not in pairs or node.args[0].op != "get_attr":
            continue
        q_const = _attr_value(gm, node.args[0].target)
        if q_const.is_floating_point():
            continue
        args = [_attr_value(gm, a.target) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a
                for a in node.args]
        name = f"_rescompress_float_weight_{i}"
        gm.register_buffer(name, node.target(*args).contiguous())
        with graph.inserting_before(node):
            w = graph.get_attr(name)
            q = graph.call_function(pairs[node.target], (w, *node.args[1:]))
        node.replace_input_with(node.args[0], q)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _attr_value(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


TARGETS.add("tflite", TargetSpec(name="tflite", config=TFLiteConfig, export=export_tflite,
                                 precisions=("fp32", "fp16", "int8"), suffix=".tflite", runtime="tflite",
                                 summary="TFLite run in the LiteRT interpreter (litert-torch; converter onnx2tf needs "
                                         "rescompress[tensorflow])",
                                 extra="tflite", source=_source, requires=_requires,
                                 reload=lambda details: partial(tflite_runner, nhwc=details.get("layout") == "nhwc"),
                                 # LiteRT int8 is int8 activations with any zero point: tensorrt's symmetric
                                 # layout is a special case; onnxruntime's uint8 activations are not
                                 schemes=("tflite", "tensorrt")))
