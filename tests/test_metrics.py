"""Metrics on small tables computed by hand."""

import math

import pandas as pd
import pytest

from mixkvq.eval.metrics import agreement, summarize


def frame(records):
    cols = ["problem_id", "sample_index", "extracted", "correct", "n_tokens", "truncated", "gen_seconds"]
    df = pd.DataFrame(records, columns=cols)
    df["problem_index"] = df.problem_id.str[1:].astype(int)
    return df


# p0: 2/3 correct; answers 5,5,7 -> majority 5 (correct).
# p1: 0/3 correct; answers 3,4,None -> tie 3 vs 4, first occurrence 3 (wrong).
# p2: 1/3 correct; answers None,9,8 -> tie 9 vs 8, first occurrence 9 (correct).
SAMPLES = frame(
    [
        ("p0", 0, "5", True, 10, False, 2.0),
        ("p0", 1, "5", True, 20, False, 2.0),
        ("p0", 2, "7", False, 30, True, 2.0),
        ("p1", 2, None, False, 40, True, 4.0),  # row order must not matter
        ("p1", 0, "3", False, 50, False, 4.0),
        ("p1", 1, "4", False, 60, False, 4.0),
        ("p2", 0, None, False, 70, True, 4.0),
        ("p2", 1, "9", True, 80, False, 4.0),
        ("p2", 2, "8", False, 90, False, 4.0),
    ]
)


def test_pass1_and_se():
    s = summarize(SAMPLES)
    means = [2 / 3, 0.0, 1 / 3]
    mu = sum(means) / 3
    sd = math.sqrt(sum((m - mu) ** 2 for m in means) / 2)
    assert s["n_problems"] == 3 and s["n_samples"] == 3
    assert s["pass1"] == pytest.approx(1 / 3)
    assert s["pass1_se"] == pytest.approx(sd / math.sqrt(3))


def test_majority_ties_and_none():
    assert summarize(SAMPLES)["majority"] == pytest.approx(2 / 3)
    # all answers missing -> not correct; a None majority never counts as an answer
    df = frame([("p0", 0, None, True, 1, False, 1.0), ("p0", 1, None, True, 1, False, 1.0)])
    assert summarize(df)["majority"] == 0.0
    df = frame([("p0", 0, None, False, 1, False, 1.0), ("p0", 1, None, False, 1, False, 1.0),
                ("p0", 2, "1", True, 1, False, 1.0)])
    assert summarize(df)["majority"] == 1.0


def test_single_problem_se_is_zero():
    s = summarize(SAMPLES[SAMPLES.problem_id == "p0"])
    assert s["pass1_se"] == 0.0 and s["pass1"] == pytest.approx(2 / 3)


def test_lengths_truncation_throughput():
    s = summarize(SAMPLES)
    assert s["mean_tokens"] == pytest.approx(50.0)
    assert s["truncation_rate"] == pytest.approx(3 / 9)
    assert s["tokens_per_s"] == pytest.approx(450 / (2.0 + 4.0 + 4.0))  # each problem's time once


def test_budget_truncation_only_for_methods_with_a_budget():
    assert summarize(SAMPLES)["budget_truncation_rate"] is None  # no such column: the method has no budget
    df = SAMPLES.copy()
    df["truncated_by_budget"] = [False, True, False, False, False, False, True, True, False]
    assert summarize(df)["budget_truncation_rate"] == pytest.approx(3 / 9)


def test_bits_and_bytes():
    df = SAMPLES.copy()
    df["payload_bits_mean"] = [2.0, 3.0, 4.0] * 3
    df["storage_bits_mean"] = 3.0
    df["payload_bits_final"] = 2.5
    df["storage_bits_final"] = 3.5
    df["kv_bytes_final"] = [100, 200, 300] * 3
    df["kv_bytes_bf16_final"] = [1000, 1000, 1000] * 3
    s = summarize(df)
    assert s["payload_bits_mean"] == pytest.approx(3.0)
    assert s["storage_bits_final"] == pytest.approx(3.5)
    assert s["kv_bytes_final"] == pytest.approx(200.0)
    assert s["kv_bytes_vs_bf16"] == pytest.approx(0.2)
    df["kv_bytes_final"] = None  # fake storage
    s = summarize(df)
    assert s["kv_bytes_final"] is None and s["kv_bytes_vs_bf16"] is None


def test_agreement():
    run = pd.DataFrame(
        {
            "problem_id": ["p0", "p0", "p1", "p9"],
            "sample_index": [0, 1, 0, 0],
            "extracted": ["5", None, "3", "1"],
            "token_ids": [[1, 2, 3, 4], [1, 2], [7], [1]],
        }
    )
    ref = pd.DataFrame(
        {
            "problem_id": ["p0", "p0", "p1"],
            "sample_index": [0, 1, 0],
            "extracted": ["5", None, "4"],
            "token_ids": [[1, 2, 9], [1, 2], [8, 7]],
        }
    )
    a = agreement(run, ref)
    assert a["n_matched"] == 3
    assert a["agree_answer"] == pytest.approx(2 / 3)  # None == None counts as agreeing
    assert a["agree_prefix_tokens"] == pytest.approx((2 + 2 + 0) / 3)
    assert a["agree_prefix_frac"] == pytest.approx((2 / 4 + 1 + 0) / 3)
    assert agreement(run, ref.iloc[:0])["n_matched"] == 0
