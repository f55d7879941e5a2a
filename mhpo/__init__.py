"""MHPO Monitor: MHPO and GRPO-family losses, trust-region diagnostics and a streaming client."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mhpo.client import Run, init

__version__ = "0.1.0"

__all__ = ["Run", "__version__", "init"]


def __getattr__(name: str) -> Any:
    """`mhpo.init` and `mhpo.Run` load the client (and httpx) on first use, so `mhpo --help` stays quick."""
    if name in ("Run", "init"):
        import mhpo.client

        return getattr(mhpo.client, name)
    raise AttributeError(f"module 'mhpo' has no attribute {name!r}")
