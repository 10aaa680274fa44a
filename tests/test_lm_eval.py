"""lm-evaluation-harness with the project's caches: its real evaluator, the offline task YAMLs on the shared JSONL
files, the real SmolLM2 (2 documents, a few tokens each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra: pip install -e '.[lm-eval]'")

from lm_eval.tasks import TaskManager  # noqa: E402

from mixkvq.config import load_config  # noqa: E402
from mixkvq.errors import ConfigError  # noqa: E402
from mixkvq.lmeval.model import MODEL_NAME, QuantizedKVLM, cache_config  # noqa: E402
from mixkvq.lmeval.run import check_tasks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "mixkvq" / "lm_eval_tasks"
LOCAL = ["gsm8k_cot_zeroshot_local", "gsm8k_local", "aime24_local", "aime25_local", "hendrycks_math500_local"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def task_manager(shared_data, tmp_path_factory) -> TaskManager:
    """The offline tasks, and a scoring task on a local file (loads offline, asks for loglikelihoods)."""
    extra = tmp_path_factory.mktemp("tasks")
    (extra / "choice.yaml").write_text(
        "task: aime24_choice\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {shared_data / 'aime24' / 'test.jsonl'}}}}}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{problem}}'\n"
        "doc_to_choice: ['yes', 'no']\ndoc_to_target: 0\nmetric_list: [{metric: acc}]\n")
    return TaskManager(include_path=[str(TASKS), str(extra)])  # one index of lm-eval's tasks for the module


@pytest.fixture(scope="module")
def smol():
    from mixkvq.eval.models import load_model

    return load_model(load_config().model)


def evaluate(lm, task_manager, task: str) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, limit=2, log_samples=True,
                                   gen_kwargs={"max_gen_toks": 8}, apply_chat_template=True, bootstrap_iters=0)


def test_local_tasks_read_the_shared_files_with_upstream_prompts_and_gold(task_manager, monkeypatch):
    monkeypatch.chdir(REPO)  # the YAMLs name the data relative to the repository root
    tasks = task_manager.load(LOCAL)["tasks"]
    sizes = {name: len(list(task.test_docs())) for name, task in tasks.items()}
    assert sizes == {"gsm8k_cot_zeroshot_local": 1319, "gsm8k_local": 1319, "aime24_local": 30,
                     "aime25_local": 30, "hendrycks_math500_local": 500}
    aime = list(tasks["aime24_local"].test_docs())
    assert tasks["aime24_local"].doc_to_target(aime[7]) == "25"  # the file's "025", as upstream's integer
    gsm = tasks["gsm8k_cot_zeroshot_local"]
    assert gsm.doc_to_text(next(iter(gsm.test_docs()))).startswith("Q: Janet")
    assert all(t.OUTPUT_TYPE == "generate_until" for t in tasks.values())


def test_bf16_and_kivi_run_through_the_evaluator_on_a_fresh_cache_each(smol, task_manager, monkeypatch):
    monkeypatch.chdir(REPO)
    bits = {}
    for method in ("bf16", "kivi"):
        # R=32: the prompts outgrow the full-precision window, so KIVI holds 2-bit codes from the first step
        cfg = load_config([f"method={method}"] + (["method.residual_length=32"] if method == "kivi" else []))
        lm = QuantizedKVLM(pretrained=smol.model, tokenizer=smol.tokenizer, kv_config=cfg, batch_size=2)
        res = evaluate(lm, task_manager, "aime24_local")
        assert res["results"]["aime24_local"]["sample_len"] == 2
        assert len(lm.cache_records) == 2  # one generate call of 2 left-padded rows, every row accounted
        assert all(1 <= r["n_tokens"] <= 8 for r in lm.cache_records)
        assert all(len(s["resps"][0][0]) > 0 for s in res["samples"]["aime24_local"])
        bits[method] = [r["payload_bits_mean"] for r in lm.cache_records]
    assert bits["bf16"] == [16.0, 16.0]
    assert all(b < 6 for b in bits["kivi"]), bits  # 2-bit codes plus the 32-token full-precision window
    with pytest.raises(ConfigError, match="generation tasks only"):
        lm.loglikelihood([])


def test_script_runs_offline_and_writes_lm_evals_files_beside_ours(tmp_path):
    cmd = [sys.executable, "scripts/lm_eval_run.py", "method=mixkvq", "logger.mode=disabled",
           f"results_dir={tmp_path}", "lm_eval.tasks=[gsm8k_cot_zeroshot_local]", "lm_eval.limit=2",
           "lm_eval.batch_size=2", "model.max_new_tokens=8", "method.residual_length=32", "lm_eval.bootstrap_iters=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert run.name.startswith("mixkvq-C2.5_smollm2-135m_gsm8k_cot_zeroshot_local_packed_")
    (results,) = run.glob("lm_eval/results_*.json")
    (samples,) = run.glob("lm_eval/samples_gsm8k_cot_zeroshot_local_*.jsonl")
    assert len(samples.read_text().splitlines()) == 2 * 2  # 2 documents x 2 filters (strict, flexible)
    stats = pd.read_json(run / "cache_stats.jsonl", lines=True)
    assert len(stats) == 2 and (stats["payload_bits_mean"] < 16).all()
    row = pd.read_parquet(run / "run.parquet").iloc[0]
    metric = json.loads(results.read_text())["results"]["gsm8k_cot_zeroshot_local"]["exact_match,strict-match"]
    assert row["lm_eval_metric"] == "exact_match,strict-match" and row["pass1"] == metric
    assert (row["n_problems"], row["n_samples"], row["decoding"]) == (2, 1, "greedy")
    assert row["git_sha"] and json.loads(row["versions"])["lm_eval"] == lm_eval.__version__
    assert row["payload_bits_mean"] == pytest.approx(stats["payload_bits_mean"].mean())
    assert "[smollm2-135m / gsm8k_cot_zeroshot_local / packed]" in proc.stdout and "mixkvq" in proc.stdout


def test_loglikelihood_and_unknown_tasks_are_refused_before_any_model_loads(task_manager, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(["lm_eval.tasks=[aime24_choice]"], config_name="lm_eval")
    with pytest.raises(ConfigError, match=r"'aime24_choice' requests \['multiple_choice'\].*generation tasks only"):
        check_tasks(cfg, task_manager)
    cfg = load_config(["lm_eval.metric='exact_match,flexible'"], config_name="lm_eval")
    with pytest.raises(ConfigError, match=r"lm_eval.metric='exact_match,flexible'.*'exact_match,flexible-extract'"):
        check_tasks(cfg, task_manager)
    cfg = load_config(["lm_eval.tasks=[gsm8k_locl]"], config_name="lm_eval")
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['gsm8k_locl'\].*gsm8k_local"):
        check_tasks(cfg, task_manager)


def test_model_args_route_to_the_method_or_to_hflm_and_bad_ones_fail_first():
    assert lm_eval.api.registry.get_model(MODEL_NAME) is QuantizedKVLM
    cfg, rest = cache_config("kivi4", k_bits=2, kv_storage="fake", batch_size=4, max_length=2048)
    assert (cfg.method.name, cfg.method.k_bits, cfg.method.v_bits, cfg.storage) == ("kivi", 2, 4, "fake")
    assert rest == {"batch_size": 4, "max_length": 2048}
    with pytest.raises(ConfigError, match="kv_method.*'kivi4'"):
        cache_config("kivy")
    with pytest.raises(ConfigError, match="storage='paged'"):
        cache_config("kivi", kv_storage="paged")


def test_crosscheck_grades_real_solutions_both_ways_and_explains_each_difference(shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    from scripts.grading_crosscheck import main

    run = REPO / "results" / "comparison" / "runs" / "bf16-16_smollm2-135m_gsm_symbolic_packed_927bda28"
    assert main([str(run), "--out", str(tmp_path), "--reference",
                 f"aime24={shared_data / 'aime24' / 'test.jsonl'}:solution"]) == 0
    rows = pd.read_parquet(tmp_path / "crosscheck.parquet")
    aime = rows[rows["source"] == "aime24 reference solutions"].set_index("problem_id")
    assert (len(aime), aime["correct"].sum(), aime["lm_correct"].sum()) == (30, 27, 13)
    assert aime.loc["61", "extracted"] == "\\textbf{(113) }" and aime.loc["61", "correct"]  # AoPS answer markup
    assert not aime.loc["61", "lm_correct"] and aime.loc["61", "reason"].startswith("markup in the box")
    assert not aime.loc["78", "lm_correct"] and aime.loc["78", "reason"].startswith("number format")  # "023"
    gsm = rows[rows["grading"] == "gsm8k_cot_zeroshot_local/flexible-extract"]
    assert len(gsm) == 80 and gsm["same_answer"].mean() > 0.95  # both read the last number of a GSM answer
    assert rows.loc[~rows["agree"] | ~rows["same_answer"], "reason"].notna().all()
    assert "Every grade that differs" in (tmp_path / "crosscheck.md").read_text()
