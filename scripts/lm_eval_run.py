"""lm-evaluation-harness generation tasks with one method's KV cache, configured like run.py.

    python scripts/lm_eval_run.py method=kivi lm_eval.tasks=[gsm8k_cot_zeroshot_local] lm_eval.limit=20
    python scripts/lm_eval_run.py -m method=bf16,kivi,mixkvq lm_eval.tasks=[aime24_local]

One run directory per task under results_dir (lm-eval's results and samples, the cache statistics, run.parquet),
resumed from lm-eval's request cache. Defaults: configs/lm_eval.yaml. Needs `pip install -e ".[lm-eval]"`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, run from anywhere

from mixkvq.errors import ConfigError  # noqa: E402


@hydra.main(config_path="../configs", config_name="lm_eval", version_base=None)
def main(cfg: DictConfig):
    try:
        from mixkvq.lmeval import run as lm_eval_run  # heavy imports after Hydra has parsed the command line
    except ModuleNotFoundError as e:
        print(f"error: {e.name} is missing; install the extra: pip install -e \".[lm-eval]\"", file=sys.stderr)
        sys.exit(2)
    try:
        return lm_eval_run.run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
