"""Aggregation into tables and plots (mixkvq/tables.py, scripts/make_tables.py) and the notebook that uses it.

tests/fixtures/results holds real runs of the default model (bf16, KIVI, MixKVQ on GSM-Symbolic and GSM8K; 2
problems x 2 samples, 32 new tokens), written by run.py.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mixkvq import tables

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "results"
PAPERS = REPO / "results" / "papers"
PNG = b"\x89PNG\r\n\x1a\n"


def test_collect_reads_every_fixture_run_and_the_table_matches_run_rows():
    c = tables.collect(FIXTURE)
    assert c.problems == []
    assert set(c.runs["method"]) == {"bf16", "kivi", "mixkvq"} and set(c.runs["task"]) == {"gsm_symbolic", "gsm8k"}
    table = tables.method_task_table(c.runs)
    assert len(table) == 3 and list(table.columns[:3]) == ["model", "method", "storage"]
    assert set(table.columns[3:5]) == {"gsm_symbolic", "gsm8k"}
    kivi = c.runs[(c.runs["method"] == "kivi") & (c.runs["task"] == "gsm8k")].iloc[0]
    row = table[table["method"] == kivi["label"]].iloc[0]
    assert row["gsm8k"] == f"{100 * kivi['pass1']:.1f} ± {100 * kivi['pass1_se']:.1f}"
    stored = c.runs[c.runs["label"] == kivi["label"]]["storage_bits_mean"].mean()
    assert row["storage bits"] == f"{stored:.2f}" and float(row["storage bits"]) < 16
    assert len(c.samples) == sum(c.runs["n_problems"] * c.runs["n_samples"])
    md, tex = tables.to_markdown(table), tables.to_latex(table, "caption")
    assert md.count("\n") == 4 and "gsm\\_symbolic" in tex and r"$\pm$" in tex and r"\caption{caption}" in tex


def test_pareto_front():
    pts = [(16, 50.0), (2.5, 40.0), (3, 38.0), (4, 45.0), (2, 10.0), (4, 44.0)]
    assert tables.pareto_front(pts) == [(2, 10.0), (2.5, 40.0), (4, 45.0), (16, 50.0)]


def test_paper_cells_get_our_matching_runs_with_aime_pooled():
    runs = pd.DataFrame([
        {"model": "deepseek-r1-distill-llama-8b", "task": t, "method": "mixkvq", "label": "mixkvq-C2.7",
         "pass1": p, "pass1_se": 0.1, "n_problems": 30, "n_samples": 1}
        for t, p in (("aime24", 0.5), ("aime25", 0.3))])
    comparison = tables.paper_comparison(runs, tables.load_papers(PAPERS), "mixkvq_table3")
    cell = comparison[(comparison["model"] == "R1-Llama-8B") & (comparison["method"] == "MixKVQ")
                      & (comparison["dataset"] == "AIME24-25")].iloc[0]
    se = (2 * (0.1 * 30) ** 2) ** 0.5 / 60
    assert cell["ours"] == f"40.0 ± {100 * se:.1f}" and cell["n"] == "60x1" and cell["our run"] == "mixkvq-C2.7"
    assert cell["paper"] == "41.67" or re.fullmatch(r"\d+\.\d+", cell["paper"])
    other = comparison[(comparison["model"] == "R1-Qwen-14B")]
    assert (other["ours"] == "-").all()  # not run: no number invented


def test_paper_csvs_are_complete_copies():
    """Row counts as results/papers/README.md lists them; every row as wide as its header."""
    listed = dict(re.findall(r"^\| `(\w+)\.csv` \| (\d+) \|", (PAPERS / "README.md").read_text(), re.M))
    assert len(listed) == 24
    for stem, n in listed.items():
        with open(PAPERS / f"{stem}.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert len(rows) - 1 == int(n), stem
        assert {len(r) for r in rows} == {len(rows[0])}, stem


def test_make_tables_reports_a_truncated_parquet_by_name_and_aggregates_the_rest(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    runs = sorted(p for p in results.iterdir() if p.is_dir())
    damaged = runs[0] / "samples.parquet"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    broken_row = runs[1] / "run.parquet"
    broken_row.write_bytes(broken_row.read_bytes()[:100])
    unfinished = runs[2] / "run.parquet"
    unfinished.unlink()
    out = tmp_path / "tables"
    proc = subprocess.run([sys.executable, "scripts/make_tables.py", str(results), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped {damaged}: unreadable parquet" in proc.stderr
    assert f"skipped {broken_row}: unreadable parquet" in proc.stderr
    assert f"skipped {runs[2]}: unfinished run" in proc.stderr
    assert f"{len(runs) - 3} runs, 3 skipped" in proc.stderr
    for name in ("table.md", "table.tex", "papers.md", "papers.tex"):
        assert (out / name).stat().st_size > 0, name
    for name in ("pareto.png", "memory_context.png", "vs_mixkvq_table3.png", "vs_pmkvq_table2.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    table = (out / "table.md").read_text()
    assert "smollm2-135m" in table and table == proc.stdout.split("\n\n")[0].strip() + "\n"
    assert "MixKVQ Table 3" in (out / "papers.md").read_text()


def test_the_paper_tables_notebook_runs_headless(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "notebooks" / "paper_tables.ipynb", as_version=4)
    os.environ["MIXKVQ_RESULTS"], os.environ["MIXKVQ_TABLES_OUT"] = str(FIXTURE), str(tmp_path)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        del os.environ["MIXKVQ_RESULTS"], os.environ["MIXKVQ_TABLES_OUT"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "every run readable" in text and "smollm2-135m" in text and "PM-KVQ Table 2" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2 + len(tables.PAPER_TABLES)
    assert (tmp_path / "pareto.png").read_bytes()[:8] == PNG
