"""The instrumented GRPO-family trainer behind `mhpo train`."""

from typing import TYPE_CHECKING

from mhpo.trainer.config import TrainerConfig
from mhpo.trainer.tasks import Example, make_task

if TYPE_CHECKING:
    from mhpo.trainer.trainer import Trainer

__all__ = ["Example", "Trainer", "TrainerConfig", "make_task"]


def __getattr__(name: str) -> object:
    """`Trainer` imports torch and transformers; load it on first use so `mhpo --help` stays fast."""
    if name == "Trainer":
        from mhpo.trainer.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'mhpo.trainer' has no attribute {name!r}")
