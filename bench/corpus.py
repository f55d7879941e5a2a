"""A labelled corpus of real `mhpo train` runs, to judge the flags on runs they were not tuned on.

Every run is the built-in tiny model trained on CPU (`mhpo train --no-stream --metrics-file`:
the records exactly as they would be streamed), one thread per run:

    python bench/corpus.py --out DIR                      # every regime, seeds 0-2 (51 runs)
    python bench/corpus.py --out DIR --jobs 2             # two runs at a time
    python bench/corpus.py --out DIR --only lr_ramp low_temp --quick   # 1 seed, half-length runs
    python bench/corpus.py --out DIR --only unlearnable --seeds 0 1

One run takes 10-35 s of one core (measured: `add_mhpo`, 128x2, 100 rollouts: 28 CPU seconds;
`big_lr_ramp`, 192x3, 90 rollouts: 32), the whole corpus about 20 CPU-minutes: about 10
minutes with `--jobs 2` on two free cores, more on a busy machine (the progress line gives
each run's wall-clock and CPU seconds).

A finished run's records file (`DIR/runs/<regime>-s<seed>-r<rollouts>-<hash of the flags>.jsonl`)
is reused, whatever code made it (start a new DIR after changing the trainer); a run is
written to `.part` and renamed when it ends. `DIR/manifest.json` lists per run its regime,
seed, split, the train command, the records file, rollouts, optimizer steps, wall-clock and
CPU seconds, the commit that trained it, and its labels. `load_corpus(DIR)` returns the runs with their records and labels
(`bench/early_warning.py` scores the flags on them). The JSONL tasks are written into
`DIR/data/`. The runs are deterministic on one machine, not across machines (CPU kernels
differ): another machine gives other trajectories and so other labels.

Regimes (3 seeds each; 128 hidden x 2 layers unless "192x3"; 8 prompts x 8 completions, lr
5e-4 with 4 warm-up steps unless stated):

| regime | task | loss | what differs | rollouts |
|---|---|---|---|---|
| add_mhpo | addition, 1 digit | mhpo | `mhpo demo` settings: 16 prompts | 100 |
| add_grpo | addition | grpo | 16 prompts | 100 |
| add_dapo | addition | dapo | | 100 |
| add_sapo_bf16 | addition | sapo | bf16 sampler (`--rollout-dtype bfloat16`) | 100 |
| countdown_dual_clip | countdown | dual_clip | | 100 |
| mul_cispo | JSONL 1-digit multiplication, numeric reward | cispo | | 100 |
| reverse_mhpo | JSONL reverse 3 digits, exact reward | mhpo | | 100 |
| short_add_grpo | addition | grpo | `--max-new-tokens 2` | 100 |
| big_add_gspo | addition | gspo | 192x3 | 80 |
| lr_ramp | addition | grpo | lr ramped to 6e-3 over 160 optimizer steps | 100 |
| many_updates | addition | grpo | lr 2e-3, 2 epochs x 4 mini-batches | 60 |
| big_lr_ramp | addition | grpo | 192x3, lr ramped to 6e-3 over 160 steps | 90 |
| unlearnable | addition, 5 digits | mhpo | | 60 |
| stale_sampler | addition | grpo | lr 1e-3, sampler refreshed every 4 rollouts | 80 |
| low_temp (held) | addition | mhpo | temperature 0.3, lr 1e-3, 16 prompts | 80 |
| short_countdown (held) | countdown | cispo | `--max-new-tokens 3` (the expressions need 5) | 60 |
| big_reverse_dapo (held) | JSONL reverse | dapo | 192x3 | 80 |

Split (fixed, by regime and seed): seeds 0 and 1 of the first 14 regimes are `tune`, the only
runs thresholds may be chosen on; seed 2 of every regime and every seed of the 3 regimes
marked held (a collapse-prone one, low temperature; a stop-prone one, completions cut before
any expression ends; a model size and task tuning never sees together) are `held`. `--quick`
runs seed 0 only, for half the rollouts: a smoke test, not a corpus.

Labels come from each run's outcome, never from a detector, per rollout (`train/rollout`;
a rollout is several optimizer steps, each record's `step` is the optimizer step). A
rollout's values are those of its on-policy first update (`train/update_index` 0):
- collapse: the first rollout r such that the entropy (`policy/entropy`) of rollouts r..r+4
  is each under 25 % of the mean of rollouts 0..2;
- stopped: the first rollout r such that rollouts r..r+9 each have
  `group/degenerate_frac` >= 0.9 (every completion of nearly every group got the same
  reward, so every advantage is 0: TRL's `frac_reward_zero_std`);
- truncation (informational, where `policy/truncated_frac` is logged): the first rollout r
  such that rollouts r..r+4 each have more than half of the completions cut at the length limit;
- mismatch: a run sampled with a stale copy of the policy (`--rollout-sync-every` > 1), known
  from its command: the sampler and the trainer disagree by construction, so its `mismatch`
  flags are not false alarms; with neither state below, it is not counted as healthy;
- healthy: neither collapse nor stopped (nor mismatch). A run may be both (a policy collapsed onto one
  answer stops learning): its kind is the earlier, and it counts under both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

SEEDS = (0, 1, 2)
TUNE_SEEDS = (0, 1)
COLLAPSE_FRACTION = 0.25  # entropy under this share of its start...
COLLAPSE_HOLD = 5  # ...for this many rollouts in a row
START_ROLLOUTS = 3  # the start: mean entropy of the first rollouts
STOPPED_FRACTION = 0.9  # degenerate groups at or above this share...
STOPPED_HOLD = 10  # ...for this many rollouts in a row
TRUNCATED_FRACTION = 0.5
TRUNCATED_HOLD = 5
DEMO = ("--prompts-per-step", "16")
BIG = ("--tiny-hidden", "192", "--tiny-layers", "3")
DATA = "{data}"  # replaced by the corpus' data directory


@dataclass(frozen=True)
class Regime:
    name: str
    flags: tuple[str, ...]
    rollouts: int
    held: bool = False  # every seed is held out, not only seed 2


REGIMES: tuple[Regime, ...] = (
    Regime("add_mhpo", ("--loss", "mhpo", *DEMO), 100),
    Regime("add_grpo", ("--loss", "grpo", *DEMO), 100),
    Regime("add_dapo", ("--loss", "dapo"), 100),
    Regime("add_sapo_bf16", ("--loss", "sapo", "--rollout-dtype", "bfloat16"), 100),
    Regime("countdown_dual_clip", ("--task", "countdown", "--loss", "dual_clip"), 100),
    Regime("mul_cispo", ("--data", f"{DATA}/multiply.jsonl", "--reward", "numeric", "--loss", "cispo"), 100),
    Regime("reverse_mhpo", ("--data", f"{DATA}/reverse.jsonl", "--reward", "exact", "--loss", "mhpo"), 100),
    Regime("short_add_grpo", ("--loss", "grpo", "--max-new-tokens", "2"), 100),
    Regime("big_add_gspo", ("--loss", "gspo", *BIG), 80),
    Regime("lr_ramp", ("--loss", "grpo", "--lr", "6e-3", "--lr-warmup-steps", "160"), 100),
    Regime("many_updates", ("--loss", "grpo", "--lr", "2e-3", "--ppo-epochs", "2", "--mini-batches", "4"), 60),
    Regime("big_lr_ramp", ("--loss", "grpo", "--lr", "6e-3", "--lr-warmup-steps", "160", *BIG), 90),
    Regime("unlearnable", ("--task-digits", "5", "--loss", "mhpo"), 60),
    Regime("stale_sampler", ("--loss", "grpo", "--lr", "1e-3", "--rollout-sync-every", "4"), 80),
    Regime("low_temp", ("--loss", "mhpo", "--temperature", "0.3", "--lr", "1e-3", *DEMO), 80, held=True),
    Regime("short_countdown", ("--task", "countdown", "--loss", "cispo", "--max-new-tokens", "3"), 60, held=True),
    Regime(
        "big_reverse_dapo",
        ("--data", f"{DATA}/reverse.jsonl", "--reward", "exact", "--loss", "dapo", *BIG),
        80,
        held=True,
    ),
)
BY_NAME = {r.name: r for r in REGIMES}


def split_of(regime: Regime, seed: int) -> str:
    """`tune` or `held`: the fixed split of the module docstring."""
    return "tune" if not regime.held and seed in TUNE_SEEDS else "held"


def write_data(data_dir: Path) -> None:
    """The JSONL tasks: every 3-digit number reversed ("123>" -> "321"), and a x b for one-digit a, b."""
    data_dir.mkdir(parents=True, exist_ok=True)
    reverse = [{"prompt": f"{n}>", "answer": str(n)[::-1]} for n in range(100, 1000)]
    multiply = [{"prompt": f"{a}*{b}=", "answer": str(a * b)} for a in range(10) for b in range(10)]
    for name, rows in (("reverse", reverse), ("multiply", multiply)):
        text = "".join(json.dumps(row) + "\n" for row in rows)
        path = data_dir / f"{name}.jsonl"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


# ---- labels -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """One rollout's optimizer steps and the values of its on-policy first update."""

    index: int
    first_step: int
    last_step: int
    entropy: float | None
    degenerate_frac: float | None
    truncated_frac: float | None


@dataclass(frozen=True)
class Labels:
    """Rollout indices at which each state starts (None: never); see the module docstring."""

    collapse: int | None
    stopped: int | None
    truncation: int | None
    mismatch: bool = False  # the sampler is stale by construction (`--rollout-sync-every` > 1)

    @property
    def kind(self) -> str:
        """`collapse`, `stopped` (the earlier of the two; a tie is collapse), `mismatch` or `healthy`."""
        if self.collapse is None and self.stopped is None:
            return "mismatch" if self.mismatch else "healthy"
        if self.stopped is None or (self.collapse is not None and self.collapse <= self.stopped):
            return "collapse"
        return "stopped"

    @property
    def rollout(self) -> int | None:
        return {"collapse": self.collapse, "stopped": self.stopped}.get(self.kind)


def rollouts_of(records: Sequence[dict[str, Any]]) -> list[Rollout]:
    """The run's rollouts in order, from records carrying `step` and `scalars` with `train/rollout`.

    A rollout's on-policy update is its record with `train/update_index` 0, else its first record.
    """
    groups: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(int(record["scalars"]["train/rollout"]), []).append(record)
    out = []
    for index in sorted(groups):
        group = sorted(groups[index], key=lambda r: int(r["step"]))
        on_policy = next((r for r in group if r["scalars"].get("train/update_index") == 0), group[0])["scalars"]
        out.append(
            Rollout(
                index,
                int(group[0]["step"]),
                int(group[-1]["step"]),
                on_policy.get("policy/entropy"),
                on_policy.get("group/degenerate_frac"),
                on_policy.get("policy/truncated_frac"),
            )
        )
    return out


def first_sustained(flags: Sequence[bool], hold: int) -> int | None:
    """The first position from which `hold` consecutive flags are all true (None: nowhere)."""
    run = 0
    for i, flag in enumerate(flags):
        run = run + 1 if flag else 0
        if run == hold:
            return i - hold + 1
    return None


def collapse_label(rollouts: Sequence[Rollout]) -> int | None:
    """Rollout index from which the entropy stays under 25 % of its start (rollouts 0-2's mean) for 5 rollouts."""
    entropy = [r.entropy for r in rollouts]
    if len(entropy) < START_ROLLOUTS or any(e is None for e in entropy[:START_ROLLOUTS]):
        return None
    start = statistics.fmean(e for e in entropy[:START_ROLLOUTS] if e is not None)
    at = first_sustained([e is not None and e < COLLAPSE_FRACTION * start for e in entropy], COLLAPSE_HOLD)
    return None if at is None else rollouts[at].index


def stopped_label(rollouts: Sequence[Rollout]) -> int | None:
    """Rollout index from which 10 rollouts in a row have >= 90 % degenerate groups."""
    flags = [r.degenerate_frac is not None and r.degenerate_frac >= STOPPED_FRACTION for r in rollouts]
    at = first_sustained(flags, STOPPED_HOLD)
    return None if at is None else rollouts[at].index


def truncation_label(rollouts: Sequence[Rollout]) -> int | None:
    """Rollout index from which 5 rollouts in a row have more than half the completions truncated."""
    flags = [r.truncated_frac is not None and r.truncated_frac > TRUNCATED_FRACTION for r in rollouts]
    at = first_sustained(flags, TRUNCATED_HOLD)
    return None if at is None else rollouts[at].index


def stale_sampler(command: Sequence[str]) -> bool:
    """Whether the train command samples with a stale copy of the policy (`--rollout-sync-every` K > 1)."""
    flags = list(command)
    return "--rollout-sync-every" in flags and int(flags[flags.index("--rollout-sync-every") + 1]) > 1


def label(rollouts: Sequence[Rollout], command: Sequence[str] = ()) -> Labels:
    return Labels(collapse_label(rollouts), stopped_label(rollouts), truncation_label(rollouts), stale_sampler(command))


# ---- runs ---------------------------------------------------------------------------------


@dataclass
class CorpusRun:
    """One run of the corpus: its records (`step` and `scalars` only) and labels."""

    regime: str
    seed: int
    split: str
    path: Path
    command: list[str]
    records: list[dict[str, Any]]
    labels: Labels
    rollouts: list[Rollout] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.regime} s{self.seed}"

    def rollout_at(self, step: int) -> int:
        """The rollout an optimizer step belongs to (the last rollout starting at or before it)."""
        index = self.rollouts[0].index
        for r in self.rollouts:
            if r.first_step > step:
                break
            index = r.index
        return index

    def last_step(self, rollout: int) -> int:
        """The last optimizer step of `rollout` (of the run's last rollout when the run ends before it)."""
        return max(r.last_step for r in self.rollouts if r.index <= rollout)

    def first_step(self, rollout: int) -> int:
        return next(r.first_step for r in self.rollouts if r.index == rollout)


def read_records(path: Path) -> list[dict[str, Any]]:
    """`step` and `scalars` of each JSON line (histograms and outlier tokens dropped)."""
    out = []
    with path.open() as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                out.append({"step": int(record["step"]), "scalars": record["scalars"]})
    return out


def load_corpus(out: Path | str, splits: Iterable[str] = ("tune", "held")) -> list[CorpusRun]:
    """The runs of `out/manifest.json` in the given splits, with their records and labels (recomputed)."""
    out = Path(out)
    manifest = out / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} not found; generate it with `python bench/corpus.py --out {out}`")
    wanted = set(splits)
    runs = []
    for entry in json.loads(manifest.read_text())["runs"]:
        if entry["split"] not in wanted:
            continue
        path = out / entry["path"]
        records = read_records(path)
        rollouts = rollouts_of(records)
        labels = label(rollouts, entry["command"])
        runs.append(
            CorpusRun(entry["regime"], entry["seed"], entry["split"], path, entry["command"], records, labels, rollouts)
        )
    return runs


@dataclass(frozen=True)
class Planned:
    regime: Regime
    seed: int
    rollouts: int

    @property
    def split(self) -> str:
        return split_of(self.regime, self.seed)

    def file_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.regime.flags).encode()).hexdigest()[:8]
        return f"{self.regime.name}-s{self.seed}-r{self.rollouts}-{digest}.jsonl"

    def command(self, data_dir: Path, metrics_file: Path) -> list[str]:
        flags = [f.replace(DATA, str(data_dir)) for f in self.regime.flags]
        return [
            *("mhpo", "train", *flags),
            *("--seed", str(self.seed), "--steps", str(self.rollouts)),
            *("--no-stream", "--no-progress", "--name", f"{self.regime.name}-s{self.seed}"),
            *("--metrics-file", str(metrics_file)),
        ]


def plan(only: Sequence[str] | None, seeds: Sequence[int] | None, quick: bool) -> list[Planned]:
    """The runs to make: every regime (or `only`) x seeds 0-2 (or `seeds`; seed 0 with `quick`)."""
    unknown = sorted(set(only or ()) - set(BY_NAME))
    if unknown:
        raise SystemExit(f"--only {' '.join(unknown)}: unknown regime; valid: {', '.join(BY_NAME)}")
    regimes = [BY_NAME[n] for n in only] if only else list(REGIMES)
    chosen = seeds if seeds is not None else ((0,) if quick else SEEDS)
    return [Planned(r, s, max(10, r.rollouts // 2) if quick else r.rollouts) for r in regimes for s in chosen]


@dataclass(frozen=True)
class Trained:
    """A run's records file and train command; its wall-clock and CPU seconds (None: reused from the cache)."""

    path: Path
    command: list[str]
    seconds: float | None = None
    cpu_seconds: float | None = None


def train(run: Planned, out: Path) -> Trained:
    """Train `run` unless its records file exists (one thread; its output goes to a `.log` kept on failure)."""
    path = out / "runs" / run.file_name()
    command = run.command(out / "data", path)
    if path.exists():
        return Trained(path, command)
    partial = path.with_name(path.name + ".part")
    log = path.with_suffix(".log")
    partial.unlink(missing_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    t0 = time.monotonic()
    with log.open("w") as sink:
        argv = [sys.executable, "-m", *run.command(out / "data", partial)]
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own CPU time, whatever else the machine runs
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = "\n".join(log.read_text().strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode} (output in {log}):\n{tail}")
    partial.rename(path)
    log.unlink()
    return Trained(path, command, time.monotonic() - t0, usage.ru_utime + usage.ru_stime)


def describe(labels: Labels, rollouts: Sequence[Rollout]) -> str:
    parts = []
    for kind in ("collapse", "stopped", "truncation"):
        at = getattr(labels, kind)
        if at is not None:
            step = next(r.first_step for r in rollouts if r.index == at)
            parts.append(f"{kind} at rollout {at} (step {step})")
    return ", ".join(parts) or "healthy"


def code_version() -> str:
    """The checkout's commit, `+dirty` when tracked files differ from it ("unknown" outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def manifest_entry(run: Planned, out: Path, trained: Trained) -> dict[str, Any]:
    records = read_records(trained.path)
    rollouts = rollouts_of(records)
    labels = label(rollouts, trained.command)
    at = labels.rollout
    return {
        "regime": run.regime.name,
        "seed": run.seed,
        "split": run.split,
        "command": trained.command,
        "path": str(trained.path.relative_to(out)),
        "rollouts": len(rollouts),
        "optimizer_steps": len(records),
        "seconds": None if trained.seconds is None else round(trained.seconds, 1),
        "cpu_seconds": None if trained.cpu_seconds is None else round(trained.cpu_seconds, 1),
        "label": labels.kind,
        "label_rollout": at,
        "label_step": None if at is None else next(r.first_step for r in rollouts if r.index == at),
        "labels": {"collapse": labels.collapse, "stopped": labels.stopped, "truncation": labels.truncation},
        "described": describe(labels, rollouts),
    }


def generate(
    out: Path, only: Sequence[str] | None = None, seeds: Sequence[int] | None = None, quick: bool = False, jobs: int = 1
) -> list[dict[str, Any]]:
    """Train (or reuse) the planned runs, `jobs` at a time, and write `out/manifest.json`; its run entries."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    write_data(out / "data")
    runs = plan(only, seeds, quick)
    manifest_path = out / "manifest.json"
    previous = json.loads(manifest_path.read_text())["runs"] if manifest_path.exists() else []
    old = {e["path"]: e for e in previous}
    entries: dict[tuple[str, int], dict[str, Any]] = {}
    failed = []
    version = code_version()
    cpu = 0.0  # CPU seconds of the runs trained now
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(train, run, out): run for run in runs}
        for done, future in enumerate(as_completed(futures), 1):
            run = futures[future]
            try:
                trained = future.result()
            except RuntimeError as exc:
                failed.append(run)
                print(f"[{done}/{len(runs)}] {run.regime.name} s{run.seed}: FAILED {exc}", file=sys.stderr, flush=True)
                continue
            entry = manifest_entry(run, out, trained)
            entry["code"] = version
            cpu += trained.cpu_seconds or 0.0
            if trained.seconds is None:  # reused: keep the times and code version of the run that made it
                for key in ("seconds", "cpu_seconds", "code"):
                    entry[key] = old.get(entry["path"], {}).get(key)
            entries[(run.regime.name, run.seed)] = entry
            took = (
                "cached" if trained.seconds is None else f"{trained.seconds:.0f} s ({entry['cpu_seconds']:.0f} s CPU)"
            )
            print(
                f"[{done}/{len(runs)}] {run.regime.name} s{run.seed} ({run.split}): {entry['rollouts']} rollouts, "
                f"{entry['optimizer_steps']} steps, {took} -> {entry['described']}",
                flush=True,
            )
    kept = [e for e in previous if (e["regime"], e["seed"]) not in entries and (out / e["path"]).exists()]
    order = {r.name: i for i, r in enumerate(REGIMES)}
    all_entries = sorted([*kept, *entries.values()], key=lambda e: (order.get(e["regime"], len(order)), e["seed"]))
    body = {"label_rules": (__doc__ or "").split("Labels come from")[1].strip(), "runs": all_entries}
    tmp = manifest_path.with_name("manifest.json.part")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.rename(manifest_path)
    counts = Counter((e["split"], e["label"]) for e in all_entries)
    print(
        f"{len(entries)} runs in {time.monotonic() - t0:.0f} s ({cpu:.0f} CPU seconds of the runs trained now); "
        f"{len(all_entries)} in {manifest_path}: "
        + ", ".join(f"{split} {kind} {n}" for (split, kind), n in sorted(counts.items()))
    )
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: " + ", ".join(f"{r.regime.name} s{r.seed}" for r in failed))
    return all_entries


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="corpus directory (finished runs in it are reused)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, one thread each (default 1)")
    parser.add_argument("--only", nargs="+", metavar="REGIME", help=f"these regimes only: {', '.join(BY_NAME)}")
    parser.add_argument("--seeds", nargs="+", type=int, help="these seeds only (default 0 1 2)")
    parser.add_argument("--quick", action="store_true", help="seed 0 only, half the rollouts: a smoke test")
    args = parser.parse_args()
    generate(args.out, args.only, args.seeds, args.quick, args.jobs)


if __name__ == "__main__":
    main()
