"""MHPO Monitor: MHPO and GRPO-family losses, trust-region diagnostics and a streaming client."""

from mhpo.client import Run, init

__version__ = "0.1.0"

__all__ = ["Run", "__version__", "init"]
