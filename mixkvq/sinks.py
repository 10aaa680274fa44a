"""Weights & Biases as an optional sink. The parquet files are the source of truth, so W&B failures
only warn: a flaky network or a missing package never costs a run."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from mixkvq.errors import choice_error

MODES = ("auto", "online", "offline", "disabled")


def resolve_mode(mode: str) -> str:
    """`auto` is offline unless WANDB_API_KEY is set: nothing leaves the machine without a key."""
    if mode not in MODES:
        raise choice_error("logger.mode", mode, MODES)
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def sweep_group() -> str | None:
    """The W&B group of a multirun job: one per sweep (its output folder), so every job of a sweep shows
    together. `logger.group` (set by each experiment to its name) takes precedence; a single run has none."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not under Hydra (tests, notebooks)
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return "sweep-" + "-".join(Path(hc.sweep.dir).parts[-2:])  # results/hydra/multirun/<day>/<time>


class WandbSink:
    def __init__(self, cfg_logger, run_name: str, config_dict: dict, run_dir: str | os.PathLike,
                 default_group: str | None = None):
        self.mode = resolve_mode(cfg_logger.mode)
        self._run = None
        self._warned = False
        if self.mode == "disabled":
            return  # imports nothing
        try:
            import wandb

            self._run = wandb.init(
                project=cfg_logger.project,
                entity=cfg_logger.entity,
                group=cfg_logger.group or default_group,
                tags=list(cfg_logger.tags),
                name=run_name,
                config=config_dict,
                dir=str(Path(run_dir)),  # the offline directory lives inside the run directory
                mode=self.mode,
                # bounded: an unreachable W&B costs this long, then the run goes on without it
                settings=wandb.Settings(init_timeout=float(cfg_logger.get("init_timeout_s") or 90)),
            )
        except Exception as e:
            self._warn("init", e)
            self._run = None

    def _warn(self, what: str, e: Exception) -> None:
        if not self._warned:
            warnings.warn(f"W&B {what} failed, results are still written to parquet: {e!r}", stacklevel=3)
            self._warned = True

    def log_problem(self, metrics: dict) -> None:
        if self._run is None:
            return
        try:
            self._run.log(metrics)
        except Exception as e:
            self._warn("log", e)

    def log_summary(self, row: dict) -> None:
        if self._run is None:
            return
        try:
            self._run.summary.update(row)
        except Exception as e:
            self._warn("summary", e)

    def finish(self) -> None:
        if self._run is None:
            return
        try:
            self._run.finish()
        except Exception as e:
            self._warn("finish", e)
        self._run = None
