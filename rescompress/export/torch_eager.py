"""The torch model itself, wrapped as an Artifact: the reference every export is compared with."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

from rescompress.data import InputSpec
from rescompress.export.artifact import Artifact


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` inside the block (unchanged when None), restored after:
    a latency measurement at one thread count must not leave later training in the process at it."""
    before = torch.get_num_threads()
    if threads and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def torch_artifact(model: nn.Module, spec: InputSpec, *, name: str, precision: str, from_stage: str,
                   checkpoint: Optional[Path]) -> Artifact:
    model = model.eval()

    def load_runner(_path: Optional[Path], threads: Optional[int]) -> Callable[[np.ndarray], np.ndarray]:
        @torch.inference_mode()
        def run(x: np.ndarray) -> np.ndarray:
            with torch_threads(threads):  # each call runs at `threads`; the process keeps its own count
                return model(torch.from_numpy(x)).float().numpy()

        return run

    return Artifact(name=name, target="torch", precision=precision, path=checkpoint, input_spec=spec,
                    runtime=f"torch {torch.__version__.split('+')[0]} eager", from_stage=from_stage,
                    load_runner=load_runner)
