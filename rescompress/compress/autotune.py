"""Accuracy-aware PTQ: neural-compressor's tuner over rescompress's own int8 schemes.

Candidates are ordered from the fastest to the slowest: everything in int8 with each observer, then the
layers that usually carry the quantization error kept in float one group at a time (the classifier, the
stem, then whole stages from the input side). neural-compressor's tuning monitor stops at the first
candidate whose validation top-1 is within `tolerable_loss` (relative) of the float model's, so the model
kept is the fastest that meets the goal. When none does, the most accurate candidate is kept and the
report says so. Calibration and every evaluation run on `train.device`; the candidates are converted and
kept on the CPU. Needs the `inc` extra (neural-compressor-pt).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from rescompress.errors import BackendMissingError

try:
    from neural_compressor.common.base_config import BaseConfig
    from neural_compressor.common.base_tuning import TuningConfig, init_tuning
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise BackendMissingError(
        "ptq.autotune needs neural-compressor: pip install 'rescompress[inc]'") from exc


class Candidate(BaseConfig):
    """One PTQ configuration to try: an observer and the modules kept in float."""

    name = "rescompress_ptq"

    def __init__(self, observer: str = "minmax", keep_float: Optional[list[str]] = None, white_list=None) -> None:
        super().__init__(white_list=white_list)
        self.observer = observer
        self.keep_float = list(keep_float or [])
        self.params_list = ["observer", "keep_float"]
        self.non_tunable_params = ["keep_float"]  # a list value, not a grid to expand

    @classmethod
    def register_supported_configs(cls) -> list:
        return []

    @classmethod
    def get_config_set_for_tuning(cls) -> None:
        return None

    def describe(self) -> str:
        where = f", float: {', '.join(self.keep_float)}" if self.keep_float else ", all int8"
        return f"{self.observer} observers{where}"

    def __repr__(self) -> str:
        return f"Candidate({self.describe()})"


def candidates(model: Any, observer: str) -> list[Candidate]:
    """Fastest first: all-int8 with each observer, then growing float fallbacks."""
    observers = [observer] + [o for o in ("histogram", "minmax", "moving_average") if o != observer]
    out = [Candidate(o) for o in observers]
    fallbacks = [["fc"], ["conv1"], ["conv1", "fc"]]
    stages = list(getattr(model, "stage_names", []))
    for i in range(1, len(stages)):
        fallbacks.append(["conv1", "fc", *stages[:i]])
    out += [Candidate(observer, keep) for keep in fallbacks]
    return out


def autotune(model: Any, cfg: Any, ctx: Any, scheme: str) -> Any:
    from rescompress.console import loggers_at

    with loggers_at(logging.WARNING, "neural_compressor"):  # it logs every configuration it tries at INFO
        return _autotune(model, cfg, ctx, scheme)


def _autotune(model: Any, cfg: Any, ctx: Any, scheme: str) -> Any:
    from rescompress.accel import train_device
    from rescompress.compress.quantize import quantize_ptq
    from rescompress.train import evaluate

    tune = cfg.autotune
    split = ctx.data.val if len(ctx.data.val) else ctx.data.train
    which = "validation" if len(ctx.data.val) else "training (no validation split)"
    device = train_device(ctx.recipe.train)

    def score(m: Any) -> float:  # on the training device; the model (float or int8) stays on the CPU
        return evaluate(m, split, ctx.data.input_spec, ctx.recipe.train.eval_batch_size, device=device)

    tuning = TuningConfig(config_set=candidates(model, cfg.observer), tolerable_loss=tune.tolerable_loss,
                          max_trials=tune.max_trials)
    loader, _, monitor = init_tuning(tuning)
    baseline = score(model)
    monitor.set_baseline(baseline)
    goal = baseline * (1 - tune.tolerable_loss)
    ctx.console.print(f"autotune: float {which} top-1 {baseline * 100:.2f}%, goal ≥ {goal * 100:.2f}% "
                      f"(tolerable loss {tune.tolerable_loss:.1%}), up to {tune.max_trials} trials")
    trials: list[dict] = []
    best: Optional[tuple[float, int, Any, Candidate]] = None
    for i, cand in enumerate(loader, 1):
        quantized = quantize_ptq(model, ctx, cfg, scheme, observer=cand.observer, keep_float=tuple(cand.keep_float))
        acc = score(quantized)
        monitor.add_trial_result(i, acc, cand)
        trials.append({"trial": i, "config": cand.describe(), "val_top1": acc, "met": acc >= goal})
        ctx.console.print(f"  trial {i}: {cand.describe():<40} {which} top-1 {acc * 100:.2f}%"
                          f"  {'meets the goal' if acc >= goal else 'below the goal'}")
        if best is None or acc > best[0] or acc >= goal:
            best = (acc, i, quantized, cand)  # the first to meet the goal is the fastest that does
        if acc >= goal or monitor.need_stop():
            break
    if best is None:
        raise RuntimeError("autotune: neural-compressor's tuner produced no candidate to try")
    acc, i, quantized, cand = best
    met = acc >= goal
    ctx.record.update(autotune={"tolerable_loss": tune.tolerable_loss, "baseline_val_top1": baseline,
                                "trials": trials, "chosen": i, "met": met})
    if met:
        ctx.notes.append(f"autotune (neural-compressor): trial {i} of {len(trials)} meets the goal — {cand.describe()}, "
                         f"{which} top-1 {acc * 100:.2f}% vs float {baseline * 100:.2f}%")
    else:
        ctx.notes.append(f"autotune (neural-compressor): NO configuration met the goal (≥ {goal * 100:.2f}% {which} "
                         f"top-1) in {len(trials)} trials; kept the most accurate, trial {i} — {cand.describe()}, "
                         f"{acc * 100:.2f}%")
    return quantized
