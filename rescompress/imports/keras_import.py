"""Keras models (`.keras`, legacy `.h5`, a SavedModel directory) read into rescompress models.

keras.applications ResNets map onto the registry's ResNet variants (`keras_apps`); any other functional (or
Sequential) model of standard layers becomes a graph model (`rescompress.models.graph`): NHWC activations
become NCHW, HWIO kernels OIHW, a Dense after a Flatten has its rows permuted from HWC to CHW order,
'same' paddings become the explicit (possibly asymmetric) paddings TensorFlow uses for the model's input
size, a final softmax is dropped so the model emits logits, and Rescaling / Normalization layers at the
input fold into the input spec. TensorFlow is imported only here, when a Keras file is imported.
"""

from __future__ import annotations

import importlib.util
import json
import math
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rescompress.errors import BackendMissingError, ModelImportError
from rescompress.imports.base import Imported, SourceInput, unsupported

SUPPORTED_LAYERS = (
    "InputLayer", "Conv2D", "BatchNormalization", "Activation (relu, linear; softmax as the last layer)",
    "ReLU (plain)", "Add", "ZeroPadding2D", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D",
    "Flatten (before a Dense)", "Dense", "Dropout", "Softmax (as the last layer)",
    "Rescaling and Normalization (at the input)",
)
_SKIPPED = {"Dropout", "SpatialDropout2D", "GaussianDropout", "AlphaDropout", "GaussianNoise"}
_INPUT_SIDE = {"Rescaling", "Normalization"}
_NESTED = {"Functional", "Sequential", "Model"}
SAVE_FUNCTIONAL = ("build it with the functional API (keras.Input → layers → keras.Model(inputs, outputs)) or "
                   "as a keras.Sequential, then save it with model.save('model.keras')")


def require_tensorflow() -> None:
    if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
        raise BackendMissingError("importing a Keras model needs TensorFlow, which is not installed: "
                                  "pip install 'rescompress[tensorflow]'")


def _version(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check_keras_version(path: Path) -> Optional[str]:
    """The Keras version a `.keras` file was saved with; refused when newer than the installed Keras."""
    import keras

    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("metadata.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise ModelImportError(f"{path} is not a Keras .keras archive ({type(exc).__name__}: {exc})") from None
    saved = str(meta.get("keras_version", ""))
    if saved and _version(saved)[:2] > _version(keras.__version__)[:2]:
        raise ModelImportError(f"{path} was saved by Keras {saved}, newer than the installed Keras "
                               f"{keras.__version__}; upgrade keras (pip install -U keras), or save the model again "
                               f"with Keras {'.'.join(map(str, _version(keras.__version__)[:2]))}")
    return saved or None


def load_keras(path: Path) -> Any:
    """The Keras model in `path` (`.keras`, `.h5`/`.hdf5`, or a SavedModel directory), without compiling it."""
    require_tensorflow()
    import keras

    if not path.exists():
        raise ModelImportError(f"model file not found: {path}")
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ModelImportError(f"{path} is a directory but not a SavedModel (no saved_model.pb)")
        return _load_saved_model(path)
    if path.suffix == ".keras":
        check_keras_version(path)
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except (TypeError, ValueError) as exc:
        text = str(exc)
        if "Could not locate class" in text or "could not be deserialized" in text or "get_config" in text:
            raise ModelImportError(f"{path} holds a subclassed Keras model whose layer graph cannot be read "
                                   f"({text.splitlines()[0][:160]}); {SAVE_FUNCTIONAL}") from None
        if path.suffix in (".h5", ".hdf5") and "No model config" in text:
            raise ModelImportError(f"{path} holds weights only, no model; save the whole model "
                                   "(model.save('model.keras'))") from None
        raise ModelImportError(f"cannot read Keras model {path}: {text.splitlines()[0][:200]}") from None
    except OSError as exc:
        raise ModelImportError(f"cannot read Keras model {path}: {exc}") from None
    return model


def _load_saved_model(path: Path) -> Any:
    """A SavedModel written by Keras 2 (tf.keras / tf_keras) still holds the layer graph: read it with tf_keras."""
    if importlib.util.find_spec("tf_keras") is None:
        raise BackendMissingError(f"{path} is a SavedModel; reading its Keras layers needs tf_keras: "
                                  "pip install 'rescompress[tensorflow]'")
    import tf_keras

    try:
        model = tf_keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # a SavedModel without Keras metadata fails in many ways inside TensorFlow
        raise ModelImportError(f"{path} is a SavedModel without a readable Keras layer graph "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); {SAVE_FUNCTIONAL}") from None
    if not hasattr(model, "layers") or type(model).__name__ not in ("Functional", "Sequential"):
        raise ModelImportError(f"{path} is a SavedModel of a subclassed model, whose layer graph cannot be read; "
                               f"{SAVE_FUNCTIONAL}")
    return model


# ------------------------------------------------------------------------------------------- the layer graph


def _histories(obj: Any) -> list[tuple[str, int, int]]:
    """(layer, node index, tensor index) of every tensor in a node's serialized arguments (Keras 3 or 2)."""
    out: list[tuple[str, int, int]] = []
    if isinstance(obj, dict):
        hist = obj.get("config", {}).get("keras_history") if obj.get("class_name") == "__keras_tensor__" else None
        if hist is not None:
            out.append((str(hist[0]), int(hist[1]), int(hist[2])))
        else:
            for v in obj.values():
                out += _histories(v)
    elif isinstance(obj, (list, tuple)):
        if len(obj) >= 3 and isinstance(obj[0], str) and isinstance(obj[1], int) and isinstance(obj[2], int):
            out.append((obj[0], obj[1], obj[2]))  # Keras 2: [layer, node, tensor, kwargs]
        else:
            for v in obj:
                out += _histories(v)
    return out


def _layer_list(model: Any) -> list[tuple[Any, list[str]]]:
    """(layer, names of the layers it reads) for each layer of a Functional or Sequential model, in order."""
    kind = type(model).__name__
    config = model.get_config()
    layers = config.get("layers")
    if kind == "Sequential" or (layers and "inbound_nodes" not in layers[0]):
        out, prev = [], None
        for layer in model.layers:
            out.append((layer, [] if prev is None else [prev]))
            prev = layer.name
        return out
    if kind not in ("Functional", "Model") or layers is None:
        raise ModelImportError(f"the Keras model is a subclassed {kind}, whose layer graph cannot be read; "
                               f"{SAVE_FUNCTIONAL}")
    out = []
    for entry in layers:
        name = entry.get("name") or entry["config"]["name"]
        nodes = entry.get("inbound_nodes") or []
        if len(nodes) > 1:
            raise unsupported(name, entry["class_name"], SUPPORTED_LAYERS, "the layer is called more than once "
                              "(shared weights)")
        sources = _histories(nodes[0]) if nodes else []
        if any(node != 0 for _, node, _ in sources):
            raise unsupported(name, entry["class_name"], SUPPORTED_LAYERS, "it reads a shared layer's second call")
        out.append((model.get_layer(name), [s for s, _, _ in sources]))
    return out


def _endpoints(model: Any) -> tuple[list[str], list[str]]:
    def names(spec: Any) -> list[str]:
        return [h[0] for h in _histories(spec)] if spec else []

    if type(model).__name__ == "Sequential":
        return [model.layers[0].name] if model.layers else [], [model.layers[-1].name] if model.layers else []
    config = model.get_config()
    return names(config.get("input_layers")), names(config.get("output_layers"))


def _arr(v: Any) -> np.ndarray:
    return np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.float32)


def _finite(layer: str, **tensors: Optional[np.ndarray]) -> None:
    for what, t in tensors.items():
        if t is not None and not np.all(np.isfinite(t)):
            kind = "NaN" if np.isnan(t).any() else "Inf"
            raise ModelImportError(f"layer '{layer}' {what} holds {kind} values; the model cannot be imported "
                                   "(it was saved after a diverged training step?)")


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding along one axis: the extra cell goes to the end (bottom/right)."""
    eff = (kernel - 1) * dilation + 1
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + eff - size, 0)
    return total // 2, total - total // 2


def _window(size: int, kernel: int, stride: int, dilation: int, pads: tuple[int, int]) -> int:
    return (size + pads[0] + pads[1] - ((kernel - 1) * dilation + 1)) // stride + 1


class _Builder:
    """Walks a Keras layer graph and emits graph-spec nodes and their weights."""

    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.weights: dict[str, dict[str, np.ndarray]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # tensor -> (C, H, W) or (F,)
        self.alias: dict[str, str] = {}  # keras layer (incl. skipped ones) -> the spec tensor holding its output
        self.layer_map: dict[str, str] = {}  # spec node -> keras layer whose output it equals
        self.taken: set[str] = {"input"}
        self.flattened: dict[str, tuple[int, int, int]] = {}  # flatten node -> the (C, H, W) it flattened
        self.notes: list[str] = []

    def name(self, raw: str) -> str:
        from rescompress.models.graph import module_name

        out = module_name(raw, self.taken)
        self.taken.add(out)
        return out

    def add(self, raw: str, op: str, inputs: list[str], shape: tuple[int, ...], **fields: Any) -> str:
        name = self.name(raw)
        self.nodes.append({"name": name, "op": op, "inputs": inputs, **fields})
        self.shapes[name] = shape
        return name

    def activation(self, layer: Any, kind: str, act: str, x: str, last: bool) -> str:
        if act in ("linear", None):
            return x
        if act == "relu":
            return self.add(f"{layer.name}_relu", "relu", [x], self.shapes[x])
        if act == "softmax" and last:
            self.notes.append(f"the softmax of '{layer.name}' is dropped: the model emits logits")
            return x
        raise unsupported(layer.name, f"{kind}(activation='{act}')", SUPPORTED_LAYERS)


def _act_name(layer: Any) -> str:
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", None) or str(act)
    return name


def read_keras_model(kmodel: Any, path: Path, *, image_size: Optional[int] = None,
                     channels: Optional[int] = None) -> Imported:
    """An `Imported` for a loaded Keras model: a registry ResNet for keras.applications ResNets, a graph
    model otherwise."""
    import keras
    import tensorflow as tf

    if type(kmodel).__name__ not in ("Functional", "Sequential"):
        raise ModelImportError(f"{path} holds a subclassed Keras model ({type(kmodel).__name__}), whose layer graph "
                               f"cannot be read; {SAVE_FUNCTIONAL}")
    shape = _input_shape(kmodel, image_size, channels)  # refuses a size or channel count other than the data's
    from rescompress.imports.keras_apps import import_keras_application, match_keras_application

    known = match_keras_application(kmodel)
    if known is not None:
        return import_keras_application(kmodel, known, path, image_size=image_size)
    runtime = f"tensorflow {tf.__version__} (keras {getattr(keras, '__version__', '?')})"
    if type(kmodel).__module__.startswith("tf_keras"):
        import tf_keras

        runtime = f"tensorflow {tf.__version__} (tf_keras {tf_keras.__version__})"
    return _graph_import(kmodel, path, shape, runtime)


def _input_shape(kmodel: Any, image_size: Optional[int], channels: Optional[int]) -> tuple[int, int, int]:
    shape = getattr(kmodel, "input_shape", None)
    if isinstance(shape, list):
        if len(shape) != 1:
            raise ModelImportError(f"the Keras model has {len(shape)} inputs; only single-image-input classifiers "
                                   "can be imported")
        shape = shape[0]
    if shape is None or len(shape) != 4:
        raise ModelImportError(f"the Keras model's input has shape {shape}; an image classifier takes "
                               "(batch, height, width, channels)")
    _, h, w, c = shape
    if c is None:
        raise ModelImportError("the Keras model's input has no fixed channel count")
    if h is None or w is None:
        if image_size is None:
            raise ModelImportError(f"the Keras model's input has dynamic spatial dimensions {tuple(shape)}; give "
                                   "image_size (import --image-size N, or data.image_size in the recipe)")
        h = w = image_size
    elif image_size is not None and (h, w) != (image_size, image_size):
        raise ModelImportError(f"the Keras model takes {h}x{w} inputs, but image_size {image_size} was asked for; "
                               f"set data.image_size: {h} (or import --image-size {h})")
    if channels is not None and c != channels:
        raise ModelImportError(f"the Keras model takes {c}-channel inputs, but the data has {channels} channels; "
                               f"set data.channels: {c}")
    return int(c), int(h), int(w)


def _graph_import(kmodel: Any, path: Path, shape: tuple[int, int, int], runtime: str) -> Imported:
    from rescompress.models.arch import build_arch
    from rescompress.models.graph import GRAPH_ARCH, GRAPH_FORMAT, GRAPH_VERSION

    b = _Builder()
    c, h, w = shape
    b.shapes["input"] = (c, h, w)
    inputs, outputs = _endpoints(kmodel)
    if len(outputs) != 1:
        raise ModelImportError(f"the Keras model has {len(outputs)} outputs; only single-output classifiers "
                               "can be imported")
    affine = _walk(kmodel, b, {n: "input" for n in inputs}, outputs[0], top=True)
    out = b.alias[outputs[0]]
    nodes = {n["name"]: n for n in b.nodes}
    if out not in nodes or nodes[out]["op"] != "linear":
        kind = nodes[out]["op"] if out in nodes else "input"
        raise ModelImportError(f"the Keras model ends in a {kind} layer, not a Dense classifier")
    spec = {"format": GRAPH_FORMAT, "version": GRAPH_VERSION,
            "input": {"name": "input", "channels": c, "height": h, "width": w}, "nodes": b.nodes, "output": out}
    classes = int(nodes[out]["out_features"])
    arch = {"name": GRAPH_ARCH, "graph": spec, "num_classes": classes, "in_channels": c, "small_input": False}
    model = build_arch(arch)
    _load(model, b.weights)
    normalization, preprocessing, source_input = _input_contract(affine, c)
    return Imported(model=model.eval(), arch=arch, channels=c, height=h, width=w, normalization=normalization,
                    preprocessing=preprocessing, source_input=source_input,
                    source={"path": str(path), "format": "keras", "runtime": runtime,
                            "architecture": f"Keras {type(kmodel).__name__} model '{kmodel.name}', "
                                            f"{len(b.nodes)} graph nodes"},
                    layer_map=b.layer_map, notes=b.notes)


def _load(model: Any, weights: dict[str, dict[str, np.ndarray]]) -> None:
    import torch

    sd = model.state_dict()
    for node, tensors in weights.items():
        for key, value in tensors.items():
            target = sd[f"{node}.{key}"]
            if tuple(target.shape) != value.shape:
                raise ModelImportError(f"layer '{node}': {key} has shape {value.shape}, the graph expects "
                                       f"{tuple(target.shape)}")
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def _walk(kmodel: Any, b: _Builder, bound: dict[str, str], final: str, *, top: bool,
          affine: Optional[list] = None) -> list:
    """Emit the nodes of `kmodel` (nested models inline). `bound` maps its input layers to spec tensors.
    Returns the input-side affine transforms [(scale, offset), ...] folded from Rescaling/Normalization."""
    affine = [] if affine is None else affine
    for layer, srcs in _layer_list(kmodel):
        kind = type(layer).__name__
        name = layer.name
        if kind == "InputLayer":
            if name not in bound:
                raise ModelImportError(f"input layer '{name}' is not connected")
            b.alias[name] = bound[name]
            continue
        if not srcs and type(kmodel).__name__ == "Sequential" and layer is kmodel.layers[0]:
            srcs = list(bound)  # a Sequential without an InputLayer entry reads the bound input directly
            b.alias.setdefault(srcs[0], bound[srcs[0]])
        ins = [b.alias[s] for s in srcs]
        last = top and name == final
        if kind in _NESTED:
            inner_in, inner_out = _endpoints(layer)
            if len(ins) != 1 or len(inner_in) != 1 or len(inner_out) != 1:
                raise unsupported(name, kind, SUPPORTED_LAYERS, "a nested model must have one input and one output")
            _walk(layer, b, {inner_in[0]: ins[0]}, inner_out[0], top=False, affine=affine)
            b.alias[name] = b.alias[inner_out[0]]
            continue
        if kind in _SKIPPED:
            b.alias[name] = ins[0]
            continue
        if kind in _INPUT_SIDE:
            if ins != ["input"]:
                raise unsupported(name, kind, SUPPORTED_LAYERS, "only directly after the input can it fold into "
                                  "the input spec")
            affine.append(_affine(layer, kind, b.shapes["input"][0]))
            b.alias[name] = "input"
            continue
        before = len(b.nodes)
        b.alias[name] = _emit(layer, kind, ins, b, last)
        made = {n["name"] for n in b.nodes[before:]}
        if b.alias[name] in made and b.alias[name] not in b.flattened:
            b.layer_map[b.alias[name]] = name  # this node's output is the Keras layer's (flatten orders differ)
    return affine


def _affine(layer: Any, kind: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    def per_channel(v: Any) -> np.ndarray:
        a = np.asarray(v, dtype=np.float64).reshape(-1)
        if a.size == 1:
            return np.full(channels, float(a[0]))
        if a.size != channels:
            raise unsupported(layer.name, kind, SUPPORTED_LAYERS, f"{a.size} values for {channels} channels")
        return a

    if kind == "Rescaling":
        return per_channel(layer.scale), per_channel(layer.offset)
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else (layer.axis,)
    if tuple(axis) not in ((-1,), (3,)):
        raise unsupported(layer.name, kind, SUPPORTED_LAYERS, f"normalising over axis {layer.axis}, not channels")
    mean = per_channel(_arr(layer.mean))
    var = per_channel(_arr(layer.variance))
    if getattr(layer, "invert", False):
        raise unsupported(layer.name, f"{kind}(invert=True)", SUPPORTED_LAYERS)
    std = np.sqrt(np.maximum(var, 1e-7))  # Keras' own floor (backend.epsilon())
    return 1.0 / std, -mean / std


def _input_contract(affine: list, channels: int) -> tuple[Optional[dict], str, SourceInput]:
    """The torch model's input spec normalisation, the source's preprocessing in words, and how the Keras input
    follows from the torch input."""
    if not affine:
        return None, "as the Keras model expects: NHWC float32; the model holds no Rescaling/Normalization layer", \
            SourceInput(layout="NHWC")
    scale, offset = np.ones(channels), np.zeros(channels)
    for a, o in affine:  # y = (x * scale + offset) * a + o
        scale, offset = scale * a, offset * a + o
    if np.any(scale <= 0):
        raise ModelImportError("the input Rescaling/Normalization flips the sign of a channel; it cannot be "
                               "expressed as an input mean/std")
    # the torch input y = (p / 255 - mean) / std equals the Keras model's folded input y = p * scale + offset
    std = 1.0 / (255.0 * scale)
    mean = -offset * std + 0.0  # no negative zeros in the spec
    words = ", ".join(f"x*{s:.6g}{o:+.6g}" for s, o in zip(scale, offset))
    normalization = {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    source = SourceInput(layout="NHWC", scale=[float(1.0 / s) for s in scale],
                         offset=[float(-o / s) for s, o in zip(scale, offset)])
    return normalization, f"pixels in 0..255, NHWC; its input layers compute {words} (folded into the input spec)", source


def _emit(layer: Any, kind: str, ins: list[str], b: _Builder, last: bool) -> str:
    cfg = layer.get_config()
    if kind not in ("Add",) and len(ins) != 1:
        raise unsupported(layer.name, kind, SUPPORTED_LAYERS, f"{len(ins)} inputs")
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise unsupported(layer.name, kind, SUPPORTED_LAYERS, "data_format channels_first")
    x = ins[0] if ins else None
    shape = b.shapes[x] if x is not None else None
    if kind == "Conv2D":
        return _conv(layer, cfg, x, shape, b, last)
    if kind == "BatchNormalization":
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
        if axis not in (-1, 3) or len(shape) != 3:
            raise unsupported(layer.name, kind, SUPPORTED_LAYERS, f"axis {axis} (only the channel axis)")
        c = shape[0]
        gamma = _arr(layer.gamma) if layer.gamma is not None else np.ones(c, np.float32)
        beta = _arr(layer.beta) if layer.beta is not None else np.zeros(c, np.float32)
        mean, var = _arr(layer.moving_mean), _arr(layer.moving_variance)
        _finite(layer.name, gamma=gamma, beta=beta, moving_mean=mean, moving_variance=var)
        node = b.add(layer.name, "batchnorm", [x], shape, features=c, eps=float(cfg["epsilon"]))
        b.weights[node] = {"weight": gamma, "bias": beta, "running_mean": mean, "running_var": var}
        return node
    if kind == "Activation":
        act = cfg.get("activation")
        act = act if isinstance(act, str) else _act_name(layer)
        if act == "relu":
            return b.add(layer.name, "relu", [x], shape)
        return b.activation(layer, kind, act, x, last)
    if kind == "ReLU":
        if cfg.get("max_value") is not None or cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
            raise unsupported(layer.name, kind, SUPPORTED_LAYERS, "max_value, negative_slope or threshold set")
        return b.add(layer.name, "relu", [x], shape)
    if kind == "Softmax":
        if not last:
            raise unsupported(layer.name, kind, SUPPORTED_LAYERS, "a softmax before the last layer")
        b.notes.append(f"the final Softmax layer '{layer.name}' is dropped: the model emits logits")
        return x
    if kind == "Add":
        shapes = {b.shapes[i] for i in ins}
        if len(shapes) != 1:
            raise unsupported(layer.name, kind, SUPPORTED_LAYERS, f"inputs of different shapes {sorted(shapes)}")
        return b.add(layer.name, "add", ins, shape)
    if kind == "ZeroPadding2D":
        (t, bo), (le, r) = cfg["padding"]
        c, h, w = shape
        return b.add(layer.name, "pad", [x], (c, h + t + bo, w + le + r), padding=[t, bo, le, r])
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        return _pool(layer, kind, cfg, x, shape, b)
    if kind == "GlobalAveragePooling2D":
        keep = bool(cfg.get("keepdims", False))
        return b.add(layer.name, "global_avgpool", [x], (shape[0], 1, 1) if keep else (shape[0],), keepdims=keep)
    if kind == "Flatten":
        if len(shape) != 3:
            return x
        node = b.add(layer.name, "flatten", [x], (int(np.prod(shape)),))
        b.flattened[node] = shape  # type: ignore[assignment]
        return node
    if kind == "Dense":
        return _dense(layer, cfg, x, shape, b, last)
    raise unsupported(layer.name, kind, SUPPORTED_LAYERS)


def _conv(layer: Any, cfg: dict, x: str, shape: tuple, b: _Builder, last: bool) -> str:
    c, h, w = shape
    kh, kw = cfg["kernel_size"]
    sh, sw = cfg["strides"]
    dh, dw = cfg.get("dilation_rate", (1, 1))
    groups = int(cfg.get("groups", 1))
    if cfg["padding"] == "same":
        (t, bo), (le, r) = _same_pads(h, kh, sh, dh), _same_pads(w, kw, sw, dw)
    elif cfg["padding"] == "valid":
        t = bo = le = r = 0
    else:
        raise unsupported(layer.name, "Conv2D", SUPPORTED_LAYERS, f"padding '{cfg['padding']}'")
    kernel = _arr(layer.kernel)  # (kh, kw, cin / groups, cout)
    bias = _arr(layer.bias) if cfg.get("use_bias", True) and layer.bias is not None else None
    _finite(layer.name, kernel=kernel, bias=bias)
    cout = int(kernel.shape[-1])
    out = (cout, _window(h, kh, sh, dh, (t, bo)), _window(w, kw, sw, dw, (le, r)))
    node = b.add(layer.name, "conv", [x], out, in_channels=c, out_channels=cout, kernel=[kh, kw], stride=[sh, sw],
                 padding=[t, bo, le, r], dilation=[dh, dw], groups=groups, bias=bias is not None)
    b.weights[node] = {"weight": kernel.transpose(3, 2, 0, 1)}
    if bias is not None:
        b.weights[node]["bias"] = bias
    act = cfg.get("activation")
    return b.activation(layer, "Conv2D", act if isinstance(act, str) else _act_name(layer), node, last)


def _pool(layer: Any, kind: str, cfg: dict, x: str, shape: tuple, b: _Builder) -> str:
    c, h, w = shape
    kh, kw = cfg["pool_size"]
    sh, sw = cfg.get("strides") or cfg["pool_size"]
    if cfg["padding"] == "same":
        (t, bo), (le, r) = _same_pads(h, kh, sh, 1), _same_pads(w, kw, sw, 1)
    else:
        t = bo = le = r = 0
    out = (c, _window(h, kh, sh, 1, (t, bo)), _window(w, kw, sw, 1, (le, r)))
    if kind == "MaxPooling2D":
        return b.add(layer.name, "maxpool", [x], out, kernel=[kh, kw], stride=[sh, sw], padding=[t, bo, le, r])
    if (t, le) != (bo, r) or 2 * t > kh or 2 * le > kw:
        raise unsupported(layer.name, kind, SUPPORTED_LAYERS, f"'same' padding {[t, bo, le, r]} is asymmetric "
                          "for this input size")
    return b.add(layer.name, "avgpool", [x], out, kernel=[kh, kw], stride=[sh, sw], padding=[t, bo, le, r],
                 count_include_pad=False)


def _dense(layer: Any, cfg: dict, x: str, shape: tuple, b: _Builder, last: bool) -> str:
    if len(shape) != 1:
        raise unsupported(layer.name, "Dense", SUPPORTED_LAYERS, f"a {len(shape)}-D input (Flatten or pool first)")
    kernel = _arr(layer.kernel)  # (in, out)
    bias = _arr(layer.bias) if cfg.get("use_bias", True) and layer.bias is not None else None
    _finite(layer.name, kernel=kernel, bias=bias)
    if x in b.flattened:  # Keras flattened NHWC rows (h, w, c); the torch model flattens NCHW (c, h, w)
        c, h, w = b.flattened[x]
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
    node = b.add(layer.name, "linear", [x], (int(kernel.shape[1]),), in_features=int(kernel.shape[0]),
                 out_features=int(kernel.shape[1]), bias=bias is not None)
    b.weights[node] = {"weight": kernel.T.copy()}
    if bias is not None:
        b.weights[node]["bias"] = bias
    act = cfg.get("activation")
    return b.activation(layer, "Dense", act if isinstance(act, str) else _act_name(layer), node, last)


# ------------------------------------------------------------------------------------------- the source model


class KerasSource:
    """The Keras model run by TensorFlow; its logits are the classifier's output before any softmax."""

    def __init__(self, kmodel: Any, runtime: str, batch: int = 16) -> None:
        self.kmodel, self.runtime, self.batch = kmodel, runtime, batch
        self._logits_model = _logits_model(kmodel)

    def _run(self, model: Any, x: np.ndarray) -> list[np.ndarray]:
        outs: list[list[np.ndarray]] = []
        for i in range(0, len(x), self.batch):
            y = model([x[i:i + self.batch]], training=False)  # a list: the structure of a one-input model
            ys = y if isinstance(y, (list, tuple)) else [y]
            outs.append([np.asarray(t) for t in ys])
        return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self._run(self._logits_model, x)[0]

    def layer_outputs(self, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        import keras

        layers = []
        for n in names:
            try:
                layers.append((n, self.kmodel.get_layer(n).output))
            except (ValueError, AttributeError):
                continue  # a layer inside a nested model: not reachable from the outer graph
        if not layers:
            return {}
        probe = keras.Model(self.kmodel.inputs, [t for _, t in layers]) if "tf_keras" not in type(
            self.kmodel).__module__ else _tf_keras_model(self.kmodel.inputs, [t for _, t in layers])
        outs = self._run(probe, x)
        return {n: (o.transpose(0, 3, 1, 2) if o.ndim == 4 else o) for (n, _), o in zip(layers, outs)}


def _tf_keras_model(inputs: Any, outputs: Any) -> Any:
    import tf_keras

    return tf_keras.Model(inputs, outputs)


def _logits_model(kmodel: Any) -> Any:
    """`kmodel` with its final softmax removed: a Dense's softmax activation is set to linear (on this loaded
    copy), a final Softmax/Activation('softmax') layer is cut off."""
    last = kmodel.layers[-1]
    kind = type(last).__name__
    if kind in _NESTED:
        return kmodel
    if kind == "Dense" and _act_name(last) == "softmax":
        import keras

        last.activation = keras.activations.linear
        return kmodel
    if kind == "Softmax" or (kind == "Activation" and _act_name(last) == "softmax"):
        maker = _tf_keras_model if "tf_keras" in type(kmodel).__module__ else None
        if maker is None:
            import keras

            maker = keras.Model
        return maker(kmodel.inputs, last.input)
    return kmodel


def read_keras(path: Path, *, image_size: Optional[int] = None,
               channels: Optional[int] = None) -> tuple[Imported, KerasSource]:
    """Load a Keras file and import it; returns the import and the Keras model to measure parity against."""
    kmodel = load_keras(path)
    imported = read_keras_model(kmodel, path, image_size=image_size, channels=channels)
    return imported, KerasSource(kmodel, imported.source["runtime"])


def is_keras_path(path: Path) -> bool:
    return path.suffix in (".keras", ".h5", ".hdf5") or (path.is_dir() and (path / "saved_model.pb").is_file())
