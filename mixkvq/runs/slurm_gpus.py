"""GPUs each Slurm job asks for (`hydra/launcher=slurm`): what its model needs, `model.gpus`.

hydra-submitit-launcher submits a sweep as one job array with one `gpus_per_node`. So before anything is launched
(mixkvq.runs.hydra_callbacks.SlurmGpus) every job of the sweep is composed and its model's need read: when they agree,
that count goes into the launcher's config; a sweep whose models need different counts is refused, naming the
launches to split it into. `hydra.launcher.gpus_per_node=N` (or MIXKVQ_SLURM_GPUS) forces N for every job and is
refused below a model's need; null asks for no GPU (CPU-only nodes).
"""

from __future__ import annotations

import os
from collections import defaultdict

from omegaconf import DictConfig, read_write

from mixkvq.errors import ConfigError

KEY = "hydra.launcher.gpus_per_node"
ENV = "MIXKVQ_SLURM_GPUS"


def is_slurm(cfg: DictConfig) -> bool:
    return "SlurmLauncher" in str(cfg.hydra.launcher.get("_target_", ""))


def forced(cfg: DictConfig) -> bool:
    """Whether the user set the count (command line or environment) rather than leaving it to the models."""
    return ENV in os.environ or any(str(o).startswith(f"{KEY}=") for o in cfg.hydra.overrides.hydra)


def check(needs: list[tuple[str, int]], count: int | None, is_forced: bool) -> tuple[int | None, list[str]]:
    """(GPUs every job asks for, errors) for jobs needing `needs` [(model, model.gpus)] under the launcher's count."""
    by = defaultdict(set)
    for model, gpus in needs:
        by[int(gpus)].add(model)
    if is_forced:
        if count is None:
            return None, []  # CPU-only nodes: the models run on the CPU
        short = {g: sorted(ms) for g, ms in by.items() if g > count}
        return count, [f"{KEY}={count} is fewer than model.gpus={g} of {', '.join(ms)}; ask for {g} GPUs, or set "
                       f"model.gpus={count} too if the model fits" for g, ms in sorted(short.items())]
    if len(by) <= 1:
        return (next(iter(by)) if by else count), []
    groups = "; ".join(f"{g} GPU{'s' * (g > 1)}: {', '.join(sorted(ms))}" for g, ms in sorted(by.items()))
    launches = " and ".join(f"`model={','.join(sorted(ms))}`" for _, ms in sorted(by.items()))
    return None, [f"the models of this sweep need different GPU counts (model.gpus) and Slurm gets one per sweep "
                  f"({groups}); launch them apart with {launches}, the rest of the command unchanged, or force one "
                  f"count with {KEY}=N"]


def job_needs(config_name: str, sweeper_params: dict, task_overrides: list[str]) -> list[tuple[str, int]]:
    """(model, model.gpus) of every job of the sweep, composed as the jobs will be. A job that does not compose is
    left out here: the experiment plan, or the job itself, names what is wrong with it."""
    from mixkvq.runs.experiments import _compose, expand

    needs = []
    for overrides in expand(sweeper_params, task_overrides):
        try:
            cfg = _compose(config_name, overrides)
        except Exception:
            continue
        needs.append((cfg.model.name, int(cfg.model.gpus)))
    return needs


def assign(cfg: DictConfig, needs: list[tuple[str, int]]) -> None:
    """Write the sweep's GPU count into the launcher config, or raise ConfigError naming the split."""
    count, errors = check(needs, cfg.hydra.launcher.gpus_per_node, forced(cfg))
    if errors:
        raise ConfigError("; ".join(errors))
    with read_write(cfg.hydra.launcher):
        cfg.hydra.launcher.gpus_per_node = count
