"""Weights & Biases as an optional sink. The parquet files are the source of truth, so W&B failures
only warn: a flaky network or a missing package never costs a run."""

from __future__ import annotations

import hashlib
import netrc
import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

from mixkvq.errors import choice_error

MODES = ("auto", "online", "offline", "disabled")
ENV_MODES = {"online": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}
# The per-sample table: the end of each response (where the answer is) beside what was graded.
TABLE_COLUMNS = ("problem_id", "sample_index", "response_tail", "extracted", "gold", "correct", "n_tokens",
                 "truncated", "storage_bits_mean")
RESPONSE_TAIL = 400  # characters


def _has_credentials() -> bool:
    """A key in the environment or saved by `wandb login` (a .netrc entry for the W&B host), read without
    importing wandb or touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """`auto` follows WANDB_MODE when set, else goes online with credentials (WANDB_API_KEY or `wandb login`)
    and offline without: nothing leaves the machine without a key."""
    if mode not in MODES:
        raise choice_error("logger.mode", mode, MODES)
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if env in ENV_MODES:
            return ENV_MODES[env]
        return "online" if _has_credentials() else "offline"
    return mode


def run_id(run_dir: str | os.PathLike) -> str:
    """One W&B run per run folder: a requeued or restarted job resumes its W&B run instead of opening another."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def run_tags(config: dict, extra) -> list[str]:
    """method, model, task and storage of the run, then the configured tags (filters in the W&B UI)."""
    found = [(config.get(k) or {}).get("name") for k in ("method", "model", "task")] + [config.get("storage")]
    return list(dict.fromkeys(str(t) for t in [*found, *extra] if t))


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
                 default_group: str | None = None, job_type: str = "evaluate"):
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
                tags=run_tags(config_dict, cfg_logger.tags),
                job_type=job_type,
                name=run_name,
                id=run_id(run_dir),
                resume="allow",
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

    def log_samples(self, samples, key: str = "samples") -> None:
        """Every sample of the run (resumed problems included) as one wandb.Table."""
        if self._run is None or samples is None or len(samples) == 0:
            return
        try:
            import wandb

            df = samples.assign(response_tail=samples["response"].astype(str).str[-RESPONSE_TAIL:])
            cols = [c for c in TABLE_COLUMNS if c in df]
            rows = [[None if v != v else v for v in r] for r in df[cols].itertuples(index=False)]  # NaN -> None
            self._run.log({key: wandb.Table(columns=cols, data=rows)})
        except Exception as e:
            self._warn("table", e)

    def log_files(self, name: str, files, kind: str = "run-results") -> None:
        """The result files as one artifact, so a W&B run links to the data its numbers came from."""
        if self._run is None:
            return
        try:
            import wandb

            artifact = wandb.Artifact(name=name, type=kind)
            for f in files:
                if Path(f).is_file():
                    artifact.add_file(str(f), policy="immutable")  # referenced in place: no copy in W&B's staging
            self._run.log_artifact(artifact)
        except Exception as e:
            self._warn("artifact", e)

    def finish(self) -> None:
        if self._run is None:
            return
        try:
            self._run.finish()
        except Exception as e:
            self._warn("finish", e)
        self._run = None
