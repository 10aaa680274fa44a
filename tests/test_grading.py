"""Answer extraction, equivalence and batch grading, including every gold answer of the real eval sets."""

from __future__ import annotations

import re
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from mixkvq.errors import ConfigError
from mixkvq.eval import grading
from mixkvq.eval.grading import GRADERS, Grade, extract_boxed, grade, grade_many, last_number
from mixkvq.eval.tasks import load_task, task_config

# --- extract_boxed ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),  # nested braces kept
        (r"\boxed{\left\{ 1, 2 \right\}}", r"\left\{ 1, 2 \right\}"),  # escaped braces are not delimiters
        (r"first \boxed{3}, then \boxed{x^{2}} wins", "x^{2}"),  # last box wins
        (r"\boxed{ 7 }", "7"),
        (r"\fbox{12}", "12"),
        (r"the answer is \boxed 42.", "42"),  # \boxed followed by a token
        (r"$\boxed 5$", "5"),
        (r"\boxed{9}. Recall: put it in \boxed{}", "9"),  # echoed empty box is skipped
        ("no box here, 17", None),
        (r"\boxedx{3}", None),  # not the \boxed macro
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text", [r"\boxed{\frac{1}{2}", r"\boxed{1} and finally \boxed{2", r"ends with \boxed"])
def test_extract_boxed_unbalanced_last_box_gives_none(text):
    # A truncated final answer is no answer; an earlier, intermediate box must not stand in for it.
    assert extract_boxed(text) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("It costs $1,234.50. Then 7 more, so 18.", "18"),
        ("Total: $1,234.50.", "1234.50"),
        ("1,2,3", "3"),  # list commas are not thousands separators
        ("She is down -5 dollars.", "-5"),
        ("no digits", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_gsm_grader_falls_back_to_last_number_math_grader_does_not():
    response = "She has 3 apples, then buys 15 more. The answer is 18."
    assert grade(response, "18", "gsm") == Grade("18", True)
    assert grade(response, "18", "math") == Grade(None, False)
    # A box always beats the fallback.
    assert grade(r"\boxed{17} although 18", "18", "gsm") == Grade("17", False)


# --- equivalence ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("25", "025"),
        ("1,000", "1000"),
        ("18.00", "18"),
        ("0.5", r"\frac{1}{2}"),
        (r"\dfrac{\pi}{2}", r"\frac{\pi}{2}"),
        ("(x+1)^2", "x^2+2x+1"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
    ],
)
def test_equivalent_answers_grade_correct(pred, gold):
    assert grade(rf"... \boxed{{{pred}}}", gold, "math").correct


@pytest.mark.parametrize(
    "pred, gold",
    [("24", "25"), ("0.51", r"\frac{1}{2}"), ("(x-1)^2", "x^2+2x+1"), (r"(3,\pi)", r"(3,\frac{\pi}{2})")],
)
def test_different_answers_grade_wrong(pred, gold):
    assert not grade(rf"... \boxed{{{pred}}}", gold, "math").correct


def test_grade_works_outside_the_main_thread():
    # Math-Verify's SIGALRM timeouts would raise in a thread; grading must still compare, not count wrong.
    out = []
    t = threading.Thread(target=lambda: out.append(grade(r"\boxed{0.5}", r"\frac{1}{2}", "math")))
    t.start()
    t.join()
    assert out == [Grade("0.5", True)]


def test_a_failing_comparison_counts_wrong_not_crash(monkeypatch):
    def boom(pred, gold):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(grading, "is_equivalent", boom)
    assert grade_many([r"\boxed{1}", "nothing"], ["1", "1"], "math", workers=0) == [
        Grade("1", False),
        Grade(None, False),
    ]


# --- grade_many -----------------------------------------------------------------------------------


def test_grade_many_in_workers_matches_serial():
    responses = [r"\boxed{0.5}", r"\boxed{3}", "answer 7", r"\boxed{\frac{1}{3}", r"\boxed{x^2}"]
    golds = [r"\frac{1}{2}", "4", "7", r"\frac{1}{3}", "x^{2}"]
    serial = grade_many(responses, golds, "gsm", workers=0)
    assert [g.correct for g in serial] == [True, False, True, False, True]
    assert grade_many(responses, golds, "gsm", workers=2) == serial


def test_grade_many_argument_errors():
    assert grade_many([], [], "math") == []
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        grade_many(["a", "b"], ["a"], "math")
    with pytest.raises(ConfigError, match="'nope'.*'gsm', 'math'"):
        grade_many(["a"], ["a"], "nope")
    with pytest.raises(ConfigError, match="-1"):
        grade_many(["a"], ["a"], "math", workers=-1)


def test_grader_registry_names():
    assert GRADERS.names() == ["gsm", "math"]


# --- every gold answer of the real eval sets ------------------------------------------------------

_INT_OR_DECIMAL = re.compile(r"-?\d+(\.\d+)?")


def _changed(gold: str) -> str:
    """A clearly different answer: gold+1 for numbers, else the gold expression plus one."""
    if _INT_OR_DECIMAL.fullmatch(gold):
        return str(Decimal(gold) + 1)
    return gold + "+1"


@pytest.mark.parametrize("task", ["gsm8k", "math500", "aime24", "aime25"])
def test_every_gold_grades_correct_and_every_changed_answer_wrong(task, shared_data: Path):
    folder = shared_data / task
    if not (folder / "test.jsonl").is_file():
        pytest.skip(f"{folder / 'test.jsonl'} is absent")
    cfg = task_config(task, data_dir=str(folder))
    golds = [p.answer for p in load_task(cfg)]
    changed = [_changed(g) for g in golds]
    responses = [rf"... so the answer is \boxed{{{a}}}." for a in golds + changed]
    grades = grade_many(responses, golds + golds, cfg.grader)

    right, wrong = grades[: len(golds)], grades[len(golds) :]
    assert [g.extracted for g in right] == golds
    not_right = [(gold, g) for gold, g in zip(golds, right) if not g.correct]
    assert not not_right, f"{len(not_right)} gold answers graded wrong, e.g. {not_right[:5]}"
    assert [g.extracted for g in wrong] == changed
    not_wrong = [(gold, c) for gold, c, g in zip(golds, changed, wrong) if g.correct]
    assert not not_wrong, f"{len(not_wrong)} changed answers graded correct, e.g. {not_wrong[:5]}"


@pytest.mark.parametrize("task", ["gsm8k", "math500", "aime24", "aime25"])
def test_math_verify_reads_every_gold(task, shared_data: Path):
    # The exact-match shortcut hides parse failures above; an unparseable gold would mark every
    # equivalent-but-differently-written answer wrong.
    folder = shared_data / task
    if not (folder / "test.jsonl").is_file():
        pytest.skip(f"{folder / 'test.jsonl'} is absent")
    golds = [p.answer for p in load_task(task_config(task, data_dir=str(folder)))]
    unread = [g for g in golds if not grading._math_verify(g, g)]
    assert not unread, f"Math-Verify cannot compare {len(unread)} golds with themselves, e.g. {unread[:5]}"
