"""Hydra callbacks: an experiment's jobs, checks and cost before launching (`python run.py +experiment=NAME`);
one summary table at the end of a multirun (`python run.py -m ...`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from mixkvq import metrics
from mixkvq.results import RUN_FILE, find_finished
from mixkvq.summary import format_summary


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
            from mixkvq.fidelity import format_table

            print("\n" + format_table(fidelity))


class ExperimentPlan(Callback):
    """Before a multirun that names an experiment: print its jobs and GPU-hours, refuse it (exit 2) if any job's
    config is wrong, and stop after printing when `experiment.dry_run=true`."""

    def on_multirun_start(self, config, config_name=None, **kwargs) -> None:
        if "experiment" not in config:
            return
        from mixkvq.experiments import format_plan, plan

        exp = config.experiment
        params = config.hydra.sweeper.get("params") or {}
        jobs, errors = plan(config_name or "config", OmegaConf.to_container(params) if params else {},
                            list(config.hydra.overrides.task), config.cost)
        print(format_plan(exp.name, exp.title, jobs, config.cost), flush=True)
        if errors:
            print(f"error: experiment {exp.name} refused, nothing submitted; fix these jobs first:", file=sys.stderr)
            for e in errors:
                print(f"  {e}", file=sys.stderr)
            sys.exit(2)
        if exp.dry_run:
            print(f"dry run: nothing launched (drop experiment.dry_run=true to launch {len(jobs)} jobs)")
            sys.exit(0)
