"""rescompress: take a ResNet classifier from training to measured edge-device artifacts.

Importing this package stays light: torch and the export backends are imported by the modules that use them.
`rescompress.load(path)` (a bundle folder or an artifact file) imports what it runs when it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["__version__", "load"]

if TYPE_CHECKING:
    from rescompress.deploy import Predictor


def load(path, *, threads=None) -> "Predictor":
    """A `Predictor` for a bundle folder or an artifact file: call it on images for logits, or
    `.predict(images, top=5)` for (label, score) pairs. See `rescompress.deploy`."""
    from rescompress.deploy import load as _load

    return _load(path, threads=threads)
