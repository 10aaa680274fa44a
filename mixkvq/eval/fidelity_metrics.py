"""Fidelity metrics from the rows of a fidelity run (pure numpy/pandas: tables and notebooks import it without
torch). A row is one problem with per-token lists: kl, top1, nll (method), nll_ref (bf16), and natural_tokens,
where the bf16 model would have ended its answer itself."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

# Columns of a fidelity sample row that the metrics read (tables load only these).
TOKEN_COLUMNS = ["problem_id", "kl", "top1", "nll", "nll_ref", "natural_tokens", "truncated_by_budget",
                 "payload_bits_mean", "storage_bits_mean", "payload_bits_final", "storage_bits_final",
                 "kv_bytes_final", "kv_bytes_bf16_final"]


def _tokens(samples: pd.DataFrame, col: str) -> np.ndarray:
    parts = [np.asarray(v, dtype=np.float64) for v in samples[col]]
    return np.concatenate(parts) if parts else np.zeros(0)


def _pos(samples: pd.DataFrame) -> np.ndarray:
    """Position of each scored token in its reference (0 = the first generated token)."""
    return np.concatenate([np.arange(len(v)) for v in samples["kl"]]) if len(samples) else np.zeros(0)


def token_metrics(kl: np.ndarray, top1: np.ndarray, nll: np.ndarray, nll_ref: np.ndarray) -> dict:
    if not len(kl):
        return {"n_tokens": 0, "kl_mean": None, "kl_p95": None, "top1": None, "dnll": None, "dnll_p95": None}
    d = nll - nll_ref
    return {"n_tokens": int(len(kl)), "kl_mean": float(kl.mean()), "kl_p95": float(np.percentile(kl, 95)),
            "top1": float(top1.mean()), "dnll": float(d.mean()), "dnll_p95": float(np.percentile(d, 95))}


def summarize(samples: pd.DataFrame, buckets: list[int]) -> dict:
    """Means and 95th percentiles over every scored token, the same per position bucket, and means over the
    tokens of the bf16 model's own answers (`*_answer`)."""
    kl, top1 = _tokens(samples, "kl"), _tokens(samples, "top1")
    nll, nll_ref = _tokens(samples, "nll"), _tokens(samples, "nll_ref")
    out = {"n_problems": len(samples), **token_metrics(kl, top1, nll, nll_ref),
           "nll_ref": float(nll_ref.mean()) if len(nll_ref) else None,
           "nll": float(nll.mean()) if len(nll) else None}
    pos = _pos(samples)
    past = np.concatenate([np.arange(len(v)) >= n for v, n in zip(samples["kl"], samples["natural_tokens"])]) \
        if len(samples) else np.zeros(0, dtype=bool)
    out["past_eos_share"] = float(past.mean()) if len(past) else None  # tokens bf16 would not have written
    # The same metrics on the bf16 model's own answers only (before the EOS it would have written): text past
    # it (EOS masked to reach long contexts) is the model's, but not what it would have said.
    own = token_metrics(kl[~past], top1[~past], nll[~past], nll_ref[~past])
    out.update({f"{k}_answer": v for k, v in own.items() if k in ("n_tokens", "kl_mean", "top1", "dnll")})
    by_pos = []
    for lo, hi in zip(buckets[:-1], buckets[1:]):
        sel = (pos >= lo) & (pos < hi)
        if sel.any():
            by_pos.append({"lo": lo, "hi": hi, **token_metrics(kl[sel], top1[sel], nll[sel], nll_ref[sel])})
    out["by_position"] = json.dumps(by_pos)
    for col in ("payload_bits_mean", "storage_bits_mean", "payload_bits_final", "storage_bits_final"):
        out[col] = float(samples[col].mean()) if col in samples and len(samples) else None
    out["kv_bytes_vs_bf16"] = None
    if "kv_bytes_final" in samples and samples["kv_bytes_final"].notna().all() and len(samples):
        out["kv_bytes_vs_bf16"] = float((samples["kv_bytes_final"] / samples["kv_bytes_bf16_final"]).mean())
    out["budget_truncation_rate"] = float(samples["truncated_by_budget"].mean()) if len(samples) else None
    return out


def _sqnr_db(signal: float, noise: float) -> float | None:
    return None if noise <= 0 else 10 * math.log10(signal / noise)  # None: lossless (bf16, full-precision layers)


def layer_table(samples: pd.DataFrame) -> pd.DataFrame:
    """Per layer: mean relative L2 error of the decode attention output, SQNR (dB) of dequantized K and V."""
    if "attn_err_sum" not in samples or samples["attn_err_sum"].isna().all():
        return pd.DataFrame(columns=["layer", "attn_rel_err", "key_sqnr_db", "value_sqnr_db", "attn_steps"])
    s = samples.dropna(subset=["attn_err_sum"])
    stack = {c: np.stack([np.asarray(v, dtype=np.float64) for v in s[c]]).sum(axis=0)
             for c in ("attn_err_sum", "attn_err_n", "key_signal", "key_noise", "value_signal", "value_noise")}
    return pd.DataFrame({
        "layer": np.arange(len(stack["attn_err_sum"])),
        "attn_rel_err": stack["attn_err_sum"] / np.maximum(stack["attn_err_n"], 1),
        "key_sqnr_db": [_sqnr_db(a, b) for a, b in zip(stack["key_signal"], stack["key_noise"])],
        "value_sqnr_db": [_sqnr_db(a, b) for a, b in zip(stack["value_signal"], stack["value_noise"])],
        "attn_steps": stack["attn_err_n"].astype(np.int64),
    })
