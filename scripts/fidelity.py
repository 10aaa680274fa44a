"""Teacher-forced fidelity of a KV-cache method against the unmodified bf16 model, configured like run.py.

    python scripts/fidelity.py method=kivi task=gsm8k task.data_files=../shared/data/gsm8k/test.jsonl task.limit=20
    python scripts/fidelity.py -m method=bf16,kivi,kivi4,mixkvq,pmkvq,kvmix ...   # one table at the end

Each run writes <results_dir>/<run name>/ (config.yaml, samples.parquet: one row per problem with per-token
KL, top-1 and NLLs; layers.parquet: per-layer attention error and SQNR; run.parquet: the summary row) and resumes
like an evaluation run. Defaults: configs/fidelity.yaml. Tables and plots: scripts/make_tables.py.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from mixkvq.errors import ConfigError


@hydra.main(config_path="../configs", config_name="fidelity", version_base=None)
def main(cfg: DictConfig) -> dict:
    from mixkvq.eval import fidelity  # heavy imports after Hydra has parsed the command line

    try:
        return fidelity.run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
