"""Run directories: atomic writes, resume, locking, names; plus the sinks and the printed summary."""

import json
import os
import sys
import types

import pytest
from omegaconf import OmegaConf

from mixkvq.errors import ConfigError
from mixkvq.eval.summary import format_summary
from mixkvq.runs import provenance, results
from mixkvq.runs.results import RunDir, find_reference, find_runs, run_name, twin_key
from mixkvq.runs.sinks import WandbSink, resolve_mode


def make_cfg(method="kivi", task="aime24", results_dir="results/runs", **method_params):
    return OmegaConf.create(
        {
            "method": {"name": method, **method_params},
            "model": {"name": "tiny-random"},
            "task": {"name": task, "n_samples": 2},
            "storage": "fake",
            "seed": 0,
            "results_dir": results_dir,
            "logger": {"mode": "disabled"},
        }
    )


def rows(problem_id, n=2, tag="a"):
    return [
        {
            "problem_id": problem_id,
            "problem_index": int(problem_id[1:]),
            "sample_index": i,
            "extracted": f"{tag}{i}",
            "correct": True,
            "token_ids": [1, 2, i],
            "kv_bytes_final": None,
        }
        for i in range(n)
    ]


# ---------------------------------------------------------------- names


def test_run_name_deterministic_and_sensitive_to_method_params():
    a = run_name(make_cfg(bits=2))
    assert a == run_name(make_cfg(bits=2))
    assert a != run_name(make_cfg(bits=4))
    assert a.startswith("kivi_tiny-random_aime24_fake_")
    assert run_name(make_cfg(bits=2), label="kivi-k2v2").startswith("kivi-k2v2_tiny-random")
    assert run_name(make_cfg(bits=2), label="k2v2").startswith("kivi-k2v2_tiny-random")


def test_run_name_ignores_volatile_keys():
    assert run_name(make_cfg(results_dir="a")) == run_name(make_cfg(results_dir="b"))


def test_settings_that_change_no_result_stay_out_of_the_hash():
    plain = make_cfg()
    for key, value in (("progress", False), ("grading_workers", 0), ("cpu_threads", 4)):
        assert run_name(OmegaConf.merge(plain, {key: value})) == run_name(plain), key
        assert twin_key(OmegaConf.merge(plain, {key: value})) == twin_key(plain), key  # bf16 agreement still found
    assert run_name(OmegaConf.merge(plain, {"seed": 1})) != run_name(plain)


def test_a_folder_named_under_the_old_hash_keeps_resuming(tmp_path):
    """Folders named when the hash still covered `progress` are found by the config they hold."""
    old = OmegaConf.merge(make_cfg(), {"progress": True})
    legacy = tmp_path / "kivi_tiny-random_aime24_fake_0ld4a5h0"
    legacy.mkdir()
    (legacy / "config.yaml").write_text(OmegaConf.to_yaml(old))
    (tmp_path / "bf16_tiny-random_aime24_fake_12345678").mkdir()  # another run's folder, no config: passed over
    new = OmegaConf.merge(make_cfg(), {"progress": False})
    with RunDir(tmp_path, new) as rd:
        assert rd.path == legacy
        rd.append_samples(rows("p0"))
        rd.write_run_row({"pass1": 1.0})
    assert results.find_finished(tmp_path, new) == legacy
    assert results.find_finished(tmp_path, OmegaConf.merge(new, {"seed": 1})) is None


def test_twin_key_equal_across_methods_not_tasks():
    assert twin_key(make_cfg("kivi", bits=2)) == twin_key(make_cfg("bf16"))
    assert twin_key(make_cfg("kivi")) != twin_key(make_cfg("kivi", task="math500"))


def written_before_the_move(cfg) -> dict:
    """A run config as it was written while MixKVQ's per-model settings lived in the model config (`model.mixkvq`)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data["method"].pop("per_model", None)
    data["model"]["mixkvq"] = results.MOVED_MODEL_KEYS["mixkvq"][data["model"]["name"]]
    return data


@pytest.mark.parametrize("model", sorted(results.MOVED_MODEL_KEYS["mixkvq"]))
def test_runs_written_before_the_per_model_settings_moved_keep_their_identity(model, tmp_path):
    from mixkvq.config import load_config

    for method in ("mixkvq", "bits/mixkvq2.3", "kivi", "bf16"):
        cfg = load_config([f"method={method}", f"model={model}"])
        old = written_before_the_move(cfg)
        assert run_name(cfg) == run_name(old) and twin_key(cfg) == twin_key(old), method
        folder = tmp_path / method.replace("/", "-")
        folder.mkdir()
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(old))
        assert results.check_saved_config(folder, cfg)  # the old folder resumes under the new config


def test_the_default_job_keeps_its_committed_folder_and_per_model_settings_are_its_identity():
    from mixkvq.config import load_config

    cfg = load_config([])
    assert results.config_hash(cfg) == "3ac72897"  # results/default_job/runs/mixkvq-C2.5_..._3ac72897
    changed = load_config(["+method.per_model.smollm2-135m.target_bits=3.0"])
    assert results.config_hash(changed) != results.config_hash(cfg)
    assert twin_key(changed) == twin_key(cfg) == twin_key(load_config(["method=bf16"]))  # still bf16's twin
    # Another model's entry is not this run's setting.
    assert results.config_hash(load_config(["+method.per_model.qwen3-8b.target_bits=3.0"])) == results.config_hash(cfg)


# ---------------------------------------------------------------- run directory


def test_append_is_atomic_when_replace_fails(tmp_path, monkeypatch):
    with RunDir(tmp_path, make_cfg()) as rd:
        rd.append_samples(rows("p0"))

        def crash(*args):
            raise OSError("simulated crash before rename")

        monkeypatch.setattr(results.os, "replace", crash)
        with pytest.raises(OSError):
            rd.append_samples(rows("p1"))
        monkeypatch.undo()
        assert rd.done_problem_ids() == {"p0"}
        assert len(rd.read_samples()) == 2
        assert [p.name for p in rd.path.iterdir() if p.name.endswith(".tmp")] == []


def test_append_is_idempotent_and_keeps_first(tmp_path):
    with RunDir(tmp_path, make_cfg()) as rd:
        rd.append_samples(rows("p0"))
        rd.append_samples(rows("p0", tag="b") + rows("p1"))
        df = rd.read_samples()
    assert len(df) == 4
    assert df[df.problem_id == "p0"].extracted.tolist() == ["a0", "a1"]
    assert df.token_ids.iloc[0].tolist() == [1, 2, 0]


def test_restart_skips_finished_problems(tmp_path):
    cfg = make_cfg()
    with RunDir(tmp_path, cfg) as rd:
        rd.append_samples(rows("p0"))
    with RunDir(tmp_path, cfg) as rd:  # the restarted job
        assert rd.done_problem_ids() == {"p0"}
        todo = [p for p in ["p0", "p1"] if p not in rd.done_problem_ids()]
    assert todo == ["p1"]


def test_missing_samples_is_empty(tmp_path):
    rd = RunDir(tmp_path, make_cfg())
    assert rd.done_problem_ids() == set()
    assert rd.read_samples().empty


def test_truncated_parquet_raises(tmp_path):
    with RunDir(tmp_path, make_cfg()) as rd:
        rd.append_samples(rows("p0"))
        size = rd.samples_path.stat().st_size
        with open(rd.samples_path, "r+b") as f:
            f.truncate(size // 2)
        with pytest.raises(ConfigError, match="samples.parquet.*delete"):
            rd.done_problem_ids()
        with pytest.raises(ConfigError, match="samples.parquet"):
            rd.append_samples(rows("p1"))


def test_lock_prevents_second_writer(tmp_path):
    cfg = make_cfg()
    with RunDir(tmp_path, cfg):
        with pytest.raises(ConfigError, match="another job is writing this run"):
            RunDir(tmp_path, cfg).prepare()
    with RunDir(tmp_path, cfg):  # released on exit
        pass


def test_write_without_lock_is_refused(tmp_path):
    with pytest.raises(RuntimeError):
        RunDir(tmp_path, make_cfg()).append_samples(rows("p0"))


def test_config_written_and_edited_config_rejected(tmp_path):
    cfg = make_cfg()
    with RunDir(tmp_path, cfg) as rd:
        assert OmegaConf.load(rd.config_path) == cfg
    with RunDir(tmp_path, make_cfg(results_dir="elsewhere")):  # volatile keys may differ
        pass
    rd.config_path.write_text(rd.config_path.read_text().replace("seed: 0", "seed: 1"))
    with pytest.raises(ConfigError, match="config.yaml"):
        RunDir(tmp_path, cfg).prepare()
    with RunDir(tmp_path, make_cfg(method="bf16")):  # a failed prepare released its lock elsewhere
        pass


def test_run_rows_and_reference(tmp_path):
    quant, ref = make_cfg("kivi", bits=2), make_cfg("bf16")
    assert find_reference(tmp_path, quant) is None
    with RunDir(tmp_path, ref) as rd:
        rd.append_samples(rows("p0"))
        rd.write_run_row({"method": "bf16", "pass1": 1.0})
        ref_path = rd.path
    with RunDir(tmp_path, make_cfg("bf16", task="math500")) as rd:
        rd.append_samples(rows("p0"))
    with RunDir(tmp_path, quant) as rd:
        rd.write_run_row({"method": "kivi", "pass1": 0.5, "kv_bytes_final": None})
        rd.write_run_row({"method": "kivi", "pass1": 0.25, "kv_bytes_final": None})  # overwrite
        assert rd.read_run_row()["pass1"] == 0.25
    assert find_reference(tmp_path, quant) == ref_path
    assert find_reference(tmp_path, ref) is None  # never its own reference
    runs = find_runs(tmp_path)
    assert sorted(runs.pass1) == [0.25, 1.0]
    assert "run_dir" in runs


# ---------------------------------------------------------------- provenance, sinks, summary


def test_provenance():
    p = provenance.collect(device="cpu")
    assert set(p) == {"git_sha", "git_dirty", "versions", "device", "hostname", "created_at"}
    versions = json.loads(p["versions"])
    assert "python" in versions and versions["datasets"] and versions["math-verify"] and versions["reasoning-gym"]
    assert p["created_at"].endswith("+00:00")


def test_weights_and_problems_are_identified_by_content(tmp_path):
    from mixkvq.eval.tasks import Problem

    a, b = Problem("p0", "What is 2+2?", "4"), Problem("p1", "What is 3+3?", "6")
    assert provenance.problems_sha256([a, b]) == provenance.problems_sha256([Problem("p0", "What is 2+2?", "4"), b])
    assert provenance.problems_sha256([a, b]) != provenance.problems_sha256([b, a])
    assert provenance.problems_sha256([a]) != provenance.problems_sha256([Problem("p0", "What is 2+2?", "5")])
    assert provenance.folder_weights_sha256(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-00001.safetensors").write_bytes(b"weights")
    first = provenance.folder_weights_sha256(tmp_path)
    (tmp_path / "config.json").write_text('{"changed": 1}')  # not a weight file
    assert provenance.folder_weights_sha256(tmp_path) == first
    (tmp_path / "model-00001.safetensors").write_bytes(b"weightz")
    assert provenance.folder_weights_sha256(tmp_path) != first


def test_wandb_mode(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_mode("auto") == "offline"  # no key anywhere: nothing leaves the machine
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert resolve_mode("auto") == "online"  # what `wandb login` saved
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline"  # WANDB_MODE wins
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_mode("auto") == "online"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled" and resolve_mode("offline") == "offline"  # an explicit mode wins
    with pytest.raises(ConfigError):
        resolve_mode("sometimes")


def wandb_records(path):
    """The records of a W&B transaction log (.wandb): a 7-byte file header, then LevelDB-style blocks of 32 KiB
    whose chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) carry protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf, off, parts, out = path.read_bytes(), 7, b"", []
    while off + 7 <= len(buf):
        left = 32768 - off % 32768
        length, kind = int.from_bytes(buf[off + 4:off + 6], "little"), buf[off + 6] if left >= 7 else 0
        if kind == 0:  # block padding
            off += left
            continue
        parts += buf[off + 7:off + 7 + length]
        off += 7 + length
        if kind in (1, 4):
            out.append(pb.Record.FromString(parts))
            parts = b""
    return out


def test_wandb_offline_run_has_tags_samples_table_artifact_and_resumes(monkeypatch, tmp_path):
    """A real offline W&B run, read back from its files: job type, tags, the per-sample table, the result files
    as an artifact, and one run id for a restarted job."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    logger = OmegaConf.create({"mode": "offline", "project": "p", "entity": None, "group": None, "tags": ["mine"]})
    config = {"method": {"name": "kivi"}, "model": {"name": "smollm2-135m"}, "task": {"name": "gsm8k"},
              "storage": "packed"}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.parquet").write_bytes(b"row")
    samples = pd.DataFrame({"problem_id": ["p0", "p0"], "sample_index": [0, 1], "extracted": ["4", None],
                            "response": ["x" * 1000 + " so \\boxed{4}", "no idea"], "gold": ["4", "4"],
                            "correct": [True, False], "n_tokens": [300, 12], "truncated": [False, True],
                            "storage_bits_mean": [3.1, float("nan")], "token_ids": [[1], [2]]})
    for _ in range(2):  # the job, then its requeue
        sink = WandbSink(logger, "kivi-run", config, run_dir)
        sink.log_summary({"pass1": 0.5})
        sink.log_samples(samples)
        sink.log_files("kivi-run", [run_dir / "run.parquet", run_dir / "absent.parquet"])
        sink.finish()
    logs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and len({p.name for p in logs}) == 1  # two sessions, one W&B run id: synced as one run
    records = wandb_records(logs[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.job_type == "evaluate" and list(run.tags) == ["kivi", "smollm2-135m", "gsm8k", "packed", "mine"]
    assert run.resume and logs[0].name == f"run-{run.run_id}.wandb"
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    results_artifact = next(a for a in artifacts if a.type == "run-results")
    assert results_artifact.name == "kivi-run" and [c.path for c in results_artifact.manifest.contents] == ["run.parquet"]
    table_file = next(logs[0].parent.glob("files/media/table/samples_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"][:3] == ["problem_id", "sample_index", "response_tail"] and "token_ids" not in table["columns"]
    first, second = table["data"]
    assert first[2].endswith("\\boxed{4}") and len(first[2]) == 400 and first[5] is True and second[3] is None


def test_wandb_disabled_imports_nothing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import would raise
    sink = WandbSink(OmegaConf.create({"mode": "disabled"}), "r", {}, tmp_path)
    sink.log_problem({"a": 1})
    sink.log_summary({"a": 1})
    sink.finish()


def test_wandb_failures_warn_once(monkeypatch, tmp_path):
    class Run:
        def log(self, m):
            raise RuntimeError("network down")

        def finish(self):
            raise RuntimeError("network down")

    fake = types.SimpleNamespace(init=lambda **kw: Run(), Settings=dict)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = OmegaConf.create({"mode": "offline", "project": "p", "entity": None, "group": None, "tags": []})
    sink = WandbSink(logger, "r", {}, tmp_path)
    with pytest.warns(UserWarning, match="W&B log failed") as caught:
        sink.log_problem({"a": 1})
        sink.log_problem({"a": 2})
        sink.finish()
    assert len(caught) == 1


def test_summary_table():
    rows_ = [
        {
            "method": "bf16", "model": "deepseek-r1-distill-qwen-32b", "task": "aime24", "storage": "packed",
            "pass1": 0.7, "pass1_se": 0.05, "majority": 0.8, "agree_answer": None,
            "payload_bits_mean": 16.0, "storage_bits_mean": 16.0, "kv_bytes_vs_bf16": 1.0,
            "tokens_per_s": 31.2, "peak_mem_bytes": 70 * 2**30, "n_problems": 30, "n_samples": 16,
        },
        {
            "method": "kivi", "label": "kivi-k2v2", "model": "deepseek-r1-distill-qwen-32b", "task": "math500",
            "storage": "fake", "pass1": 0.5, "pass1_se": 0.02, "majority": float("nan"), "agree_answer": 0.9,
            "payload_bits_mean": 2.31, "storage_bits_mean": 3.3, "kv_bytes_vs_bf16": None,
            "tokens_per_s": 12.0, "peak_mem_bytes": None, "n_problems": 500, "n_samples": 16,
        },
    ]
    text = format_summary(rows_)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert "70.0±5.0" in text and "1.00x" in text and "71680" in text and "kivi-k2v2" in text
    assert lines[3] == "[deepseek-r1-distill-qwen-32b / aime24 / packed]" and lines[5].endswith("math500 / fake]")
    fake = lines[-1]
    assert "12.0" not in fake and "90.0" in fake  # no speed figure from fake storage
    assert format_summary([]) == "(no runs)"
    assert "KV budget" not in text  # neither method has a budget
    assert "KV budget" not in format_summary([{**rows_[0], "budget_truncation_rate": 0.0}])
    pm = {**rows_[0], "method": "pmkvq", "label": "pmkvq-Fbit-2", "budget_truncation_rate": 0.25}
    assert format_summary([rows_[0], pm]).splitlines()[-1] == "KV budget ended: pmkvq-Fbit-2 25.0% of samples"
    # agreement says how it was decoded: sampled answers disagree between two bf16 runs by chance
    sampled, greedy = {**rows_[1], "decoding": "sampled"}, {**rows_[1], "label": "kivi-g", "decoding": "greedy"}
    marked = format_summary([rows_[0], sampled, greedy]).splitlines()
    assert "90.0 s" in marked[-3] and "90.0 g" in marked[-2] and marked[-1].startswith("agree%: final answer")
    assert "agree%: final" not in text  # rows without the field (older runs) stay unmarked


def test_summary_tells_variants_apart_and_shows_length():
    """A kivi and a kivi4 run print under their own labels; rows without `label` (older run.parquet files)
    fall back to method + nominal bits; truncation and mean length have their columns."""
    base = {"model": "m", "task": "t", "storage": "packed", "pass1": 0.5, "n_problems": 2, "n_samples": 1}
    kivi = {**base, "method": "kivi", "nominal_bits": "KIVI-2", "truncation_rate": 0.25, "mean_tokens": 311.4}
    kivi4 = {**base, "method": "kivi", "label": "kivi-KIVI-4", "nominal_bits": "KIVI-4", "truncation_rate": 0.0,
             "mean_tokens": 288.0}
    header, units, _, _, first, second = format_summary([kivi, kivi4]).splitlines()
    assert header.split()[4:6] == ["trunc", "mean"] and units.split()[3:5] == ["%", "tokens"]
    assert first.split()[0] == "kivi-KIVI-2" and second.split()[0] == "kivi-KIVI-4"
    assert "25.0" in first and "311" in first and "288" in second


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux peak-RSS reset only")
def test_cpu_peak_memory_is_the_runs_own_not_the_process_lifetime():
    """A multirun's jobs share a process: each job's peak starts at its own beginning."""
    import numpy as np
    import torch

    from mixkvq.eval.evaluate import peak_memory, reset_peak_memory

    cpu = [torch.device("cpu")]
    block = np.ones(64 * 2**20 // 8)  # 64 MiB touched, then freed: an earlier job's peak
    before, kind, _ = peak_memory(cpu)
    del block
    reset_peak_memory(cpu)
    after, _, _ = peak_memory(cpu)
    assert kind == "cpu_rss" and after < before - 32 * 2**20, (before, after)
