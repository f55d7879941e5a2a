"""First paint of the dashboard's run and compare pages on long runs, in headless Chromium.

Starts a real `mhpo serve` on a fresh SQLite file, seeds over the HTTP API three runs of
`--steps` steps (10,000 by default), three short baseline runs (`--baseline-steps`, 100)
and one run that logs `--keys` extra scalar keys (1,000 per-layer grad norms by default)
for `--keys-steps` steps, then opens each page `--repeat` times in a fresh browser context
and reports the time from navigation to every chart drawn (all Plotly graphs of the page
rendered with their data). Baseline pages are measured in the same process, on the same
server. Goal: <= 2 s for a 10,000-step run page, for a compare page of three such runs
and for the run page of the many-key run. Live updates: the time from posting 5 new steps
of a run whose page is open until its heat-map has drawn them (goal <= 2 s).

    python bench/dashboard.py [--steps 10000] [--keys 1000] [--repeat 5] [--screenshot /tmp/run-10k.png]

`--screenshot` also saves the run page of the long MHPO run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.dashboard.seeding import create_run, post_records, records, seed_run
from tests.fixtures.server import LiveServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
RUN_PAGE_GRAPHS = 7  # heat-map, step histogram, trust region, hazard, gradients, policy, training
GOAL_S = 2.0


def seed_three(url: str, steps: int, tag: str) -> list[str]:
    """An MHPO run with one hazard spike, and GRPO and DAPO runs whose ratios widen more over the run."""
    specs = [
        ("mhpo", {"lr": 1e-6, "hparams": {"c": 1.5}}, 0.1, steps // 2),
        ("grpo", {"lr": 1e-6, "hparams": {"eps": 0.2}}, 0.4, None),
        ("dapo", {"lr": 2e-6, "hparams": {"eps_low": 0.2, "eps_high": 0.28}}, 0.7, None),
    ]
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(
                seed_run,
                url,
                "bench",
                f"{loss}-{tag}",
                loss,
                config,
                steps,
                seed=i,
                drift=widening * 1000 / steps,
                spike_at=spike,
                batch=500,
            )
            for i, (loss, config, widening, spike) in enumerate(specs)
        ]
        return [f.result() for f in futures]


def seed_many_keys(url: str, keys: int, steps: int) -> str:
    """A run whose records carry `keys` per-layer grad norms besides the usual diagnostics."""
    import httpx

    with httpx.Client(base_url=url, timeout=300) as client:
        run_id = create_run(client, "bench", f"{keys}-keys", "mhpo", {"lr": 1e-6})
        batch = []
        for rec in records(0, steps, seed=9):
            rec["scalars"].update({f"grad/norm/layer_{i}": 1.0 + i / keys + rec["step"] / steps for i in range(keys)})
            batch.append(rec)
            if len(batch) == 20:
                post_records(client, run_id, batch)
                batch = []
        if batch:
            post_records(client, run_id, batch)
    return run_id


def first_paint(browser: object, url: str, graphs: int) -> tuple[float, float]:
    """Seconds from navigation start until `graphs` Plotly charts are drawn with data, and the
    slowest Dash callback's server time within that (the page's own layout callback)."""
    context = browser.new_context(viewport={"width": 1600, "height": 1100})
    page = context.new_page()
    errors: list[str] = []
    callbacks: list[float] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on(
        "requestfinished",
        lambda r: (
            callbacks.append((r.timing["responseStart"] - r.timing["requestStart"]) / 1000)
            if "_dash-update-component" in r.url
            else None
        ),
    )
    page.goto(url, wait_until="commit")
    page.wait_for_function(
        "(n) => { const g = document.querySelectorAll('.js-plotly-plot');"
        " return g.length >= n && [...g].every(p => p._fullLayout && p.querySelector('.main-svg')); }",
        arg=graphs,
        timeout=120_000,
        polling="raf",
    )
    elapsed = page.evaluate("() => performance.now()") / 1000.0
    context.close()
    if errors:
        raise RuntimeError(f"{url}: page errors {errors}")
    return elapsed, max(callbacks, default=0.0)


def measure(browser: object, label: str, url: str, graphs: int, repeat: int) -> dict[str, float | str]:
    first_paint(browser, url, graphs)  # warm-up: server imports, caches, browser code cache
    runs = [first_paint(browser, url, graphs) for _ in range(repeat)]
    times = [t for t, _ in runs]
    return {
        "page": label,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "server_s": statistics.median(c for _, c in runs),
    }


def live_append(browser: object, url: str, run_id: str, first_step: int, repeat: int) -> dict[str, float | str]:
    """Seconds from posting 5 new steps of an open run page's run until its heat-map has drawn them
    (the page's live poll, no reload), `repeat` times on one page."""
    import httpx

    context = browser.new_context(viewport={"width": 1600, "height": 1100})
    page = context.new_page()
    page.goto(f"{url}/runs/{run_id}")
    heatmap = "document.querySelector('.graph-heatmap .js-plotly-plot')"
    page.wait_for_function(f"() => {heatmap} && {heatmap}.data && {heatmap}.data.length > 0", timeout=120_000)
    times = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(repeat + 1):  # the first one is a warm-up
            start = first_step + 5 * i
            drawn = page.evaluate(f"() => {heatmap}.data[0].x.length")
            started = time.monotonic()
            post_records(client, run_id, list(records(start, start + 5, seed=5)))
            page.wait_for_function(f"(n) => {heatmap}.data[0].x.length === n", arg=drawn + 5, timeout=60_000)
            if i:
                times.append(time.monotonic() - started)
    context.close()
    return {
        "page": "live: 5 new steps drawn",
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "server_s": float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000, help="steps per long run")
    parser.add_argument("--baseline-steps", type=int, default=100, help="steps per baseline run")
    parser.add_argument("--keys", type=int, default=1_000, help="extra scalar keys of the many-key run")
    parser.add_argument("--keys-steps", type=int, default=200, help="steps of the many-key run")
    parser.add_argument("--repeat", type=int, default=5, help="timed loads per page (after one warm-up)")
    parser.add_argument("--screenshot", type=Path, help="save the long MHPO run's page here (PNG)")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, LiveServer(f"sqlite:///{tmp}/bench.db") as server:
        started = time.monotonic()
        long_runs = seed_three(server.url, args.steps, f"{args.steps}")
        short_runs = seed_three(server.url, args.baseline_steps, f"{args.baseline_steps}")
        many = seed_many_keys(server.url, args.keys, args.keys_steps)
        print(
            f"seeded 3 x {args.steps} + 3 x {args.baseline_steps} steps and {args.keys} keys x "
            f"{args.keys_steps} steps over HTTP in {time.monotonic() - started:.1f} s"
        )
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            rows = []
            for steps, ids in ((args.baseline_steps, short_runs), (args.steps, long_runs)):
                rows.append(
                    measure(
                        browser, f"run page, {steps} steps", f"{server.url}/runs/{ids[0]}", RUN_PAGE_GRAPHS, args.repeat
                    )
                )
                compare = f"{server.url}/compare?runs={','.join(ids)}"
                rows.append(measure(browser, f"compare, 3 x {steps} steps", compare, 5 + 3 + 1, args.repeat))
            rows.append(
                measure(
                    browser, f"run page, {args.keys} keys", f"{server.url}/runs/{many}", RUN_PAGE_GRAPHS, args.repeat
                )
            )
            live = seed_run(server.url, "bench", "live", "mhpo", {"lr": 1e-6}, args.baseline_steps, seed=5)
            rows.append(live_append(browser, server.url, live, args.baseline_steps, args.repeat))
            if args.screenshot:
                context = browser.new_context(viewport={"width": 1600, "height": 1100})
                page = context.new_page()
                page.goto(f"{server.url}/runs/{long_runs[0]}")
                page.wait_for_function(
                    f"() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= {RUN_PAGE_GRAPHS}"
                )
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(args.screenshot), full_page=False)
                context.close()
                print(f"saved {args.screenshot}")
            browser.close()
    print(f"\nfirst paint in headless Chromium (median of {args.repeat}, after one warm-up load); goal <= {GOAL_S} s")
    print("server s = the page callback's time on the server (median), part of the first paint")
    print("live = from posting 5 steps of an open run page's run to the heat-map drawing them (no reload)")
    print("load average (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(f"{'page':<28} {'median s':>9} {'min s':>7} {'max s':>7} {'server s':>9}")
    for row in rows:
        print(
            f"{row['page']:<28} {row['median_s']:>9.2f} {row['min_s']:>7.2f} {row['max_s']:>7.2f}"
            f" {row['server_s']:>9.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
