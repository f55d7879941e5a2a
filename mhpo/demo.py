"""`mhpo demo`: the service plus an MHPO and a GRPO run on the same task and seed.

It starts `mhpo serve` as a subprocess (the embedded SQLite default unless `--db` is given;
a SQLite file is created and migrated on first use, PostgreSQL needs `mhpo db upgrade`
first), prints the dashboard URL as soon as the server answers, then trains the two runs
one after the other on the warmed-up tiny model (`--model tiny`, built and cached on first
use), saying one line per phase, and keeps serving until Ctrl-C. `--no-serve` stops the
server when the runs are done (for scripts); `--steps` shortens the runs; `--no-progress`
leaves only the phase lines (no progress bars, neither ours nor the libraries'). With
`--server URL` it streams to a server that is already running instead of starting one.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mhpo.trainer import TrainerConfig

DEFAULT_PORT = 8765


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhpo demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", help="SQLAlchemy URL for the server (default: the server's SQLite file)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"server port (default {DEFAULT_PORT})")
    parser.add_argument("--server", help="stream to this running server instead of starting one")
    parser.add_argument("--steps", type=int, default=30, help="rollout steps per run (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed shared by both runs (default 0)")
    parser.add_argument("--task", default="addition", help="built-in task (default addition)")
    parser.add_argument("--project", default="demo", help="project name (default demo)")
    parser.add_argument(
        "--serve",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep serving after the runs (--no-serve: stop and exit)",
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    return parser


def demo_configs(steps: int, seed: int, task: str, project: str, server: str, progress: bool) -> list[TrainerConfig]:
    """The two runs: identical except for the loss (MHPO defaults; GRPO eps = 0.2)."""
    from mhpo.trainer import TrainerConfig

    common: dict[str, Any] = {
        "task": task,
        "steps": steps,
        "seed": seed,
        "project": project,
        "server": server,
        "progress": progress,
        "prompts_per_step": 16,
        "group_size": 8,
        "lr": 5e-4,
        "model": "tiny",
    }
    return [TrainerConfig(loss=loss, name=f"{loss}-{task}-s{seed}", **common) for loss in ("mhpo", "grpo")]


def wait_healthy(health_url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Block until `health_url` answers 200; raise RuntimeError if `proc` exits first or `timeout` passes."""
    import httpx  # here, not at the top: `mhpo demo --help` stays quick

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the server exited with code {proc.returncode} before {health_url} answered; see its message above"
            )
        try:
            if httpx.get(health_url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{health_url} did not answer within {timeout:.0f} s")


def port_in_use(port: int) -> bool:
    """True when something already listens on 127.0.0.1:port: its /healthz would pass for the demo's own server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def start_server(db: str | None, port: int) -> subprocess.Popen[bytes]:
    """`mhpo serve` in a subprocess on 127.0.0.1:port, logging only warnings (the demo says what happens).

    Refuses a port that is already taken: the server there would answer the health check, and the runs
    would go into its database instead of the one asked for.
    """
    if port_in_use(port):
        raise RuntimeError(
            f"port {port} on 127.0.0.1 is already in use (another server?): pass --port with a free port, "
            "or --server URL to train into the server that is running there"
        )
    db_args = ["--db", db] if db else []
    command = [sys.executable, "-m", "mhpo", "serve", *db_args, "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(command)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/healthz", proc)
    except BaseException:
        proc.terminate()
        proc.wait(timeout=10)
        raise
    return proc


def say(message: str) -> None:
    print(f"mhpo demo: {message}", flush=True)


def main(command: str = "demo", argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[2:] if argv is None else argv)
    proc = None
    url = args.server
    if url is None:
        url = f"http://127.0.0.1:{args.port}"
        say(f"starting the server on {url} ...")
        try:
            proc = start_server(args.db, args.port)
        except RuntimeError as exc:
            say(str(exc))
            return 1
    say(f"dashboard: {url}/ (open it now: the runs appear there as they train)")
    started = time.monotonic()
    try:
        configs = demo_configs(args.steps, args.seed, args.task, args.project, url, args.progress)
        phases = len(configs) + 1
        say(f"[1/{phases}] preparing the tiny model (built and warmed up on first use, then cached) ...")
        from mhpo.trainer.trainer import Trainer

        trainer = Trainer(configs[0])
        say(f"[1/{phases}] tiny model ready in {time.monotonic() - started:.0f} s")
        for phase, config in enumerate(configs, start=2):
            if phase > 2:
                trainer = Trainer(config)
            say(f"[{phase}/{phases}] training {config.run_name} ({config.steps} rollout steps): {trainer.run_url}")
            trainer.train()
            rewards = trainer.reward_history
            k = max(1, min(5, len(rewards) // 3))
            say(
                f"[{phase}/{phases}] {config.run_name}: reward {sum(rewards[:k]) / k:.3f} (first {k} rollouts) -> "
                f"{sum(rewards[-k:]) / k:.3f} (last {k})"
            )
        say(f"runs done in {time.monotonic() - started:.0f} s; dashboard: {url}/")
        if proc is not None and args.serve:
            say("serving; Ctrl-C to stop")
            proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main("demo", sys.argv[1:]))
