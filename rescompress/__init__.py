"""rescompress: take a ResNet classifier from training to measured edge-device artifacts.

Importing this package stays light: torch and the export backends are imported by the modules that use them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
