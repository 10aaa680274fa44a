"""Run bookkeeping: run folders and their identity, sinks (parquet, W&B), provenance, experiments and sweeps on
Hydra and Slurm, interrupts."""
