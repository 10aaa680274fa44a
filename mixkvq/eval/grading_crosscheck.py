"""Our grading against lm-evaluation-harness's on the same responses: agreement, and why each disagreement occurs.

Every response of a run (samples.parquet) is graded by lm-eval's own task machinery, the filter pipeline and
metric of the project's offline copy of the matching upstream task (mixkvq/lm_eval_tasks), against the same gold,
and compared with the grade our run recorded. `scripts/grading_crosscheck.py` writes the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from lm_eval.tasks.aime.utils import last_boxed_only_string, remove_boxed, strip_string
from omegaconf import OmegaConf

from mixkvq.eval.grading import extract_boxed, grade_many
from mixkvq.runs.results import CONFIG_FILE, SAMPLES_FILE

TASKS_DIR = Path(__file__).resolve().parents[1] / "lm_eval_tasks"


@dataclass(frozen=True)
class Twin:
    """One lm-eval grading of a task of ours: an lm-eval task, one of its filters, and the doc it needs."""

    task: str
    filter: str
    doc: callable  # gold -> the lm-eval document carrying it

    @property
    def name(self) -> str:
        return f"{self.task}/{self.filter}"


def _gsm_doc(gold: str) -> dict:
    return {"question": "", "answer": f"#### {gold}"}  # GSM8K's answer field: the gold after '#### '


def _aime_doc(gold: str) -> dict:
    return {"problem": "", "answer": gold}


_GSM = [Twin("gsm8k_cot_zeroshot_local", "flexible-extract", _gsm_doc),
        Twin("gsm8k_cot_zeroshot_local", "strict-match", _gsm_doc),
        Twin("gsm8k_local", "strict-match", _gsm_doc)]
# Our task -> the lm-eval gradings of it. gsm_symbolic is GSM8K-style and graded like it on both sides.
TWINS: dict[str, list[Twin]] = {
    "gsm8k": _GSM, "gsm_symbolic": _GSM,
    "aime24": [Twin("aime24_local", "none", _aime_doc)], "aime25": [Twin("aime25_local", "none", _aime_doc)],
}


def lm_eval_grades(responses: list[str], golds: list[str], twin: Twin, task) -> pd.DataFrame:
    """(extracted, correct) of each response under lm-eval's filter pipeline and metric of `task` (twin.task)."""
    (ensemble,) = [f for f in task._filters if f.name == twin.filter]
    docs = [twin.doc(g) for g in golds]
    instances = [Instance("generate_until", doc, ("", {}), 0, (twin.task, i, 1), resps=[r])
                 for i, (doc, r) in enumerate(zip(docs, responses))]
    ensemble.apply(instances)
    filtered = [inst.filtered_resps[twin.filter] for inst in instances]
    correct = [bool(task.process_results(doc, [f])["exact_match"]) for doc, f in zip(docs, filtered)]
    extracted = [_aime_extracted(f) if twin.filter == "none" else f for f in filtered]
    return pd.DataFrame({"lm_extracted": extracted, "lm_correct": correct})


def _aime_extracted(response: str) -> str:
    """What upstream aime's process_results compares: the last \\boxed{} content, else the first-to-last $ span,
    else the whole response (it returns only the score; this repeats its extraction for the table)."""
    dollars = [i for i, c in enumerate(response) if c == "$"]
    answer = response if len(dollars) <= 1 else response[dollars[0] + 1: dollars[-1]]
    boxed = last_boxed_only_string(response)
    if boxed is not None:
        try:
            answer = remove_boxed(boxed)
        except (AssertionError, IndexError):
            pass
    return answer


def _numeric(s) -> float | None:
    """The value of a plain number, ignoring what lm-eval's GSM metric ignores (commas, '$', a trailing '.')."""
    if s is None or isinstance(s, float):
        return None
    m = re.fullmatch(r"-?\d*\.?\d+", str(s).replace(",", "").replace("$", "").strip().rstrip("."))
    return float(m.group(0)) if m else None


NO_ANSWER = "[invalid]"  # lm-eval's filters when nothing matches


def _same(ours, theirs) -> bool:
    """The two extractions name the same answer: both none, equal values, or equal after the MATH cleanup."""
    ours = None if ours is None or isinstance(ours, float) else str(ours)
    theirs = None if theirs in (None, NO_ANSWER) else str(theirs)
    if ours is None or theirs is None:
        return ours is None and theirs is None
    a, b = _numeric(ours), _numeric(theirs)
    if a is not None or b is not None:
        return a == b
    try:
        return strip_string(ours) == strip_string(theirs)
    except Exception:  # strip_string asserts on some malformed LaTeX
        return ours.strip() == theirs.strip()


def explain(row: pd.Series) -> str:
    """Why our grade or our extracted answer and lm-eval's differ on this response (the README's categories)."""
    ours, theirs = row["extracted"], row["lm_extracted"]
    ours = None if ours is None or isinstance(ours, float) else ours
    boxed = extract_boxed(row["response"])
    if row["filter"] == "strict-match":
        if theirs == NO_ANSWER:
            return "answer phrase missing: lm-eval's strict filter needs 'The answer is N.' (cot) or '#### N' (gsm8k)"
        return "first answer phrase: lm-eval takes the first 'The answer is N.', ours the last \\boxed{} or number"
    if row["filter"] == "none":  # aime: last \boxed{} else the $...$ span, then MATH string normalisation
        if boxed is None:
            return "no \\boxed{}: lm-eval compares the $...$ span or the whole text, ours has no answer"
        if _numeric(ours) is not None:
            return "number format: '023' or '23.' is 23 to us, a different string to lm-eval"
        return "markup in the box: Math-Verify reads \\textbf{(113) } as 113, lm-eval's string cleanup does not"
    # flexible-extract: the last number-like token of the whole text against ours (the last \boxed{}, else last number)
    if ours is None:
        return "ours finds no answer (an unclosed \\boxed{}), lm-eval the last number"
    if theirs == NO_ANSWER:
        return "lm-eval finds no number of two characters or more, ours a one-digit number"
    if boxed is not None:
        return "boxed vs last number: ours reads the \\boxed{} answer, lm-eval the last number after it"
    return "number format: the same last number read differently"


def run_samples(run: Path) -> tuple[str, str, pd.DataFrame]:
    """(label, task, samples) of one run directory; runs of one task share a label (the table's row)."""
    cfg = OmegaConf.load(run / CONFIG_FILE)
    samples = pd.read_parquet(run / SAMPLES_FILE)
    samples["run"] = run.name
    return f"{cfg.task.name} responses ({cfg.model.name})", cfg.task.name, samples


def reference_samples(task: str, data_file: Path, column: str,
                      limit: int | None = None) -> tuple[str, str, pd.DataFrame]:
    """A task's reference solutions (`column` of its JSONL) as responses, graded by our grader: correct answers
    written by people, where a grader's false negatives show (model runs on a small model are mostly wrong)."""
    import json

    from mixkvq.eval.tasks import load_task, task_config

    problems = load_task(task_config(task, data_files=str(data_file), limit=limit))
    texts = [json.loads(line)[column] for line in data_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    grader = task_config(task).grader
    grades = grade_many(texts[: len(problems)], [p.answer for p in problems], grader, workers=0)
    frame = pd.DataFrame({"problem_id": [p.id for p in problems], "sample_index": 0,
                          "gold": [p.answer for p in problems], "response": texts[: len(problems)],
                          "extracted": [g.extracted for g in grades], "correct": [g.correct for g in grades]})
    frame["run"] = str(data_file.name)
    return f"{task} reference {column}s", task, frame


def crosscheck(sources: list[tuple[str, str, pd.DataFrame]], manager: TaskManager | None = None) -> pd.DataFrame:
    """One row per (response, lm-eval grading): both extractions, both grades, and the reason when they differ.
    `sources` are (label, task, samples) from run_samples or reference_samples."""
    manager = manager or TaskManager(include_path=str(TASKS_DIR))
    names = sorted({twin.task for _, task, _ in sources for twin in TWINS.get(task, [])})
    tasks = manager.load(names)["tasks"] if names else {}
    frames = []
    for label, task, samples in sources:
        twins = TWINS.get(task)
        if twins is None:
            raise ValueError(f"{label}: task {task!r} has no lm-eval twin; known: {sorted(TWINS)}")
        for twin in twins:
            lm = lm_eval_grades(samples["response"].tolist(), samples["gold"].astype(str).tolist(), twin,
                                tasks[twin.task])
            frame = samples[["run", "problem_id", "sample_index", "gold", "response", "extracted", "correct"]]
            frame = pd.concat([frame.reset_index(drop=True), lm], axis=1)
            frame.insert(0, "source", label)
            frame.insert(1, "task", task)
            frame.insert(2, "grading", twin.name)
            frame["filter"] = twin.filter
            frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out["agree"] = out["correct"].astype(bool) == out["lm_correct"]
    out["same_answer"] = [_same(a, b) for a, b in zip(out["extracted"], out["lm_extracted"])]
    out["reason"] = [None if a and same else explain(r)
                     for a, same, (_, r) in zip(out["agree"], out["same_answer"], out.iterrows())]
    return out


def agreement_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (task, lm-eval grading): responses, accuracy under each, agreement, and disagreements by direction."""
    def one(g: pd.DataFrame) -> pd.Series:
        ours, theirs = g["correct"].astype(bool), g["lm_correct"]
        return pd.Series({
            "responses": len(g), "ours %": 100 * ours.mean(), "lm-eval %": 100 * theirs.mean(),
            "agree %": 100 * g["agree"].mean(), "same answer %": 100 * g["same_answer"].mean(),
            "ours only": int((ours & ~theirs).sum()),
            "lm-eval only": int((~ours & theirs).sum()),
        })

    return rows.groupby(["source", "grading"], sort=False).apply(one, include_groups=False).reset_index()
