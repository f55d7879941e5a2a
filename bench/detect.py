"""Flag detection on labelled synthetic GRPO-family streams, posted to a real server in batches.

Generates `--per-kind` streams of each injected kind (collapse, erosion, hazard_spike,
grad_spike, non_finite, on_policy) at random onsets plus `--clean` clean streams
(`tests.flags.synthetic`), posts each as a run to `mhpo serve` (started here on a fresh
SQLite file unless `--server` is given), reads the flags back from
`GET /api/v1/runs/{id}/events` and prints per kind: detected/total within the goal
delay, the delay in steps (median, max) and false warning/critical flags per 1,000 clean
steps (clean streams plus the steps before each onset; informational flags counted
apart). Then, in-process, the reported failure shapes (`pattern_stream`: linear and
geometric entropy collapse, entropy blow-up, KL x100) and the healthy shapes that used to
raise false alarms (alternating on/off-policy updates, empty steps), over
`--pattern-seeds` seeds each. It also times ingest with the detectors on
and, on the same clean streams in the same server, with every detector off (a project
override), so the cost of flagging on ingest is measured against its own baseline.

    python bench/detect.py                    # 10 streams per kind, 10 clean x 2,000 steps
    python bench/detect.py --per-kind 3 --clean 2 --clean-steps 1000   # quicker
    python bench/detect.py --offline          # detectors only, no server (larger samples fast)
    python bench/detect.py --replay-lr 0.003 --replay-steps 40   # also replay a real unstable trainer run

The replay trains the built-in tiny model with `mhpo train --loss grpo --lr LR`, streams
it to the same server, and reports the step where the reward drops (its rolling mean over
8 optimizer steps falls below half its running maximum) and how many steps before (or
after) it the first warning or critical flag came.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from servers import mhpo_server

from mhpo_server.monitoring import FlagParams, History, detect
from tests.flags.synthetic import (
    GOAL_DELAY,
    INJECTED_KINDS,
    PATTERN_KIND,
    PATTERNS,
    Stream,
    generate_suite,
    pattern_stream,
    score,
)

ALL_OFF = {name: {"enabled": False} for name in FlagParams.model_fields}
PATTERN_GOAL = {"collapse": 30, "entropy_surge": 30, "kl_spike": 2}


def post_stream(client: httpx.Client, project: str, stream: Stream, batch: int) -> tuple[str, list[float]]:
    """Create a run and post the stream in batches; returns the run id and each batch's latency (s)."""
    name = f"{stream.kind or 'clean'}-{stream.seed}"
    run = client.post("/api/v1/runs", json={"project": project, "name": name, "loss": "grpo"})
    run.raise_for_status()
    run_id = run.json()["run_id"]
    latencies = []
    for start in range(0, stream.n_steps, batch):
        body = json.dumps({"batch_id": uuid.uuid4().hex, "records": stream.records(start, start + batch)})
        t0 = time.perf_counter()
        r = client.post(f"/api/v1/runs/{run_id}/records", content=body, headers={"content-type": "application/json"})
        latencies.append(time.perf_counter() - t0)
        r.raise_for_status()
    return run_id, latencies


Flags = list[list[tuple[str, int, str]]]  # per stream: (kind, step, severity)


def run_server(url: str, streams: list[Stream], batch: int) -> tuple[Flags, dict[str, list[float]]]:
    project = f"bench-detect-{uuid.uuid4().hex[:6]}"
    timing: dict[str, list[float]] = {"on": [], "off": []}
    flags = []
    with httpx.Client(base_url=url, timeout=120) as client:
        client.put(f"/api/v1/projects/{project}-off/flag-params", json=ALL_OFF).raise_for_status()
        for i, stream in enumerate(streams):
            run_id, latencies = post_stream(client, project, stream, batch)
            events = client.get(f"/api/v1/runs/{run_id}/events").json()["events"]
            flags.append([(e["kind"], e["step"], e["severity"]) for e in events if e["type"] == "flag"])
            if stream.kind is None:
                timing["on"] += latencies
                timing["off"] += post_stream(client, f"{project}-off", stream, batch)[1]
            print(f"\r  posted {i + 1}/{len(streams)} streams", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return flags, timing


def reward_drop(steps: list[int], rewards: list[float], window: int = 8) -> int | None:
    """First step where the rolling mean reward falls below half its running maximum (once that exceeded 0.1)."""
    best = 0.0
    for i in range(window - 1, len(rewards)):
        level = statistics.fmean(rewards[i - window + 1 : i + 1])
        if best > 0.1 and level < 0.5 * best:
            return steps[i]
        best = max(best, level)
    return None


def replay_trainer(url: str, lr: float, steps: int, warmup: int) -> None:
    """Stream one real unstable GRPO run to the server and time its first flag against the reward drop."""
    project, name = "bench-detect-replay", f"grpo-lr{lr:g}-{uuid.uuid4().hex[:4]}"
    cmd = [
        sys.executable,
        "-m",
        "mhpo",
        "train",
        "--server",
        url,
        "--project",
        project,
        "--name",
        name,
        "--loss",
        "grpo",
        "--lr",
        str(lr),
        "--lr-warmup-steps",
        str(warmup),
        "--steps",
        str(steps),
        "--mini-batches",
        "4",
        "--no-progress",
    ]
    print(f"\nreplay: {' '.join(cmd[1:])}")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True, env=env)
    with httpx.Client(base_url=url, timeout=60) as client:
        runs = client.get("/api/v1/runs", params={"project": project}).json()["runs"]
        run = next(r for r in runs if r["name"] == name)
        series = client.get(
            f"/api/v1/runs/{run['run_id']}/scalars", params={"keys": "reward/mean", "max_points": 10_000}
        ).json()["series"]["reward/mean"]
        events = client.get(f"/api/v1/runs/{run['run_id']}/events").json()["events"]
    flags = [e for e in events if e["type"] == "flag" and e["severity"] != "info"]
    drop = reward_drop(series["step"], [float(v) for v in series["value"]])  # "NaN" strings back to floats
    listed = ", ".join(f"{e['kind']}@{e['step']}" for e in events if e["type"] == "flag") or "none"
    print(f"  {len(series['step'])} optimizer steps; flags: {listed}")
    if drop is None:
        print("  the reward did not drop in this run (try a larger --replay-lr or more --replay-steps)")
    elif not flags:
        print(f"  reward drop at step {drop}; no warning or critical flag")
    else:
        first = flags[0]
        lead = drop - first["step"]
        when = f"{lead} steps before the drop" if lead >= 0 else f"{-lead} steps after the drop"
        print(f"  reward drop at step {drop}; first flag ({first['kind']}) at step {first['step']}: {when}")


def run_offline(streams: list[Stream]) -> Flags:
    return [[(f.kind, f.step, f.severity) for f in detect(History(s.points()), range(s.n_steps))] for s in streams]


def alarms(flags: Flags, keep_info: frozenset[str] = frozenset()) -> list[list[tuple[str, int]]]:
    """(kind, step) of the warning and critical flags (and of the informational ones of `keep_info` kinds)."""
    return [[(k, s) for k, s, sev in found if sev != "info" or k in keep_info] for found in flags]


def report_patterns(seeds: int) -> None:
    """The reported failure shapes and the healthy shapes that used to raise false alarms, offline."""
    print(
        f"\n{'pattern':<19}{'kind':<15}{'flagged':>9}{'goal':>12}{'delay median':>14}{'delay max':>11}"
        f"{'severity':>10}{'false alarms':>14}"
    )
    for pattern in PATTERNS:
        kind = PATTERN_KIND.get(pattern)
        delays, severities, false = [], set(), 0
        for seed in range(seeds):
            stream = pattern_stream(pattern, seed)
            onset = stream.onset if stream.onset is not None else stream.n_steps
            flags = detect(History(stream.points()), range(stream.n_steps))
            false += sum(1 for f in flags if f.severity != "info" and f.step < onset)
            hits = [f for f in flags if f.kind == kind and f.step >= onset]
            if hits:
                delays.append(hits[0].step - onset)
                severities.add(hits[0].severity)
        goal = PATTERN_GOAL.get(kind or "")
        within = sum(d <= goal for d in delays) if goal is not None else 0
        med = f"{statistics.median(delays):.1f}" if delays else "-"
        worst = f"{max(delays)}" if delays else "-"
        print(
            f"{pattern:<19}{kind or '(healthy)':<15}{f'{within}/{seeds}' if kind else '-':>9}"
            f"{f'<= {goal} steps' if goal is not None else '-':>12}{med:>14}{worst:>11}"
            f"{'/'.join(sorted(severities)) or '-':>10}{false:>14}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="base URL of a running server (default: start one on a temporary SQLite file)")
    parser.add_argument("--per-kind", type=int, default=10, help="streams per injected kind")
    parser.add_argument("--steps", type=int, default=400, help="steps per stream with an injected event")
    parser.add_argument("--clean", type=int, default=10, help="clean streams")
    parser.add_argument("--clean-steps", type=int, default=2000, help="steps per clean stream")
    parser.add_argument("--batch", type=int, default=50, help="records per POST")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--offline", action="store_true", help="run the detectors in-process, no server")
    parser.add_argument("--pattern-seeds", type=int, default=20, help="seeds per reported failure shape (offline)")
    parser.add_argument("--replay-lr", type=float, help="also replay a real GRPO trainer run with this learning rate")
    parser.add_argument("--replay-steps", type=int, default=30, help="rollout steps to replay (4 optimizer steps each)")
    parser.add_argument("--replay-warmup", type=int, default=4, help="optimizer steps of lr warm-up in the replay")
    args = parser.parse_args()

    streams = generate_suite(args.seed, args.per_kind, args.steps, args.clean, args.clean_steps)
    total_steps = sum(s.n_steps for s in streams)
    print(f"{len(streams)} streams, {total_steps} steps, {len(streams[0].scalars)} scalars per step, seed {args.seed}")
    if args.offline:
        t0 = time.perf_counter()
        report(streams, run_offline(streams), {}, args.batch, time.perf_counter() - t0, "in-process detectors")
        report_patterns(args.pattern_seeds)
        return
    with mhpo_server() if args.server is None else nullcontext(args.server) as url:
        t0 = time.perf_counter()
        flags, timing = run_server(url, streams, args.batch)
        report(streams, flags, timing, args.batch, time.perf_counter() - t0, f"server {url}")
        report_patterns(args.pattern_seeds)
        if args.replay_lr:
            replay_trainer(url, args.replay_lr, args.replay_steps, args.replay_warmup)


def report(
    streams: list[Stream],
    flags: Flags,
    timing: dict[str, list[float]],
    batch: int,
    elapsed: float,
    where: str,
) -> None:
    result = score(streams, alarms(flags, frozenset({"on_policy"})))
    info = score(streams, [[(k, s) for k, s, _ in found] for found in flags]).false_flags - result.false_flags
    print(f"\n{'kind':<14}{'detected':>10}{'goal':>12}{'delay median':>14}{'delay max':>11}")
    for kind in INJECTED_KINDS:
        delays = result.delays.get(kind, [])
        med = f"{statistics.median(delays):.1f}" if delays else "-"
        worst = f"{max(delays)}" if delays else "-"
        print(
            f"{kind:<14}{result.detected.get(kind, 0):>5}/{result.total.get(kind, 0):<4}"
            f"{f'<= {GOAL_DELAY[kind]} steps':>12}{med:>14}{worst:>11}"
        )
    by_kind = ", ".join(f"{k}: {v}" for k, v in sorted(result.false_by_kind.items())) or "none"
    print(
        f"\nfalse warning/critical flags: {result.false_flags} in {result.clean_steps} clean steps = "
        f"{result.false_per_1000():.3f} per 1,000 steps (goal < 0.5; by kind: {by_kind}); "
        f"informational: {info} ({1000 * info / max(result.clean_steps, 1):.3f} per 1,000)"
    )
    if timing:
        on, off = statistics.median(timing["on"]) * 1e3, statistics.median(timing["off"]) * 1e3
        print(
            f"ingest of {batch}-record batches, median: {on:.1f} ms with flags and alert rules evaluated, "
            f"{off:.1f} ms with every detector off (same server, same clean streams): "
            f"{on - off:+.1f} ms per batch, {(on - off) / batch:.2f} ms per step"
        )
    print(f"wall time {elapsed:.1f} s ({where})")


if __name__ == "__main__":
    main()
