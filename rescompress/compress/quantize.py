"""Int8 stages: quantization-aware training (`qat`) and post-training quantization (`ptq`), both through
torchao PT2E under the target runtime's scheme (compress/schemes.py).

qat: capture -> fake-quantize -> train (optionally distilling from the float model) -> convert. BatchNorm
     statistics and observers are frozen for the last epochs so the final scales match what was trained.
ptq: capture -> observe N batches of real training data -> convert; with `autotune`, neural-compressor's
     tuner walks configurations from the fastest (everything int8) to slower ones (sensitive layers kept
     in float) and keeps the first that meets the accuracy goal, or the most accurate when none does.

Both capture and convert on the CPU and train or calibrate on `train.device` (compress/pt2e.py says how the
prepared graph moves). QAT trains in fp32 whatever `train.precision` says: fake-quantization rounds float32
values to the int8 grid, and its ranges and straight-through gradients are meant for float32 (the stage
notes it when the recipe asks for bf16 or fp16).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rescompress.stages import StageContext, register_stage

if TYPE_CHECKING:
    import torch
    from torch import nn

Scheme = Literal["tensorrt", "onnxruntime", "tflite"]
DEFAULT_SCHEME = "onnxruntime"


class QATConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scheme: Optional[Scheme] = Field(None, description="int8 layout; default: the first device's scheme")
    epochs: int = Field(3, ge=1)
    lr: Optional[float] = Field(None, gt=0.0, description="default: a tenth of train.lr")
    freeze_bn_after: Optional[int] = Field(
        None, ge=0, description="epochs after which BatchNorm statistics are frozen; default: all but the last")
    freeze_observers_after: Optional[int] = Field(
        None, ge=0, description="epochs after which quantization ranges are frozen; default: all but the last")
    distill: bool = Field(False, description="learn from the float model's logits while quantized")
    temperature: float = Field(4.0, gt=0.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _freeze_within_epochs(self) -> "QATConfig":
        for key in ("freeze_bn_after", "freeze_observers_after"):
            value = getattr(self, key)
            if value is not None and value > self.epochs:
                raise ValueError(f"{key} is {value} but QAT runs {self.epochs} epochs")
        return self

    def freeze_epochs(self) -> tuple[int, int]:
        default = max(1, self.epochs - 1) if self.epochs > 1 else self.epochs
        bn = default if self.freeze_bn_after is None else self.freeze_bn_after
        obs = default if self.freeze_observers_after is None else self.freeze_observers_after
        return bn, obs


class AutotuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tolerable_loss: float = Field(0.01, gt=0.0, lt=1.0,
                                  description="relative top-1 loss allowed on the validation split (0.01 = 1 %)")
    max_trials: int = Field(6, ge=1)


class PTQConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scheme: Optional[Scheme] = Field(None, description="int8 layout; default: the first device's scheme")
    calibration: Literal["train", "random"] = Field(
        "train", description="calibration data: training images, or random noise (marked in the report)")
    calibration_batches: int = Field(16, ge=1)
    batch_size: int = Field(32, ge=1)
    observer: Literal["minmax", "moving_average", "histogram"] = "minmax"
    autotune: Optional[AutotuneConfig] = Field(None, description="accuracy-aware search through neural-compressor")


def _check_ptq(cfg: PTQConfig) -> None:
    import importlib.util

    from rescompress.errors import BackendMissingError

    if cfg.autotune is not None and importlib.util.find_spec("neural_compressor") is None:
        raise BackendMissingError("ptq.autotune needs neural-compressor, which is not installed: "
                                  "pip install 'rescompress[inc]' (or drop ptq.autotune)")


def default_scheme(devices: list) -> tuple[str, str]:
    """(scheme, why): the first device's int8 scheme, else onnxruntime's."""
    for device in devices:
        if getattr(device, "int8_scheme", None):
            return device.int8_scheme, f"device {device.name}"
    return DEFAULT_SCHEME, "no device names a scheme"


def resolve_scheme(scheme: Optional[str], ctx: StageContext) -> str:
    return scheme or default_scheme(ctx.devices)[0]


def _describe_scheme(name: str) -> str:
    from rescompress.compress.schemes import get_scheme

    return f"{name} scheme ({get_scheme(name).summary})"


# ---------------------------------------------------------------------------------------------------- QAT


@register_stage("qat", QATConfig, "quantization-aware training to int8 (torchao PT2E, the target runtime's scheme)",
                quantizes=True, exclusive_with=("ptq",))
def qat(model: "nn.Module", cfg: QATConfig, ctx: StageContext) -> "nn.Module":
    from rescompress.compress import pt2e
    from rescompress.compress.distill import kd_loss
    from rescompress.compress.schemes import ResNetQuantizer
    from rescompress.train import fit

    scheme = resolve_scheme(cfg.scheme, ctx)
    prepared = pt2e.prepare(model, ctx.example, ResNetQuantizer(scheme, qat=True), qat=True)
    freeze_bn, freeze_obs = cfg.freeze_epochs()

    def on_epoch(m: "nn.Module", epoch: int) -> None:
        m.rescompress_freeze_bn = epoch >= freeze_bn
        m.rescompress_freeze_observers = epoch >= freeze_obs
        m.train()

    loss = None
    if cfg.distill:
        loss = kd_loss(ctx.teacher, temperature=cfg.temperature, alpha=cfg.alpha,
                       label_smoothing=ctx.recipe.train.label_smoothing)
    lr = cfg.lr if cfg.lr is not None else ctx.recipe.train.lr / 10
    fit(prepared, ctx.data, ctx.recipe.train, epochs=cfg.epochs, lr=lr, seed=ctx.seed + ctx.index + 1,
        console=ctx.console, state_path=ctx.work_dir / "train-state.pt", loss_fn=loss, epoch_hook=on_epoch,
        desc=f"qat {scheme} (stage {ctx.index})", precision="fp32")
    ctx.console.print("converting to int8 ...")
    converted = pt2e.convert(prepared)
    ctx.notes.append(f"{_describe_scheme(scheme)}; {cfg.epochs} epochs at lr {lr:g}, BatchNorm frozen after "
                     f"epoch {freeze_bn}, ranges frozen after epoch {freeze_obs}"
                     + (f", distilled from the float model (T={cfg.temperature}, alpha={cfg.alpha})" if cfg.distill else ""))
    if ctx.recipe.train.precision != "fp32":
        ctx.notes.append(f"QAT trained in fp32, not train.precision {ctx.recipe.train.precision}: fake-quantization "
                         f"needs float32 values (the precision applies to float training only)")
    ctx.record.update(precision="int8", scheme=scheme)
    return converted


# ---------------------------------------------------------------------------------------------------- PTQ


def calibration_batches(cfg: PTQConfig, ctx: StageContext, device: Optional["torch.device"] = None) -> Iterator["torch.Tensor"]:
    """Real training images (shuffled with the run's seed), or explicitly requested random noise, on `device`
    (default: the CPU). The noise is drawn on the CPU, so it is the same on every device."""
    import torch

    from rescompress.data import batches

    spec = ctx.data.input_spec
    if cfg.calibration == "random":
        g = torch.Generator().manual_seed(ctx.seed)
        for _ in range(cfg.calibration_batches):
            x = torch.randn(cfg.batch_size, spec.channels, spec.height, spec.width, generator=g)
            yield x if device is None else x.to(device)
        return
    for i, (x, _) in enumerate(batches(ctx.data.train, spec, cfg.batch_size, shuffle=True, seed=ctx.seed + ctx.index,
                                       device=device)):
        if i >= cfg.calibration_batches:
            return
        yield x


def quantize_ptq(model: "nn.Module", ctx: StageContext, cfg: PTQConfig, scheme: str, *, observer: str,
                 keep_float: tuple[str, ...] = (), progress=None) -> "nn.Module":
    from rescompress import accel
    from rescompress.compress import pt2e
    from rescompress.compress.schemes import ResNetQuantizer

    quantizer = ResNetQuantizer(scheme, qat=False, observer=observer, keep_float=keep_float)
    prepared = pt2e.prepare(model, ctx.example, quantizer, qat=False, keep_float=keep_float)
    device = accel.train_device(ctx.recipe.train)
    with accel.on_device(prepared, device):  # observers watch on the training device, conversion is on the CPU
        pt2e.calibrate(prepared, calibration_batches(cfg, ctx, device), progress=progress)
    return pt2e.convert(prepared)


@register_stage("ptq", PTQConfig, "post-training int8 quantization calibrated on training data, optionally autotuned",
                quantizes=True, exclusive_with=("qat",), check=_check_ptq)
def ptq(model: "nn.Module", cfg: PTQConfig, ctx: StageContext) -> "nn.Module":
    from rescompress.train import progress_bar

    scheme = resolve_scheme(cfg.scheme, ctx)
    ctx.record.update(precision="int8", scheme=scheme, calibration=cfg.calibration)
    if cfg.calibration == "random":
        ctx.notes.append("CALIBRATED ON RANDOM DATA (the recipe asked for it): ranges do not reflect real "
                         "images, expect a larger accuracy loss")
    if cfg.autotune is not None:
        from rescompress.compress.autotune import autotune

        return autotune(model, cfg, ctx, scheme)
    with progress_bar(ctx.console) as progress:
        task = progress.add_task(f"calibrating ({scheme})", total=cfg.calibration_batches, info="")
        quantized = quantize_ptq(model, ctx, cfg, scheme, observer=cfg.observer,
                                 progress=lambda: progress.advance(task))
    ctx.notes.append(f"{_describe_scheme(scheme)}; {cfg.observer} observers over {cfg.calibration_batches} "
                     f"batches of {cfg.batch_size} {'random tensors' if cfg.calibration == 'random' else 'training images'}")
    return quantized
