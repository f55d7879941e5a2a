"""The `mhpo` command line.

Each sub-command hands the rest of argv to the module that owns it. This file is the one
place that ties the packages together, so `server` is imported here lazily and only for
the commands that run it; the library (`mhpo.losses`, `mhpo.client`, ...) never imports it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence

# What the torch-only commands import that the default (serving) install leaves out.
TRAIN_MODULES = ("torch", "transformers", "tqdm", "yaml")
NEEDS_TRAIN_EXTRA = {"train", "demo"}

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("mhpo_server.cli", "API and dashboard in one process"),
    "db": ("mhpo_server.cli", "database schema: `mhpo db upgrade [--db URL]`"),
    "token": ("mhpo_server.cli", "API tokens: `mhpo token create|list|revoke`"),
    "train": ("mhpo.trainer.cli", "instrumented GRPO-family training"),
    "demo": ("mhpo.demo", "serve + short MHPO and GRPO runs"),
    "import": (
        "mhpo.importers.cli",
        "import TensorBoard, MLflow or CSV histories: `mhpo import tensorboard|mlflow|csv`",
    ),
}


def _usage() -> str:
    lines = ["usage: mhpo <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`mhpo <command> --help` describes each command.")
    return "\n".join(lines)


def missing_train_modules() -> list[str]:
    """The modules of the `train` extra that are not installed (found without importing them)."""
    return [name for name in TRAIN_MODULES if importlib.util.find_spec(name) is None]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"mhpo: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # `--help` is built without torch, so a serving install can read what the training commands take.
    wants_help = "-h" in rest or "--help" in rest
    missing = missing_train_modules() if command in NEEDS_TRAIN_EXTRA and not wants_help else []
    if missing:
        print(
            f"mhpo {command}: needs the training extra ({', '.join(missing)} not installed); "
            "install it with `pip install 'mhpo[train]'` (pin torch first for a CPU-only build, "
            "e.g. `pip install torch==2.13.0`). Serving needs none of it.",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(command, rest) or 0)
