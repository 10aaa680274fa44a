"""Composing the Hydra config outside `run.py` (tests, notebooks, scripts) from the same files."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


def repo_path(path: str | Path) -> Path:
    """A repository-relative default (calibration artifacts) as an absolute path, whatever the current folder."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def per_model_settings(table, model: str | None) -> dict:
    """A method's per-model settings (its config's `per_model` table, keyed by model config name) for `model`: the
    `default` entry updated by the model's own; nothing without a model (no model config at hand)."""
    if model is None or not table:
        return {}
    return {**(table.get("default") or {}), **(table.get(model) or {})}


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides or []))
