"""Teacher-forced fidelity (mixkvq/eval/fidelity.py, scripts/fidelity.py): the measure is sensitive, the bf16 path is
at the noise floor, and runs resume and report like evaluation runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mixkvq.config import load_config
from mixkvq.errors import ConfigError
from mixkvq.eval import fidelity
from mixkvq.eval.fidelity import Reference, drive, greedy_references, layer_table, summarize
from mixkvq.eval.tasks import Problem
import mixkvq.kv.storage
from tiny import build, random_prompts, tiny_model

REPO = Path(__file__).resolve().parents[1]
# Harness bf16 path against plain transformers on a bf16 model: the noise floor of bf16 rounding in a differently
# laid-out (ragged, left-aligned) attention. Measured 1.1e-4 on this model; SmolLM2's is in results/fidelity/.
BF16_KL_THRESHOLD = 5e-4


@pytest.fixture(scope="module")
def bf16_setup():
    """A bf16 GQA model (8 query heads on 2 KV heads), three left-padded prompts, 300-token greedy references:
    long enough that KIVI flushes two R=128 blocks."""
    model = tiny_model("qwen2", dtype=torch.bfloat16, q_heads=8, kv_heads=2)
    prompts = [p.tolist() for p in random_prompts([20, 161, 90], seed=3)]
    made = greedy_references(model, prompts, 300, {1}, True, 0)
    return model, [Reference(f"p{i}", prompts[i], t, n) for i, (t, n) in enumerate(made)]


def _score(model, refs, name, every=0):
    rows = drive(model, model, build(name, model=model), refs, 0, "auto", every)
    return rows, summarize(pd.DataFrame(rows), [0, 128, 256, 512])


def test_bf16_through_the_harness_is_at_the_noise_floor_of_plain_transformers(bf16_setup):
    model, refs = bf16_setup
    rows, s = _score(model, refs, "bf16", every=4)
    assert s["n_tokens"] == 900 and [r["n_tokens"] for r in rows] == [300, 300, 300]
    assert s["kl_mean"] < BF16_KL_THRESHOLD and s["top1"] > 0.98 and abs(s["dnll"]) < 1e-2
    layers = layer_table(pd.DataFrame(rows))
    # bf16 stores nothing lossy: exact SQNR (None) and attention equal to exact attention over the same history
    assert layers["key_sqnr_db"].isna().all() and layers["value_sqnr_db"].isna().all()
    assert (layers["attn_rel_err"] == 0).all() and (layers["attn_steps"] == 3 * (299 // 4)).all()


def test_float32_bf16_path_matches_dynamic_cache_almost_exactly():
    model = tiny_model("llama")
    prompts = [p.tolist() for p in random_prompts([20, 61], seed=4)]
    refs = [Reference(f"p{i}", prompts[i], t, n)
            for i, (t, n) in enumerate(greedy_references(model, prompts, 150, {1}, True, 0))]
    _, s = _score(model, refs, "bf16")
    assert s["kl_mean"] < 1e-6 and s["top1"] == 1.0


def test_scales_off_by_one_percent_raise_kl_clearly(bf16_setup, monkeypatch):
    model, refs = bf16_setup
    _, good = _score(model, refs, "bits/kivi8")
    honest = mixkvq.kv.storage.dequantize
    monkeypatch.setattr(mixkvq.kv.storage, "dequantize", lambda c, s, z, d: honest(c, s * 1.01, z, d))
    _, broken = _score(model, refs, "bits/kivi8")
    # 8-bit codes alone sit near the bf16 floor; every scale 1% off must stand out by an order of magnitude.
    assert good["kl_mean"] < 2 * BF16_KL_THRESHOLD
    assert broken["kl_mean"] > 5 * good["kl_mean"] and broken["kl_mean"] > 5 * BF16_KL_THRESHOLD


def test_fewer_bits_mean_more_error_at_every_level(bf16_setup):
    model, refs = bf16_setup
    r4, k4 = _score(model, refs, "kivi4", every=4)
    r2, k2 = _score(model, refs, "kivi", every=4)
    assert k2["kl_mean"] > 2 * k4["kl_mean"] > 0 and k2["dnll"] > k4["dnll"]
    l4, l2 = layer_table(pd.DataFrame(r4)), layer_table(pd.DataFrame(r2))
    # each bit halves the step: about 6 dB of SQNR per bit, so K4V4 is well over 6 dB above K2V2 in every layer
    assert (l4["key_sqnr_db"] - l2["key_sqnr_db"] > 6).all() and (l4["value_sqnr_db"] - l2["value_sqnr_db"] > 6).all()
    assert (l2["attn_rel_err"] > l4["attn_rel_err"]).all()
    assert all(r["storage_bits_mean"] < 16 for r in r2)


def test_summaries_are_means_percentiles_and_position_buckets_of_the_tokens():
    samples = pd.DataFrame([
        {"kl": [0.0, 1.0, 2.0], "top1": [True, False, True], "nll": [1.0, 2.0, 3.0], "nll_ref": [1.0, 1.0, 1.0],
         "natural_tokens": 2, "truncated_by_budget": False},
        {"kl": [4.0], "top1": [False], "nll": [0.5], "nll_ref": [1.5], "natural_tokens": 1,
         "truncated_by_budget": True},
    ])
    s = summarize(samples, [0, 1, 4])
    assert s["n_tokens"] == 4 and s["kl_mean"] == pytest.approx(7 / 4) and s["top1"] == 0.5
    assert s["kl_p95"] == pytest.approx(np.percentile([0, 1, 2, 4], 95))
    assert s["dnll"] == pytest.approx((0 + 1 + 2 - 1) / 4) and s["budget_truncation_rate"] == 0.5
    assert s["past_eos_share"] == 0.25  # the third token of the first row comes after bf16's own EOS
    assert s["n_tokens_answer"] == 3 and s["kl_mean_answer"] == pytest.approx(5 / 3)
    by_pos = json.loads(s["by_position"])
    assert [(b["lo"], b["hi"], b["n_tokens"]) for b in by_pos] == [(0, 1, 2), (1, 4, 2)]
    assert by_pos[0]["kl_mean"] == 2.0 and by_pos[1]["kl_mean"] == 1.5


def test_gold_reference_is_the_worked_solution_without_calculator_markup():
    p = Problem("gsm8k-0", "q", "18", "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\nShe makes $<<9*2=18>>18.\n"
                                      "#### 1,018")
    assert fidelity.SOLUTIONS.get("gsm8k")(p) == ("Janet sells 16 - 3 - 4 = 9 duck eggs.\nShe makes $18.\n"
                                                 "The answer is \\boxed{1018}.")


BAD_SETTINGS = [
    ("fidelity.reference=sampled", "unknown fidelity.reference 'sampled'; valid choices: 'gold', 'greedy'"),
    # the default task is generated without worked solutions
    ("fidelity.reference=gold", "unknown task for fidelity.reference=gold 'gsm_symbolic'; valid choices: 'gsm8k'"),
    ("fidelity.tokens=0", "fidelity.tokens=0 must be a positive integer"),
    ("fidelity.buckets=[5,10]", "fidelity.buckets=[5, 10] must be increasing integers starting at 0"),
]


@pytest.mark.parametrize("override, message", BAD_SETTINGS)
def test_bad_settings_fail_before_any_model_is_loaded(tmp_path, monkeypatch, override, message):
    monkeypatch.setattr(fidelity, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(fidelity, "load_task", lambda *a, **k: pytest.fail("the task was loaded"))
    cfg = load_config([override, f"results_dir={tmp_path}", "logger.mode=disabled"], config_name="fidelity")
    with pytest.raises(ConfigError) as refused:
        fidelity.run(cfg)
    assert message in str(refused.value)
    assert not any(tmp_path.iterdir())


def test_the_fidelity_script_refuses_a_bad_setting_with_exit_2_and_one_message(tmp_path):
    # The command-line contract of scripts/fidelity.py; the settings it checks are the test above's.
    proc = subprocess.run([sys.executable, "scripts/fidelity.py", "fidelity.tokens=0", f"results_dir={tmp_path}",
                           "logger.mode=disabled"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == ["error: fidelity.tokens=0 must be a positive integer"], errors
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_run_writes_its_files_and_resumes_only_what_is_missing(tmp_path, shared_data, tiny_run_model):
    # the tiny random-weight model (two layers): the files and the resume are what is tested, not the weights
    args = [sys.executable, "scripts/fidelity.py", "method=kivi", *tiny_run_model, "task=gsm8k",
            f"task.data_files={shared_data / 'gsm8k' / 'test.jsonl'}", "task.limit=3", "fidelity.tokens=24",
            "fidelity.batch_size=2", "fidelity.layer_stats_every=2", "method.residual_length=32",
            "method.group_size=32", "logger.mode=disabled", "progress=false", f"results_dir={tmp_path}"]
    first = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    (rd,) = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    samples = pd.read_parquet(rd / "samples.parquet")
    assert sorted(samples["problem_id"]) == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert (samples["n_tokens"] == 24).all() and samples["kl"].map(len).eq(24).all()
    row = pd.read_parquet(rd / "run.parquet").iloc[0]
    assert row["kind"] == "fidelity" and row["n_tokens"] == 72 and 0 < row["kl_mean"] and row["top1"] <= 1
    assert row["storage_bits_mean"] < 16 and row["decode_kernels_used"] == "torch"
    layers = pd.read_parquet(rd / "layers.parquet")
    assert len(layers) == 2 and (layers["key_sqnr_db"] > 0).all() and (layers["attn_rel_err"] > 0).all()
    assert "KL mean" in first.stdout and "kivi-KIVI-2" in first.stdout

    # Lose the last batch's problem and the run row, as a killed run would: the rerun redoes only that problem.
    kept = samples[samples["problem_id"] != "gsm8k-2"]
    kept.to_parquet(rd / "samples.parquet")
    (rd / "run.parquet").unlink()
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 problems, 2 already done" in second.stderr
    again = pd.read_parquet(rd / "samples.parquet").sort_values("problem_id").reset_index(drop=True)
    assert again["problem_id"].tolist() == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert again["batch_seconds"][:2].tolist() == samples.sort_values("problem_id")["batch_seconds"][:2].tolist()
    # references are shared, not regenerated: problem 2 scores the very tokens it scored the first time
    assert again["kl"][2].tolist() == pytest.approx(samples.sort_values("problem_id")["kl"].iloc[2].tolist(), abs=0)
    assert pd.read_parquet(rd / "run.parquet").iloc[0]["n_tokens"] == 72
