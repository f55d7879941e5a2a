"""`mhpo train`: flags generated from `TrainerConfig`; `--config FILE` (YAML/JSON) first, flags win.

With `--resume`, the checkpoint's options come first and only the options given explicitly (in
the file or as flags) override them: see `mhpo.trainer.checkpoint`.

The parser is built from the dataclass itself (`dataclasses.fields`, `typing.get_type_hints`,
each field's `help` metadata) with the standard library's argparse, so a new option is one field.
Not transformers' `HfArgumentParser`, which does the same: importing it takes 0.6 s and needs the
training extra (so `--help` would be slow, and missing on a serving install), and it fills every
default in, where a resume must know which options were given. Nothing here imports torch or
transformers: `mhpo train --help` answers at once. Also the entry point under
`torchrun --nproc-per-node N -m mhpo train ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from mhpo.trainer.checkpoint import resume_config
from mhpo.trainer.config import TrainerConfig, load_config_file


def _flag_type(annotation: Any) -> Any:
    """The type a flag converts to: `X | None` -> X."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def _hparam(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--hparam {text!r}: write NAME=VALUE, e.g. --hparam c=1.5")
    try:
        return key.strip(), float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--hparam {text!r}: VALUE must be a number") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mhpo train",
        description="Instrumented GRPO-family RL training on a transformers model, streamed to the MHPO service.",
        argument_default=argparse.SUPPRESS,  # only flags actually given appear in the namespace
    )
    parser.add_argument("--config", help="YAML or JSON file of the options below (flags win)")
    hints = typing.get_type_hints(TrainerConfig)
    for f in dataclasses.fields(TrainerConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        kind = _flag_type(hints[f.name])
        if f.name == "hparams":
            parser.add_argument(
                "--hparam", dest="hparams", action="append", type=_hparam, metavar="NAME=VALUE", help=help_
            )
        elif kind is bool:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, help=f"{help_} (default {f.default})"
            )
        else:
            parser.add_argument(flag, dest=f.name, type=kind, help=f"{help_} (default {f.default})")
    return parser


def parse_options(argv: Sequence[str]) -> tuple[TrainerConfig, frozenset[str]]:
    """The config (file values, then flags) and the names of the options that were given.

    Given means set by a flag or by the `--config` file; every other field holds its default.
    Code that must not override a checkpoint with a default (resuming) asks this set.
    """
    args = vars(build_parser().parse_args(list(argv)))
    values: dict[str, Any] = {}
    if "config" in args:
        values |= load_config_file(args.pop("config"))
    if "hparams" in args:
        args["hparams"] = {**values.get("hparams", {}), **dict(args["hparams"])}
    values |= args
    return TrainerConfig(**values), frozenset(values)


def parse_config(argv: Sequence[str]) -> TrainerConfig:
    """Config file values, then flags; with `--resume`, the checkpoint's options under both."""
    config, given = parse_options(argv)
    return resume_config(config, given)


def explicit_options(argv: Sequence[str]) -> frozenset[str]:
    """`TrainerConfig` field names given in `argv`, by a flag or by its `--config` file."""
    return parse_options(argv)[1]


def main(command: str = "train", argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # a resume warns here
    for chatty in ("httpx", "httpcore"):  # one INFO line per request would break up the progress bar
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        config = parse_config(sys.argv[2:] if argv is None else argv)  # --help exits here, before torch loads
    except (ValueError, FileNotFoundError) as exc:
        print(f"mhpo {command}: {exc}", file=sys.stderr)
        return 2
    from mhpo.client import MHPOClientError
    from mhpo.trainer import distributed
    from mhpo.trainer.trainer import Trainer

    try:
        trainer = Trainer(config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mhpo {command}: {exc}", file=sys.stderr)
        return 2
    except MHPOClientError as exc:
        print(f"mhpo {command}: the server refused the run: {exc}", file=sys.stderr)
        return 1
    try:
        trainer.train()
        if trainer.run_url:
            print(f"run finished: {trainer.run_url}")
    except MHPOClientError as exc:
        print(f"mhpo {command}: the server refused the run: {exc}", file=sys.stderr)
        return 1
    finally:
        # DDP's reducer holds the process group: free it first, or gloo's destructor can deadlock on the GIL
        del trainer
        gc.collect()
        distributed.teardown()
    return 0
