"""What one live poll of the dashboard reads: rows and bytes for one live run and for a compare of
10 live runs, re-reading everything (before) against reading only what is newer (after).

Starts a real `mhpo serve` on a fresh SQLite file, seeds `--runs` runs of `--steps` steps over
the HTTP API (a grad-norm spike and an alert every `--alert-every` steps, so each run holds
events), then logs `--new` more steps to every run and makes the reads of one poll with the dashboard's own API client and helpers:

    before  run page: the run, its keys, the new points and heat-map columns, and the whole event
            list (what the page read each second); compare page: every run's charted metrics up
            to its last step (as a reload) and its whole event list.
    after   run page: the same, but the events after the page's cursor; compare page: per run,
            the points after the last step drawn and the events after its cursor.

Rows are the points (steps of every series) plus the events and histogram columns returned;
bytes are the HTTP bodies of every read of the poll.

    python bench/live_poll.py [--runs 10] [--steps 2000] [--new 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dash
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
dash.Dash(__name__, use_pages=True, pages_folder="")  # the pages register themselves with an app on import

from mhpo_dashboard import figures
from mhpo_dashboard.api import ApiClient
from mhpo_dashboard.pages import compare as compare_page
from mhpo_dashboard.pages import run as run_page
from tests.dashboard.seeding import create_run, post_records, records
from tests.fixtures.server import LiveServer


class Meter:
    """Counts the bytes of every answer its client reads."""

    def __init__(self, url: str) -> None:
        self.bytes = 0
        self.requests = 0
        self.http = httpx.Client(base_url=url, timeout=300, event_hooks={"response": [self._count]})
        self.client = ApiClient(url, http=self.http)

    def _count(self, response: httpx.Response) -> None:
        response.read()
        self.bytes += len(response.content)
        self.requests += 1

    def measure(self, poll: Callable[[ApiClient], tuple[int, int]]) -> tuple[int, int, int, int]:
        """(points, events, bytes, requests) of one call of `poll`."""
        self.bytes = self.requests = 0
        points, events = poll(self.client)
        return points, events, self.bytes, self.requests


def points(answer: dict[str, Any]) -> int:
    return sum(len(s["step"]) for s in answer.get("series", {}).values())


def run_poll(run_id: str, held: dict[str, Any], incremental: bool) -> Callable[[ApiClient], tuple[int, int]]:
    """The run page's refresh after new steps: points and heat-map columns after the last step shown."""

    def poll(client: ApiClient) -> tuple[int, int]:
        run = client.run(run_id)
        keys = client.keys(run_id)
        start = held["last_step"] + 1
        _, data = run_page._panel_data(client, run_id, keys["scalars"], start=start, end=run["last_step"])
        hist = client.histograms(
            run_id, run_page.HEATMAP_KEY, start=start, end=run["last_step"], max_steps=run_page.MAX_HEATMAP_STEPS
        )
        events = client.events_after(run_id, held["cursor"])["events"] if incremental else client.events(run_id)
        return points(data) + len(hist["step"]), len(events)

    return poll


def compare_poll(
    ids: list[str], metrics: list[str], held: dict[str, dict[str, Any]], incremental: bool
) -> Callable[[ApiClient], tuple[int, int]]:
    """The compare page: its charted metrics and events of every run, re-read whole or after the cursors."""

    def poll(client: ApiClient) -> tuple[int, int]:
        runs = [client.run(i) for i in ids]
        starts = {i: held[i]["last_step"] + 1 for i in ids} if incremental else None
        data = compare_page._metric_series(client, runs, metrics, starts)
        events = [client.events_after(i, held[i]["cursor"])["events"] if incremental else client.events(i) for i in ids]
        shown = set(metrics)
        return sum(len(s["step"]) for d in data.values() for k, s in d.items() if k in shown), sum(map(len, events))

    return poll


def probed(start: int, stop: int, seed: int, every: int) -> list[dict[str, Any]]:
    """The seeded records with `bench/probe` 1 every `every` steps (an alert each time), else 0."""
    out = list(records(start, stop, seed=seed, spike_at=(start + stop) // 2))
    for r in out:
        r["scalars"]["bench/probe"] = float(r["step"] % every == every - 1)
    return out


def seed(url: str, n: int, steps: int, every: int) -> str:
    with httpx.Client(base_url=url, timeout=300) as client:
        run_id = create_run(client, "bench", f"live-{n}", "mhpo", {"lr": 1e-6 * (n + 1)})
        for start in range(0, steps, 500):
            post_records(client, run_id, probed(start, min(steps, start + 500), n, every))
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="live runs in the comparison")
    parser.add_argument("--steps", type=int, default=2_000, help="steps each run holds when the poll starts")
    parser.add_argument("--new", type=int, default=1, help="steps each run logs between two polls")
    parser.add_argument("--alert-every", type=int, default=20, help="an alert fires every this many steps")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp, LiveServer(f"sqlite:///{tmp}/bench.db") as server:
        started = time.monotonic()
        rule = {
            "name": "probe",
            "project": "bench",
            "cooldown_s": 0,
            "condition": {"type": "threshold", "key": "bench/probe", "op": ">", "value": 0.5},
        }
        httpx.post(f"{server.url}/api/v1/alert-rules", json=rule, timeout=60).raise_for_status()
        with ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(lambda n: seed(server.url, n, args.steps, args.alert_every), range(args.runs)))
        print(f"seeded {args.runs} x {args.steps} steps over HTTP in {time.monotonic() - started:.1f} s")
        meter = Meter(server.url)
        held = {i: {"last_step": args.steps - 1, "cursor": meter.client.events_after(i, "")["cursor"]} for i in ids}
        flags = [len(meter.client.events(i)) for i in ids]
        logged = meter.client.keys(ids[0])["scalars"]
        metrics = [m for m in figures.COMPARE_DEFAULT_METRICS if m in logged]  # the page's charts by default
        with httpx.Client(base_url=server.url, timeout=300) as writer:
            for n, i in enumerate(ids):
                post_records(writer, i, probed(args.steps, args.steps + args.new, n, args.alert_every))
        rows = []
        for label, make in (
            ("1 live run (run page)", lambda inc: run_poll(ids[0], held[ids[0]], inc)),
            (f"compare of {args.runs} live runs", lambda inc: compare_poll(ids, metrics, held, inc)),
        ):
            before, after = meter.measure(make(False)), meter.measure(make(True))
            rows.append((label, before, after))
        meter.http.close()
    print(
        f"one poll after each run logged {args.new} new step(s); each run holds {args.steps} steps and "
        f"{min(flags)}-{max(flags)} events; the compare page charts {len(metrics)} metrics"
    )
    print("rows = points (and heat-map columns) + events")
    print(f"{'poll':<30} {'before rows':>15} {'before bytes':>13} {'after rows':>12} {'after bytes':>12} {'reads':>6}")
    for label, (b_pts, b_ev, b_bytes, _), (a_pts, a_ev, a_bytes, a_reads) in rows:
        before, after = f"{b_pts:,} + {b_ev:,}", f"{a_pts:,} + {a_ev:,}"
        print(f"{label:<30} {before:>15} {b_bytes:>13,} {after:>12} {a_bytes:>12,} {a_reads:>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
