"""Grade our runs' responses with lm-evaluation-harness's metrics too, and explain every disagreement.

    python scripts/grading_crosscheck.py results/crosscheck/runs/* results/comparison/runs/* --out results/crosscheck \
        --reference gsm8k=../shared/data/gsm8k/test.jsonl:answer \
        --reference aime24=../shared/data/aime24/test.jsonl:solution

`--reference TASK=FILE:COLUMN` adds a task's reference solutions as responses (correct answers written by people).

Writes <out>/crosscheck.md (agreement per task and lm-eval grading, then every disagreement with its reason) and
<out>/crosscheck.parquet (one row per response and grading). Needs `pip install -e ".[lm-eval]"`; reads the
offline lm-eval tasks, so run it from the repository root.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, run from anywhere

EXAMPLES = 10  # disagreements listed per (source, grading, reason) in crosscheck.md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (config.yaml + samples.parquet)")
    p.add_argument("--reference", action="append", default=[], metavar="TASK=FILE:COLUMN",
                   help="a task's reference solutions as extra responses")
    p.add_argument("--reference-limit", type=int, default=None, help="first N reference solutions of each file")
    p.add_argument("--out", type=Path, required=True, help="folder for crosscheck.md and crosscheck.parquet")
    args = p.parse_args(argv)
    runs = [r for r in args.runs if (r / "samples.parquet").is_file()]
    missing = sorted(set(args.runs) - set(runs))
    if missing:
        p.error(f"no samples.parquet in {[str(m) for m in missing]}")

    references = []
    for spec in args.reference:
        task, _, rest = spec.partition("=")
        path, _, column = rest.rpartition(":")
        if not (task and path and column):
            p.error(f"--reference {spec!r} must read TASK=FILE:COLUMN")
        references.append((task, Path(path), column))

    from mixkvq.eval.grading_crosscheck import agreement_table, crosscheck, reference_samples, run_samples

    sources = [run_samples(r) for r in runs]
    sources += [reference_samples(t, path, c, args.reference_limit) for t, path, c in references]
    rows = crosscheck(sources)
    table = agreement_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(args.out / "crosscheck.parquet", index=False)
    wrong, differ = rows[~rows["agree"]], rows[rows["reason"].notna()]
    text = ["Sources: " + ", ".join(sorted(set(rows["source"]))), "",
            table.to_markdown(index=False, floatfmt=".1f"), "",
            "Grades or extracted answers that differ, by reason:", "",
            differ.groupby(["grading", "agree", "reason"]).size().rename("responses").reset_index()
            .to_markdown(index=False), "",
            (f"Every grade that differs ({len(wrong)}; up to {EXAMPLES} per source, grading and reason here, all "
             "of them in crosscheck.parquet):"), "",
            wrong.groupby(["source", "grading", "reason"], sort=False).head(EXAMPLES)[
                ["source", "run", "problem_id", "sample_index", "grading", "gold", "extracted", "correct",
                 "lm_extracted", "lm_correct", "reason"]].to_markdown(index=False)]
    (args.out / "crosscheck.md").write_text("\n".join(text) + "\n")
    print(table.to_markdown(index=False, floatfmt=".1f"))
    print(f"{len(wrong)} disagreements of {len(rows)}; details in {args.out / 'crosscheck.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
