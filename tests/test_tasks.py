"""Task loading: local shared data, gsm_symbolic generation, limits, and the errors bad configs raise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mixkvq.config import CONFIG_DIR
from mixkvq.errors import ConfigError
from mixkvq.eval.tasks import TASKS, Problem, load_task, task_config

REQUIRED_KEYS = {"name", "n_samples", "limit", "grader", "data_dir", "data_files", "hub"}

# task -> (row count, first id, first answer)
LOCAL = {
    "gsm8k": (1319, "gsm8k-0", "18"),
    "math500": (500, "test/precalculus/807.json", r"\left( 3, \frac{\pi}{2} \right)"),
    "aime24": (30, "60", "204"),
    "aime25": (30, "2025-I-1", "70"),
}


def _folder(shared_data: Path, task: str) -> Path:
    folder = shared_data / task
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    return folder


def test_every_task_has_a_config_with_the_common_keys():
    yamls = {p.stem for p in (CONFIG_DIR / "task").glob("*.yaml")}
    assert yamls == set(TASKS.names())
    for name in yamls:
        cfg = task_config(name)
        assert REQUIRED_KEYS <= set(cfg), name
        assert cfg.name == name and cfg.n_samples == 4 and cfg.limit is None


@pytest.mark.parametrize("task", sorted(LOCAL))
def test_loads_local_shared_data(task, shared_data: Path):
    count, first_id, first_answer = LOCAL[task]
    problems = load_task(task_config(task, data_dir=str(_folder(shared_data, task))))
    assert len(problems) == count
    assert (problems[0].id, problems[0].answer) == (first_id, first_answer)
    assert len({p.id for p in problems}) == count
    for p in problems:
        assert isinstance(p, Problem)
        assert all(isinstance(v, str) and v.strip() for v in (p.id, p.question, p.answer))


def test_gsm8k_gold_is_the_number_after_hashes_without_commas(shared_data: Path):
    problems = load_task(task_config("gsm8k", data_dir=str(_folder(shared_data, "gsm8k"))))
    assert all(p.answer.lstrip("-").isdigit() for p in problems)
    assert "####" not in problems[0].answer


def test_aime_answers_lose_leading_zeros(shared_data: Path):
    problems = {p.id: p.answer for p in load_task(task_config("aime24", data_dir=str(_folder(shared_data, "aime24"))))}
    assert problems["67"] == "25"  # "025" in the file
    assert all(a == str(int(a)) for a in problems.values())


def test_data_files_takes_precedence_over_data_dir(shared_data: Path):
    folder = _folder(shared_data, "gsm8k")
    problems = load_task(task_config("gsm8k", data_dir=str(folder), data_files=str(folder / "train.jsonl")))
    assert len(problems) == 7473
    assert problems[0].answer == "72"


def test_limit_takes_the_first_problems(shared_data: Path):
    folder = str(_folder(shared_data, "math500"))
    full = load_task(task_config("math500", data_dir=folder))
    assert load_task(task_config("math500", data_dir=folder, limit=5)) == full[:5]
    assert load_task(task_config("math500", data_dir=folder, limit=10_000)) == full


def test_plain_dict_config_is_accepted(shared_data: Path):
    cfg = OmegaConf.to_container(task_config("aime25", data_dir=str(_folder(shared_data, "aime25"))), resolve=True)
    assert len(load_task(cfg)) == 30


def test_hub_split_follows_split_also_inside_the_full_config():
    root = OmegaConf.create({"task": task_config("gsm8k", split="train")})
    assert root.task.hub.split == "train"
    assert task_config("math500").hub.split == "test"


def test_gsm_symbolic_is_deterministic_per_seed():
    a = load_task(task_config("gsm_symbolic", size=8, seed=1))
    assert load_task(task_config("gsm_symbolic", size=8, seed=1)) == a
    b = load_task(task_config("gsm_symbolic", size=8, seed=2))
    assert [p.question for p in a] != [p.question for p in b]
    assert [p.id for p in a] == [f"gsm_symbolic-1-{i}" for i in range(8)]
    assert all(p.answer.lstrip("-").isdigit() for p in a + b)
    assert task_config("gsm_symbolic").grader == "gsm"
    assert len(load_task(task_config("gsm_symbolic", size=5, limit=3))) == 3


# --- errors ---------------------------------------------------------------------------------------


def test_missing_file_names_path_and_option(tmp_path: Path):
    with pytest.raises(ConfigError, match="task.data_dir") as e:
        load_task(task_config("math500", data_dir=str(tmp_path / "nowhere")))
    assert str(tmp_path / "nowhere" / "test.jsonl") in str(e.value)
    with pytest.raises(ConfigError, match="task.data_files") as e:
        load_task(task_config("math500", data_files=str(tmp_path / "missing.jsonl")))
    assert "missing.jsonl" in str(e.value)


def test_malformed_line_names_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2", "unique_id": "a"}\n{"problem": "2+2", "answer": \n')
    with pytest.raises(ConfigError, match="malformed JSON") as e:
        load_task(task_config("math500", data_files=str(path)))
    assert f"{path} line 2" in str(e.value)


def test_missing_field_names_field_file_line_and_present_fields(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    rows = [{"problem": "1+1", "answer": "2", "unique_id": "a"}, {"question": "2+2", "answer": "4", "unique_id": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError) as e:
        load_task(task_config("aime24", data_files=str(path)))  # aime24 maps id -> 'id'
    assert "'id'" in str(e.value) and f"{path} line 1" in str(e.value) and "'unique_id'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_task(task_config("math500", data_files=str(path)))
    assert "'problem'" in str(e.value) and f"{path} line 2" in str(e.value) and "'question'" in str(e.value)


def test_gsm8k_row_without_hashes_is_a_config_error(tmp_path: Path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(ConfigError, match="####"):
        load_task(task_config("gsm8k", data_files=str(path)))


def test_unknown_task_lists_valid_names():
    with pytest.raises(ConfigError, match="'gsm9k'.*'gsm8k'"):
        load_task({**OmegaConf.to_container(task_config("gsm8k")), "name": "gsm9k"})
    with pytest.raises(ConfigError, match="'gsm9k'"):
        task_config("gsm9k")


@pytest.mark.parametrize(
    "override, bad",
    [
        ({"limit": 0}, "0"),
        ({"limit": "5"}, "'5'"),
        ({"n_samples": -1}, "-1"),
        ({"n_samples": 2.5}, "2.5"),
        ({"grader": "exact"}, "'exact'"),
        ({"size": 0}, "0"),
        ({"data_dir": "somewhere"}, "somewhere"),
    ],
)
def test_bad_values_raise_config_error_naming_them(override, bad):
    with pytest.raises(ConfigError) as e:
        load_task(task_config("gsm_symbolic", **override))
    assert bad in str(e.value)


def test_hub_failure_suggests_local_data(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match="HuggingFaceH4/MATH-500.*no network.*task.data_dir="):
        load_task(task_config("math500"))
