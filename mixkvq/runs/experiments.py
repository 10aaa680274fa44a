"""Paper-table experiments (`python run.py +experiment=NAME`): expand the sweep, check every job, estimate cost.

Runs in the submitting process before anything is launched (mixkvq.runs.hydra_callbacks.ExperimentPlan): every job's
config is composed and checked like a run checks itself (methods against the registry, tasks, kernels, decoding),
so an experiment naming a model, task or method that does not exist is refused before a job is submitted.
The cost is a rough model from configs/cost/ (decode rate per model, mean response length per task), printed as
jobs and GPU-hours; it is never a result.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from omegaconf import DictConfig

from mixkvq.errors import ConfigError


@dataclass
class Job:
    overrides: list[str]
    model: str
    task: str
    method: str
    problems: int
    samples: int
    max_new_tokens: int
    gpus: int
    gpu_hours: float


def expand(sweeper_params: dict, task_overrides: list[str]) -> list[list[str]]:
    """The job override lists, exactly as Hydra's basic sweeper builds them (experiment params, then the
    command line, a later value of a key replacing an earlier one)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = [f"{k}={v}" for k, v in (sweeper_params or {}).items()] + list(task_overrides)
    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)[0]


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose

    return compose(config_name=config_name, overrides=overrides)


def job_cost(cfg: DictConfig, cost: DictConfig) -> tuple[int, int, int, int, float]:
    """(problems, samples, max_new_tokens, gpus, GPU-hours) of one job under the cost model."""
    models, tasks = cost.models, cost.tasks
    if cfg.model.name not in models:
        raise ConfigError(f"model {cfg.model.name!r} has no decode rate in the cost model; add it to "
                          f"configs/cost/{cost.name}.yaml (known: {sorted(models)})")
    if cfg.task.name not in tasks:
        raise ConfigError(f"task {cfg.task.name!r} has no entry in the cost model; add it to "
                          f"configs/cost/{cost.name}.yaml (known: {sorted(tasks)})")
    m, t = models[cfg.model.name], tasks[cfg.task.name]
    total = cfg.task.get("size") or t.problems
    problems = min(cfg.task.limit, total) if cfg.task.get("limit") else total
    samples = int(cfg.task.n_samples)
    max_new = cfg.generation.max_new_tokens or cfg.model.max_new_tokens
    # n samples decode as one batch, which ends with its longest sample.
    longest = min(max_new, t.mean_new_tokens * (cost.longest_of_batch if samples > 1 else 1.0))
    seconds = cost.job_overhead_s + problems * longest / m.steps_per_s * cost.storage_factor[cfg.storage]
    gpus = int(cfg.model.gpus)
    return problems, samples, max_new, gpus, gpus * seconds / 3600


def _short(e: Exception) -> str:
    """Hydra's missing-config message on one line, without the search path (it names machine folders)."""
    text = str(e).strip()
    head, _, rest = text.partition("Available options in")
    if not rest:
        return " ".join(text.split("Config search path")[0].split())
    group, _, names = rest.split("Config search path")[0].partition(":")
    return f"{' '.join(head.split())}; valid choices in {group.strip()}: {', '.join(names.split())}"


def plan(config_name: str, sweeper_params: dict, task_overrides: list[str], cost: DictConfig):
    """Every job of the experiment with its cost, and the errors that refuse it (empty: it may launch).

    A job whose method does not exist is still costed (with the reference method in its place), so the
    estimate covers the whole experiment while it is refused."""
    from mixkvq.eval.preflight import check_artifacts, check_static
    from mixkvq.eval.tasks import TASKS

    jobs, errors = [], defaultdict(int)
    for overrides in expand(sweeper_params, task_overrides):
        label = _method_label(overrides)
        try:
            try:
                cfg = _compose(config_name, overrides)
            except Exception as e:  # a missing model/task/method config: Hydra names the valid options
                errors[_short(e)] += 1
                if "'method/" not in str(e):
                    continue
                cfg = _compose(config_name, [o for o in overrides if not o.startswith("method=")] + ["method=bf16"])
            else:
                if cfg.task.name not in TASKS:
                    raise ConfigError(f"unknown task {cfg.task.name!r}; valid choices: {TASKS.names()}")
                check_static(cfg)
                try:
                    check_artifacts(cfg)
                except ConfigError as e:  # refused, and still costed
                    errors[str(e)] += 1
            jobs.append(Job(overrides, cfg.model.name, cfg.task.name, label, *job_cost(cfg, cost)))
        except ConfigError as e:
            errors[str(e)] += 1
    return jobs, [f"{msg} ({n} job{'s' * (n > 1)})" for msg, n in errors.items()]


def check_sweep(config_name: str, sweeper_params: dict, task_overrides: list[str]) -> list[str]:
    """Every job of a `-m` sweep through the run's own preflight, before the first starts; one line per bad job."""
    from mixkvq.eval.preflight import preflight

    errors = []
    for n, overrides in enumerate(expand(sweeper_params, task_overrides)):
        try:
            preflight(_compose(config_name, overrides))
        except ConfigError as e:
            errors.append(f"job {n} ({' '.join(overrides)}): {e}")
        except Exception as e:  # a missing model/task/method config: Hydra names the valid options
            errors.append(f"job {n} ({' '.join(overrides)}): {_short(e)}")
    return errors


def _method_label(overrides: list[str]) -> str:
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("method=")]
    return chosen[-1] if chosen else "(default)"


def format_plan(name: str, title: str, jobs: list[Job], cost: DictConfig) -> str:
    by = defaultdict(list)
    for j in jobs:
        by[(j.model, j.task)].append(j)
    lines = [f"experiment {name}: {title}",
             f"  {'model':30s} {'task':13s} {'jobs':>4s} {'problems':>8s} {'samples':>7s} {'max_new':>7s} "
             f"{'GPUs':>4s} {'GPU-h':>8s}"]
    for (model, task), js in by.items():
        j = js[0]
        lines.append(f"  {model:30s} {task:13s} {len(js):4d} {j.problems:8d} {j.samples:7d} {j.max_new_tokens:7d} "
                     f"{j.gpus:4d} {sum(x.gpu_hours for x in js):8.1f}")
    total = sum(j.gpu_hours for j in jobs)
    methods = sorted({j.method for j in jobs})
    lines.append(f"  total: {len(jobs)} jobs ({len(methods)} methods: {', '.join(methods)}), "
                 f"{total:.1f} GPU-hours on {cost.gpu} (estimate from configs/cost/{cost.name}.yaml: "
                 f"{math.ceil(total / max(1, len(jobs)) * 60)} GPU-min per job on average)")
    return "\n".join(lines)
