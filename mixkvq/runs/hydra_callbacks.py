"""Hydra callbacks: an experiment's jobs, checks and cost before launching (`python run.py +experiment=NAME`);
one summary table at the end of a multirun (`python run.py -m ...`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from mixkvq.errors import ConfigError
from mixkvq.eval import metrics
from mixkvq.eval.summary import format_summary
from mixkvq.runs import slurm_gpus
from mixkvq.runs.results import RUN_FILE, find_finished


def fill_agreement(rows: list[dict]) -> list[dict]:
    """Agreement with the bf16 run of the same config, for rows that ran before their bf16 twin."""
    reference = {r["twin_key"]: r for r in rows if r.get("method") == "bf16"}
    out = []
    for row in rows:
        ref = reference.get(row.get("twin_key"))
        if ref is not None and row.get("method") != "bf16" and row.get("agree_answer") is None:
            samples = pd.read_parquet(Path(row["run_dir"]) / "samples.parquet")
            row = {**row, **metrics.agreement(samples, pd.read_parquet(Path(ref["run_dir"]) / "samples.parquet"))}
        out.append(row)
    return out


def rows_of_sweep(sweep_dir: str | Path) -> list[dict]:
    """Run rows of a sweep's finished jobs, found from the job configs Hydra saved in the sweep folder.

    Launchers that run jobs in other processes (Slurm) call on_job_end there, not in the submitting process.
    """
    rows = []
    for saved in sorted(Path(sweep_dir).glob("*/.hydra/config.yaml"), key=lambda p: (len(p.parts[-3]), p)):
        cfg = OmegaConf.load(saved)
        run = find_finished(cfg.results_dir, cfg)
        if run is not None:
            rows.append(pd.read_parquet(run / RUN_FILE).iloc[0].to_dict())
    return rows


class MultirunSummary(Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, dict):
            self.rows.append(job_return.return_value)

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.rows:  # jobs ran elsewhere: read what they wrote
            self.rows = rows_of_sweep(config.hydra.sweep.dir)
        fidelity = [r for r in self.rows if r.get("kind") == "fidelity"]  # scripts/fidelity.py sweeps
        lm_eval = [r for r in self.rows if r.get("kind") == "lm_eval"]  # scripts/lm_eval_run.py: no samples.parquet
        evaluation = [r for r in self.rows if r.get("kind") not in ("fidelity", "lm_eval")]
        if evaluation:
            print("\n" + format_summary(fill_agreement(evaluation)))
        if lm_eval:
            print("\n" + format_summary(lm_eval))
        if fidelity:
            from mixkvq.eval.fidelity import format_table

            print("\n" + format_table(fidelity))


class ExperimentPlan(Callback):
    """Before a multirun that names an experiment: print its jobs and GPU-hours, refuse it (exit 2) if any job's
    config is wrong, and stop after printing when `experiment.dry_run=true`. Before any other multirun: every job
    through the run's own checks (model files, data, artifacts, run folders), the sweep refused (exit 2) if one
    fails, so a bad job never stops a sweep halfway."""

    def on_multirun_start(self, config, config_name=None, **kwargs) -> None:
        params = config.hydra.sweeper.get("params") or {}
        params = OmegaConf.to_container(params) if params else {}
        if "experiment" not in config:
            if (config_name or "config") != "config":  # scripts/fidelity.py sweeps check their own jobs
                return
            from mixkvq.runs.experiments import check_sweep

            errors = check_sweep(config_name or "config", params, list(config.hydra.overrides.task))
            if errors:
                print("error: sweep refused, no job started; fix these jobs first:", file=sys.stderr)
                for e in errors:
                    print(f"  {e}", file=sys.stderr)
                sys.exit(2)
            return
        from mixkvq.runs.experiments import format_plan, plan

        exp = config.experiment
        jobs, errors = plan(config_name or "config", params, list(config.hydra.overrides.task), config.cost)
        print(format_plan(exp.name, exp.title, jobs, config.cost), flush=True)
        if slurm_gpus.is_slurm(config):
            count, split = slurm_gpus.check([(j.model, j.gpus) for j in jobs], config.hydra.launcher.gpus_per_node,
                                            slurm_gpus.forced(config))
            errors += split
            if not split:
                asks = "no GPU (CPU nodes)" if count is None else f"{count} GPU{'s' * (count != 1)} per node"
                print(f"  Slurm: every job asks for {asks}", flush=True)
        if errors:
            print(f"error: experiment {exp.name} refused, nothing submitted; fix these jobs first:", file=sys.stderr)
            for e in errors:
                print(f"  {e}", file=sys.stderr)
            sys.exit(2)
        if exp.dry_run:
            print(f"dry run: nothing launched (drop experiment.dry_run=true to launch {len(jobs)} jobs)")
            sys.exit(0)


class SlurmGpus(Callback):
    """Before a Slurm sweep is submitted: every job asks for the GPUs its model needs (mixkvq/runs/slurm_gpus.py); a sweep
    whose models need different counts is refused (exit 2), naming the launches to split it into."""

    def on_multirun_start(self, config, config_name=None, **kwargs) -> None:
        if not slurm_gpus.is_slurm(config):
            return
        params = config.hydra.sweeper.get("params") or {}
        needs = slurm_gpus.job_needs(config_name or "config", OmegaConf.to_container(params) if params else {},
                                     list(config.hydra.overrides.task))
        try:
            slurm_gpus.assign(config, needs)
        except ConfigError as e:
            print(f"error: nothing submitted: {e}", file=sys.stderr)
            sys.exit(2)
