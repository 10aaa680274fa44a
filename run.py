"""Evaluate one KV-cache method on one model and task: `python run.py method=kivi model=... task=...`.

Sweeps: `python run.py -m method=bf16,kivi,mixkvq`. Every default lives in configs/.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from mixkvq.errors import ConfigError
from mixkvq.runs.interrupts import Interrupted, signals_interrupt


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> dict:
    with signals_interrupt():
        try:
            from mixkvq.eval.evaluate import evaluate  # heavy imports after Hydra has parsed the command line

            return evaluate(cfg)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Interrupted as e:
            print(f"interrupted: {e.detail}", file=sys.stderr)
            sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
