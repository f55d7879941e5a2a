"""`mhpo import` on a default install: no torch needed, and a missing reader names the `import` extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from tests.fixtures.server import REPO_ROOT


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, check=False, capture_output=True, text=True, timeout=300
    )


def test_a_csv_import_needs_no_torch(tmp_path: Path) -> None:
    path = tmp_path / "run.csv"
    path.write_text("step,loss\n0,1.0\n1,0.5\n")
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if it were not installed\n"
        "from mhpo.cli import main\n"
        f"code = main(['import', 'csv', {str(path)!r}, '--db', 'sqlite:///{tmp_path / 'mhpo.db'}', '--no-progress'])\n"
        "assert code == 0, code\n"
        "heavy = sorted({'transformers', 'trl'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "imported 1 runs, 2 points" in result.stdout


def test_a_missing_reader_names_the_import_extra(tmp_path: Path) -> None:
    with SummaryWriter(str(tmp_path / "logs" / "run")) as writer:
        writer.add_scalar("loss", 1.0, 0)
    code = (
        "import sys\n"
        "sys.modules['tensorboard'] = None  # as if it were not installed\n"
        "from mhpo.cli import main\n"
        f"raise SystemExit(main(['import', 'tensorboard', {str(tmp_path / 'logs')!r}, '--db', 'sqlite://']))\n"
    )
    result = _run_python(code)
    assert result.returncode == 2, result.stderr
    assert "mhpo import tensorboard: needs the tensorboard package: pip install 'mhpo[import]'" in result.stderr
    assert "Traceback" not in result.stderr
