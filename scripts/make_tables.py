"""Tables and plots from every run under a results folder, beside the papers' published numbers.

    python scripts/make_tables.py                                 # results_dir of configs/config.yaml
    python scripts/make_tables.py results/runs other/runs --out results/tables

Writes to --out: table.md / table.tex (method x task: pass@1 ± s.e., bits, memory), papers.md / papers.tex
(each reproduced paper table with our numbers beside it), pareto.png (accuracy vs storage bits),
memory_context.png (KV memory and throughput vs context) and vs_<paper table>.png. A damaged or unfinished
run is reported by name on stderr and left out; the rest is still aggregated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mixkvq import tables  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    default_results = OmegaConf.load(REPO / "configs" / "config.yaml").results_dir
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", default=[default_results], help="results folders (any depth)")
    ap.add_argument("--out", default="results/tables", help="output folder")
    ap.add_argument("--papers", default=str(REPO / "results" / "papers"), help="folder of the papers' CSVs")
    args = ap.parse_args(argv)

    collected = [tables.collect(r) for r in args.results]
    runs = pd.concat([c.runs for c in collected], ignore_index=True)
    samples = pd.concat([c.samples for c in collected], ignore_index=True)
    problems = [p for c in collected for p in c.problems]
    for path, why in problems:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if runs.empty:
        print(f"no finished runs under {', '.join(args.results)}", file=sys.stderr)
        return 1
    if "label" in runs:  # labels again over every folder, so two folders' settings stay apart
        runs["label"] = tables._labels(runs)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = tables.method_task_table(runs)
    md = tables.to_markdown(table)
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

    print(md)
    print(f"\n{len(runs)} runs, {len(problems)} skipped; wrote {', '.join(sorted(p.name for p in out.iterdir()))} "
          f"to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
