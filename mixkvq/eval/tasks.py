"""Evaluation tasks: each turns its `task` config node (configs/task/<name>.yaml) into a list of Problems.

Tabular tasks read a local JSONL file (`data_files`, or `<data_dir>/<split>.jsonl`) or, by default, the
Hugging Face hub (`hub`); `fields` maps their columns onto Problem. gsm_symbolic is generated offline.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from mixkvq.config import CONFIG_DIR
from mixkvq.errors import ConfigError
from mixkvq.eval.grading import GRADERS
from mixkvq.registry import Registry
from mixkvq.runs.interrupts import TimeLimit, time_limit


@dataclass(frozen=True)
class Problem:
    id: str  # stable and unique within the task
    question: str
    answer: str  # gold final answer
    solution: str | None = None  # the source's answer field as written (GSM8K: the worked solution)


Loader = Callable[[DictConfig], list[Problem]]
TASKS: Registry[Loader] = Registry("task")


def task_config(name: str, **overrides: Any) -> DictConfig:
    """The task's YAML defaults with `overrides` merged on top (what Hydra gives as cfg.task)."""
    TASKS.get(name)  # unknown names fail here, listing the valid ones
    base = OmegaConf.load(CONFIG_DIR / "task" / f"{name}.yaml")
    return OmegaConf.merge(base, OmegaConf.create(overrides))


def load_task(cfg: DictConfig | Mapping[str, Any], hub_timeout_s: float | None = None) -> list[Problem]:
    """Problems of the task `cfg` describes (the `task` config node, or a complete plain dict). Reading them from
    the hub takes at most `hub_timeout_s` seconds."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    loader = TASKS.get(_get(cfg, "name"))
    GRADERS.get(_get(cfg, "grader"))  # a bad grader should fail before any generation, not after
    _positive_int(cfg, "n_samples")
    limit = _positive_int(cfg, "limit", nullable=True)
    from_hub = all(cfg.get(k) is None for k in ("data_files", "data_dir")) and cfg.get("hub") is not None
    try:
        with time_limit(hub_timeout_s if from_hub else None, f"the hub (task {cfg.name!r})"):
            problems = loader(cfg)
    except TimeLimit as e:
        raise ConfigError(f"{e}; offline, use a local copy: task.data_dir=<folder with {cfg.get('split')}.jsonl> "
                          f"or task.data_files=<file.jsonl>") from None
    if not problems:
        raise ConfigError(f"task {cfg.name!r} has no problems: its data ({_source(cfg)}) is empty")
    return problems if limit is None else problems[:limit]


def _source(cfg: DictConfig) -> str:
    return next((f"task.{k}={cfg.get(k)!r}" for k in ("data_files", "data_dir") if cfg.get(k) is not None), "the hub")


# --- config checks ------------------------------------------------------------------------------


def _get(cfg: DictConfig, key: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"task config {cfg.get('name', '?')!r} has no key 'task.{key}'; see configs/task/")
    return cfg[key]


def _positive_int(cfg: DictConfig, key: str, nullable: bool = False) -> int | None:
    value = _get(cfg, key)
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive int or null" if nullable else "a positive int"
        raise ConfigError(f"task.{key} must be {allowed}, got {value!r}")
    return value


def _answer(raw: Any) -> str:
    """Gold as a string; pure-integer answers lose leading zeros (AIME writes 25 as "025")."""
    s = str(raw).strip()
    return str(int(s)) if re.fullmatch(r"\d+", s) else s


# --- tabular tasks (local JSONL or hub) ---------------------------------------------------------

Row = tuple[str, dict]  # (where it came from, for error messages; the row)


def read_jsonl(path: Path, option: str) -> list[Row]:
    """(where, row) of every non-empty line; a malformed line is a ConfigError naming `option`, file and line."""
    if path.is_dir():
        raise ConfigError(f"{option}={str(path)!r} is a folder; name a .jsonl file in it")
    if not path.is_file():
        raise ConfigError(f"{option}: data file {str(path)!r} does not exist")
    rows: list[Row] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{option}: malformed JSON in {where}: {e.msg}") from e
            if not isinstance(row, dict):
                raise ConfigError(f"{option}: {where} is not a JSON object")
            rows.append((where, row))
    return rows


def _read_hub(cfg: DictConfig) -> list[Row]:
    hub = _get(cfg, "hub")
    if hub is None:
        raise ConfigError(f"task {cfg.name!r} has no hub source; set task.data_dir or task.data_files")
    source = f"hub dataset {hub.path!r} (name={hub.name!r}, split={hub.split!r})"
    try:
        import datasets

        ds = datasets.load_dataset(hub.path, hub.name, split=hub.split)
    except Exception as e:
        raise ConfigError(
            f"could not load {source}: {type(e).__name__}: {e}. Offline, use a local copy: "
            f"task.data_dir=<folder with {cfg.get('split', '<split>')}.jsonl> or task.data_files=<file.jsonl>"
        ) from e
    return [(f"{source} row {i}", dict(row)) for i, row in enumerate(ds)]


def _read_rows(cfg: DictConfig) -> list[Row]:
    if _get(cfg, "data_files") is not None:
        return read_jsonl(Path(str(cfg.data_files)).expanduser(), "task.data_files")
    if _get(cfg, "data_dir") is not None:
        path = Path(str(cfg.data_dir)).expanduser() / f"{_get(cfg, 'split')}.jsonl"
        return read_jsonl(path, "task.data_dir")
    return _read_hub(cfg)


def _field(row: dict, where: str, role: str, column: str) -> Any:
    if column not in row:
        raise ConfigError(
            f"task.fields.{role}={column!r}: no field {column!r} in {where}; fields present: {sorted(row)}"
        )
    return row[column]


def _problems(cfg: DictConfig, rows: Iterable[Row], gold: Callable[[Any], str]) -> list[Problem]:
    fields = _get(cfg, "fields")
    for role in ("question", "answer"):
        if fields.get(role) is None:
            raise ConfigError(f"task.fields.{role} must name a column of the {cfg.name!r} data, got None")
    problems = []
    for index, (where, row) in enumerate(rows):
        # Without an id column, the row index in the source file is the stable id.
        id_col = fields.get("id")
        pid = f"{cfg.name}-{index}" if id_col is None else str(_field(row, where, "id", id_col))
        question = str(_field(row, where, "question", fields.question))
        raw = _field(row, where, "answer", fields.answer)
        try:
            answer = gold(raw)
        except ValueError as e:
            raise ConfigError(f"task {cfg.name!r}: bad gold answer in {where}: {e}") from e
        problems.append(Problem(pid, question, answer, str(raw)))
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"task {cfg.name!r}: problem id {dup!r} occurs more than once")
    return problems


def _gsm8k_gold(raw: Any) -> str:
    """GSM8K's answer field is a worked solution whose last line is '#### <number>'."""
    head, sep, tail = str(raw).rpartition("#### ")
    if not sep:
        raise ValueError(f"no '#### ' line in answer {str(raw)[-80:]!r}")
    return _answer(tail.replace(",", ""))


def _tabular(gold: Callable[[Any], str] = _answer) -> Loader:
    return lambda cfg: _problems(cfg, _read_rows(cfg), gold)


TASKS.register("gsm8k")(_tabular(_gsm8k_gold))
TASKS.register("math500")(_tabular())
TASKS.register("aime24")(_tabular())
TASKS.register("aime25")(_tabular())


# --- generated tasks ----------------------------------------------------------------------------


@TASKS.register("gsm_symbolic")
def _gsm_symbolic(cfg: DictConfig) -> list[Problem]:
    for key in ("data_dir", "data_files", "hub"):
        if cfg.get(key) is not None:
            raise ConfigError(f"task.{key}={cfg[key]!r}: gsm_symbolic is generated (task.size, task.seed), not read")
    size = _positive_int(cfg, "size")
    seed = _get(cfg, "seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"task.seed must be an int, got {seed!r}")
    import reasoning_gym  # slow import; only this task needs it

    entries = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
    return [
        Problem(f"gsm_symbolic-{seed}-{i}", entry["question"], _answer(entry["answer"]))
        for i, entry in enumerate(entries)
    ]
