"""Offline calibration, Hydra-configured like run.py; writes the artifact a run of the method then loads.

Each method that calibrates registers its calibrator in its own module (mixkvq/calib/calibration.py: the registry and
the tooling calibrators share); this script builds the method, runs its calibrator and writes the artifact.

    python scripts/calibrate.py method=pmkvq model=deepseek-r1-distill-7b     # sensitivity, IP, key scales
    python scripts/calibrate.py method=kvmix                                   # gradient-norm layer scores
    python scripts/calibrate.py method=mixkvq                                  # Optuna τ search
    python scripts/calibrate.py method=kvmix data_files=../shared/data/gsm8k/train.jsonl   # local text

Artifacts: <method.calibration_dir>/<model>/<method>/{artifact.json, config.yaml}, with the data hash.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mixkvq.errors import ConfigError


def calibrate(cfg: DictConfig, loaded=None) -> Path:
    """Calibrate cfg.method on cfg.model (or on an already `loaded` model, as tests do) and write the artifact."""
    import torch

    from mixkvq.calib.artifacts import artifact_dir, save_artifact
    from mixkvq.calib.calibration import calibrator
    from mixkvq.eval.models import load_model
    from mixkvq.kv.methods import ModelShape, build_method, method_config

    name = cfg.method.name
    calibrate_method = calibrator(name)  # registered in the method's own module
    method_config(cfg.method)
    loaded = loaded or load_model(cfg.model)
    if loaded.device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    shape = ModelShape.of(loaded.model)
    # Build the method without the artifact this run is about to make (only its settings are needed).
    method = build_method(cfg, shape, method=OmegaConf.merge(cfg.method, calibrate_method.without_artifact(shape)))
    start = time.perf_counter()
    payload, data = calibrate_method.run(cfg, loaded, method)
    seconds = time.perf_counter() - start
    folder = Path(cfg.out_dir) if cfg.out_dir else artifact_dir(cfg.method.calibration_dir, cfg.model.name, name)
    path = save_artifact(folder, method=name, model=cfg.model.name, shape=shape, payload=payload, data=data,
                         config_yaml=OmegaConf.to_yaml(cfg, resolve=True), seconds=seconds)
    print(f"{name} calibration of {cfg.model.name}: {seconds:.1f} s on {loaded.device}; data sha256 "
          f"{data['sha256'][:12]}; wrote {path}")
    return path


@hydra.main(config_path="../configs", config_name="calibrate", version_base=None)
def main(cfg: DictConfig):
    try:
        return calibrate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
