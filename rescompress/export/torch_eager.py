"""The torch model itself, wrapped as an Artifact: the reference every export is compared with."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from rescompress.data import InputSpec
from rescompress.export.artifact import Artifact


def torch_artifact(model: nn.Module, spec: InputSpec, *, name: str, precision: str, from_stage: str,
                   checkpoint: Optional[Path]) -> Artifact:
    model = model.eval()

    def load_runner(_path: Optional[Path], threads: Optional[int]) -> Callable[[np.ndarray], np.ndarray]:
        if threads:
            torch.set_num_threads(threads)

        @torch.inference_mode()
        def run(x: np.ndarray) -> np.ndarray:
            return model(torch.from_numpy(x)).float().numpy()

        return run

    return Artifact(name=name, target="torch", precision=precision, path=checkpoint, input_spec=spec,
                    runtime=f"torch {torch.__version__.split('+')[0]} eager", from_stage=from_stage,
                    load_runner=load_runner)
