"""Paper-table experiments: every job composed, checked and costed before launch; bad ones refused."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mixkvq.runs.experiments import expand, job_cost, plan

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def method_exists(name: str) -> bool:
    return (CONFIGS / "method" / f"{name}.yaml").exists()


def test_the_paper_experiments_are_there():
    assert {"mixkvq_table3", "pmkvq_table2", "kivi_gsm8k", "kvmix_bits", "matched_bits"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_job_of_an_experiment_is_costed_and_only_missing_methods_or_artifacts_refuse_it(name):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("config", overrides=[f"+experiment={name}"], return_hydra_config=True)
        params = OmegaConf.to_container(cfg.hydra.sweeper.params)
        jobs, errors = plan("config", params, [f"+experiment={name}"], cfg.cost)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.logger.group == name
    sizes = [len(str(v).split(",")) for v in params.values()]
    expected = 1
    for n in sizes:
        expected *= n
    assert len(jobs) == expected, "every job is costed, also those refused for a missing method"
    assert all(j.gpu_hours > 0 and j.problems > 0 for j in jobs)
    # A job is refused for a missing method config or a missing calibration artifact (made on the GPU for these
    # models, not committed), never for its settings.
    refused = [e for e in errors if "Could not find 'method/" not in e and "needs the calibration artifact" not in e]
    assert not refused, refused
    missing = sorted({m.strip() for m in str(params["method"]).split(",") if not method_exists(m.strip())})
    named = sorted(set(re.findall(r"Could not find 'method/([^']+)'", " ".join(errors))))
    assert named == missing, errors  # refused exactly for the methods this checkout lacks (pmkvq, kvmix...)


def test_cost_follows_the_cost_model():
    cost = OmegaConf.load(CONFIGS / "cost" / "h100.yaml")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("config", overrides=["model=deepseek-r1-distill-32b", "task=aime24", "task.n_samples=1",
                                           "storage=fake"])
    problems, samples, max_new, gpus, hours = job_cost(cfg, cost)
    assert (problems, samples, max_new, gpus) == (30, 1, 32768, 2)
    seconds = cost.job_overhead_s + 30 * 13000 / 10 * cost.storage_factor.fake
    assert hours == pytest.approx(2 * seconds / 3600)
    cfg.task.limit = 5
    assert job_cost(cfg, cost)[0] == 5


def test_expand_matches_hydra_basic_sweeper_with_command_line_winning():
    jobs = expand({"model": "a,b", "task": "x,y"}, ["task=z", "seed=1"])
    assert jobs == [["model=a", "task=z", "seed=1"], ["model=b", "task=z", "seed=1"]]


def test_run_py_prints_the_cost_and_launches_nothing_on_a_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "+experiment=mixkvq_table3", "experiment.dry_run=true",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"results_dir={tmp_path / 'runs'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"total: 27 jobs \(3 methods: bf16, kivi, mixkvq\), [0-9.]+ GPU-hours", proc.stdout), proc.stdout
    assert "deepseek-r1-distill-32b" in proc.stdout and "dry run: nothing launched" in proc.stdout
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "runs").exists()


BAD_EXPERIMENT = """# @package _global_
defaults:
  - /cost: h100
  - _self_
experiment: {name: bad, title: names a model and a task that do not exist, dry_run: false}
hydra:
  mode: MULTIRUN
  sweeper:
    params:
      model: smollm2-135m,no-such-model
      task: gsm_symbolic,no-such-task
      method: bf16
"""


def test_an_experiment_naming_a_missing_model_or_task_is_refused_before_submission(tmp_path):
    (tmp_path / "configs" / "experiment").mkdir(parents=True)
    (tmp_path / "configs" / "experiment" / "bad.yaml").write_text(BAD_EXPERIMENT)
    proc = subprocess.run([sys.executable, "run.py", "--config-dir", str(tmp_path / "configs"), "+experiment=bad",
                           "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                           f"results_dir={tmp_path / 'runs'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "SLURM_CONF": str(tmp_path / "no-cluster.conf")})
    err = proc.stderr
    assert proc.returncode == 2, (proc.stdout[-2000:], err[-3000:])
    assert "refused, nothing submitted" in err and "Traceback" not in err
    assert "model/no-such-model" in err and "deepseek-r1-distill-7b" in err  # the bad value and the valid ones
    assert "task/no-such-task" in err and "gsm8k" in err
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "runs").exists()  # no job folder, no result


def test_the_jobs_of_one_sweep_share_a_wandb_group(monkeypatch, tmp_path):
    import types

    from hydra.core.hydra_config import HydraConfig

    from mixkvq.runs.sinks import WandbSink, sweep_group

    assert sweep_group() is None  # a single run outside Hydra has none
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("config", overrides=["hydra.mode=MULTIRUN", "hydra.sweep.dir=results/hydra/multirun/d1/t1"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert sweep_group() == "sweep-d1-t1"
    finally:
        HydraConfig.instance().cfg = None
    seen = {}
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: seen.update(kw), Settings=dict))
    logger = OmegaConf.create({"mode": "offline", "project": "p", "entity": None, "group": None, "tags": []})
    WandbSink(logger, "run", {}, tmp_path, "sweep-d1-t1")
    assert seen["group"] == "sweep-d1-t1" and seen["dir"] == str(tmp_path)
    logger.group = "mixkvq_table3"  # an experiment's name wins
    WandbSink(logger, "run", {}, tmp_path, "sweep-d1-t1")
    assert seen["group"] == "mixkvq_table3"


def test_the_planner_reads_each_jobs_gpus_and_a_slurm_launch_is_split_by_gpu_count():
    from mixkvq.runs import slurm_gpus

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("config", overrides=["+experiment=mixkvq_table3"], return_hydra_config=True)
        params = OmegaConf.to_container(cfg.hydra.sweeper.params)
        jobs, _ = plan("config", params, ["+experiment=mixkvq_table3"], cfg.cost)
        needs = sorted({(j.model, j.gpus) for j in jobs})
        assert needs == [("deepseek-r1-distill-14b", 1), ("deepseek-r1-distill-32b", 2),
                         ("deepseek-r1-distill-llama-8b", 1)]
        assert slurm_gpus.job_needs("config", params, ["+experiment=mixkvq_table3", "model=deepseek-r1-distill-32b"]) \
            == [("deepseek-r1-distill-32b", 2)] * 9  # the command line's model replaces the experiment's list
    pairs = [(j.model, j.gpus) for j in jobs]
    count, errors = slurm_gpus.check(pairs, 1, is_forced=False)
    assert count is None and len(errors) == 1
    assert "1 GPU: deepseek-r1-distill-14b, deepseek-r1-distill-llama-8b; 2 GPUs: deepseek-r1-distill-32b" in errors[0]
    assert "`model=deepseek-r1-distill-14b,deepseek-r1-distill-llama-8b` and `model=deepseek-r1-distill-32b`" in errors[0]
    assert slurm_gpus.check([p for p in pairs if p[1] == 2], 1, is_forced=False) == (2, [])  # the models' count wins
    assert slurm_gpus.check(pairs, 2, is_forced=True) == (2, [])  # forced: enough for every model
    assert slurm_gpus.check(pairs, None, is_forced=True) == (None, [])  # null: CPU-only nodes
    count, errors = slurm_gpus.check(pairs, 1, is_forced=True)
    assert errors == ["hydra.launcher.gpus_per_node=1 is fewer than model.gpus=2 of deepseek-r1-distill-32b; ask for 2 "
                      "GPUs, or set model.gpus=1 too if the model fits"]


def test_a_gpu_count_forced_on_the_command_line_below_a_models_need_is_refused(monkeypatch):
    # The forced half of test_slurm's refusal test, in process: `hydra.launcher.gpus_per_node=N` on the command line
    # is the user's count, checked against every job's model.gpus (test_slurm runs the unforced split through run.py).
    from mixkvq.errors import ConfigError
    from mixkvq.runs import slurm_gpus

    monkeypatch.delenv(slurm_gpus.ENV, raising=False)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=1"],
                      return_hydra_config=True)
        needs = slurm_gpus.job_needs("config", {"model": "deepseek-r1-distill-32b,deepseek-r1-distill-14b"}, [])
    assert slurm_gpus.is_slurm(cfg) and slurm_gpus.forced(cfg)
    with pytest.raises(ConfigError, match="hydra.launcher.gpus_per_node=1 is fewer than model.gpus=2 of "
                                          "deepseek-r1-distill-32b; ask for 2 GPUs"):
        slurm_gpus.assign(cfg, needs)
