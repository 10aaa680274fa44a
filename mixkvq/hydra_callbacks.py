"""Hydra callbacks: one summary table at the end of a multirun (`python run.py -m ...`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback

from mixkvq import metrics
from mixkvq.summary import format_summary


def fill_agreement(rows: list[dict]) -> list[dict]:
    """Agreement with the bf16 run of the same config, for rows that ran before their bf16 twin."""
    reference = {r["twin_key"]: r for r in rows if r.get("method") == "bf16"}
    out = []
    for row in rows:
        ref = reference.get(row.get("twin_key"))
        if ref is not None and row.get("method") != "bf16" and row.get("agree_answer") is None:
            samples = pd.read_parquet(Path(row["run_dir"]) / "samples.parquet")
            row = {**row, **metrics.agreement(samples, pd.read_parquet(Path(ref["run_dir"]) / "samples.parquet"))}
        out.append(row)
    return out


class MultirunSummary(Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, dict):
            self.rows.append(job_return.return_value)

    def on_multirun_end(self, config, **kwargs) -> None:
        if self.rows:
            print("\n" + format_summary(fill_agreement(self.rows)))
