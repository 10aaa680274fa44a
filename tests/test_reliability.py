"""Every mistake caught in seconds, before the model loads; interruptions and damaged files handled.

A table of bad inputs goes through `evaluate` in-process with the model loader replaced by a tripwire: each case
must stop with one ConfigError naming the typeable key and the bad value, fast, create no run folder and leave an
existing finished run byte for byte as it was. Two subprocess tests keep the command-line contracts: exit 2 with
one message and no traceback, and SIGTERM during generation.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from hydra import compose, initialize_config_dir

from mixkvq.config import CONFIG_DIR, load_config
from mixkvq.errors import ConfigError
from mixkvq.eval import evaluate as evaluate_module
from mixkvq.eval.preflight import preflight
from mixkvq.runs.results import RunDir, find_finished, run_state

REPO = Path(__file__).resolve().parents[1]
QUICK = ["logger.mode=disabled", "progress=false", "grading_workers=0", "task.limit=2", "task.n_samples=2"]
SECONDS = 10  # the bound for a refusal, model load excluded by construction


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def finish_run(cfg, label: str) -> Path:
    """A finished run as evaluate leaves one: 2 problems x 2 samples and the summary row that counts them."""
    with RunDir(cfg.results_dir, cfg, label) as rd:
        rd.append_samples([{"problem_id": f"p{i}", "sample_index": s, "correct": True, "extracted": "1",
                            "n_tokens": 3, "truncated": False} for i in range(2) for s in range(2)])
        rd.write_run_row({"run_name": rd.name, "method": cfg.method.name, "n_problems": 2, "n_samples": 2})
    return rd.path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Bad files a user may point a run at."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "empty.jsonl").write_text("")
    (root / "malformed.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": \n')
    (root / "config-only").mkdir()
    (root / "config-only" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "no-calibration").mkdir()
    cut = root / "cut-artifact"
    cut.mkdir()
    shipped = REPO / "results" / "calibration" / "smollm2-135m" / "kvmix" / "artifact.json"
    cut.joinpath("artifact.json").write_text(shipped.read_text()[:200])
    return {p.name: p for p in root.iterdir()}


# (overrides, strings the one message must contain: the typeable key and the bad value). `{name}` is a file of
# the `data` fixture.
CASES = [
    (["method=kivi", "method.v_bits=5"], ["method.v_bits", "5", "[2, 3, 4, 8]"]),
    (["method=kivi", "method.group_size=48"], ["method.group_size", "48"]),
    (["method=kivi", "method.residual_length=-1"], ["method.residual_length", "-1"]),
    (["method.tau_bf16=abc"], ["method.tau_bf16", "abc"]),
    (["method.target_bits=12"], ["method.target_bits", "12"]),
    (["generation.temperature=abc"], ["generation.temperature", "abc"]),
    (["generation.temperature=0"], ["generation.temperature", "0", "> 0"]),
    (["generation.top_p=1.5"], ["generation.top_p", "1.5", "<= 1"]),
    (["generation.max_new_tokens=0"], ["generation.max_new_tokens", "0"]),
    (["generation.max_new_tokens=8100"], ["generation.max_new_tokens=8", "8192"]),
    (["generation.do_sample=false", "task.n_samples=4"], ["task.n_samples", "4"]),
    (["model.max_new_tokens=9000"], ["model.max_new_tokens", "9000"]),
    (["model.dtype=int3"], ["model.dtype", "int3"]),
    (["model.device=tpu"], ["model.device", "tpu"]),
    (["model.path={config-only}"], ["model.path", "config-only", "lacks a tokenizer"]),
    (["model.path={missing}"], ["model.path", "missing", "is not a folder"]),
    (["seed=abc"], ["seed", "abc"]),
    (["cpu_threads=0"], ["cpu_threads", "0", ">= 1"]),
    (["grading_workers=-1"], ["grading_workers", "-1", ">= 0"]),
    (["progress=maybe"], ["progress", "maybe"]),
    (["storage=compressed"], ["storage", "compressed", "packed"]),
    (["quant.rounding=up"], ["quant.rounding", "up", "half_even"]),
    (["quant.min_scale=abc"], ["quant.min_scale", "abc"]),
    (["quant.meta_dtype=int8"], ["quant.meta_dtype", "int8"]),
    (["logger.mode=loud"], ["logger.mode", "loud", "offline"]),
    (["hub_timeout_s=0"], ["hub_timeout_s", "0"]),
    (["attention.decode_kernel=cuda_magic"], ["attention.decode_kernel", "cuda_magic", "torch"]),
    (["attention.decode_kernel=triton"], ["attention.decode_kernel", "triton", "CUDA"]),
    (["quant.pack_kernel=cuda_magic"], ["quant.pack_kernel", "cuda_magic", "torch"]),
    (["quant.pack_kernel=triton"], ["quant.pack_kernel", "triton", "CUDA"]),
    (["task=gsm8k", "task.data_files={empty.jsonl}"], ["task.data_files", "empty.jsonl", "no problems"]),
    (["task=gsm8k", "task.data_files={malformed.jsonl}"], ["task.data_files", "malformed.jsonl", "line 2"]),
    (["task=gsm8k", "task.data_files={no-calibration}"], ["task.data_files", "no-calibration", "is a folder"]),
    (["task=gsm8k", "task.data_files=does/not/exist.jsonl"], ["task.data_files", "does/not/exist.jsonl"]),
    (["task.size=0"], ["task.size", "0"]),
    (["task.grader=exact"], ["grader", "exact", "gsm"]),
    (["method=kvmix", "method.calibration_dir={no-calibration}"], ["kvmix", "artifact", "does not exist"]),
    (["method=kvmix", "method.artifact={cut-artifact}"], ["cut-artifact", "unreadable", "calibrate.py"]),
    (["method=pmkvq", "method.fbit_candidates=[3]"], ["method.fbit_candidates", "[3]"]),
    (["method=pmkvq", "method.max_len=64"], ["method.max_len=64", "every sample would end in prefill"]),
]


def _resolve(overrides: list[str], data: dict[str, Path], tmp: Path) -> list[str]:
    files = {k: str(v) for k, v in data.items()} | {"missing": str(tmp / "missing")}
    for name, path in files.items():
        overrides = [o.replace("{" + name + "}", path) for o in overrides]
    return overrides


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A results folder holding one finished run of the default config, which no refused run may touch."""
    root = tmp_path_factory.mktemp("results")
    cfg = load_config([*QUICK, f"results_dir={root}"])
    finish_run(cfg, preflight(cfg).label)
    return root


def test_a_missing_artifact_resolves_against_the_repository_from_any_folder(monkeypatch, tmp_path, results):
    monkeypatch.chdir(tmp_path)  # the shipped SmolLM2 artifacts are found from elsewhere too
    assert preflight(load_config([*QUICK, f"results_dir={results}", "method=kvmix"])).method.nominal_bits


@pytest.mark.parametrize("overrides, named", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_a_bad_input_is_refused_before_the_model_loads_with_one_message(overrides, named, data, results, tmp_path,
                                                                         monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a plain CPU machine: Triton cannot run
    monkeypatch.setattr(evaluate_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    before = digest(results)
    cfg = load_config([*QUICK, f"results_dir={results}", *_resolve(overrides, data, tmp_path)])
    start = time.perf_counter()
    with pytest.raises(ConfigError) as refused:
        evaluate_module.evaluate(cfg)
    seconds = time.perf_counter() - start
    message = str(refused.value)
    assert all(s in message for s in named), f"{overrides}: {message!r} does not name {named}"
    assert seconds < SECONDS, f"{overrides}: refused after {seconds:.1f} s"
    assert digest(results) == before  # no run folder made, the finished run untouched


def test_a_locked_run_or_an_edited_config_is_refused_before_the_model_loads(results, monkeypatch):
    monkeypatch.setattr(evaluate_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = load_config([*QUICK, f"results_dir={results}", "seed=1"])
    run = finish_run(cfg, preflight(cfg).label)
    fd = os.open(run / ".lock", os.O_RDONLY)  # a live job holds the run
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(ConfigError, match="another job is writing this run"):
            evaluate_module.evaluate(cfg)
    finally:
        os.close(fd)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("seed: 1", "seed: 2"))
    with pytest.raises(ConfigError, match="holds a different config"):
        evaluate_module.evaluate(cfg)


def test_a_truncated_samples_file_is_found_and_redone_not_reported_finished(tmp_path, capsys):
    cfg = load_config([*QUICK, f"results_dir={tmp_path}"])
    checked = preflight(cfg)
    run = finish_run(cfg, checked.label)
    assert preflight(cfg).state.finished and find_finished(tmp_path, cfg) == run
    samples = run / "samples.parquet"
    samples.write_bytes(samples.read_bytes()[:100])  # a disk that filled up, a copy cut short
    state = preflight(cfg).state
    assert not state.finished and state.samples_damaged and find_finished(tmp_path, cfg) is None
    with RunDir(tmp_path, cfg, checked.label) as rd:  # what the rerun does once it holds the lock
        assert rd.done_problem_ids() == set()
    err = capsys.readouterr().err
    assert "samples.parquet is unreadable" in err and "redone" in err
    assert (run / "samples.parquet.damaged").exists() and not (run / "run.parquet").exists()


def test_a_summary_that_counts_more_than_the_samples_hold_is_redone(tmp_path):
    cfg = load_config([*QUICK, f"results_dir={tmp_path}"])
    label = preflight(cfg).label
    run = finish_run(cfg, label)
    with RunDir(tmp_path, cfg, label) as rd:
        rd.write_run_row({"run_name": rd.name, "n_problems": 3, "n_samples": 2})
    state = run_state(run)
    assert not state.finished and "counts 3 problems (6 samples)" in state.damage[0]


def test_every_job_of_a_sweep_is_checked_before_the_first_starts(results):
    from mixkvq.runs.experiments import check_sweep

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        compose("config")
        errors = check_sweep("config", {}, [*QUICK, f"results_dir={results}", "method=kivi", "method.v_bits=2,5,4"])
    assert len(errors) == 1 and errors[0].startswith("job 1 (") and "method.v_bits=5" in errors[0], errors


def test_a_shipped_experiment_with_missing_calibration_is_refused(tmp_path):
    from omegaconf import OmegaConf

    from mixkvq.runs.experiments import plan

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["+experiment=kvmix_bits"], return_hydra_config=True)
        jobs, errors = plan("config", OmegaConf.to_container(cfg.hydra.sweeper.params), ["+experiment=kvmix_bits"],
                            cfg.cost)
    assert any("calibration artifact" in e and "calibrate.py method=kvmix" in e for e in errors), errors


def test_grading_workers_leave_with_a_killed_run():
    code = ("import time; from mixkvq.eval.grading import grade_many; grade_many(['1', '2'], ['1', '2'], 'gsm', 2); "
            "print('ready', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        children = psutil.Process(proc.pid).children(recursive=True)  # forkserver, workers, resource tracker
        assert len(children) >= 3, "no grading worker to watch"
    finally:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"processes outlived their killed run: {[p.cmdline()[-1][:60] for p in alive]}"


def test_run_py_refuses_a_bad_value_with_exit_2_one_message_no_traceback(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "run.py", *QUICK, f"results_dir={tmp_path / 'runs'}", "method=kivi",
                           "method.v_bits=5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == ["error: method.v_bits=5 is not a supported code width; choose one of [2, 3, 4, 8]"], errors
    assert not (tmp_path / "runs").exists()
    print(f"refused in {seconds:.1f} s, interpreter start and imports included")


@pytest.mark.slow
def test_sigterm_during_generation_keeps_finished_problems_and_stops_the_workers(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "run.py", "logger.mode=disabled", "progress=false", "grading_workers=2", "task.size=3",
           "task.n_samples=1", "model.max_new_tokens=48", f"results_dir={runs}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while not list(runs.glob("*/samples.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)  # the first problem is written: generation of the second is under way
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    run = next(runs.iterdir())
    saved = len(run_state(run).done)
    assert 1 <= saved < 3 and not (run / "run.parquet").exists()
    assert f"interrupted: {saved} of 3 problems saved in {run}; rerun the same command to resume" in err, err[-3000:]
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"processes outlived the run: {[p.cmdline()[:3] for p in alive]}"


@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers: the hub or W&B hanging, not down."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(50)
    held = []

    def accept():
        try:
            while True:
                held.append(server.accept())
        except OSError:  # closed at teardown
            pass

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.mark.parametrize("overrides, named", [(["model=deepseek-r1-distill-7b"], "model.path="),
                                              (["task=math500"], "task.data_files=")])
def test_a_hub_that_never_answers_stops_the_run_within_its_time_limit(overrides, named, silent_server, monkeypatch,
                                                                       tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", silent_server)
    cfg = load_config([*QUICK, f"results_dir={tmp_path}", "hub_timeout_s=2", *overrides])
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=f"did not answer within 2 s.*{named}"):
        preflight(cfg)
    assert time.perf_counter() - start < 2 + SECONDS


def test_an_unreachable_wandb_costs_its_time_limit_then_the_run_goes_on(silent_server, monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from mixkvq.runs.sinks import WandbSink

    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    logger = OmegaConf.create({"mode": "online", "project": "p", "entity": None, "group": None, "tags": [],
                               "init_timeout_s": 3})
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="W&B init failed"):
        sink = WandbSink(logger, "run", {}, tmp_path)
    sink.log_problem({"accuracy": 1.0})
    sink.finish()
    assert time.perf_counter() - start < 3 + 30  # the W&B service's own start-up included; unbounded it was 90 s


def test_a_malformed_calibration_file_is_named_with_its_line(data, shared_data):
    from mixkvq.calib.calibration import load_texts

    texts, source = load_texts({"fields": ["question"]}, str(shared_data / "gsm8k" / "train.jsonl"), 3, 0)
    assert len(texts) == 3 and source["documents"] == 3
    with pytest.raises(ConfigError, match=r"data_files: malformed JSON in .*malformed.jsonl line 2"):
        load_texts({"fields": ["question"]}, str(data["malformed.jsonl"]), 3, 0)
