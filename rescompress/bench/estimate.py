"""Estimated latency: a layer-wise roofline calibrated on published figures.

The model, per inference of a float model's layer table on one compute unit at one precision:

    t = t0 + sum over kernels k of [ max(ops_k / peak[precision], bytes_k / bandwidth) / efficiency + t_layer ]

- kernels: what TensorRT, XNNPACK and NPU delegates actually launch. BatchNorm is folded into the conv's weights
  and the ReLU runs in the conv's epilogue (neither is in the layer table); a residual add is fused into the
  epilogue of the conv that produces its first operand (the conv then also reads the other operand); max and
  average pools and the classifier are kernels of their own.
- ops = 2 x multiply-accumulates (the profiles' peaks count 1 MAC as 2 operations, dense);
  bytes = (weights + input + output [+ residual operand]) x the precision's element size (int8 1, fp16 2, fp32 4).
- `efficiency` (one number for both roofs): the fraction of the unit's peak and bandwidth a batch-1 network
  reaches (tiles that do not fill the machine, pipeline fill, caches that hold part of the activations).
- `t_layer`: the fixed cost of one kernel (launch, inter-kernel gap, operator dispatch and barrier).
- `t0`: a fixed cost per inference (enqueue and synchronisation).

Calibration: per estimate group, on the figures marked `use: calibrate` of every profile in the group, each
evaluated with its own device's unit peaks and bandwidth; least squares on log(estimated / published). With n
calibration figures the first n parameters of `FIT_ORDER` are fitted, the rest stay at `DEFAULTS` (documented
there). The published statistic (p50, p90 or mean) is taken as the median: for a dedicated accelerator the
spread is a few percent, below this model's resolution.

Checks, always out of sample: each calibration figure is estimated by the model fitted on the group's *other*
calibration figures (leave-one-out), and each `use: holdout` figure by the model fitted on all calibration
figures (the fit never reads a holdout figure). `figure_errors` reports both, beside the fit's own residuals.

Measured on the shipped profiles (orin-gpu-tensorrt: two MLPerf int8 ResNet-50 figures, AGX Orin and Orin NX,
and four NetsPresso fp16 figures, ResNet-18/50 on AGX Orin and Orin Nano): leave-one-out errors -13 % and
+21 % (AGX ResNet-18/50 fp16), -28 % and -15 % (Nano ResNet-18/50 fp16), +10 % (AGX ResNet-50 int8) and +41 %
(NX ResNet-50 int8, the least like the others). Calibrated on the two MLPerf figures alone, the fp16 figures
come out -29 %, -10 %, -50 % and -44 %: the two sources scale differently between devices (NX/AGX in MLPerf
is 1.69x, below the int8 peak ratio 2.83x; Nano/AGX in NetsPresso is 4.2x, the fp16 peak ratio 4.25x), so
a group needs figures of the precision and kind it estimates. Freeing `fixed_us` as a third parameter moves
the Nano ResNet-18 check to -30 %; it stays fixed (see DEFAULTS).

So an estimate carries an error bar (`check_max_abs_error_pct`) only from the group's figures of its own
runtime and precision; an Orin CPU onnxruntime int8 estimate, whose group holds only Raspberry Pi TFLite fp16
figures, is labelled `check: "unchecked: no published figure of this runtime/precision ..."` instead.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch
    from torch import nn

    from rescompress.devices import DeviceProfile, PublishedLatency

ELEMENT_BYTES = {"int8": 1, "fp16": 2, "fp32": 4}

# Defaults of the parameters a group's calibration figures do not free. None of them is read off a holdout figure.
DEFAULTS: dict[str, float] = {
    # a fraction of peak typical of batch-1 convolutions of ResNet sizes: half the tiles' worth of work is lost to
    # wave quantisation and pipeline fill (first principles; only used where no figure is left to fit it, which
    # cannot happen: with one figure it is the parameter fitted)
    "efficiency": 0.5,
    # kernel launch plus the gap between dependent kernels on a Jetson-class integrated GPU is a few microseconds;
    # XNNPACK's per-operator thread-pool dispatch and barrier and an NPU graph's per-op scheduling are of the same
    # order. 3 us, the middle of "a few"
    "layer_us": 3.0,
    # per inference: enqueue and one synchronisation; "compute only" figures exclude it and MLPerf SingleStream's
    # share of it is tens of microseconds at most, so it starts at 0 and is fitted only from a third figure on
    "fixed_us": 0.0,
}
# which parameters n calibration figures free, in order: the least-known first. fixed_us is never fitted: the
# compute-only figures exclude it and its share of an MLPerf SingleStream figure is below the model's resolution
FIT_ORDER: tuple[str, ...] = ("efficiency", "layer_us")


# ---------------------------------------------------------------------------------------------------- layer table

@dataclass(frozen=True)
class Layer:
    """One operation of a forward pass, at the batch of the example it was traced with.

    `kind`: conv, linear, pool (max or average, incl. the global average pool) or add (a residual add).
    BatchNorm and ReLU are not listed: every target runtime folds BatchNorm into the conv's weights and runs the
    ReLU in the conv's epilogue, so they cost no kernel and no memory traffic of their own.
    Element counts are of the whole batch (weights: once).
    """
    name: str
    kind: str
    macs: int
    weight_elems: int
    in_elems: int
    out_elems: int
    batch: int = 1


_POOLS = ("MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d")


def layer_table(model: "nn.Module", example: "torch.Tensor") -> list[Layer]:
    """The convs, linears, pools and residual adds one forward pass of `model` on `example` runs, in order.

    Channel counts and spatial sizes are those of the real modules and tensors (a structurally pruned model gives
    its own, smaller, table); the batch is `example.shape[0]`. Residual adds are found on the ResNet blocks
    (`out + identity` at the end of BasicBlock/Bottleneck forward).
    """
    import torch
    from torch import nn

    batch = int(example.shape[0])
    names = {m: n for n, m in model.named_modules()}
    rows: list[Layer] = []

    def weights_of(module: nn.Module) -> int:
        return module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        name = names.get(module, type(module).__name__)
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs = output.numel() * (module.in_channels // module.groups) * kh * kw
            rows.append(Layer(name, "conv", int(macs), int(weights_of(module)), int(x.numel()), int(output.numel()),
                              batch))
        elif isinstance(module, nn.Linear):
            macs = output.numel() * module.in_features
            rows.append(Layer(name, "linear", int(macs), int(weights_of(module)), int(x.numel()),
                              int(output.numel()), batch))
        elif type(module).__name__ in _POOLS:
            rows.append(Layer(name, "pool", 0, 0, int(x.numel()), int(output.numel()), batch))
        elif _is_residual_block(module):
            # the block ends with relu(out + identity): an add of two tensors of the output's shape
            rows.append(Layer(f"{name}.add" if name else "add", "add", 0, 0, 2 * int(output.numel()),
                              int(output.numel()), batch))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) or type(m).__name__ in _POOLS or _is_residual_block(m)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return rows


def _is_residual_block(module: object) -> bool:
    from rescompress.models.resnet import BasicBlock, Bottleneck

    return isinstance(module, (BasicBlock, Bottleneck))


@functools.lru_cache(maxsize=32)
def reference_layers(model: str, input_size: int = 224, num_classes: int = 1000, batch: int = 1) -> tuple[Layer, ...]:
    """The layer table of a registry model (ImageNet-style stem), cached: published figures are of these."""
    import torch

    from rescompress.models import build_model

    net = build_model(model, num_classes=num_classes, small_input=False)
    return tuple(layer_table(net, torch.zeros(batch, 3, input_size, input_size)))


# ------------------------------------------------------------------------------------------------------ roofline

@dataclass(frozen=True)
class Kernel:
    """What a runtime launches: a layer with its fused epilogue (a residual add folded into a conv)."""
    name: str
    kind: str
    ops: float
    elems: int  # weights + activations read and written


def kernels(layers: list[Layer] | tuple[Layer, ...]) -> list[Kernel]:
    out: list[Kernel] = []
    fused: set[int] = set()
    for layer in layers:
        prev = out[-1] if out else None
        if (layer.kind == "add" and prev is not None and prev.kind == "conv" and len(out) - 1 not in fused):
            # the conv's epilogue adds the residual operand: one more tensor read, no kernel of its own
            out[-1] = Kernel(prev.name + "+add", "conv", prev.ops, prev.elems + layer.out_elems)
            fused.add(len(out) - 1)
            continue
        out.append(Kernel(layer.name, layer.kind, 2.0 * layer.macs,
                          layer.weight_elems + layer.in_elems + layer.out_elems))
    return out


def roofline_ms(layers, precision: str, peak_tops: float, memory_gbps: float, params: dict[str, float]) -> float:
    """The model's latency, in ms, of `layers` at `precision` on a unit with these peak and bandwidth."""
    peak = peak_tops * 1e12
    bandwidth = memory_gbps * 1e9
    size = ELEMENT_BYTES[precision]
    eff = params["efficiency"]
    t = params["fixed_us"] * 1e-6
    for k in kernels(layers):
        t += max(k.ops / peak, k.elems * size / bandwidth) / eff + params["layer_us"] * 1e-6
    return t * 1e3


# --------------------------------------------------------------------------------------------------- calibration

@dataclass
class FigureFit:
    """A published figure beside the model's estimate for it."""
    device: str
    model: str
    runtime: str
    precision: str
    use: str
    published_ms: float
    estimated_ms: float
    error_pct: float
    statistic: str
    source: str
    input_size: int = 224
    num_classes: int = 1000
    batch: int = 1

    def label(self) -> str:
        return (f"{self.device} {self.model} {self.runtime} {self.precision} {self.published_ms:.3f} ms "
                f"({self.source})")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Calibration:
    """The parameters fitted for one estimate group, the figures they were fitted on and the fit's residuals."""
    group: str
    params: dict[str, float]  # efficiency, layer_us, fixed_us
    fitted: list[str]  # the names of the parameters the figures freed; the others are DEFAULTS
    figures: list[FigureFit] = field(default_factory=list)  # use: calibrate, with their residuals
    skipped: list[str] = field(default_factory=list)  # calibration figures that could not be evaluated, and why

    @property
    def residuals_pct(self) -> list[float]:
        return [f.error_pct for f in self.figures]

    def labels(self) -> list[str]:
        return [f.label() for f in self.figures]

    def describe(self) -> dict:
        """The parameters, for a report: each value, and which of them the calibration figures fitted."""
        return {**{k: float(v) for k, v in self.params.items()}, "fitted": list(self.fitted)}

    def to_dict(self) -> dict:
        return {"group": self.group, "parameters": dict(self.params), "fitted": list(self.fitted),
                "figures": [f.to_dict() for f in self.figures], "skipped": list(self.skipped)}


class _Figure:
    """A figure made ready to evaluate: its layers and its device's unit."""

    def __init__(self, device: "DeviceProfile", fig: "PublishedLatency") -> None:
        self.device, self.fig = device, fig
        rt = device.runtimes[fig.runtime]
        self.problem = ""
        if rt.unit is None:
            self.problem = f"{device.name} runtime {fig.runtime} has no compute unit"
            return
        unit = device.compute[rt.unit]
        if fig.precision not in unit.peak_tops:
            self.problem = f"{device.name} unit {rt.unit} has no peak_tops for {fig.precision}"
            return
        self.peak, self.bandwidth = unit.peak_tops[fig.precision], unit.memory_gbps
        from rescompress.models import MODELS

        if fig.model not in MODELS:
            self.problem = f"{device.name} publishes a figure for '{fig.model}', which is not a registry model"
            return
        self.layers = reference_layers(fig.model, fig.input_size, fig.num_classes, fig.batch)

    def estimate(self, params: dict[str, float]) -> float:
        return roofline_ms(self.layers, self.fig.precision, self.peak, self.bandwidth, params)

    def fit_row(self, params: dict[str, float]) -> FigureFit:
        f = self.fig
        est = self.estimate(params)
        return FigureFit(self.device.name, f.model, f.runtime, f.precision, f.use, float(f.latency_ms), float(est),
                         float((est - f.latency_ms) / f.latency_ms * 100.0), f.statistic, f.source,
                         f.input_size, f.num_classes, f.batch)


def _figures(group: str, devices, use: str) -> list[tuple["DeviceProfile", "PublishedLatency"]]:
    from rescompress.devices import group_figures

    return [(d, f) for d, f in group_figures(group, devices) if f.use == use]


_CALIBRATIONS: dict[str, Calibration] = {}
_CHECKS: dict[str, list[dict]] = {}


def _key(group: str, pairs: list[tuple["DeviceProfile", "PublishedLatency"]]) -> str:
    """A cache key holding everything a fit reads: the figures and their devices' units."""
    return json.dumps([group] + [[d.name, f.model_dump(mode="json"),
                                  d.compute[d.runtimes[f.runtime].unit].model_dump(mode="json")
                                  if d.runtimes[f.runtime].unit else None] for d, f in pairs], sort_keys=True)


def calibrate(group: str, devices: Optional[list["DeviceProfile"]] = None) -> Calibration:
    """Fit the group's free parameters on its `use: calibrate` figures only (cached per group and figures).

    Raises ValueError when the group has no calibration figure that can be evaluated.
    """
    pairs = _figures(group, devices, "calibrate")
    key = _key(group, pairs)
    if key in _CALIBRATIONS:
        return _CALIBRATIONS[key]
    ready, skipped = [], []
    for d, f in pairs:
        item = _Figure(d, f)
        (skipped.append(f"{d.name} {f.model} {f.runtime} {f.precision}: {item.problem}") if item.problem
         else ready.append(item))
    if not ready:
        raise ValueError(f"estimate group '{group}' has no published figure with `use: calibrate`"
                         + (f" that can be evaluated ({'; '.join(skipped)})" if skipped else ""))
    free = free_parameters(len(ready))
    params = _fit(ready, free)
    cal = Calibration(group, params, free, [item.fit_row(params) for item in ready], skipped)
    _CALIBRATIONS[key] = cal
    return cal


def free_parameters(n: int) -> list[str]:
    """The parameters n calibration figures fit: one for one figure, else at most n - 1, so that a fit keeps a
    degree of freedom and its residuals say how well the model holds (n figures, n parameters would fit any
    numbers exactly, e.g. a negative-looking 1.5 ms per layer on two CPU figures)."""
    return list(FIT_ORDER[:1 if n <= 1 else min(n - 1, len(FIT_ORDER))])


def _fit(ready: list[_Figure], free: list[str]) -> dict[str, float]:
    """Least squares on log(estimated / published) over the free parameters (efficiency and layer_us in log
    space, so they stay positive; fixed_us >= 0)."""
    import numpy as np
    from scipy.optimize import least_squares

    def unpack(x) -> dict[str, float]:
        params = dict(DEFAULTS)
        for name, v in zip(free, x):
            params[name] = float(v) if name == "fixed_us" else float(math.exp(v))
        return params

    def residuals(x):
        params = unpack(x)
        return np.array([math.log(item.estimate(params) / item.fig.latency_ms) for item in ready])

    x0, lo, hi = [], [], []
    for name in free:
        if name == "fixed_us":
            x0.append(DEFAULTS[name]); lo.append(0.0); hi.append(1e6)
        else:
            top = 1.0 if name == "efficiency" else 1e4  # no unit runs above its peak
            x0.append(math.log(DEFAULTS[name])); lo.append(math.log(1e-4)); hi.append(math.log(top))
    result = least_squares(residuals, np.array(x0), bounds=(np.array(lo), np.array(hi)), x_scale=1.0,
                           xtol=1e-12, ftol=1e-12, gtol=1e-12)
    return unpack(result.x)


def holdout_errors(group: str, devices: Optional[list["DeviceProfile"]] = None) -> list[dict]:
    """The calibrated model against each `use: holdout` figure of the group (figures the fit never saw)."""
    cal = calibrate(group, devices)
    out = []
    for d, f in _figures(group, devices, "holdout"):
        item = _Figure(d, f)
        if not item.problem:
            out.append({**item.fit_row(cal.params).to_dict(), "check": "holdout"})
    return out


def calibration_errors(group: str, devices: Optional[list["DeviceProfile"]] = None) -> list[dict]:
    """The fit's residuals: the calibrated model against each `use: calibrate` figure it was fitted on."""
    return [f.to_dict() for f in calibrate(group, devices).figures]


def leave_one_out_errors(group: str, devices: Optional[list["DeviceProfile"]] = None) -> list[dict]:
    """Each calibration figure against the model fitted on the group's other calibration figures; `error_pct`
    is None for a group's only figure (nothing is left to fit on). `fit_error_pct` is the full fit's residual."""
    ready = [item for item in (_Figure(d, f) for d, f in _figures(group, devices, "calibrate")) if not item.problem]
    full = {(r["device"], r["model"], r["runtime"], r["precision"]): r["error_pct"]
            for r in calibration_errors(group, devices)}
    out = []
    for i, item in enumerate(ready):
        others = ready[:i] + ready[i + 1:]
        row = item.fit_row(calibrate(group, devices).params).to_dict()
        row["fit_error_pct"] = full[(row["device"], row["model"], row["runtime"], row["precision"])]
        if others:
            params = _fit(others, free_parameters(len(others)))
            est = item.estimate(params)
            row.update(estimated_ms=float(est), error_pct=float((est - item.fig.latency_ms) / item.fig.latency_ms * 100))
        else:
            row.update(estimated_ms=None, error_pct=None)
        out.append({**row, "check": "leave-one-out"})
    return out


def figure_errors(group: str, devices: Optional[list["DeviceProfile"]] = None) -> list[dict]:
    """Every figure of the group beside its out-of-sample estimate: calibration figures left out of the fit
    in turn, then the held-out ones; each row says its `use` and `check` (cached per group and figures)."""
    from rescompress.devices import group_figures

    key = _key(group, group_figures(group, devices))
    if key not in _CHECKS:
        _CHECKS[key] = leave_one_out_errors(group, devices) + holdout_errors(group, devices)
    return [dict(r) for r in _CHECKS[key]]


# ------------------------------------------------------------------------------------------------------ estimate

EXTRAPOLATION_FACTOR = 10.0  # MACs this many times outside the calibration figures' range: say so


def _extrapolation(layers: list[Layer], cal: Calibration) -> str:
    """A warning when the model is far outside the sizes the group was calibrated on: there, the per-kernel
    and fixed costs the fit could barely see decide the estimate."""
    macs = sum(layer.macs for layer in layers) / max(1, layers[0].batch)
    sizes = [sum(x.macs for x in reference_layers(f.model, f.input_size, f.num_classes, f.batch)) / f.batch
             for f in cal.figures]
    low, high = min(sizes), max(sizes)
    if low / EXTRAPOLATION_FACTOR <= macs <= high * EXTRAPOLATION_FACTOR:
        return ""
    return (f"extrapolated: {macs / 1e6:.1f}M MACs per image, against {low / 1e9:.2f}-{high / 1e9:.2f}G in the "
            f"figures it was calibrated on; the per-kernel cost (fitted {cal.params['layer_us']:.2g} us) decides "
            f"it here, so measure on the device before relying on it")


@dataclass
class Estimate:
    latency: Optional[dict]  # None with `message` saying why
    message: str = ""


def estimate_latency(device: "DeviceProfile", runtime: str, precision: str, layers: list[Layer],
                     devices: Optional[list["DeviceProfile"]] = None) -> Estimate:
    """The calibrated roofline's latency of `layers` (a layer table) on `device` in `runtime` at `precision`."""
    rt = device.runtimes.get(runtime)
    if rt is None:
        return Estimate(None, f"{device.name} has no runtime '{runtime}' (runtimes: {', '.join(device.runtimes)})")
    if rt.unit is None:
        return Estimate(None, f"{device.name} runtime {runtime} has no compute unit (runtimes.{runtime}.unit) "
                              f"to estimate on")
    if not rt.estimate_group:
        return Estimate(None, f"{device.name} runtime {runtime} has no estimate group "
                              f"(runtimes.{runtime}.estimate_group) to calibrate on")
    unit = device.compute[rt.unit]
    if precision not in ELEMENT_BYTES:
        return Estimate(None, f"unknown precision '{precision}' (one of {', '.join(ELEMENT_BYTES)})")
    if precision not in unit.peak_tops:
        return Estimate(None, f"{device.name} unit {rt.unit} (runtime {runtime}) has no peak_tops for {precision} "
                              f"(has: {', '.join(unit.peak_tops)})")
    if not layers:
        return Estimate(None, "the layer table is empty")
    group = rt.estimate_group
    try:
        cal = calibrate(group, devices)
    except ValueError as exc:
        return Estimate(None, str(exc))
    p50 = roofline_ms(layers, precision, unit.peak_tops[precision], unit.memory_gbps, cal.params)
    return Estimate({
        **({"extrapolated": note} if (note := _extrapolation(layers, cal)) else {}),
        "source": "estimated",
        "p50_ms": float(p50),
        "batch": int(layers[0].batch),
        "group": group,
        "calibrated_on": cal.labels(),
        **check_for(group, runtime, precision, devices),
        "parameters": dict(cal.params),
    })


UNCHECKED = "unchecked: no published figure of this runtime/precision"


def check_for(group: str, runtime: str, precision: str, devices: Optional[list["DeviceProfile"]] = None) -> dict:
    """The error bar an estimate of `runtime` at `precision` in `group` may carry: the largest out-of-sample
    error on the group's published figures of that same runtime and precision (`check_max_abs_error_pct`,
    with `check` saying on how many). Figures of another runtime or precision do not check it (the group's
    fit scales differently between them, see the module docstring): without one of its own, `check` says
    "unchecked: ..." and no error is given."""
    rows = [r for r in figure_errors(group, devices) if (r["runtime"], r["precision"]) == (runtime, precision)]
    errors = [r["error_pct"] for r in rows if r["error_pct"] is not None]
    if errors:
        return {"check": f"out of sample on {len(errors)} published {runtime} {precision} figure(s) of group {group}",
                "check_max_abs_error_pct": float(max(abs(e) for e in errors))}
    if rows:
        return {"check": f"unchecked: the group's only published {runtime} {precision} figure is the one it was "
                         f"fitted on, so none is left out to check it"}
    return {"check": f"{UNCHECKED} ({runtime} {precision}) in group {group}"}
