"""Deployability lint: does an exported file run the way its target runtime runs fast?

`lint_file(path, target)` reads an artifact and returns a `LintResult` whose findings each name a rule, the
node and the fix. Three targets:

- `tensorrt` (an ONNX file): the QDQ layout TensorRT builds int8 engines from. Only QuantizeLinear /
  DequantizeLinear (no QOperator ops), int8 zero points that are all 0, per-channel weight scales on an
  explicit axis 0 with one scale per output channel, per-tensor activation scales, positive finite scales,
  float biases (no int32 bias DequantizeLinear), Q/DQ on both inputs of every residual Add, opset >= 13.
  Needs no GPU.
- `onnxruntime` (an ONNX file): onnxruntime's own graph optimisation is run and every int8 Conv, Add and
  Gemm must come out as an integer kernel (QLinearConv, QLinearAdd, QGemm, ...); one left in float between
  Dequantize and Quantize runs slower than fp32. Whether 8-bit weights can saturate U8S8 kernels depends on
  the CPU that runs the model: it is judged for the device profiles given (their `cpu` section), and said to
  be unknown without one.
- `tflite` (a .tflite file): for an int8 model, every operator computes on integer tensors; only the
  QUANTIZE at the input and the DEQUANTIZE at the output may touch float.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from rescompress.errors import RescompressError

if TYPE_CHECKING:
    from rescompress.devices import CPUFeatures, DeviceProfile

LINT_TARGETS = ("tensorrt", "onnxruntime", "tflite")
QOPERATOR_OPS = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
                 "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QGemm",
                 "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat",
                 "DynamicQuantizeMatMul", "QAttention", "QLinearSoftmax"}
INT8_KERNELS = {"QLinearConv", "QLinearAdd", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearMul", "NhwcQLinearConv"}
INT8_DTYPE = 3  # onnx.TensorProto.INT8
FLOAT_COMPUTE = {"Conv", "FusedConv", "Add", "Gemm", "MatMul", "FusedGemm", "FusedMatMul", "NchwcConv"}


@dataclass
class Finding:
    rule: str
    severity: str  # "error" (the runtime will not run it, or not in int8) | "warning" (runs, slower) | "info"
    node: str
    message: str
    fix: str = ""

    def to_dict(self) -> dict:
        return {"rule": self.rule, "severity": self.severity, "node": self.node, "message": self.message,
                "fix": self.fix}

    def line(self) -> str:
        where = f" [{self.node}]" if self.node else ""
        fix = f"\n      fix: {self.fix}" if self.fix else ""
        return f"{self.severity:<7} {self.rule}{where}: {self.message}{fix}"


@dataclass
class LintResult:
    target: str
    path: str
    findings: list[Finding] = field(default_factory=list)
    checked: str = ""  # what was checked, in words

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def passed(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"target": self.target, "passed": self.passed, "errors": len(self.errors),
                "warnings": len(self.warnings), "checked": self.checked,
                "findings": [f.to_dict() for f in self.findings]}

    def summary(self) -> str:
        verdict = "passes" if self.passed else "FAILS"
        return (f"{Path(self.path).name} {verdict} the {self.target} lint: {len(self.errors)} error(s), "
                f"{len(self.warnings)} warning(s) ({self.checked})")


def lint_file(path: str | Path, target: str, devices: Sequence["DeviceProfile"] = ()) -> LintResult:
    """Lint `path` for `target`; `devices`: the profiles of the devices that will run it in onnxruntime, whose
    CPUs the onnxruntime rules judge (without any, what depends on the CPU is reported as unknown)."""
    path = Path(path)
    if target not in LINT_TARGETS:
        raise RescompressError(f"unknown lint target '{target}' (known: {', '.join(LINT_TARGETS)})")
    if not path.is_file():
        raise RescompressError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if target == "tflite":
        if suffix != ".tflite":
            raise RescompressError(f"the tflite lint reads a .tflite file, got {path.name}")
        return lint_tflite(path)
    if suffix != ".onnx":
        raise RescompressError(f"the {target} lint reads an ONNX file, got {path.name}")
    model = _load_onnx(path)
    if target == "tensorrt":
        return LintResult("tensorrt", str(path), list(tensorrt_rules(model)), _describe(model))
    return lint_onnxruntime(path, model, devices)


def _load_onnx(path: Path):
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise RescompressError(f"{path} is not a readable ONNX model: {type(exc).__name__}: {exc}") from None
    if not model.HasField("graph") or not model.opset_import:
        # protobuf decodes an empty or truncated file as an empty model, which would pass every rule
        raise RescompressError(f"{path} is not a readable ONNX model: it has no graph or no opset")
    return model


def _describe(model) -> str:
    from collections import Counter

    ops = Counter(n.op_type for n in model.graph.node)
    q = ops["QuantizeLinear"] + ops["DequantizeLinear"]
    return f"{len(model.graph.node)} nodes, {q} Q/DQ, opset {_opset(model)}"


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# ------------------------------------------------------------------------------------------ ONNX helpers


class _Graph:
    """Constant values, producers and consumers of an ONNX graph (Constant nodes count as constants)."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        g = model.graph
        self.nodes = list(g.node)
        self.const = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.const[n.output[0]] = numpy_helper.to_array(a.t)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.shapes = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            dims = vi.type.tensor_type.shape.dim
            self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]

    def is_const(self, name: str) -> bool:
        if name in self.const:
            return True
        p = self.producer.get(name)
        # a weight stored in float and quantized in the graph: Q(constant) -> DQ
        return p is not None and p.op_type in ("QuantizeLinear", "Identity", "Cast") and p.input and self.is_const(p.input[0])

    def through_dq(self, name: str):
        p = self.producer.get(name)
        return p if p is not None and p.op_type == "DequantizeLinear" else None


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _label(node) -> str:
    return f"{node.op_type} {node.name}" if node.name else f"{node.op_type} -> {node.output[0]}"


FIX_QDQ = ("export in QDQ format: rescompress qat/ptq with scheme tensorrt, or onnxruntime quantize_static("
           "quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, "
           "per_channel=True, extra_options={'ActivationSymmetric': True, 'WeightSymmetric': True, "
           "'QuantizeBias': False})")
FIX_SYMMETRIC = ("quantize activations to symmetric int8: scheme tensorrt, or quantize_static(activation_type="
                 "QuantType.QInt8, extra_options={'ActivationSymmetric': True})")


def tensorrt_rules(model) -> Iterable[Finding]:
    """TensorRT-readiness of a QDQ ONNX graph (explicit quantization, TensorRT 8.6 to 10.x)."""
    import numpy as np

    opset = _opset(model)
    if opset < 13:
        yield Finding("trt-opset", "error", "opset_import", f"opset {opset}: per-channel Q/DQ needs opset >= 13",
                      "re-export with opset >= 13 (rescompress exports opset 18)")
    g = _Graph(model)
    for n in g.nodes:
        if n.op_type in QOPERATOR_OPS:
            yield Finding("trt-qoperator", "error", _label(n),
                          f"{n.op_type} is an onnxruntime QOperator op; TensorRT only reads int8 as "
                          f"QuantizeLinear/DequantizeLinear pairs around float ops", FIX_QDQ)
    qdq = [n for n in g.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        return  # a float graph: no int8 rules apply
    weight_dq = {}  # DQ output name -> (conv/gemm node) when the DQ feeds a weight input
    bias_dq = {}  # the same for a bias input
    for n in g.nodes:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1:
            dq = g.through_dq(n.input[1])
            if dq is not None:
                weight_dq[dq.output[0]] = n
            dq = g.through_dq(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if dq is not None:
                bias_dq[dq.output[0]] = n
    for n in qdq:
        label = _label(n)
        if n.output[0] in bias_dq:
            yield Finding("trt-bias-quantized", "error", label,
                          f"the bias of {_label(bias_dq[n.output[0]])} is stored quantized (int32 + "
                          f"DequantizeLinear): TensorRT quantizes only int8 tensors and takes biases in float",
                          "keep biases in float (rescompress schemes do; onnxruntime quantize_static: "
                          "extra_options={'QuantizeBias': False})")
            continue
        scale = g.const.get(n.input[1]) if len(n.input) > 1 else None
        zp = g.const.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if scale is None:
            yield Finding("trt-constant-scale", "error", label, "the scale is computed at run time",
                          "scales must be initializers or Constant nodes: fold the graph (onnx-simplifier / "
                          "constant folding) or re-export")
            continue
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            yield Finding("trt-scale-value", "error", label,
                          f"scale has non-positive or non-finite values (min {float(np.min(scale)):.3g})",
                          "recalibrate: a channel with zero range got a zero scale; clamp scales to >= 1e-8")
        if zp is None:
            if n.op_type == "QuantizeLinear" and _attr(n, "output_dtype", 0) != INT8_DTYPE:
                yield Finding("trt-int8-zero-point", "error", label,
                              "no zero point: ONNX makes the output uint8, TensorRT builds it as int8, so the file "
                              "computes differently in TensorRT and in every other runtime",
                              "give an int8 zero point of 0 (" + FIX_SYMMETRIC + ")")
        else:
            if zp.dtype != np.int8:
                yield Finding("trt-int8-zero-point", "error", label,
                              f"zero point is {zp.dtype} (asymmetric {'u' if zp.dtype == np.uint8 else ''}int8 "
                              f"layout): TensorRT rejects a nonzero one and reads a zero one as int8, clipping the "
                              f"upper half of the range; it runs symmetric int8 with zero point 0 only",
                              FIX_SYMMETRIC)
            elif np.any(zp != 0):
                yield Finding("trt-zero-point-nonzero", "error", label,
                              f"zero point {int(np.ravel(zp)[np.flatnonzero(np.ravel(zp))[0]])} is not 0: TensorRT "
                              f"int8 is symmetric", FIX_SYMMETRIC)
        axis_given = any(a.name == "axis" for a in n.attribute)
        per_channel = scale.size > 1
        feeds_weight = n.op_type == "DequantizeLinear" and n.output[0] in weight_dq
        quantizes_weight = n.op_type == "QuantizeLinear" and any(
            c.op_type == "DequantizeLinear" and c.output[0] in weight_dq for c in g.consumers.get(n.output[0], []))
        if feeds_weight or quantizes_weight:
            op = weight_dq[n.output[0]] if feeds_weight else next(
                weight_dq[c.output[0]] for c in g.consumers[n.output[0]] if c.output[0] in weight_dq)
            yield from _weight_rules(n, label, op, scale, axis_given, g)
        elif per_channel:
            # a scalar scale makes `axis` meaningless (ONNX and TensorRT ignore it; torch writes axis=1)
            if g.is_const(n.input[0]):
                continue  # a constant quantized per channel for some other op: not an activation
            yield Finding("trt-activation-per-tensor", "error", label,
                          f"activation quantized per channel (axis {_attr(n, 'axis', 1)}, {scale.size} scales)",
                          "activations take one scale per tensor: calibrate activations per tensor")
    yield from _add_rules(g)


def _weight_rules(n, label: str, op, scale, axis_given: bool, g: _Graph) -> Iterable[Finding]:
    import numpy as np

    wname = n.input[0]
    w = g.const.get(wname)
    shape = list(w.shape) if w is not None else g.shapes.get(wname)
    out_channels = shape[0] if shape else None
    if op.op_type in ("Gemm", "MatMul"):
        # fully connected weights build per tensor or per channel, but a per-channel scale must say its axis
        axis = _attr(n, "axis", 1)
        if scale.size > 1 and shape and len(shape) > axis and scale.size != shape[axis]:
            yield Finding("trt-weight-axis", "error", label,
                          f"{scale.size} weight scales on axis {axis}{'' if axis_given else ' (the default)'} of a "
                          f"{'x'.join(map(str, shape))} weight of {_label(op)}: the graph is invalid",
                          "set the axis attribute to the dimension that has one scale per channel")
        return
    if scale.size > 1:
        if not axis_given:
            yield Finding("trt-weight-axis", "error", label,
                          f"per-channel weight scale ({scale.size} values) without an axis attribute: ONNX then "
                          f"reads axis 1 (input channels) for the weight of {_label(op)}",
                          "set axis=0 on the weight's QuantizeLinear/DequantizeLinear (one scale per output "
                          "channel)")
        elif _attr(n, "axis") not in (0, -4 if shape and len(shape) == 4 else 0):
            yield Finding("trt-weight-axis", "error", label,
                          f"weight quantized on axis {_attr(n, 'axis')}, TensorRT wants axis 0 (output channels)",
                          "quantize conv weights per output channel, axis=0")
        if out_channels and scale.size != out_channels:
            yield Finding("trt-weight-scale-length", "error", label,
                          f"{scale.size} scales for {out_channels} output channels of {_label(op)}",
                          "one scale per output channel")
    if w is not None and w.dtype == np.int8 and np.any(w == -128):
        yield Finding("trt-weight-range", "warning", label, "int8 weights use -128; TensorRT expects [-127, 127]",
                      "quantize weights with a symmetric range of [-127, 127] (scheme tensorrt does)")


def _add_rules(g: _Graph) -> Iterable[Finding]:
    for n in g.nodes:
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        if any(g.is_const(i) for i in n.input):
            continue  # a bias add, not a residual join
        missing = [i for i in n.input if g.through_dq(i) is None]
        if len(missing) == 1:
            yield Finding("trt-add-qdq", "error", _label(n),
                          f"residual Add has Q/DQ on one input only ({missing[0]} arrives in float): TensorRT "
                          f"cannot fuse the Add into the int8 convolution and runs it with a reformat",
                          "put a QuantizeLinear/DequantizeLinear pair on both inputs of every residual Add "
                          "(scheme tensorrt does)")


# ------------------------------------------------------------------------------------------ onnxruntime


def lint_onnxruntime(path: Path, model=None, devices: Sequence["DeviceProfile"] = ()) -> LintResult:
    """Run onnxruntime's graph optimisation and check that every int8 layer became an integer kernel; the
    layout rules judge the CPUs of `devices`."""
    import tempfile
    from collections import Counter

    import onnx
    import onnxruntime as ort

    model = model if model is not None else _load_onnx(path)
    findings: list[Finding] = []
    int8 = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") or n.op_type in QOPERATOR_OPS
               for n in model.graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        opt_path = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(opt_path)
        opts.log_severity_level = 3
        try:
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            findings.append(Finding("ort-load", "error", path.name, f"onnxruntime cannot load the model: {first}",
                                    "re-export the model; check the opset and custom ops"))
            return LintResult("onnxruntime", str(path), findings, "the model did not load")
        optimized = onnx.load(str(opt_path))
    ops = Counter(n.op_type for n in optimized.graph.node)
    checked = f"after onnxruntime {ort.__version__} optimisation: " + ", ".join(
        f"{ops[k]} {k}" for k in sorted(ops) if k in INT8_KERNELS | FLOAT_COMPUTE) if ops else ""
    if not int8:
        return LintResult("onnxruntime", str(path), findings, checked or "float graph")
    og = _Graph(optimized)
    for n in og.nodes:
        if n.op_type in FLOAT_COMPUTE and any(og.through_dq(i) is not None for i in n.input):
            findings.append(Finding(
                "ort-unfused", "error", _label(n),
                f"{n.op_type} still computes in float between DequantizeLinear and QuantizeLinear after "
                f"optimisation: it runs slower than in the fp32 model",
                "onnxruntime fuses Conv/Add/Gemm only when the input, weight and output all carry Q/DQ "
                "(uint8 activations, int8 weights): use scheme onnxruntime, or quantize_static with "
                "QuantFormat.QDQ and its defaults"))
    findings.extend(_ort_layout_rules(model, devices))
    return LintResult("onnxruntime", str(path), findings, checked)


def _ort_layout_rules(model, devices: Sequence["DeviceProfile"] = ()) -> Iterable[Finding]:
    """int8 kernels: uint8 activations (U8S8) are the fast path; on an x86 CPU without VNNI the u8*s8 pair
    sums saturate int16, so weights should use 7 bits there. Judged per device CPU, never on this host's
    unless a device's profile says it is this host (`cpu: {isa: host}`)."""
    import numpy as np

    g = _Graph(model)
    act_dtypes: dict = {}  # zero-point dtype -> the first activation QuantizeLinear using it
    wide_weights = []
    for n in g.nodes:
        if n.op_type != "QuantizeLinear" or len(n.input) < 3 or g.is_const(n.input[0]):
            continue
        zp = g.const.get(n.input[2])
        if zp is not None:
            act_dtypes.setdefault(zp.dtype, _label(n))
    for n in g.nodes:
        if n.op_type == "DequantizeLinear":
            w = g.const.get(n.input[0])
            if w is not None and w.dtype == np.int8 and w.ndim == 4 and np.abs(w.astype(np.int16)).max() > 64:
                wide_weights.append(_label(n))
    if np.dtype(np.int8) in act_dtypes:
        yield Finding("ort-s8s8", "warning", act_dtypes[np.dtype(np.int8)],
                      "int8 activations: onnxruntime's x86 CPU kernels run S8S8 convolutions more slowly than U8S8",
                      "use uint8 activations (scheme onnxruntime, or quantize_static's default QUInt8)")
    if np.dtype(np.uint8) in act_dtypes and wide_weights:
        yield from _saturation(wide_weights, devices)


SEVEN_BIT_FIX = "quantize weights to [-63, 63] (scheme onnxruntime does), which no CPU's U8S8 kernels saturate"


def u8s8_saturates(cpu: "CPUFeatures") -> Optional[bool]:
    """Whether onnxruntime's U8S8 kernels on this CPU can saturate 8-bit weights; None when that is unknown.

    On x86-64 without VNNI, MLAS multiplies u8 x s8 pairs and sums each pair in int16 (VPMADDUBSW), which
    saturates once both weights exceed 7 bits; VNNI (VPDPBUSD) and AMX accumulate in int32. MLAS's arm64
    kernels accumulate in int32 too: UDOT/SDOT with the dot-product instructions (asimddp); without them, pairs
    of 8-bit products that fit int16 for weights in [-127, 127], the range every int8 scheme here uses.
    """
    if cpu.arch == "arm64":
        return False
    if cpu.arch == "x86_64" and cpu.int8_dot is not None:
        return not cpu.int8_dot
    return None


def _saturation(wide_weights: list[str], devices: Sequence["DeviceProfile"]) -> Iterable[Finding]:
    count = f"{len(wide_weights)} conv weight(s) use more than 7 bits"
    if not devices:
        yield Finding("ort-u8s8-saturation", "info", wide_weights[0],
                      f"{count}; whether onnxruntime's U8S8 kernels saturate them is unknown: no device profile "
                      f"names the CPU that will run the model (they do on x86-64 without VNNI)",
                      f"name the device (rescompress lint FILE --target onnxruntime --device NAME), or "
                      f"{SEVEN_BIT_FIX}")
        return
    for device in devices:
        cpu = device.cpu_features()
        verdict = u8s8_saturates(cpu)
        if verdict is None:
            yield Finding("ort-u8s8-saturation", "info", wide_weights[0],
                          f"{count}; whether onnxruntime's U8S8 kernels on {device.name} saturate them is unknown "
                          f"({cpu.where.removeprefix('unknown: ')}; they do on x86-64 without VNNI)",
                          f"describe the CPU in the profile of {device.name} (cpu: {{arch: x86_64, isa: [avx2, "
                          f"avx512_vnni]}}; isa: host for this machine), or {SEVEN_BIT_FIX}")
        elif verdict:
            yield Finding("ort-u8s8-saturation", "warning", wide_weights[0],
                          f"{count} and the CPU of {device.name} is x86-64 without VNNI (from {cpu.where}): "
                          f"onnxruntime's U8S8 kernels sum u8*s8 pairs in int16 there and can saturate",
                          f"{SEVEN_BIT_FIX}, or run on a CPU with VNNI")


# ------------------------------------------------------------------------------------------------ tflite

INT_TYPES = ("int8", "uint8", "int16", "int32", "int64", "bool")


def lint_tflite(path: Path) -> LintResult:
    """Every operator of an int8 LiteRT model computes on integers; float only at the io boundary."""
    ops, tensors = tflite_ops(path)
    float_ops = [(i, op) for i, op in enumerate(ops)
                 if any(_is_float(tensors[t]) for t in op["inputs"] + op["outputs"])]
    int8 = any(tensors[t]["dtype"] in ("int8", "uint8") for op in ops for t in op["inputs"] if t in tensors)
    summary = f"{len(ops)} operators: " + ", ".join(sorted({op["name"] for op in ops}))
    findings: list[Finding] = []
    if not int8:
        return LintResult("tflite", str(path), findings, summary + " (float model)")
    for i, op in float_ops:
        label = f"{op['name']} #{i}"
        if op["name"] == "QUANTIZE" and all(not _is_float(tensors[t]) for t in op["outputs"]):
            findings.append(Finding("tflite-float-io", "info", label, "the float input is quantized on entry"))
        elif (op["name"] == "DEQUANTIZE" and all(not _is_float(tensors[t]) for t in op["inputs"])
              and _is_graph_output(op, ops)):
            findings.append(Finding("tflite-float-io", "info", label, "the int8 output is dequantized on exit"))
        else:
            names = ", ".join(f"{_short(tensors[t]['name'])} ({tensors[t]['dtype']})"
                              for t in op["inputs"] + op["outputs"] if _is_float(tensors[t]))
            findings.append(Finding("tflite-float-op", "error", label, f"computes in float: {names}",
                                    "quantize this layer too: drop it from keep_float, or, with onnx2tf, check "
                                    "that its calibration data reaches it"))
    return LintResult("tflite", str(path), findings, summary)


def _short(name: str) -> str:
    """LiteRT tensor names are module paths joined by ';': the last module is the useful part."""
    part = name.split(";")[0].rsplit("/", 1)[-1]
    return part if len(part) <= 60 else part[:57] + "..."


def _is_float(tensor: dict) -> bool:
    return tensor["dtype"].startswith("float")


def _is_graph_output(op: dict, ops: list[dict]) -> bool:
    consumed = {t for o in ops for t in o["inputs"]}
    return all(t not in consumed for t in op["outputs"])


def tflite_ops(path: Path) -> tuple[list[dict], dict[int, dict]]:
    """Operators (name, input and output tensor indices) and tensors (name, dtype) of a .tflite file."""
    interpreter = _interpreter(path, delegates=False)  # XNNPACK would hide the operators behind DELEGATE nodes
    tensors = {}
    for t in interpreter.get_tensor_details():
        tensors[t["index"]] = {"name": t["name"], "dtype": _dtype_name(t["dtype"])}
    ops = []
    for op in interpreter._get_ops_details():  # the only op listing LiteRT's interpreter offers
        ops.append({"name": op["op_name"], "inputs": [int(i) for i in op["inputs"] if i >= 0 and i in tensors],
                    "outputs": [int(i) for i in op["outputs"] if i >= 0 and i in tensors]})
    return ops, tensors


def _dtype_name(dtype) -> str:
    import numpy as np

    return np.dtype(dtype).name


def _interpreter(path: Path, *, delegates: bool):
    from rescompress.export.tflite import litert_interpreter

    return litert_interpreter(path, delegates=delegates)
