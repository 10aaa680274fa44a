"""Per-run metrics from the samples table. Pure functions; fractions in [0, 1], never percent."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd

REQUIRED = ("problem_id", "sample_index", "correct", "extracted", "n_tokens", "truncated")
KEY = ["problem_id", "sample_index"]


def _answer(x):
    # Parquet round trips turn a missing string into None or NaN depending on the dtype.
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _mean(samples: pd.DataFrame, col: str) -> float | None:
    if col not in samples or samples[col].isna().all():
        return None
    return float(samples[col].mean())


def _majority_correct(group: pd.DataFrame) -> bool:
    """Most common non-null answer, ties to the earliest sample; its correctness is its first sample's."""
    answers = [_answer(a) for a in group["extracted"]]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return False
    first = {}
    for i, a in enumerate(answers):
        first.setdefault(a, i)
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return bool(group["correct"].iloc[first[best]])


def summarize(samples: pd.DataFrame) -> dict:
    """Accuracy, length, bits, bytes and throughput of one run (keys documented in the task brief)."""
    missing = [c for c in REQUIRED if c not in samples]
    if missing:
        raise ValueError(f"samples lack columns {missing}")
    s = samples.sort_values(KEY, kind="stable")
    by_problem = s.groupby("problem_id", sort=False)
    per_problem = by_problem["correct"].mean().astype(float)
    n = len(per_problem)
    out = {
        "n_problems": n,
        "n_samples": int(by_problem.size().max()) if n else 0,
        "pass1": float(per_problem.mean()) if n else None,
        "pass1_se": (float(per_problem.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0) if n else None,
        "majority": float(np.mean([_majority_correct(g) for _, g in by_problem])) if n else None,
        "mean_tokens": _mean(s, "n_tokens"),
        "truncation_rate": float(s["truncated"].astype(float).mean()) if n else None,
        # Samples a KV budget ended (PM-KVQ at its lowest width); None for methods without a budget.
        "budget_truncation_rate": (float(s["truncated_by_budget"].astype(float).mean())
                                   if n and "truncated_by_budget" in s else None),
        # Steps a sample spent over a layer's KV budget while PM-KVQ halved once per step (0 for the others).
        "budget_over_steps_mean": _mean(s, "budget_over_steps"),
    }
    for col in ("payload_bits_mean", "storage_bits_mean", "payload_bits_final", "storage_bits_final"):
        out[col] = _mean(s, col)
    out["kv_bytes_final"] = _mean(s, "kv_bytes_final")
    out["kv_bytes_vs_bf16"] = None
    if out["kv_bytes_final"] is not None and "kv_bytes_bf16_final" in s:
        ratio = s["kv_bytes_final"].astype(float) / s["kv_bytes_bf16_final"].astype(float)
        out["kv_bytes_vs_bf16"] = None if ratio.isna().all() else float(ratio.mean())
    out["tokens_per_s"] = None
    if "gen_seconds" in s and n:
        # One generate call per problem produces all its samples: count its time once.
        seconds = float(by_problem["gen_seconds"].first().sum())
        if seconds > 0:
            out["tokens_per_s"] = float(s["n_tokens"].sum()) / seconds
    return out


def _common_prefix(a, b) -> int:
    a, b = np.asarray(a), np.asarray(b)
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


def agreement(samples: pd.DataFrame, reference_samples: pd.DataFrame) -> dict:
    """How closely a run follows its bf16 twin, sample by sample (same problem, same sample index)."""
    cols = KEY + ["extracted", "token_ids"]
    m = samples[cols].merge(reference_samples[cols], on=KEY, suffixes=("", "_ref"))
    if m.empty:
        return {"agree_answer": None, "agree_prefix_tokens": None, "agree_prefix_frac": None, "n_matched": 0}
    same = [_answer(a) == _answer(b) for a, b in zip(m["extracted"], m["extracted_ref"])]
    prefix, frac = [], []
    for a, b in zip(m["token_ids"], m["token_ids_ref"]):
        p, longest = _common_prefix(a, b), max(len(a), len(b))
        prefix.append(p)
        frac.append(p / longest if longest else 1.0)  # two empty outputs agree fully
    return {
        "agree_answer": float(np.mean(same)),
        "agree_prefix_tokens": float(np.mean(prefix)),
        "agree_prefix_frac": float(np.mean(frac)),
        "n_matched": len(m),
    }
