"""What the int8-vs-fp32 benchmark scripts under tools/ share: their options and the model they time."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch


def int8_bench_args(description: str, schemes: str, out: str, argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--schemes", default=schemes, help="comma-separated int8 schemes to compare")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50, help="timed runs per model per round")
    ap.add_argument("--rounds", type=int, default=4, help="an even count balances the order")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(out))
    return ap.parse_args(argv)


@dataclass
class BenchModel:
    model: torch.nn.Module
    spec: "object"  # rescompress.data.InputSpec
    example: torch.Tensor  # batch 2: what torch.export needs for a dynamic batch
    calibration: list[torch.Tensor]  # random batches: PTQ ranges only, latency does not depend on them


def bench_model(name: str, size: int) -> BenchModel:
    """The model as initialised (latency does not depend on weight values), 3 channels, unnormalised input."""
    from rescompress.data import InputSpec
    from rescompress.models import build_model

    torch.manual_seed(0)
    model = build_model(name, num_classes=1000 if size >= 96 else 10, in_channels=3, small_input=size < 96).eval()
    spec = InputSpec(channels=3, height=size, width=size, mean=(0.0,) * 3, std=(1.0,) * 3)
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(4, 3, size, size, generator=g) for _ in range(4)]
    return BenchModel(model, spec, torch.zeros(2, 3, size, size), calibration)
