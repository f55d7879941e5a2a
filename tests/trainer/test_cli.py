"""`mhpo train`'s command line: flags from `TrainerConfig`, --help without torch, the given options."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mhpo.trainer.cli import build_parser, explicit_options, parse_options
from mhpo.trainer.config import TrainerConfig
from tests.fixtures.server import REPO_ROOT


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, check=False, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["demo", "--help"]])
def test_help_loads_neither_torch_nor_transformers(argv: list[str]) -> None:
    code = (
        "import sys\n"
        "from mhpo.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted({'torch', 'transformers', 'trl'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_every_field_is_a_flag_with_its_help_and_type() -> None:
    actions = {a.dest: a for a in build_parser()._actions}
    for f in dataclasses.fields(TrainerConfig):
        assert f.name in actions, f.name
        assert f.metadata["help"] in (actions[f.name].help or ""), f.name
    cfg, _ = parse_options(["--lr", "1e-3", "--data", "d.jsonl", "--steps", "3", "--no-stream", "--hparam", "c=2"])
    assert (cfg.lr, cfg.data, cfg.steps, cfg.stream, cfg.hparams) == (1e-3, "d.jsonl", 3, False, {"c": 2.0})
    with pytest.raises(SystemExit):
        parse_options(["--steps", "three"])


def test_given_options_are_those_of_the_flags_and_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"loss": "grpo", "lr": 2e-4}))
    argv = ["--config", str(config), "--steps", "4", "--lr", "1e-4"]
    cfg, given = parse_options(argv)
    assert given == explicit_options(argv) == {"loss", "lr", "steps"}
    assert (cfg.loss, cfg.lr, cfg.steps) == ("grpo", 1e-4, 4)
    assert explicit_options([]) == frozenset()


@pytest.mark.parametrize("command", ["train", "demo"])
def test_a_torch_only_command_without_the_training_extra_names_it(command: str) -> None:
    """What a default (serving) install answers: one line naming the extra, exit code 2."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if it were not installed\n"
        "from mhpo.cli import main\n"
        f"raise SystemExit(main([{command!r}, '--steps', '1']))\n"
    )
    result = _run_python(code)
    assert result.returncode == 2, result.stderr
    assert f"mhpo {command}: needs the training extra (torch not installed)" in result.stderr
    assert "pip install 'mhpo[train]'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["train", "demo"])
def test_help_of_a_torch_only_command_works_without_the_training_extra(command: str) -> None:
    """A default (serving) install still shows what `mhpo train` and `mhpo demo` take."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if it were not installed\n"
        "from mhpo.cli import main\n"
        f"raise SystemExit(main([{command!r}, '--help']))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert f"usage: mhpo {command}" in result.stdout and "--steps" in result.stdout
