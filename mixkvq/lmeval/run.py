"""lm-evaluation-harness tasks with one method's KV cache: config -> tasks checked -> model -> one run per task.

Each lm-eval task gets a run directory named like an evaluation run (task = the lm-eval task):

    <results_dir>/<method-label>_<model>_<task>_<storage>_<hash8>/
        config.yaml            the resolved config of this task's run
        lm_eval/               lm-eval's own output: results_<time>.json, samples_<task>_<time>.jsonl
        requests_rank0.db      lm-eval's request cache: a restarted run reuses every answer already generated
        cache_stats.jsonl      one line per generated row: bits, bytes, tokens and seconds of its fresh cache
        run.parquet            the summary row (metric, bits, speed, memory) with the provenance of our runs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lm_eval
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from mixkvq.errors import ConfigError
from mixkvq.eval.evaluate import peak_memory
from mixkvq.eval.preflight import check_cache_config
from mixkvq.eval.summary import format_summary
from mixkvq.runs import provenance
from mixkvq.runs.results import RUN_FILE, RunDir, find_finished

STATS_FILE = "cache_stats.jsonl"
REQUESTS_CACHE = "requests"  # lm-eval appends "_rank<i>.db"
OUTPUT_DIR = "lm_eval"


def task_run_config(cfg: DictConfig, task: str) -> DictConfig:
    """The config one task's run is named, hashed and resumed by: the run config with lm-eval's task as `task`."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data["task"] = {"name": task, "source": "lm_eval"}
    data["lm_eval"] = {k: v for k, v in data["lm_eval"].items() if k != "tasks"}
    return OmegaConf.create(data)


def check_tasks(cfg: DictConfig, task_manager) -> None:
    """Every task exists and generates text, checked before the model loads."""
    tasks = list(cfg.lm_eval.tasks or [])
    if not tasks:
        raise ConfigError("lm_eval.tasks is empty; name at least one, e.g. lm_eval.tasks=[gsm8k_cot_zeroshot_local]")
    known = set(task_manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        local = sorted(n for n in known if n.endswith("_local"))
        raise ConfigError(f"unknown lm-eval task(s) {unknown}; the project's offline tasks: {local} "
                          f"(every lm-eval task: `lm_eval ls tasks`)")
    metric = cfg.lm_eval.metric
    for task in tasks:
        try:
            loaded = list(task_manager.load([task])["tasks"].values())  # a group: all its tasks
        except Exception as e:  # a hub task offline, a missing local file: say which task
            raise ConfigError(f"lm-eval task {task!r} could not be loaded: {type(e).__name__}: {e}") from e
        other = sorted({t.OUTPUT_TYPE for t in loaded} - {"generate_until"})
        if other:
            from mixkvq.lmeval.model import GENERATION_ONLY

            raise ConfigError(f"lm-eval task {task!r} requests {other}; {GENERATION_ONLY}")
        keys = sorted({f"{m['metric']},{f.name}" for t in loaded for m in t.config.metric_list for f in t._filters})
        if metric is not None and metric not in keys:
            raise ConfigError(f"lm_eval.metric={metric!r} is not a metric of task {task!r}; choose one of {keys}")


def pick_metric(results: dict, wanted: str | None) -> tuple[str, float | None, float | None]:
    """(key, value, stderr) of the summary's accuracy: `wanted` or the first metric lm-eval reports."""
    keys = [k for k in results if "," in k and "_stderr," not in k]
    if wanted is not None and wanted not in keys:
        raise ConfigError(f"lm_eval.metric={wanted!r} is not among this task's metrics {keys}")
    key = wanted or keys[0]
    metric, _, filt = key.partition(",")
    stderr = results.get(f"{metric}_stderr,{filt}")
    return key, float(results[key]), (float(stderr) if isinstance(stderr, (int, float)) else None)


def cache_summary(records: pd.DataFrame, storage: str) -> dict:
    """Bits, bytes and decode speed over every generated row of a run (fake storage: bits only)."""
    if records.empty:
        return {}
    out = {col: float(records[col].mean()) for col in
           ("payload_bits_mean", "storage_bits_mean", "payload_bits_final", "storage_bits_final") if col in records}
    out["mean_tokens"] = float(records["n_tokens"].mean())
    out["budget_truncation_rate"] = float(records["truncated_by_budget"].mean())
    out["decode_kernels_used"] = "+".join(sorted(set(records["decode_kernels"])))
    if storage == "packed":
        out["kv_bytes_final"] = float(records["kv_bytes_final"].mean())
        out["kv_bytes_vs_bf16"] = float((records["kv_bytes_final"] / records["kv_bytes_bf16_final"]).mean())
        out["kv_peak_allocated_bytes"] = int(records["kv_peak_allocated_bytes"].max())
        # one generate call makes all rows of its batch: count its seconds once
        seconds = float((records["gen_seconds"] / records["batch_rows"]).sum())
        out["tokens_per_s"] = float(records["n_tokens"].sum()) / seconds if seconds > 0 else None
    return out


def _read_stats(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame()
    return pd.read_json(path, lines=True)


def run(cfg: DictConfig) -> dict | list[dict]:
    """Run every task of `cfg.lm_eval.tasks`; returns the run row (a list of rows for several tasks)."""
    from lm_eval.tasks import TaskManager

    from mixkvq.eval.models import load_model
    from mixkvq.lmeval.model import QuantizedKVLM

    check_cache_config(cfg)
    task_manager = TaskManager(include_path=cfg.lm_eval.include_path)
    check_tasks(cfg, task_manager)
    todo, rows = [], {}
    for task in cfg.lm_eval.tasks:
        done = find_finished(cfg.results_dir, task_run_config(cfg, task))
        if done is not None:
            print(f"[{done.name}] already finished; nothing to do ({done})", file=sys.stderr)
            rows[task] = pd.read_parquet(done / RUN_FILE).iloc[0].to_dict()
        else:
            todo.append(task)
    if todo:
        started = provenance.collect()
        versions = json.loads(started["versions"])
        started["versions"] = json.dumps({**versions, "lm_eval": lm_eval.__version__}, sort_keys=True)
        loaded = load_model(cfg.model)
        if loaded.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        lm = QuantizedKVLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, kv_config=cfg,
                           batch_size=cfg.lm_eval.batch_size, device=str(loaded.device))
        for task in todo:
            rows[task] = run_task(cfg, task, lm, loaded, task_manager, started)
    out = [rows[t] for t in cfg.lm_eval.tasks]
    print(format_summary(out))
    print("pass@1%: lm-eval's " + ", ".join(f"{r['task']}: {r['lm_eval_metric']}" for r in out))
    return out[0] if len(out) == 1 else out


def run_task(cfg: DictConfig, task: str, lm, loaded, task_manager, started: dict) -> dict:
    from lm_eval.loggers import EvaluationTracker

    task_cfg = task_run_config(cfg, task)
    label = f"{cfg.method.name}-{lm.kv_method.nominal_bits}"
    le = cfg.lm_eval
    with RunDir(cfg.results_dir, task_cfg, label) as rd:
        print(f"[{rd.name}] lm-eval task {task}; writing to {rd.path}", file=sys.stderr)
        lm.kv_stats_file, lm.cache_records = rd.path / STATS_FILE, []
        # a .json path keeps lm-eval's files in lm_eval/ itself, not in a folder named after the model object
        tracker = EvaluationTracker(output_path=str(rd.path / OUTPUT_DIR / "results.json"))
        res = lm_eval.simple_evaluate(
            model=lm, tasks=[task], task_manager=task_manager, limit=le.limit, num_fewshot=le.num_fewshot,
            use_cache=str(rd.path / REQUESTS_CACHE), log_samples=True, evaluation_tracker=tracker,
            apply_chat_template=le.apply_chat_template, system_instruction=le.system_instruction,
            gen_kwargs=OmegaConf.to_container(le.gen_kwargs, resolve=True) if le.gen_kwargs else None,
            bootstrap_iters=le.bootstrap_iters, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
        )
        samples = res.pop("samples")
        tracker.save_results_aggregated(results=res, samples=samples)
        for name, rows in samples.items():
            tracker.save_results_samples(task_name=name, samples=rows)
        key, value, stderr = pick_metric(res["results"][task], le.metric)
        gen = res["configs"][task].get("generation_kwargs", {})
        row = {
            "kind": "lm_eval", "run_name": rd.name, "run_dir": str(rd.path), "method": cfg.method.name,
            "nominal_bits": lm.kv_method.nominal_bits, "storage": cfg.storage, "model": cfg.model.name,
            "model_source": loaded.source, "dtype": str(loaded.dtype).removeprefix("torch."), "task": task,
            "decode_kernel": cfg.attention.decode_kernel, "seed": cfg.seed,
            "pack_kernel": cfg.quant.get("pack_kernel", "auto"),
            "decoding": "sampled" if gen.get("do_sample") else "greedy",
            "lm_eval_metric": key, "pass1": value, "pass1_se": stderr,
            "n_problems": len({s["doc_id"] for s in samples[task]}),  # samples hold one entry per filter
            "n_samples": int(res["configs"][task].get("repeats", 1)),
            "lm_eval_results": json.dumps(res["results"], default=str),
            **cache_summary(_read_stats(rd.path / STATS_FILE), cfg.storage),
        }
        if cfg.storage == "packed":
            peak, kind, _ = peak_memory([loaded.device])
            row.update(peak_mem_bytes=peak, peak_mem_kind=kind)
        row.update(started, device=provenance.device_name(loaded.device))
        rd.write_run_row(row)
    return row
