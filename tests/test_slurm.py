"""Sweeps on a real single-node Slurm (scripts/slurm-local.sh), and the failure cases of a sweep.

The cluster gets its own state folder and ports, so the tests never touch a cluster the user has up, and the
fixture stops exactly the daemons it started.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO / "scripts" / "slurm-local.sh"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")
SIZE = 3  # problems per job
QUICK = ["task.n_samples=1", "generation.max_new_tokens=8", "logger.mode=disabled", "progress=false",
         "grading_workers=0"]
SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=3", "hydra.launcher.timeout_min=15"]

pytestmark = pytest.mark.slow


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict:
    """Environment of a running single-node Slurm; brought down (and checked down) afterwards."""
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        pytest.skip(f"Slurm binaries absent ({', '.join(missing)}); install with `apt-get install slurm-wlm munge` "
                    f"(.ci/run does)")
    state = tmp_path_factory.mktemp("slurm")
    # A port per pytest-xdist worker (gw0, gw1, ...), so Slurms started by parallel workers never collide.
    port = 6917 + 10 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state), "SLURM_LOCAL_PORT": str(port), "SLURM_LOCAL_GPUS": "2",
           "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    try:
        up = subprocess.run([str(SLURM_LOCAL), "up"], env=env, capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, f"slurm-local.sh up failed:\n{up.stdout}\n{up.stderr}"
        assert f"export SLURM_CONF={state / 'slurm.conf'}" in up.stdout
        pids = {n: int((state / f"{n}.pid").read_text()) for n in ("munged", "slurmctld", "slurmd")}
        yield {**env, "SLURM_CONF": str(state / "slurm.conf")}
    finally:
        down = subprocess.run([str(SLURM_LOCAL), "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    for name, pid in pids.items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} ({pid}) still runs after slurm-local.sh down"


def sweep(env: dict, model: list[str], results: Path, sweep_dir: Path, background: bool = False):
    cmd = [sys.executable, "run.py", "-m", *SLURM, *model, "method=bf16,kivi", f"task.size={SIZE}", *QUICK,
           f"results_dir={results}", f"hydra.sweep.dir={sweep_dir}"]
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"sweep failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def job_logs(sweep_dir: Path) -> str:
    """What the Slurm jobs wrote (submitit keeps one log pair per job, named from the Slurm job id)."""
    logs = sorted((sweep_dir / ".submitit").glob("*/*_log.err"))
    assert len(logs) == 2, f"expected the logs of 2 Slurm jobs, found {logs}"
    return "\n".join(p.read_text() for p in logs)


def squeue(env: dict) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%A"], env=env, capture_output=True, text=True, check=True).stdout
    return out.split()


def job_pids(env: dict, jobs: list[str]) -> list[int]:
    pids = []
    for job in jobs:
        out = subprocess.run(["scontrol", "listpids", job], env=env, capture_output=True, text=True).stdout
        pids += [int(line.split()[0]) for line in out.splitlines()[1:] if line.split() and line.split()[0].isdigit()]
    return [p for p in pids if p != os.getpid()]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_sweep_killed_on_slurm_resumes_then_returns_at_once(slurm, tiny_run_model, tmp_path):
    results = tmp_path / "runs"
    # 1. Start a two-job sweep and kill every job (SIGKILL, as a lost node) once the first problem is written.
    first = sweep(slurm, tiny_run_model, results, tmp_path / "sweep1", background=True)
    written: dict[str, int] = {}
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None and not written:
        for f in results.glob("*/samples.parquet"):
            written[f.parent.name] = len(pd.read_parquet(f, columns=["problem_id"]))
        time.sleep(0.05)
    jobs = squeue(slurm)
    # SIGKILL the jobs' processes, as a crash would: a cancel sends SIGTERM first, which submitit ignores for
    # KillWait seconds (long enough to finish a tiny job).
    for pid in job_pids(slurm, jobs):
        os.kill(pid, signal.SIGKILL)
    subprocess.run(["scancel", *jobs], env=slurm, check=False)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert written and min(written.values()) < SIZE, f"could not kill the sweep midway (rows: {written})"
    for _ in range(100):
        if not squeue(slurm):
            break
        time.sleep(0.2)
    assert not squeue(slurm), "killed jobs are still queued"

    # 2. Re-run the same sweep: the killed jobs resume, and every problem ends up written exactly once.
    proc = sweep(slurm, tiny_run_model, results, tmp_path / "sweep2")
    runs = sorted(p for p in results.iterdir() if p.is_dir())
    assert [r.name.split("_")[0] for r in runs] == ["bf16-16", "kivi-KIVI-2"]
    for run in runs:
        samples = pd.read_parquet(run / "samples.parquet")
        assert len(samples) == SIZE and samples["problem_id"].nunique() == SIZE, run.name
        assert not samples.duplicated(["problem_id", "sample_index"]).any()
        row = pd.read_parquet(run / "run.parquet").iloc[0]
        assert row["n_problems"] == SIZE and row["model"] == "deepseek-r1-distill-7b" and row["task"] == "gsm_symbolic"
    logs = job_logs(tmp_path / "sweep2")
    assert re.search(rf"{SIZE} problems, [1-9] already done", logs), logs[-3000:]
    assert "pass@1" in proc.stdout and "bf16" in proc.stdout and "kivi" in proc.stdout  # the multirun summary

    # 3. Once more: both jobs find their finished results and return without writing anything.
    before = digest(results)
    sweep(slurm, tiny_run_model, results, tmp_path / "sweep3")
    assert job_logs(tmp_path / "sweep3").count("already finished") == 2
    assert digest(results) == before


def test_two_jobs_on_one_config_at_once_leave_one_result_set(tmp_path, tiny_run_model):
    cmd = [sys.executable, "run.py", *tiny_run_model, "task.size=1", *QUICK, f"results_dir={tmp_path}"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [(p.wait(timeout=400), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in outs)
    assert codes[0] == 0, outs
    if codes[1] != 0:  # the loser is refused with a clear message, never a traceback
        rc, _, err = max(outs, key=lambda o: o[0])
        assert rc == 2 and "another job is writing this run" in err and "Traceback" not in err, err[-2000:]
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    samples = pd.read_parquet(runs[0] / "samples.parquet")
    assert len(samples) == 1 and pd.read_parquet(runs[0] / "run.parquet")["n_problems"].iloc[0] == 1
    assert not list(runs[0].glob(".*.tmp"))


def model_configs(folder: Path, gpus: dict[str, int]) -> Path:
    """A config dir with copies of the default model that need these GPU counts (model.gpus)."""
    import yaml

    base = yaml.safe_load((REPO / "configs" / "model" / "smollm2-135m.yaml").read_text())
    (folder / "model").mkdir(parents=True, exist_ok=True)
    for name, n in gpus.items():
        (folder / "model" / f"{name}.yaml").write_text(yaml.safe_dump({**base, "name": name, "gpus": n}))
    return folder


def gpu_sweep(env, tmp_path, models: str, *extra: str, background: bool = False):
    configs = model_configs(tmp_path / "configs", {"smol-a": 2, "smol-b": 2, "smol-one": 1})
    cmd = [sys.executable, "run.py", "--config-dir", str(configs), "-m", *[a for a in SLURM if "gpus_per_node" not in a],
           f"model={models}", "method=bf16", "task.size=1", *QUICK, f"results_dir={tmp_path / 'runs'}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra]
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_each_job_asks_slurm_for_the_gpus_its_model_needs(slurm, tmp_path):
    # Both models need 2 GPUs while the sweep's own config (the default model) needs 1: the jobs' count must win.
    proc = gpu_sweep(slurm, tmp_path, "smol-a,smol-b", background=True)
    scripts: list[Path] = []
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(scripts) < 1:
        scripts = sorted((tmp_path / "sweep" / ".submitit").glob("*/*_submission.sh"))
        time.sleep(0.2)
    jobs = squeue(slurm)
    try:
        assert scripts, f"nothing submitted: {proc.poll()} {proc.stderr.read()[-3000:] if proc.poll() is not None else ''}"
        assert "#SBATCH --gpus-per-node=2" in scripts[0].read_text()
        shown = subprocess.run(["scontrol", "show", "job", *jobs[:1]], env=slurm, capture_output=True, text=True).stdout
        assert "gres:gpu:2" in shown, shown  # granted from the node's stand-in GPUs
    finally:
        subprocess.run(["scancel", *jobs], env=slurm, check=False)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_sweep_whose_models_need_different_gpu_counts_is_refused_naming_the_split(slurm, tmp_path):
    proc = gpu_sweep(slurm, tmp_path, "smol-a,smol-one")
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "1 GPU: smol-one; 2 GPUs: smol-a" in err and "`model=smol-one` and `model=smol-a`" in err, err[-3000:]
    assert not (tmp_path / "sweep" / ".submitit").exists() and not squeue(slurm)  # nothing was submitted
    # A count forced below a model's need: test_experiments.py's
    # `test_a_gpu_count_forced_on_the_command_line_below_a_models_need_is_refused`, in process.
