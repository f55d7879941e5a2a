"""`mhpo train`: flags generated from `TrainerConfig`; `--config FILE` (YAML/JSON) first, flags win.

With `--resume`, the checkpoint's options come first and only the options given explicitly (in
the file or as flags) override them: see `mhpo.trainer.checkpoint`.

Also the entry point under `torchrun --nproc-per-node N -m mhpo train ...`.
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

from mhpo.trainer import distributed
from mhpo.trainer.checkpoint import resume_config
from mhpo.trainer.config import TrainerConfig, load_config_file


def _base_type(annotation: Any) -> Any:
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # annotations are postponed strings
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
        argument_default=argparse.SUPPRESS,  # only flags actually given override the config file
    )
    parser.add_argument("--config", help="YAML or JSON file of the options below (flags win)")
    for f in dataclasses.fields(TrainerConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        kind = _base_type(f.type)
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


def parse_options(argv: Sequence[str]) -> dict[str, Any]:
    """The options given explicitly: the config file's values, then the flags actually passed."""
    args = vars(build_parser().parse_args(list(argv)))
    values: dict[str, Any] = {}
    if "config" in args:
        values |= load_config_file(args.pop("config"))
    if "hparams" in args:
        args["hparams"] = {**values.get("hparams", {}), **dict(args["hparams"])}
    return values | args


def parse_config(argv: Sequence[str]) -> TrainerConfig:
    """Config file values, then flags; with `--resume`, the checkpoint's options under both."""
    values = parse_options(argv)
    return resume_config(TrainerConfig(**values), set(values))


def main(command: str = "train", argv: Sequence[str] | None = None) -> int:
    from mhpo.client import MHPOClientError
    from mhpo.trainer.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpcore"):  # one INFO line per request would break up the progress bar
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        config = parse_config(sys.argv[2:] if argv is None else argv)
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
