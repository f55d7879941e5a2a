"""Sampler-vs-trainer cases from public reports, rebuilt as metric streams under TRL's and verl's own names.

Each builder returns (steps 1..n, one dict of metrics per step, the step where the trouble starts
or None for a healthy run). Noise is seeded, so the streams are the same on every run.
"""

from __future__ import annotations

import math

import numpy as np

Case = tuple[list[dict[str, float]], int | None]


def trl_jump(n: int = 90, onset: int = 60, seed: int = 0) -> Case:
    """TRL #5312: vLLM sleep mode leaves the sampler's weights un-synced. Mean |d| 0.010-0.018 while synced,
    0.201 at the onset, later 0.809 (max 7.43); IS ratio min 3.2e-21, mean 3.25e-7; every clip ratio 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(1, n + 1):
        if step < onset:
            diff = float(rng.uniform(0.010, 0.018))
            is_min, is_mean, is_max, d_max = float(rng.uniform(0.3, 0.6)), 1.0 + float(rng.normal(0, 0.002)), 1.8, 0.9
        else:
            diff = 0.201 if step < onset + 15 else 0.809
            is_min, is_mean, is_max, d_max = 3.2e-21, 3.25e-7, 3.0, 7.43
        rows.append(
            {
                "sampling/sampling_logp_difference/mean": diff,
                "sampling/sampling_logp_difference/max": d_max,
                "sampling/importance_sampling_ratio/min": is_min,
                "sampling/importance_sampling_ratio/mean": is_mean,
                "sampling/importance_sampling_ratio/max": is_max,
                "clip_ratio/low_mean": 0.0,
                "clip_ratio/high_mean": 0.0,
                "clip_ratio/region_mean": 0.0,
                "entropy": 2.1 + float(rng.normal(0, 0.02)),
            }
        )
    return rows, onset


def trl_healthy(n: int = 300, level: float = 0.012, seed: int = 1) -> Case:
    """vime #64 / slime: a synced engine, mean |d| flat at ~0.012 with noise; every clip ratio 0 (one update
    per generation, TRL's default), so the idle-clip rule is in force the whole run."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        diff = level * float(np.exp(rng.normal(0, 0.2)))
        rows.append(
            {
                "sampling/sampling_logp_difference/mean": diff,
                "sampling/sampling_logp_difference/max": float(rng.uniform(0.5, 1.5)),
                "sampling/importance_sampling_ratio/min": float(rng.uniform(0.2, 0.5)),
                "sampling/importance_sampling_ratio/mean": 1.0 + float(rng.normal(0, 0.003)),
                "sampling/importance_sampling_ratio/max": float(rng.uniform(1.5, 3.0)),
                "clip_ratio/region_mean": 0.0,
                "entropy": 1.2 + float(rng.normal(0, 0.03)),
            }
        )
    return rows, None


def trl_top_k(n: int = 20, is_mean: float = 0.17) -> Case:
    """TRL #6789: log-probs returned after top-k processing: a constant IS mean of 0.17 (top_k 50) from step 1."""
    rows = [
        {
            "sampling/importance_sampling_ratio/min": is_mean / 4,
            "sampling/importance_sampling_ratio/mean": is_mean,
            "sampling/importance_sampling_ratio/max": 1.0,
            "clip_ratio/region_mean": 0.0,
        }
        for _ in range(n)
    ]
    return rows, 1


def verl_drift(n: int = 260, onset: int = 100, growth: float = 50.0, over: int = 120, seed: int = 2) -> Case:
    """FP16 paper / open-instruct #1473 under verl's names: a steady k3 KL of ~1e-3 that then grows 50x,
    geometrically, over `over` steps (and stays there); the clip fraction is small but not 0."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(1, n + 1):
        factor = growth ** (min(max(step - onset, 0), over) / over)
        k3 = 1e-3 * factor * float(np.exp(rng.normal(0, 0.15)))
        chi2 = 2.0 * k3 * float(np.exp(rng.normal(0, 0.1)))
        rows.append(
            {
                "rollout_corr/kl": -k3 * float(rng.uniform(0.5, 1.5)),
                "rollout_corr/k3_kl": k3,
                "rollout_corr/chi2_token": chi2,
                "rollout_corr/rollout_is_mean": 1.0 + float(rng.normal(0, 0.002)),
                "rollout_corr/rollout_is_std": math.sqrt(chi2),
                "rollout_corr/rollout_is_eff_sample_size": 1.0 / (1.0 + chi2),
                "rollout_corr/log_ppl_diff": float(rng.normal(0, 1e-3)),
                "training/rollout_probs_diff_mean": 0.004 * math.sqrt(factor),
                "actor/pg_clipfrac": 0.01 + float(rng.uniform(0, 0.004)),
                "actor/entropy": 0.9 + float(rng.normal(0, 0.01)),
            }
        )
    return rows, onset
