"""Calibration end to end on the real SmolLM2-135M-Instruct (CPU, tiny settings), then runs that load it."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mixkvq.config import load_config
from mixkvq.kv.methods import ModelShape
from tiny import build

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {  # a few prompts, short sequences, two Optuna trials
    "kvmix": ["method.profile.prompts=3", "method.profile.max_tokens=96"],
    "pmkvq": ["method.calib.samples=2", "method.calib.seq_len=128", "method.calib.alpha_grid=4"],
    "mixkvq": ["method.search.slices=1", "method.search.trials=2", "method.search.max_new_tokens=8",
               "method.residual_length=32"],
}


def _calibrate_module():
    spec = importlib.util.spec_from_file_location("calibrate_script", REPO / "scripts" / "calibrate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, shared_data):
    from mixkvq.eval.models import load_model

    root = tmp_path_factory.mktemp("calibration")
    data = shared_data / "gsm8k" / "train.jsonl"
    script = _calibrate_module()
    loaded = None
    for name, overrides in TINY.items():
        cfg = load_config([f"method={name}", f"method.calibration_dir={root}", f"data_files={data}",
                           "grading_workers=0", *overrides], config_name="calibrate")
        loaded = loaded or load_model(cfg.model)
        script.calibrate(cfg, loaded=loaded)
    return root, loaded


def test_each_calibration_writes_its_artifact_with_data_hash_and_config(calibrated):
    root, loaded = calibrated
    for name in TINY:
        record = json.loads((root / "smollm2-135m" / name / "artifact.json").read_text())
        assert record["model"] == "smollm2-135m" and record["shape"]["layers"] == 30
        assert len(record["data"]["sha256"]) == 64 and record["calibration_seconds"] > 0
        assert (root / "smollm2-135m" / name / "config.yaml").read_text().count(f"name: {name}") == 1
    kv = json.loads((root / "smollm2-135m" / "kvmix" / "artifact.json").read_text())["payload"]
    assert len(kv["key_scores"]) == 30 and min(kv["key_scores"]) > 0
    pm = json.loads((root / "smollm2-135m" / "pmkvq" / "artifact.json").read_text())["payload"]
    assert len(pm["sensitivity"]) == 30 and len(pm["rep_scales"][0]) == 3 and len(pm["rep_scales"][0][0]) == 32
    # Fewer bits, more damage: sensitivity falls with the width in every layer.
    assert all(row[0] < row[1] < row[2] < row[3] < row[4] for row in pm["sensitivity"])  # 16, 8, 4, 2, 1 bits
    mx = json.loads((root / "smollm2-135m" / "mixkvq" / "artifact.json").read_text())["payload"]
    assert len(mx["trials"]) == 2 and 0.1 <= mx["tau_bf16"] <= 2.0 and 0.1 <= mx["tau_uint4"] <= 2.0


@pytest.mark.parametrize("name,extra", [("pmkvq", ["method.max_len=1024", "method.budget_mean_bits=3"]),
                                         ("kvmix", [])])
def test_fake_and_packed_give_the_same_tokens_on_smollm2(calibrated, name, extra):
    from mixkvq.eval.protocol import build_prompt, generate_samples

    root, loaded = calibrated
    prompt = build_prompt(loaded.tokenizer, "Natalia sold clips to 48 of her friends in April, and then she sold "
                          "half as many clips in May. How many clips did Natalia sell altogether?",
                          "{question}\nPlease reason step by step.", False)
    # 100 tokens: past the first stored block of every row, and past PM-KVQ's first shrink
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 100}
    tokens, caches = {}, {}
    for storage in ("packed", "fake"):
        model = copy.deepcopy(loaded.model)  # PM-KVQ folds its key scales into the weights
        method = build(name, [f"method.calibration_dir={root}", *extra], model=model, storage=storage)
        method.prepare_model(model)
        out = generate_samples(model, loaded.tokenizer, method, prompt, 2, gen, 0, "torch")
        tokens[storage], caches[storage] = out.token_ids, out.cache
    assert tokens["packed"] == tokens["fake"]
    assert max(len(t) for t in tokens["packed"]) > 60
    layer = caches["packed"].layers[0]
    assert int(layer.key_stream.store.tokens().max()) > 0  # tokens really were quantized
    if name == "pmkvq":
        assert min(int(lay.beta.min()) for lay in caches["packed"].layers) < 16  # and shrunk


def test_methods_load_their_artifacts_and_refuse_another_model(calibrated, tmp_path):
    from mixkvq.errors import ConfigError

    root, loaded = calibrated
    shape = ModelShape.of(loaded.model)
    calibrated_by = [f"method.calibration_dir={root}"]
    assert build("kvmix", calibrated_by, model=shape).nominal_bits == "k2.20v2.40"  # 6 of 30 layers high-bit
    pm = build("pmkvq", calibrated_by, model=shape)
    assert len(pm.budgets()) == 30 and set(pm.fbits) <= {2, 4} and pm.nominal_bits == "Fbit=4/2"
    found = json.loads((root / "smollm2-135m" / "mixkvq" / "artifact.json").read_text())["payload"]
    assert build("mixkvq_search", calibrated_by, model=shape).taus == (found["tau_bf16"], found["tau_uint4"])
    # An artifact made for another model is refused with a message naming both.
    other = tmp_path / "smollm2-135m" / "kvmix"
    other.mkdir(parents=True)
    record = json.loads((root / "smollm2-135m" / "kvmix" / "artifact.json").read_text())
    record["model"] = "deepseek-r1-distill-7b"
    (other / "artifact.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="made for model 'deepseek-r1-distill-7b'.*smollm2-135m"):
        build("kvmix", [f"method.calibration_dir={tmp_path}"], model=shape)


def test_run_py_loads_the_pmkvq_artifact_and_reports_its_bits(calibrated, tmp_path):
    root, _ = calibrated
    cmd = [sys.executable, "run.py", "method=pmkvq", f"method.calibration_dir={root}", "method.max_len=1024",
           "task.size=1", "task.n_samples=1", "model.max_new_tokens=16", "logger.mode=disabled", "progress=false",
           "grading_workers=0", f"results_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = pd.read_parquet(next(tmp_path.glob("*/run.parquet"))).iloc[0]
    assert row["method"] == "pmkvq" and row["nominal_bits"] == "Fbit=4/2"
    samples = pd.read_parquet(next(tmp_path.glob("*/samples.parquet")))
    assert "truncated_by_budget" in samples and samples["kv_bytes_final"].notna().all()
    assert "pmkvq" in proc.stdout  # the summary table


def test_pmkvq_text_source_is_parquet_and_loads_offline_from_a_local_file(tmp_path):
    """RedPajama's arxiv slice comes through the `parquet` builder (the repo's loading script is refused by
    datasets >= 4): the same code path, pointed at a local shard, with the documents' text fields."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf

    from mixkvq.calib.calibration import load_texts

    docs = [f"\\\\section{{Paper {i}}} We prove theorem {i}." for i in range(6)]
    shard = tmp_path / "0000.parquet"
    pq.write_table(pa.table({"text": docs, "meta": [{"arxiv_id": str(i)} for i in range(6)],
                             "red_pajama_subset": ["arxiv"] * 6}), shard)
    dataset = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "calibrate.yaml").datasets.redpajama_arxiv)
    assert dataset["hub"]["path"] == "parquet" and dataset["hub"]["data_files"].startswith(
        "hf://datasets/togethercomputer/RedPajama-Data-1T@refs%2Fconvert%2Fparquet/arxiv/")
    dataset["hub"]["data_files"] = str(shard)  # the hub route, offline
    texts, source = load_texts({"name": "redpajama_arxiv", **dataset}, None, limit=4, seed=42)
    assert sorted(texts) == sorted(docs) and texts != docs  # the first `docs` documents, shuffled with the seed
    assert source["hub"]["path"] == "parquet" and source["documents"] == 6 and len(source["sha256"]) == 64
    local, local_source = load_texts(dataset, str(shard), limit=4, seed=42)  # data_files= a downloaded shard
    assert local == docs[:4] and local_source["data_files"] == str(shard)
