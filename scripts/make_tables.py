"""Tables and plots from every run under a results folder, beside the papers' published numbers.

    python scripts/make_tables.py                                 # results_dir of configs/config.yaml and fidelity.yaml
    python scripts/make_tables.py results/runs other/runs --out results/tables
    python scripts/make_tables.py results/fidelity/runs --out results/fidelity      # fidelity runs only

Writes to --out, from evaluation runs (run.py): table.md / table.tex (method x task: pass@1 ± s.e., bits, memory,
and the method's teacher-forced KL, top-1 and ΔNLL when fidelity runs are among the folders), papers.md /
papers.tex (each reproduced paper table with our numbers beside it), pareto.png (accuracy vs storage bits),
memory_context.png (KV memory and throughput vs context) and vs_<paper table>.png; from fidelity runs
(scripts/fidelity.py): fidelity.md / fidelity.tex / fidelity.json (KL, top-1, ΔNLL beside bits),
fidelity_pareto.png (KL and top-1 vs storage bits), fidelity_layers.png (per-layer attention error and K/V SQNR)
and fidelity_positions.png (KL by position in the reference). A damaged or unfinished run is reported by name on
stderr and left out; the rest is still aggregated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from mixkvq.eval import tables

REPO = tables.REPO


def default_results() -> list[str]:
    """The results folders of configs/, read from the repository root wherever the script runs."""
    evaluation = tables.repo_path(OmegaConf.load(REPO / "configs" / "config.yaml").results_dir)
    fidelity = tables.repo_path(OmegaConf.load(REPO / "configs" / "fidelity.yaml").results_dir)
    return [str(evaluation)] + ([str(fidelity)] if fidelity.is_dir() else [])


def write_fidelity(fidelity: pd.DataFrame, layers: pd.DataFrame, out: Path) -> str:
    table = tables.fidelity_table(fidelity)
    positions = tables.fidelity_positions(fidelity)
    md = (f"{tables.to_markdown(table)}\n\nMean KL by position in the reference (tokens):\n\n"
          f"{tables.to_markdown(positions)}\n")
    (out / "fidelity.md").write_text(md)
    (out / "fidelity.tex").write_text(tables.to_latex(table, "Teacher-forced fidelity against bf16: KL(bf16 "
                                                             "\\textbar\\textbar{} method), top-1, $\\Delta$NLL"))
    (out / "fidelity.json").write_text(json.dumps(tables.fidelity_rows(fidelity), indent=1) + "\n")
    tables.plot_fidelity_pareto(fidelity, out / "fidelity_pareto.png")
    tables.plot_fidelity_layers(fidelity, layers, out / "fidelity_layers.png")
    tables.plot_fidelity_positions(fidelity, out / "fidelity_positions.png")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", default=None, help="results folders (any depth)")
    ap.add_argument("--out", default="results/tables", help="output folder")
    ap.add_argument("--papers", default=str(REPO / "results" / "papers"), help="folder of the papers' CSVs")
    args = ap.parse_args(argv)
    args.results = args.results or default_results()

    collected = [tables.collect(r) for r in args.results]
    runs = pd.concat([c.runs for c in collected], ignore_index=True)
    samples = pd.concat([c.samples for c in collected], ignore_index=True)
    fidelity = pd.concat([c.fidelity for c in collected], ignore_index=True)
    layers = pd.concat([c.layers for c in collected], ignore_index=True)
    problems = [p for c in collected for p in c.problems]
    for path, why in problems:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if runs.empty and fidelity.empty:
        print(f"no finished runs under {', '.join(args.results)}", file=sys.stderr)
        return 1
    tables.relabel(runs, fidelity)  # labels again over every folder, so two folders' settings stay apart

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    printed = []
    if not runs.empty:
        table = tables.method_task_table(runs, fidelity)
        md = tables.to_markdown(table)
        printed.append(md)
        (out / "table.md").write_text(md + "\n")
        (out / "table.tex").write_text(tables.to_latex(table, "pass@1 (\\%) ± s.e. over problems, bits, memory"))

        papers = tables.load_papers(args.papers)
        md_parts, tex_parts = [], []
        for file, (title, _) in tables.PAPER_TABLES.items():
            comparison = tables.paper_comparison(runs, papers, file)
            md_parts.append(f"## {title}\n\n{tables.to_markdown(comparison)}\n")
            tex_parts.append(tables.to_latex(comparison, title))
            tables.plot_vs_papers(comparison, out / f"vs_{file}.png", title)
        (out / "papers.md").write_text("\n".join(md_parts))
        (out / "papers.tex").write_text("\n".join(tex_parts))
        tables.plot_pareto(runs, out / "pareto.png")
        tables.plot_memory_context(samples, runs, out / "memory_context.png")
    if not fidelity.empty:
        printed.append(write_fidelity(fidelity, layers, out))

    print("\n\n".join(printed))
    print(f"\n{len(runs)} runs, {len(problems)} skipped, {len(fidelity)} fidelity runs; wrote "
          f"{', '.join(sorted(p.name for p in out.iterdir()))} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
