"""Aggregation into tables and plots (mixkvq/eval/tables.py, scripts/make_tables.py) and the notebook that uses it.

tests/fixtures/results holds real runs of the default model (bf16, KIVI, MixKVQ on GSM-Symbolic and GSM8K; 2
problems x 2 samples, 32 new tokens), written by run.py; tests/fixtures/fidelity the run rows, layer tables and
configs of two committed fidelity runs (results/fidelity/runs: bf16 and KIVI-2, 20 GSM8K problems x 512 tokens).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mixkvq.eval import tables

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "results"
FIDELITY_FIXTURE = REPO / "tests" / "fixtures" / "fidelity"  # run rows and layer tables of results/fidelity/runs
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
    assert cell["paper"] == "40.00"  # the paper's MixKVQ C2.7 cell (results/papers/mixkvq_table3.csv), not BF16's
    other = comparison[(comparison["model"] == "R1-Qwen-14B")]
    assert (other["ours"] == "-").all()  # not run: no number invented
    # a second AIME24 run with another seed is its own entry, never pooled with the first
    configs = [json.dumps({"seed": 0, "task.name": t}) for t in ("aime24", "aime25")] + [json.dumps({"seed": 1, "task.name": "aime24"})]
    more = pd.concat([runs, runs.iloc[:1].assign(pass1=0.9)], ignore_index=True).assign(result_config=configs)
    comparison = tables.paper_comparison(more, tables.load_papers(PAPERS), "mixkvq_table3")
    cell = comparison[(comparison["model"] == "R1-Llama-8B") & (comparison["method"] == "MixKVQ")
                      & (comparison["dataset"] == "AIME24-25")].iloc[0]
    assert cell["our run"] == "mixkvq-C2.7 (seed=0)" and cell["ours"].startswith("40.0")  # seed=1 lacks AIME25


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
    # relative, as the README writes it: read from the repository root although the kernel runs in notebooks/
    os.environ["MIXKVQ_RESULTS"] = str(FIXTURE.relative_to(REPO))
    os.environ["MIXKVQ_TABLES_OUT"] = str(tmp_path)
    os.environ["MIXKVQ_FIDELITY"] = str(FIDELITY_FIXTURE)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        del os.environ["MIXKVQ_RESULTS"], os.environ["MIXKVQ_TABLES_OUT"], os.environ["MIXKVQ_FIDELITY"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    assert "every run readable" in text and "smollm2-135m" in text and "PM-KVQ Table 2" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2 + 3 + len(tables.PAPER_TABLES)
    assert (tmp_path / "pareto.png").read_bytes()[:8] == PNG
    assert "2 fidelity runs readable" in text and "KL (tf)" in text and "KL p95" in text
    assert (tmp_path / "fidelity_pareto.png").read_bytes()[:8] == PNG



def test_fidelity_runs_are_kept_apart_and_reported_beside_bits():
    c = tables.collect(FIDELITY_FIXTURE)
    assert c.runs.empty and c.problems == [] and set(c.fidelity["method"]) == {"bf16", "kivi"}
    assert set(c.layers["run_name"]) == set(c.fidelity["run_name"]) and len(c.layers) == 30 * len(c.fidelity)
    rows = tables.fidelity_rows(c.fidelity)
    for r in rows:
        assert set(tables.FIDELITY_JSON_KEYS) <= set(r) and r["n_tokens"] >= 512 * r["n_problems"] * 0.5
    bf16 = next(r for r in rows if r["method"].startswith("bf16"))
    kivi = next(r for r in rows if r["method"].startswith("kivi"))
    assert bf16["storage_bits"] == 16 and kivi["storage_bits"] < 16 and kivi["kl_mean"] > 10 * bf16["kl_mean"]
    table = tables.fidelity_table(c.fidelity)
    cell = table[table["method"] == kivi["method"]].iloc[0]
    assert cell["KL mean"] == f"{kivi['kl_mean']:.4f}" and cell["top-1 %"] == f"{100 * kivi['top1']:.1f}"
    positions = tables.fidelity_positions(c.fidelity)
    assert list(positions.columns[:4]) == ["reference", "method", "0-64", "64-128"]


def test_the_method_table_joins_fidelity_by_method_setting(tmp_path):
    # An evaluation run and a fidelity run of the same method setting share a label; a setting without a
    # fidelity run shows '-'.
    c = tables.collect(FIXTURE)
    fid = tables.collect(FIDELITY_FIXTURE).fidelity
    runs = c.runs.copy()
    key = dict(zip(fid["method"], fid["method_key"]))
    runs["method_key"] = [key.get(m, k) for m, k in zip(runs["method"], runs["method_key"])]
    tables.relabel(runs, fid)
    table = tables.method_task_table(runs, fid)
    kivi = fid[fid["method"] == "kivi"].iloc[0]
    row = table[table["method"] == kivi["label"]].iloc[0]
    assert row["KL (tf)"] == f"{kivi['kl_mean']:.4f}" and row["ΔNLL (tf)"] == f"{kivi['dnll']:+.4f}"
    assert (table[table["method"].str.startswith("mixkvq")]["KL (tf)"] == "-").all()


def test_make_tables_writes_the_fidelity_files_from_fidelity_runs_alone(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "scripts/make_tables.py", str(FIDELITY_FIXTURE), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 runs, 0 skipped, 2 fidelity runs" in proc.stderr and not (out / "table.md").exists()
    rows = json.loads((out / "fidelity.json").read_text())
    assert {r["method"].split("-")[0] for r in rows} == {"bf16", "kivi"}
    assert "KL mean" in (out / "fidelity.md").read_text() and "KL mean" in proc.stdout
    for name in ("fidelity_pareto.png", "fidelity_layers.png", "fidelity_positions.png"):
        assert (out / name).read_bytes()[:8] == PNG, name


def test_runs_of_one_method_with_other_settings_stay_apart(tmp_path):
    """Two KIVI runs of one task with another seed and size are two rows, each with its own numbers."""
    src = FIXTURE / "kivi-KIVI-2_smollm2-135m_gsm_symbolic_packed_d0f8bfbd"
    other = tmp_path / "kivi-KIVI-2_smollm2-135m_gsm_symbolic_packed_0000beef"
    shutil.copytree(src, tmp_path / src.name)
    shutil.copytree(src, other)
    text = (other / "config.yaml").read_text()
    (other / "config.yaml").write_text(re.sub(r"(?m)^seed: 0$", "seed: 1", text).replace("  size: 2\n", "  size: 4\n"))
    row = pd.read_parquet(other / "run.parquet")
    row["pass1"], row["storage_bits_mean"] = 0.75, 3.0
    row.to_parquet(other / "run.parquet")
    table = tables.method_task_table(tables.collect(tmp_path).runs).set_index("setting")
    assert sorted(table.index) == ["seed=0 task.size=2", "seed=1 task.size=4"]
    assert table.loc["seed=1 task.size=4", "gsm_symbolic"].startswith("75.0")
    assert table.loc["seed=1 task.size=4", "storage bits"] == "3.00"
    assert table.loc["seed=0 task.size=2", "storage bits"] != "3.00"
    # one run per cell: no setting column
    assert "setting" not in tables.method_task_table(tables.collect(FIXTURE).runs)
