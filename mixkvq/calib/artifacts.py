"""Calibration artifacts: one folder per (model, method) holding what `scripts/calibrate.py` measured.

    <calibration_dir>/<model name>/<method>/artifact.json   payload + model shape + data hash + timing
    <calibration_dir>/<model name>/<method>/config.yaml     the resolved calibration config that made it

Methods load them when a run starts (PM-KVQ sensitivities and key scales, KVmix layer scores, MixKVQ searched
thresholds). A missing artifact names the command that makes it; one made for another model is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from mixkvq.config import repo_path
from mixkvq.errors import ConfigError

ARTIFACT = "artifact.json"
CONFIG = "config.yaml"


def artifact_dir(calibration_dir: str | os.PathLike, model_name: str, method: str) -> Path:
    """A relative calibration_dir is relative to the repository, where the shipped artifacts live."""
    return repo_path(calibration_dir) / model_name / method


def shape_dict(shape) -> dict:
    return {"layers": shape.layers, "kv_heads": shape.kv_heads, "q_heads": shape.q_heads, "head_dim": shape.head_dim}


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_artifact(folder: Path, *, method: str, model: str, shape, payload: dict, data: dict, config_yaml: str,
                  seconds: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"method": method, "model": model, "shape": shape_dict(shape), "data": data,
              "calibration_seconds": seconds, "payload": payload}
    _atomic_text(folder / CONFIG, config_yaml)
    _atomic_text(folder / ARTIFACT, json.dumps(record, indent=1))
    return folder / ARTIFACT


def model_name(model_cfg) -> str | None:
    if model_cfg is None:
        return None
    return model_cfg.get("name") if hasattr(model_cfg, "get") else getattr(model_cfg, "name", None)


def load_artifact(method: str, calibration_dir: str, explicit: str | None, model_cfg, shape=None) -> dict:
    """The payload of the artifact for this model and method; ConfigError if it is missing, damaged or made
    elsewhere. Without `shape` (no model config at hand: an experiment's plan) the shape is not compared."""
    name = model_name(model_cfg)
    if explicit is not None:
        folder = Path(explicit)
    elif name is not None:
        folder = artifact_dir(calibration_dir, name, method)
    else:
        raise ConfigError(f"{method} needs a calibration artifact: set method.artifact to its folder")
    file = folder / ARTIFACT
    make = f"`python scripts/calibrate.py method={method} model={name or '<model>'}`"
    if not file.is_file():
        raise ConfigError(
            f"{method} needs the calibration artifact {file}, which does not exist; make it with {make} "
            f"(or point method.artifact / method.calibration_dir at an existing one)"
        )
    try:
        record = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"calibration artifact {file} is unreadable ({e}); make it again with {make}") from None
    if not isinstance(record, dict) or "payload" not in record:
        raise ConfigError(f"calibration artifact {file} has no payload; make it again with {make}")
    if record.get("method") != method:
        raise ConfigError(f"{file} was made for method {record.get('method')!r}, not {method!r}")
    if name is not None and record.get("model") != name:
        raise ConfigError(f"calibration artifact {file} was made for model {record.get('model')!r}, but this run "
                          f"uses model {name!r}; calibrate this model with "
                          f"`python scripts/calibrate.py method={method} model={name}`")
    want = shape_dict(shape) if shape is not None else record.get("shape")
    if record.get("shape") != want:
        raise ConfigError(f"calibration artifact {file} was made for a model of shape {record.get('shape')}, but "
                          f"model {name!r} here has shape {want}; recalibrate it")
    return record["payload"]
