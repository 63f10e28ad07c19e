"""Import an ONNX image classifier (Conv, BatchNormalization, Relu, Add, pooling, Gemm, ...) as a GraphModel.

The importer walks the graph in topological order and maps every node onto the graph spec of
`rescompress.models.graph`. Nodes whose inputs are all constants (the dynamo exporter's shape arithmetic,
Constant nodes, an Identity of a weight) are evaluated at import with onnx's reference evaluator, with the
input's static shape standing in for `Shape`; what remains must be one of `SUPPORTED_OPS`. `OnnxSource` runs
the original file in onnxruntime, for parity.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from rescompress.errors import ModelImportError
from rescompress.imports.base import Imported, SourceInput, unsupported
from rescompress.models.arch import build_arch
from rescompress.models.graph import GRAPH_ARCH, GRAPH_FORMAT, GRAPH_VERSION, GraphSpecError, module_name

SUPPORTED_OPS = ("Conv", "BatchNormalization", "Relu", "Add", "Pad", "MaxPool", "AveragePool", "GlobalAveragePool",
                 "ReduceMean", "Flatten", "Reshape", "Gemm", "MatMul", "Identity", "Dropout", "Softmax",
                 "LogSoftmax")
PREPROCESSING = "as the ONNX file expects: NCHW float32; the file does not record its normalisation"
INPUT = "input"  # the spec's name for the graph input
_BATCH = 5  # stands in for a dynamic batch size while constant subgraphs are evaluated
_RANDOM = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
_DOMAINS = ("", "ai.onnx")

PathLike = Union[str, Path]


@dataclass
class _Act:
    """An activation: the spec node that computes it, its shape (batch None when dynamic), its ONNX name."""

    node: str
    shape: tuple
    tensor: str


@dataclass
class _Const:
    """A constant; `batch` when it was computed from the dynamic batch size (stood in for by _BATCH)."""

    value: np.ndarray
    batch: bool = False


def read_onnx(path: PathLike, image_size: Optional[int] = None,
              channels: Optional[int] = None) -> tuple[Imported, "OnnxSource"]:
    """Import the ONNX classifier at `path` as a GraphModel, with the source that runs the file itself.

    `image_size` fixes dynamic spatial dimensions (and must agree with static ones); `channels` must agree
    with the input's channel dimension (and fixes a dynamic one)."""
    path = Path(path)
    proto = _load(path)
    importer = _Importer(proto, path, image_size, channels)
    imported = importer.run()
    return imported, OnnxSource(path, logits_output=importer.logits_tensor, proto=proto)


class OnnxSource:
    """The ONNX file run in onnxruntime on the CPU (the `Source` parity is measured against)."""

    def __init__(self, path: PathLike, *, logits_output: Optional[str] = None, threads: int = 2,
                 proto: Optional[onnx.ModelProto] = None) -> None:
        self.path = Path(path)
        self.runtime = f"onnxruntime {ort.__version__}"
        self.threads = threads
        self._proto = proto if proto is not None else _load(self.path)
        graph = self._proto.graph
        inputs = _graph_inputs(graph)
        if len(inputs) != 1:
            raise ModelImportError(f"ONNX model '{self.path.name}' has {len(inputs)} inputs; rescompress runs "
                                   "single-input image classifiers")
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        self.batch = int(dims[0].dim_value) if len(dims) and dims[0].HasField("dim_value") else None
        self.output = logits_output or graph.output[0].name
        self._sessions: dict[tuple[str, ...], ort.InferenceSession] = {}
        self._types: Optional[dict[str, onnx.TypeProto]] = None

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The classifier's output (before a final Softmax the import dropped) for an NCHW float32 batch."""
        return self._run(x, [self.output])[self.output]

    def layer_outputs(self, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """The named tensors of the graph (ONNX tensor names, as `Imported.layer_map` gives them)."""
        return self._run(x, list(dict.fromkeys(names)))

    def _run(self, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        wanted = [n for n in names if n != self.input_name]
        out: dict[str, np.ndarray] = {n: x for n in names if n == self.input_name}
        if not wanted:
            return out
        session = self._session(tuple(wanted))
        step = self.batch or len(x)
        parts: list[list[np.ndarray]] = []
        for start in range(0, len(x), max(step, 1)):
            chunk = x[start:start + step]
            n = len(chunk)
            if n < step:
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), np.float32)])
            parts.append([r[:n] for r in session.run(wanted, {self.input_name: chunk})])
        for i, name in enumerate(wanted):
            out[name] = np.concatenate([p[i] for p in parts]) if parts else np.zeros((0,), np.float32)
        return out

    def _session(self, names: tuple[str, ...]) -> ort.InferenceSession:
        if names in self._sessions:
            return self._sessions[names]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        outputs = {o.name for o in self._proto.graph.output}
        if set(names) <= outputs:
            model: Any = str(self.path)
        else:
            model = self._with_outputs([n for n in names if n not in outputs]).SerializeToString()
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self._sessions[names] = session
        return session

    def _with_outputs(self, names: list[str]) -> onnx.ModelProto:
        """A copy of the model whose graph outputs also include the named intermediate tensors."""
        if self._types is None:
            inferred = onnx.shape_inference.infer_shapes(self._proto)
            self._types = {v.name: v.type for v in inferred.graph.value_info}
        produced = {o for node in self._proto.graph.node for o in node.output}
        missing = [n for n in names if n not in produced]
        if missing:
            raise ModelImportError(f"ONNX model '{self.path.name}' has no tensor named {', '.join(map(repr, missing))}"
                                   "; ask for tensors of Imported.layer_map")
        model = onnx.ModelProto()
        model.CopyFrom(self._proto)
        for name in names:
            info = onnx.ValueInfoProto(name=name)
            if name in self._types:
                info.type.CopyFrom(self._types[name])
            else:
                info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
            model.graph.output.append(info)
        return model


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ModelImportError(f"ONNX file '{path}' does not exist" if not path.exists()
                               else f"'{path}' is not a file; give the path of an .onnx model")
    try:
        proto = onnx.load(str(path))
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ModelImportError(f"'{path}' is not an ONNX model ({type(e).__name__}: {e})") from None
    if not proto.ir_version or not proto.graph.node or not proto.opset_import:
        raise ModelImportError(f"'{path}' is not an ONNX model (no graph, IR version or opset in it)")
    return proto


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _dim(d: onnx.TensorShapeProto.Dimension) -> Optional[int]:
    return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None


def _describe_dim(d: onnx.TensorShapeProto.Dimension) -> str:
    if d.HasField("dim_value"):
        return str(d.dim_value)
    return d.dim_param or "?"


def _topological(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    """graph.node in a topological order (the file's own order where it is one)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    waiting: dict[str, list[int]] = {}
    missing = []
    for i, node in enumerate(graph.node):
        missing.append(sum(1 for t in set(node.input) if t not in ready))
        for t in set(node.input):
            if t not in ready:
                waiting.setdefault(t, []).append(i)
    order, queue = [], [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(queue)
    done = set()
    while queue:
        i = heapq.heappop(queue)
        done.add(i)
        order.append(graph.node[i])
        for t in graph.node[i].output:
            for j in waiting.pop(t, []):
                missing[j] -= 1
                if missing[j] == 0:
                    heapq.heappush(queue, j)
    if len(order) != len(graph.node):
        stuck = next(n for i, n in enumerate(graph.node) if i not in done)
        absent = [t for t in stuck.input if t in waiting]
        raise ModelImportError(f"ONNX model '{name}': node '{stuck.name or stuck.output[0]}' reads "
                               f"{', '.join(map(repr, absent))}, which no node, input or initializer produces "
                               "(or the graph has a cycle)")
    return order


def _shown(shape: tuple) -> str:
    """A shape as messages show it, a dynamic batch as N."""
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _broadcast(a: tuple, b: tuple) -> Optional[tuple]:
    """The broadcast of two shapes whose batch may be None, or None when they do not broadcast."""
    if len(a) != len(b):
        return None
    out = []
    for x, y in zip(a, b):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(out)


class _Importer:
    def __init__(self, proto: onnx.ModelProto, path: Path, image_size: Optional[int], channels: Optional[int]):
        if proto.functions:
            proto = onnx.inliner.inline_local_functions(proto)
        self.proto, self.path, self.file = proto, path, path.name
        self.graph = proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in _DOMAINS), 0)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.values: dict[str, Union[_Act, _Const]] = {}
        self.nodes: list[dict] = []
        self.weights: dict[str, dict[str, tuple[np.ndarray, str]]] = {}
        self.kinds: dict[str, str] = {}
        self.open: dict[str, str] = {}  # spec node -> the ONNX tensor that is its only handle (for bias folding)
        self.layer_map: dict[str, str] = {}
        self.taken: set[str] = set()
        self.notes: list[str] = []
        self.folded = 0
        self.skipped = 0
        self.zero_biases = 0
        self.cast = False
        self.dropped_softmax: Optional[str] = None
        self.logits_tensor: Optional[str] = None
        self.outputs = [o.name for o in self.graph.output]
        self.consumers: dict[str, int] = {}
        for node in self.graph.node:
            for t in node.input:
                self.consumers[t] = self.consumers.get(t, 0) + 1
        self._input(image_size, channels)

    def _input(self, image_size: Optional[int], channels: Optional[int]) -> None:
        inputs = _graph_inputs(self.graph)
        if len(inputs) != 1:
            raise ModelImportError(f"ONNX model '{self.file}' has {len(inputs)} inputs "
                                   f"({', '.join(i.name for i in inputs) or 'none'}); rescompress imports "
                                   "single-input image classifiers")
        if len(self.outputs) != 1:
            raise ModelImportError(f"ONNX model '{self.file}' has {len(self.outputs)} outputs "
                                   f"({', '.join(self.outputs)}); rescompress imports classifiers with one output "
                                   "(the logits)")
        inp = inputs[0]
        ttype = inp.type.tensor_type
        if not inp.type.HasField("tensor_type") or ttype.elem_type != onnx.TensorProto.FLOAT:
            kind = onnx.TensorProto.DataType.Name(ttype.elem_type) if inp.type.HasField("tensor_type") else "non-tensor"
            raise ModelImportError(f"ONNX model '{self.file}' takes a {kind} input '{inp.name}'; rescompress imports "
                                   "models that take a float32 NCHW image batch")
        dims = list(ttype.shape.dim) if ttype.HasField("shape") else None
        if dims is not None and len(dims) != 4:
            raise ModelImportError(f"ONNX model '{self.file}' takes a {len(dims)}-D input '{inp.name}'; rescompress "
                                   "imports models that take a 4-D NCHW image batch")
        if dims is None:
            if image_size is None or channels is None:
                raise ModelImportError(f"ONNX model '{self.file}' does not record its input shape; give channels and "
                                       "image_size (import --image-size N, or data.image_size in the recipe)")
            batch, c, h, w = None, channels, image_size, image_size
        else:
            batch, c, h, w = (_dim(d) for d in dims)
            if h is None or w is None:
                if image_size is None:
                    shown = "x".join(_describe_dim(d) for d in dims[2:])
                    raise ModelImportError(f"ONNX model '{self.file}' has dynamic spatial dimensions ({shown}); give "
                                           "image_size (import --image-size N, or data.image_size in the recipe)")
                self.notes.append(f"the file accepts any input size ({'x'.join(_describe_dim(d) for d in dims[2:])}); "
                                  f"imported for {image_size}x{image_size}")
            if image_size is not None and any(s is not None and s != image_size for s in (h, w)):
                raise ModelImportError(f"ONNX model '{self.file}' takes {_describe_dim(dims[2])}x"
                                       f"{_describe_dim(dims[3])} inputs, but image_size {image_size} was asked for; "
                                       "leave image_size unset or make it match the file")
            h = h if h is not None else image_size
            w = w if w is not None else image_size
            if c is None:
                if channels is None:
                    raise ModelImportError(f"ONNX model '{self.file}' has a dynamic channel dimension "
                                           f"({_describe_dim(dims[1])}); give channels")
                c = channels
            elif channels is not None and channels != c:
                raise ModelImportError(f"ONNX model '{self.file}' takes {c}-channel inputs, but channels {channels} "
                                       "was asked for; leave channels unset or make it match the file")
        if batch is not None:
            self.notes.append(f"the file's batch size is fixed at {batch}; its source runs in batches of {batch}")
        self.channels, self.height, self.width = int(c), int(h), int(w)
        self.input_name = inp.name
        self.values[inp.name] = _Act(INPUT, (batch, self.channels, self.height, self.width), inp.name)

    def run(self) -> Imported:
        if not self.opset:
            raise ModelImportError(f"ONNX model '{self.file}' imports no standard ONNX opset")
        for node in _topological(self.graph, self.file):
            self._node(node)
        out = self.values.get(self.outputs[0])
        if not isinstance(out, _Act) or out.node == INPUT:
            what = "a constant" if isinstance(out, _Const) else "its input"
            raise ModelImportError(f"ONNX model '{self.file}': its output '{self.outputs[0]}' is {what}, not "
                                   "computed by layers")
        if len(out.shape) != 2:
            raise ModelImportError(f"ONNX model '{self.file}': its output '{self.outputs[0]}' has shape {_shown(out.shape)}; "
                                   "rescompress imports classifiers whose output is [batch, classes]")
        self.logits_tensor = None if out.tensor == self.outputs[0] else out.tensor
        nodes = self._live(out.node)
        spec = {"format": GRAPH_FORMAT, "version": GRAPH_VERSION,
                "input": {"name": INPUT, "channels": self.channels, "height": self.height, "width": self.width},
                "nodes": nodes, "output": out.node}
        classes = int(out.shape[1])
        arch = {"name": GRAPH_ARCH, "graph": spec, "num_classes": classes, "in_channels": self.channels,
                "small_input": False}
        try:
            model = build_arch(arch)
        except GraphSpecError as e:
            raise ModelImportError(f"ONNX model '{self.file}' maps onto an invalid graph: {e}") from None
        self._fill(model, {n["name"] for n in nodes})
        model.eval()
        if self.kinds.get(out.node) != "linear":
            self.notes.append("the graph does not end in a Gemm/MatMul classifier; its class count cannot be changed")
        self._summarise()
        n_nodes = len(self.graph.node)
        source = {"path": str(self.path), "format": "onnx", "runtime": f"onnxruntime {ort.__version__}",
                  "architecture": f"ONNX graph, {n_nodes} nodes (opset {self.opset})"}
        layer_map = {n["name"]: self.layer_map[n["name"]] for n in nodes if n["name"] in self.layer_map}
        return Imported(model=model, arch=arch, channels=self.channels, height=self.height, width=self.width,
                        normalization=None, preprocessing=PREPROCESSING, source_input=SourceInput(), source=source,
                        layer_map=layer_map, notes=list(self.notes))

    def _live(self, output: str) -> list[dict]:
        """The spec nodes the output depends on, in order (dead branches dropped, with a note)."""
        by_name = {n["name"]: n for n in self.nodes}
        live, stack = set(), [output]
        while stack:
            name = stack.pop()
            if name in live or name not in by_name:
                continue
            live.add(name)
            stack.extend(by_name[name]["inputs"])
        dead = [n["name"] for n in self.nodes if n["name"] not in live]
        if dead:
            self.notes.append(f"dropped {len(dead)} node(s) the output does not depend on: {', '.join(dead)}")
        return [n for n in self.nodes if n["name"] in live]

    def _summarise(self) -> None:
        if self.folded:
            self.notes.append(f"evaluated {self.folded} node(s) whose inputs are all constants (shape arithmetic, "
                              "Constant, Identity of weights) at import")
        if self.skipped:
            self.notes.append(f"skipped {self.skipped} Identity/Dropout node(s) (inference: they pass their input on)")
        if self.zero_biases:
            self.notes.append(f"{self.zero_biases} Conv(s) have an all-zero bias (the dynamo exporter writes one "
                              "for every Conv); imported without bias")
        if self.dropped_softmax:
            self.notes.append(f"dropped the final {self.dropped_softmax} so the model emits logits; parity compares "
                              f"the source's tensor '{self.logits_tensor}' before it")
        if self.cast:
            self.notes.append("some weights are not float32 in the file; imported as float32")

    def _fill(self, model: torch.nn.Module, live: set[str]) -> None:
        with torch.no_grad():
            for name, params in self.weights.items():
                if name not in live:
                    continue
                module = model.get_submodule(name)
                for param, (value, tensor) in params.items():
                    self._finite(tensor, value)
                    target = getattr(module, param)
                    if tuple(target.shape) != tuple(value.shape):
                        raise ModelImportError(f"ONNX model '{self.file}': tensor '{tensor}' has shape "
                                               f"{list(value.shape)}, but layer '{name}' needs {list(target.shape)}")
                    target.copy_(torch.from_numpy(np.array(value, dtype=np.float32)))

    def _finite(self, tensor: str, value: np.ndarray) -> None:
        if value.dtype.kind != "f" or np.isfinite(value).all():
            return
        what = "NaN" if np.isnan(value).any() else "Inf"
        bad = int((~np.isfinite(value)).sum())
        raise ModelImportError(f"ONNX model '{self.file}': tensor '{tensor}' holds {what} ({bad} of {value.size} "
                               "values are not finite); the file is corrupt or was exported from a diverged model")

    def _value(self, name: str) -> Union[_Act, _Const]:
        if name not in self.values:
            if name in self.initializers:
                value = numpy_helper.to_array(self.initializers[name])
                self._finite(name, value)
                self.values[name] = _Const(value)
            else:
                raise ModelImportError(f"ONNX model '{self.file}': tensor '{name}' is read before it is computed")
        return self.values[name]

    def _name(self, node: onnx.NodeProto, conv: bool = False) -> str:
        raw = node.name or node.output[0]
        taken = self.taken | {t[:-4] for t in self.taken if t.endswith("_pad")} if conv else self.taken
        name = module_name(raw, taken)
        self.taken.update({name, f"{name}_pad"})
        return name

    def _emit(self, node: onnx.NodeProto, spec: dict, shape: tuple, kind: Optional[str] = None) -> None:
        out = node.output[0]
        self.nodes.append(spec)
        self.kinds[spec["name"]] = kind or spec["op"]
        self.layer_map[spec["name"]] = out
        self.values[out] = _Act(spec["name"], tuple(shape), out)
        if self._single_use(out):
            self.open[spec["name"]] = out

    def _single_use(self, tensor: str) -> bool:
        return self.consumers.get(tensor, 0) == 1 and tensor not in self.outputs

    def _alias(self, node: onnx.NodeProto, act: _Act) -> None:
        out = node.output[0]
        self.values[out] = _Act(act.node, act.shape, out)
        if self.open.get(act.node) == act.tensor and self._single_use(out):
            self.open[act.node] = out
        else:
            self.open.pop(act.node, None)

    def _node(self, node: onnx.NodeProto) -> None:
        label = node.name or (node.output[0] if node.output else "?")
        op = node.op_type
        if node.domain not in _DOMAINS:
            raise unsupported(label, f"{node.domain}.{op}", SUPPORTED_OPS, "not a standard ONNX op")
        ins = [self._value(t) if t else None for t in node.input]
        acts = [v for v in ins if isinstance(v, _Act)]
        if op in _RANDOM:
            raise unsupported(label, op, SUPPORTED_OPS, "random values cannot be imported")
        if not acts:
            self._fold(node, ins, label)
            return
        if op in ("Shape", "Size") and isinstance(ins[0], _Act):
            self._shape_of(node, ins[0])
            return
        if op == "CastLike" and isinstance(ins[0], _Const) and isinstance(ins[1], _Act):
            self.values[node.output[0]] = _Const(ins[0].value.astype(np.float32), ins[0].batch)
            self.folded += 1
            return
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise unsupported(label, op, SUPPORTED_OPS)
        try:
            handler(node, ins, _attrs(node), label)
        except _Unsupported as e:
            raise unsupported(label, op, SUPPORTED_OPS, str(e)) from None

    def _fold(self, node: onnx.NodeProto, ins: list, label: str) -> None:
        feeds = {t: v.value for t, v in zip(node.input, ins) if t}
        try:
            results = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
        except Exception as e:  # the reference evaluator raises many kinds
            raise ModelImportError(f"ONNX model '{self.file}': could not evaluate the constant node '{label}' "
                                   f"({node.op_type}): {type(e).__name__}: {e}") from None
        batch = any(v.batch for v in ins if isinstance(v, _Const))
        for name, value in zip(node.output, results):
            if name:
                self.values[name] = _Const(np.asarray(value), batch)
        self.folded += 1

    def _shape_of(self, node: onnx.NodeProto, act: _Act) -> None:
        dims = [_BATCH if d is None else d for d in act.shape]
        if node.op_type == "Size":
            value, batch = np.array(int(np.prod(dims)), np.int64), act.shape[0] is None
        else:
            attrs = _attrs(node)
            start, end = attrs.get("start", 0), attrs.get("end", None)
            idx = list(range(len(dims)))[start:end]
            value = np.array([dims[i] for i in idx], np.int64)
            batch = act.shape[0] is None and 0 in idx
        self.values[node.output[0]] = _Const(value, batch)
        self.folded += 1

    def _const(self, v: Any, what: str) -> np.ndarray:
        if not isinstance(v, _Const):
            raise _Unsupported(f"its {what} must be a constant (an initializer), not a computed tensor")
        if v.batch:
            raise _Unsupported(f"its {what} depends on the batch size")
        return v.value

    @staticmethod
    def _act(v: Any, rank: Optional[int] = None, what: str = "input") -> _Act:
        if not isinstance(v, _Act):
            raise _Unsupported(f"its {what} must be a computed tensor, not a constant")
        if rank is not None and len(v.shape) != rank:
            raise _Unsupported(f"its {what} is {len(v.shape)}-D; it must be {rank}-D")
        return v

    def _unused_outputs(self, node: onnx.NodeProto, what: str) -> None:
        if any(t and (self.consumers.get(t) or t in self.outputs) for t in node.output[1:]):
            raise _Unsupported(f"its {what} output is used")

    def _spatial(self, attrs: dict, size: tuple, kernel: tuple, stride: tuple, dilation: tuple) -> list[int]:
        """[top, bottom, left, right] padding for auto_pad or pads at the known input size."""
        auto = attrs.get("auto_pad", "NOTSET")
        if auto in ("NOTSET", ""):
            pads = list(attrs.get("pads", [0, 0, 0, 0]))
            if len(pads) != 4 or min(pads) < 0:
                raise _Unsupported(f"pads {pads}: only non-negative 2-D pads are supported")
            return [pads[0], pads[2], pads[1], pads[3]]
        if auto == "VALID":
            return [0, 0, 0, 0]
        if auto not in ("SAME_UPPER", "SAME_LOWER"):
            raise _Unsupported(f"auto_pad {auto}")
        out = []
        for n, k, s, d in zip(size, kernel, stride, dilation):
            total = max(0, (-(-n // s) - 1) * s + d * (k - 1) + 1 - n)
            small = total // 2
            out += [small, total - small] if auto == "SAME_UPPER" else [total - small, small]
        return out

    @staticmethod
    def _out_size(size: tuple, kernel: tuple, stride: tuple, dilation: tuple, pads: list[int],
                  ceil: bool = False) -> tuple[int, int]:
        out = []
        for n, k, s, d, (lo, hi) in zip(size, kernel, stride, dilation, ((pads[0], pads[1]), (pads[2], pads[3]))):
            span = n + lo + hi - d * (k - 1) - 1
            if span < 0:
                raise _Unsupported(f"its window ({k}) is larger than its padded input ({n + lo + hi})")
            if ceil and span % s:
                raise _Unsupported("ceil_mode=1 where it changes the output size")
            out.append(span // s + 1)
        return out[0], out[1]

    def _op_Conv(self, node, ins, attrs, label) -> None:
        x = self._act(ins[0], 4)
        w = self._const(ins[1], "weight")
        if w.ndim != 4:
            raise _Unsupported(f"only 2-D convolutions are supported (its weight is {w.ndim}-D)")
        cout, cin_g, kh, kw = w.shape
        groups = int(attrs.get("group", 1))
        cin = x.shape[1]
        if cin_g * groups != cin or cout % groups:
            raise _Unsupported(f"its weight {list(w.shape)} with group {groups} does not fit {cin} input channels")
        if tuple(attrs.get("kernel_shape", (kh, kw))) != (kh, kw):
            raise _Unsupported(f"kernel_shape {attrs['kernel_shape']} differs from its weight {list(w.shape)}")
        stride = tuple(attrs.get("strides", (1, 1)))
        dilation = tuple(attrs.get("dilations", (1, 1)))
        pads = self._spatial(attrs, x.shape[2:], (kh, kw), stride, dilation)
        oh, ow = self._out_size(x.shape[2:], (kh, kw), stride, dilation, pads)
        bias = None
        if len(ins) > 2 and ins[2] is not None:
            bias = self._const(ins[2], "bias").reshape(-1)
            if bias.shape != (cout,):
                raise _Unsupported(f"its bias has {bias.size} values for {cout} output channels")
            if not bias.any():
                bias = None
                self.zero_biases += 1
        name = self._name(node, conv=True)
        spec = {"name": name, "op": "conv", "inputs": [x.node], "in_channels": int(cin), "out_channels": int(cout),
                "kernel": [int(kh), int(kw)], "stride": [int(s) for s in stride], "padding": [int(p) for p in pads],
                "dilation": [int(d) for d in dilation], "groups": groups, "bias": bias is not None}
        self.weights[name] = {"weight": (w, node.input[1])}
        if bias is not None:
            self.weights[name]["bias"] = (bias, node.input[2])
        self._check_dtype(w)
        self._emit(node, spec, (x.shape[0], int(cout), oh, ow))

    def _op_BatchNormalization(self, node, ins, attrs, label) -> None:
        x = self._act(ins[0])
        if len(x.shape) != 4:
            raise _Unsupported(f"only BatchNormalization of 4-D (NCHW) tensors is supported; its input is "
                               f"{len(x.shape)}-D")
        if attrs.get("training_mode", 0):
            raise _Unsupported("training mode; export the model in eval mode")
        self._unused_outputs(node, "running statistics")
        c = x.shape[1]
        params = {}
        for i, (param, what) in enumerate((("weight", "scale"), ("bias", "B"), ("running_mean", "mean"),
                                           ("running_var", "var")), start=1):
            if len(ins) <= i or ins[i] is None:
                raise _Unsupported(f"its {what} input is missing")
            value = self._const(ins[i], what).reshape(-1)
            if value.shape != (c,):
                raise _Unsupported(f"its {what} has {value.size} values for {c} channels")
            params[param] = (value, node.input[i])
        name = self._name(node)
        spec = {"name": name, "op": "batchnorm", "inputs": [x.node], "features": int(c),
                "eps": float(attrs.get("epsilon", 1e-5))}
        self.weights[name] = params
        self._emit(node, spec, x.shape)

    def _op_Relu(self, node, ins, attrs, label) -> None:
        x = self._act(ins[0])
        self._emit(node, {"name": self._name(node), "op": "relu", "inputs": [x.node]}, x.shape)

    def _op_Add(self, node, ins, attrs, label) -> None:
        a, b = ins[0], ins[1]
        if isinstance(a, _Act) and isinstance(b, _Act):
            shape = _broadcast(a.shape, b.shape)
            if shape is None:
                raise _Unsupported(f"its inputs' shapes {_shown(a.shape)} and {_shown(b.shape)} do not match")
            self._emit(node, {"name": self._name(node), "op": "add", "inputs": [a.node, b.node]}, shape)
            return
        i = 0 if isinstance(b, _Act) else 1
        self._fold_bias(node, ins[1 - i], self._const(ins[i], "constant operand"), node.input[i])

    def _fold_bias(self, node: onnx.NodeProto, act: _Act, const: np.ndarray, const_name: str) -> None:
        """Fold `act + const` into the bias of the Conv or Gemm/MatMul that computes `act`."""
        kind = self.kinds.get(act.node)
        if kind not in ("conv", "linear") or self.open.get(act.node) != act.tensor:
            raise _Unsupported("it adds a constant, which is supported only right after a Conv, Gemm or MatMul "
                               "whose output nothing else reads (folded into its bias)")
        features = act.shape[1]
        try:
            full = np.broadcast_to(const, (1, *act.shape[1:]))
        except ValueError:
            raise _Unsupported(f"its constant {list(const.shape)} does not broadcast over "
                               f"{_shown(act.shape)}") from None
        flat = full.reshape(1, features, -1)
        if not np.array_equal(flat, np.broadcast_to(flat[:, :, :1], flat.shape)):
            raise _Unsupported("its constant varies over the spatial positions; only a per-channel bias folds")
        add = flat[0, :, 0].astype(np.float32)
        spec = next(n for n in self.nodes if n["name"] == act.node)
        params = self.weights[act.node]
        old = params["bias"][0] if "bias" in params else np.zeros(features, np.float32)
        params["bias"] = (old + add, const_name)
        spec["bias"] = True
        out = node.output[0]
        self.values[out] = _Act(act.node, act.shape, out)
        self.layer_map[act.node] = out
        if self._single_use(out):
            self.open[act.node] = out
        else:
            self.open.pop(act.node, None)

    def _pool(self, node, ins, attrs, kind: str) -> tuple[_Act, tuple, tuple, list[int], tuple[int, int]]:
        x = self._act(ins[0], 4)
        kernel = tuple(int(k) for k in attrs.get("kernel_shape", ()))
        if len(kernel) != 2:
            raise _Unsupported(f"only 2-D pooling is supported (kernel_shape {list(kernel)})")
        stride = tuple(int(s) for s in attrs.get("strides", (1, 1)))
        if any(d != 1 for d in attrs.get("dilations", (1, 1))):
            raise _Unsupported(f"dilated {kind} pooling")
        pads = self._spatial(attrs, x.shape[2:], kernel, stride, (1, 1))
        out = self._out_size(x.shape[2:], kernel, stride, (1, 1), pads, ceil=bool(attrs.get("ceil_mode", 0)))
        return x, kernel, stride, pads, out

    def _op_MaxPool(self, node, ins, attrs, label) -> None:
        self._unused_outputs(node, "Indices")
        if attrs.get("storage_order", 0) not in (0, 1):
            raise _Unsupported("storage_order")
        x, kernel, stride, pads, (oh, ow) = self._pool(node, ins, attrs, "max")
        spec = {"name": self._name(node), "op": "maxpool", "inputs": [x.node], "kernel": list(kernel),
                "stride": list(stride), "padding": pads}
        self._emit(node, spec, (x.shape[0], x.shape[1], oh, ow))

    def _op_AveragePool(self, node, ins, attrs, label) -> None:
        x, kernel, stride, pads, (oh, ow) = self._pool(node, ins, attrs, "average")
        include = bool(attrs.get("count_include_pad", 0))
        fits = pads[0] == pads[1] and pads[2] == pads[3] and pads[0] * 2 <= kernel[0] and pads[2] * 2 <= kernel[1]
        source = x.node
        if any(pads) and not fits:
            if not include:
                raise _Unsupported(f"padding {pads} (asymmetric, or over half the kernel) without count_include_pad")
            pad_name = module_name(f"{node.name or node.output[0]}_zero_pad", self.taken)
            self.taken.add(pad_name)
            self.nodes.append({"name": pad_name, "op": "pad", "inputs": [x.node], "padding": pads})
            self.kinds[pad_name] = "pad"
            source, pads = pad_name, [0, 0, 0, 0]
        spec = {"name": self._name(node), "op": "avgpool", "inputs": [source], "kernel": list(kernel),
                "stride": list(stride), "padding": pads, "count_include_pad": include}
        self._emit(node, spec, (x.shape[0], x.shape[1], oh, ow))

    def _op_GlobalAveragePool(self, node, ins, attrs, label) -> None:
        x = self._act(ins[0], 4)
        spec = {"name": self._name(node), "op": "global_avgpool", "inputs": [x.node], "keepdims": True}
        self._emit(node, spec, (x.shape[0], x.shape[1], 1, 1))

    def _op_ReduceMean(self, node, ins, attrs, label) -> None:
        x = self._act(ins[0], 4)
        if len(ins) > 1 and ins[1] is not None:
            axes = [int(a) for a in self._const(ins[1], "axes").reshape(-1)]
        else:
            axes = [int(a) for a in attrs.get("axes", [])]
        if not axes and attrs.get("noop_with_empty_axes", 0):
            self.skipped += 1
            self._alias(node, x)
            return
        if sorted(a % 4 for a in axes) != [2, 3]:
            raise _Unsupported(f"axes {axes or 'all'}: only the mean over the spatial axes [2, 3] is supported")
        keep = bool(attrs.get("keepdims", 1))
        spec = {"name": self._name(node), "op": "global_avgpool", "inputs": [x.node], "keepdims": keep}
        self._emit(node, spec, (x.shape[0], x.shape[1], 1, 1) if keep else (x.shape[0], x.shape[1]))

    def _flatten(self, node: onnx.NodeProto, x: _Act) -> None:
        if len(x.shape) == 2:
            self.skipped += 1
            self._alias(node, x)
            return
        features = int(np.prod(x.shape[1:]))
        self._emit(node, {"name": self._name(node), "op": "flatten", "inputs": [x.node]}, (x.shape[0], features))

    def _op_Flatten(self, node, ins, attrs, label) -> None:
        x = self._act(ins[0])
        axis = int(attrs.get("axis", 1))
        if axis % len(x.shape) != 1 or len(x.shape) < 2:
            raise _Unsupported(f"axis {axis}: only Flatten from axis 1 (keeping the batch) is supported")
        self._flatten(node, x)

    def _op_Reshape(self, node, ins, attrs, label) -> None:
        x = self._act(ins[0])
        if not isinstance(ins[1], _Const):
            raise _Unsupported("its target shape must be a constant")
        target = [int(t) for t in ins[1].value.reshape(-1)]
        features = int(np.prod(x.shape[1:]))
        zero = not attrs.get("allowzero", 0)
        if len(target) == 2 and len(x.shape) >= 2:
            first, second = target
            if ins[1].batch:
                batch_ok = first == _BATCH
            else:
                batch_ok = (zero and first == 0) or (x.shape[0] is not None and first == x.shape[0]) \
                    or (first == -1 and second == features)
            features_ok = second == features or (second == -1 and first != -1) \
                or (zero and second == 0 and len(x.shape) == 2)
            if batch_ok and features_ok:
                self._flatten(node, x)
                return
        raise _Unsupported(f"target shape {target} of a {_shown(x.shape)} tensor: only a reshape to "
                           "[batch, features] (a flatten) is supported")

    def _linear(self, node: onnx.NodeProto, x: _Act, weight: np.ndarray, weight_name: str,
                bias: Optional[tuple[np.ndarray, str]]) -> None:
        if weight.shape[1] != x.shape[1]:
            raise _Unsupported(f"its weight {list(weight.shape)} does not fit {x.shape[1]} input features")
        name = self._name(node)
        spec = {"name": name, "op": "linear", "inputs": [x.node], "in_features": int(weight.shape[1]),
                "out_features": int(weight.shape[0]), "bias": bias is not None}
        self.weights[name] = {"weight": (weight, weight_name)}
        if bias is not None:
            self.weights[name]["bias"] = bias
        self._emit(node, spec, (x.shape[0], int(weight.shape[0])), kind="linear")

    def _op_Gemm(self, node, ins, attrs, label) -> None:
        x = self._act(ins[0], 2)
        if attrs.get("transA", 0):
            raise _Unsupported("transA=1")
        b = self._const(ins[1], "B (weight)")
        if b.ndim != 2:
            raise _Unsupported(f"its B is {b.ndim}-D")
        self._check_dtype(b)
        weight = (b if attrs.get("transB", 0) else b.T) * np.float32(attrs.get("alpha", 1.0))
        bias = None
        if len(ins) > 2 and ins[2] is not None:
            c = self._const(ins[2], "C (bias)")
            try:
                full = np.broadcast_to(c, (1, weight.shape[0]))
            except ValueError:
                raise _Unsupported(f"its C {list(c.shape)} is not a per-output bias") from None
            bias = (full[0] * np.float32(attrs.get("beta", 1.0)), node.input[2])
        self._linear(node, x, weight, node.input[1], bias)

    def _op_MatMul(self, node, ins, attrs, label) -> None:
        x = self._act(ins[0], 2, "first input")
        b = self._const(ins[1], "second input (weight)")
        if b.ndim != 2:
            raise _Unsupported(f"its weight is {b.ndim}-D")
        self._check_dtype(b)
        self._linear(node, x, b.T, node.input[1], None)

    def _op_Identity(self, node, ins, attrs, label) -> None:
        self.skipped += 1
        self._alias(node, self._act(ins[0]))

    def _op_Dropout(self, node, ins, attrs, label) -> None:
        self._unused_outputs(node, "mask")
        if len(ins) > 2 and ins[2] is not None:
            if not isinstance(ins[2], _Const) or bool(np.asarray(ins[2].value).reshape(-1)[0]):
                raise _Unsupported("training_mode is set")
        self.skipped += 1
        self._alias(node, self._act(ins[0]))

    def _op_Pad(self, node, ins, attrs, label) -> None:
        x = self._act(ins[0], 4)
        mode = attrs.get("mode", "constant")
        if mode != "constant":
            raise _Unsupported(f"mode '{mode}': only zero (constant) padding is supported")
        if len(ins) > 1 and ins[1] is not None:
            pads = [int(p) for p in self._const(ins[1], "pads").reshape(-1)]
        else:
            pads = [int(p) for p in attrs.get("pads", [])]
        value = float(attrs.get("value", 0.0))
        if len(ins) > 2 and ins[2] is not None:
            value = float(np.asarray(self._const(ins[2], "constant_value")).reshape(-1)[0])
        if value != 0.0:
            raise _Unsupported(f"constant value {value}: only zero padding is supported")
        axes = list(range(4))
        if len(ins) > 3 and ins[3] is not None:
            axes = [int(a) % 4 for a in self._const(ins[3], "axes").reshape(-1)]
        if len(pads) != 2 * len(axes):
            raise _Unsupported(f"pads {pads} for axes {axes}")
        begin, end = [0] * 4, [0] * 4
        for i, a in enumerate(axes):
            begin[a], end[a] = pads[i], pads[i + len(axes)]
        if begin[:2] != [0, 0] or end[:2] != [0, 0] or min(begin + end) < 0:
            raise _Unsupported(f"pads {pads}: only non-negative padding of the spatial axes is supported")
        padding = [begin[2], end[2], begin[3], end[3]]
        shape = (x.shape[0], x.shape[1], x.shape[2] + padding[0] + padding[1], x.shape[3] + padding[2] + padding[3])
        self._emit(node, {"name": self._name(node), "op": "pad", "inputs": [x.node], "padding": padding}, shape)

    def _op_Softmax(self, node, ins, attrs, label) -> None:
        x = self._act(ins[0])
        axis = int(attrs.get("axis", 1 if self.opset < 13 else -1))
        if node.output[0] not in self.outputs or len(x.shape) != 2 or axis % 2 != 1:
            raise _Unsupported(f"{node.op_type} is supported only as the graph's last op, over the classes of a "
                               "[batch, classes] tensor, where it is dropped so the model emits logits")
        self.dropped_softmax = f"{node.op_type} '{label}'"
        self.values[node.output[0]] = _Act(x.node, x.shape, x.tensor)

    _op_LogSoftmax = _op_Softmax

    def _check_dtype(self, value: np.ndarray) -> None:
        if value.dtype != np.float32:
            self.cast = True


class _Unsupported(Exception):
    """Why a supported op type cannot be mapped in this use (becomes the detail of `unsupported`)."""
