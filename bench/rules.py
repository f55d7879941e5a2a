"""Cost of alert-rule evaluation on ingest: the running state against re-reading each rule's look-back.

The case: four threshold rules with `for_steps=10000` on one key whose condition holds at
every step (the worst case for a re-read: every look-back is scanned to the end), a run
with 10,000 points already stored, then 2,000-record batches.

1. In this process: the firings of one 2,000-record batch computed by re-reading the
   look-back at each step (the former evaluation, `naive_firings` of the rule-state test)
   and by `RuleStates` (first batch: state rebuilt from the window; next batch: running).
   The re-read is timed on the first `--naive-steps` steps and scaled to the batch; the
   firings of both are compared on those steps.
2. Against a real `mhpo serve` (a fresh SQLite file, or `--db URL`): the latency of
   project A's 2,000-record batches, and meanwhile of project B's 1-record batches and of
   `/healthz`. `--code-dir DIR` runs the server from another checkout (e.g. a worktree of
   an older commit) for a before/after comparison on the same machine.

    python bench/rules.py
    python bench/rules.py --code-dir /tmp/mhpo-before --skip-offline   # the server of another checkout
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from servers import mhpo_server

from mhpo_server.monitoring.detectors import History
from mhpo_server.monitoring.rules import RuleStates
from tests.flags.test_rule_state import make_rule, naive_firings

FOR_STEPS = 10_000
N_RULES = 4


def offline(prior: int, batch: int, naive_steps: int) -> None:
    rules = [
        make_rule(i + 1, {"type": "threshold", "key": "loss", "op": ">", "value": 0.0, "for_steps": FOR_STEPS})
        for i in range(N_RULES)
    ]
    steps = np.arange(prior + 2 * batch, dtype=np.int64)
    values = np.ones(len(steps))
    states = RuleStates()
    print(f"in-process, {N_RULES} threshold rules for_steps={FOR_STEPS}, {prior} points stored, {batch}-record batches")
    for label, first in (("first batch (state rebuilt)", prior), ("next batch (running state)", prior + batch)):
        lo = max(0, first - FOR_STEPS - 1)
        history = History.from_arrays({"loss": (steps[lo : first + batch], values[lo : first + batch])})
        new = steps[first : first + batch].tolist()
        t0 = time.perf_counter()
        running = [(f.step, f.rule.id) for f in states.evaluate("run", rules, history, new, [])]
        t_running = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive = naive_firings(rules, history, new[:naive_steps])
        t_naive = (time.perf_counter() - t0) * len(new) / min(naive_steps, len(new))
        assert [f for f in running if f[0] in new[:naive_steps]] == naive
        print(f"  {label:<28} re-read look-back {t_naive * 1e3:9.0f} ms   running state {t_running * 1e3:7.2f} ms")


def records(start: int, n: int) -> list[dict[str, object]]:
    return [{"step": s, "time": 1.7e9 + s, "scalars": {"loss": 1.0}} for s in range(start, start + n)]


def online(url: str, prior: int, batch: int, measured: int) -> None:
    project = f"bench-rules-{uuid.uuid4().hex[:6]}"
    with httpx.Client(base_url=url, timeout=600) as client:
        run_a = client.post("/api/v1/runs", json={"project": project, "name": "a"}).json()["run_id"]
        run_b = client.post("/api/v1/runs", json={"project": f"{project}-other", "name": "b"}).json()["run_id"]
        for i in range(N_RULES):
            client.post(
                "/api/v1/alert-rules",
                json={
                    "name": f"loss high {i}",
                    "project": project,
                    "condition": {"type": "threshold", "key": "loss", "op": ">", "value": 0.0, "for_steps": FOR_STEPS},
                },
            ).raise_for_status()
        t0 = time.perf_counter()
        for start in range(0, prior, batch):
            client.post(
                f"/api/v1/runs/{run_a}/records", json={"batch_id": uuid.uuid4().hex, "records": records(start, batch)}
            ).raise_for_status()
        print(f"  {prior} points stored in {time.perf_counter() - t0:.1f} s ({batch}-record batches, rules on)")

        stop = threading.Event()
        other: list[float] = []
        health: list[float] = []

        def probe() -> None:
            with httpx.Client(base_url=url, timeout=600) as c:
                step = 0
                while not stop.is_set():
                    t = time.perf_counter()
                    c.post(
                        f"/api/v1/runs/{run_b}/records",
                        json={"batch_id": uuid.uuid4().hex, "records": records(step, 1)},
                    ).raise_for_status()
                    other.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    c.get("/healthz").raise_for_status()
                    health.append(time.perf_counter() - t)
                    step += 1
                    time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        own = []
        try:
            for k in range(measured):
                t = time.perf_counter()
                client.post(
                    f"/api/v1/runs/{run_a}/records",
                    json={"batch_id": uuid.uuid4().hex, "records": records(prior + k * batch, batch)},
                ).raise_for_status()
                own.append(time.perf_counter() - t)
        finally:
            stop.set()
            prober.join()
        fired = len(client.get("/api/v1/alerts", params={"run_id": run_a}).json()["alerts"])
    print(f"  project A, {batch}-record batch: " + ", ".join(f"{x:.2f} s" for x in own) + f"  ({fired} alerts fired)")
    for label, latencies in (("project B, 1-record batch", other), ("/healthz", health)):
        if latencies:
            print(
                f"  meanwhile {label}: median {statistics.median(latencies) * 1e3:.0f} ms, "
                f"max {max(latencies) * 1e3:.0f} ms ({len(latencies)} requests)"
            )
        else:
            print(f"  meanwhile {label}: none completed (the measured batches were too short; raise --batch)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", type=int, default=10_000, help="points stored before the measured batches")
    parser.add_argument("--batch", type=int, default=2_000, help="records per batch of project A")
    parser.add_argument("--measured", type=int, default=2, help="measured batches of project A")
    parser.add_argument("--db", help="database URL for the server (default: a fresh SQLite file)")
    parser.add_argument("--code-dir", type=Path, default=REPO_ROOT, help="checkout the server runs from")
    parser.add_argument(
        "--naive-steps",
        type=int,
        default=200,
        help="steps the re-read baseline is timed on (scaled to the batch; it is slow)",
    )
    parser.add_argument("--skip-offline", action="store_true", help="only the real-server part")
    args = parser.parse_args()
    if not args.skip_offline:
        offline(args.prior, args.batch, args.naive_steps)
    print(f"real server from {args.code_dir}, {N_RULES} threshold rules for_steps={FOR_STEPS}")
    with mhpo_server(args.db, code_dir=args.code_dir.resolve()) as url:
        online(url, args.prior, args.batch, args.measured)


if __name__ == "__main__":
    main()
