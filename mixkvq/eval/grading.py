"""Answer extraction and grading: last \\boxed{} (optionally a GSM last-number fallback), then Math-Verify.

Math-Verify bounds its sympy work with SIGALRM, which only works in a process's main thread, so batch
grading runs in worker processes (`grade_many`), where each task does run in the main thread.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import re
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from fractions import Fraction
from itertools import repeat
from typing import Callable, Sequence

from mixkvq.errors import ConfigError
from mixkvq.registry import Registry

log = logging.getLogger(__name__)

# Seconds Math-Verify may spend parsing or comparing one answer (its own default).
MATH_VERIFY_TIMEOUT_S = 5
# Cap on default worker processes: each imports sympy, and batches here are a few thousand at most.
MAX_DEFAULT_WORKERS = 8
# Items per worker below which another worker is not worth its start-up (about a second of imports).
ITEMS_PER_WORKER = 64


@dataclass(frozen=True)
class Grade:
    extracted: str | None  # the final answer read from the response; None when there is none
    correct: bool


# --- extraction ---------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_TOKEN = re.compile(r"[^\s$]+")


def _box_content(text: str, start: int) -> str | None:
    """Argument of the \\boxed that ends at `start`: a brace group, or one token after a space."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        j = i
        while j < len(text):
            c = text[j]
            if c == "\\":  # \{ \} \\ are literal, never group delimiters
                j += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
            j += 1
        return None  # braces never close: the response was cut off inside the answer
    if i > start and i < len(text):  # "\boxed 42"
        token = _TOKEN.match(text, i)
        return token.group(0).rstrip(".") if token else None
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (brace-matched, nested braces kept), or None.

    The last box decides: if it is unbalanced (a truncated response) the answer is None rather than an
    earlier, intermediate box. Empty boxes are skipped because models echo the instruction's "\\boxed{}".
    """
    for m in reversed(list(_BOX.finditer(text))):
        content = _box_content(text, m.end())
        if content is None:
            return None
        if content.strip():
            return content.strip()
    return None


# Thousands groups must be exact so that "1,2,3" reads as three numbers, not 123.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> str | None:
    """GSM-style fallback: the last number in the text, commas stripped (a trailing period is never part of it)."""
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


Extractor = Callable[[str], str | None]
GRADERS: Registry[Extractor] = Registry("grader")


@GRADERS.register("math")
def _extract_math(response: str) -> str | None:
    return extract_boxed(response)


@GRADERS.register("gsm")
def _extract_gsm(response: str) -> str | None:
    boxed = extract_boxed(response)
    return boxed if boxed is not None else last_number(response)


# --- comparison ---------------------------------------------------------------------------------

_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _plain_number(s: str) -> Fraction | None:
    s = s.strip().strip("$").strip()
    return Fraction(s.replace(",", "")) if _PLAIN_NUMBER.fullmatch(s) else None


def _cheap_match(pred: str, gold: str) -> bool:
    """Identical strings or equal plain numbers ("025" = "25", "1,000" = "1000.0"): no sympy needed."""
    if pred.strip() == gold.strip():
        return True
    a, b = _plain_number(pred), _plain_number(gold)
    return a is not None and a == b


def _math_verify(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    # SIGALRM timeouts raise outside the main thread; there, run without them rather than fail.
    in_main = threading.current_thread() is threading.main_thread()
    timeout = MATH_VERIFY_TIMEOUT_S if in_main else None
    # Both sides wrapped the same way, so Math-Verify reads them as the boxed answers they were.
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))  # gold first: verify is asymmetric


def is_equivalent(pred: str, gold: str) -> bool:
    return _cheap_match(pred, gold) or _math_verify(pred, gold)


def grade(response: str, gold: str, grader: str) -> Grade:
    extracted = GRADERS.get(grader)(response)
    if extracted is None:
        return Grade(None, False)
    try:
        return Grade(extracted, is_equivalent(extracted, gold))
    except Exception as e:  # one odd answer must not sink a whole run
        log.warning("grading %r against %r failed (%s: %s); counted wrong", extracted, gold, type(e).__name__, e)
        return Grade(extracted, False)


def _grade_safely(response: str, gold: str, grader: str) -> Grade:
    try:
        return grade(response, gold, grader)
    except Exception as e:
        log.warning("grading failed (%s: %s); counted wrong", type(e).__name__, e)
        return Grade(None, False)


def _n_workers(workers: int | None, n_items: int) -> int:
    if workers is None:
        workers = min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS, math.ceil(n_items / ITEMS_PER_WORKER))
    elif isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"grading workers must be an int >= 0 (0 = grade in this process), got {workers!r}")
    return min(workers, n_items)


def _exit_with_parent() -> None:
    """A worker ends when the run that started it ends, even by SIGKILL: waiting on the parent's sentinel."""
    mp.parent_process().join()
    os._exit(0)


def _warm_worker() -> None:
    # Ctrl-C reaches the whole process group: the run stops its workers itself, without their tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    import math_verify  # noqa: F401  (pay the sympy import once per worker, not inside the first item)


# The evaluation loop grades one problem's few samples at a time; reusing the pool across calls saves
# the worker start-up (about a second) per problem.
_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _get_pool(n_workers: int) -> ProcessPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n_workers:
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=True)
            # Never 'fork': the parent may hold threads (tokenizers, CUDA) a forked child would inherit broken.
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            _pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_warm_worker)
            _pool_size = n_workers
        return _pool


def _drop_pool(terminate: bool = False) -> None:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is not None:
            workers = list((_pool._processes or {}).values())  # no public handle on the workers
            _pool.shutdown(wait=False, cancel_futures=True)
            for p in workers if terminate else ():
                p.terminate()
        _pool, _pool_size = None, 0


def stop_workers() -> None:
    """End the grading workers now (an interrupted run): no answer is waited for."""
    _drop_pool(terminate=True)


def grade_many(
    responses: Sequence[str], golds: Sequence[str], grader: str, workers: int | None = None
) -> list[Grade]:
    """Grade response i against gold i in worker processes (workers=0: serially, in this process).

    None picks one worker per ITEMS_PER_WORKER items, up to the CPU count and MAX_DEFAULT_WORKERS. The
    pool is kept for later calls; a pool that breaks (a worker killed, say) is rebuilt once.
    """
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
    GRADERS.get(grader)  # an unknown grader is a config error, not a column of wrong answers
    if not responses:
        return []
    n_workers = _n_workers(workers, len(responses))
    if n_workers == 0:
        return [_grade_safely(r, g, grader) for r, g in zip(responses, golds)]
    chunksize = max(1, math.ceil(len(responses) / (4 * n_workers)))

    def run() -> list[Grade]:
        pool = _get_pool(n_workers)
        try:
            return list(pool.map(_grade_safely, responses, golds, repeat(grader), chunksize=chunksize))
        except BrokenProcessPool:
            _drop_pool()
            raise

    try:
        return run()
    except BrokenProcessPool:
        log.warning("grading worker pool broke (a worker died); retrying once with a fresh pool")
        return run()
