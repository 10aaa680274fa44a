"""One run: config -> model, method, problems -> generate, grade, write rows -> summary.

Everything that can be wrong with the config, the data or the run folder is checked before the model loads
(mixkvq.eval.preflight). Rows are written after every problem (atomically), so a killed run loses at most the problem
it was on, and a restarted run skips what is already written; SIGINT and SIGTERM stop it keeping every finished
problem, and say so.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mixkvq.eval import metrics, placement
from mixkvq.eval.batching import resolve as batching_for
from mixkvq.eval.grading import grade_many, stop_workers
from mixkvq.eval.models import load_model
from mixkvq.eval.preflight import preflight
from mixkvq.eval.protocol import generate_batch
from mixkvq.eval.summary import format_summary
from mixkvq.kv.graphs import GraphSettings
from mixkvq.kv.methods import ModelShape, build_method
from mixkvq.runs import provenance
from mixkvq.runs.interrupts import Interrupted
from mixkvq.runs.results import RUN_FILE, RunDir, find_reference, twin_key
from mixkvq.runs.sinks import WandbSink, sweep_group


def reset_peak_memory(devices: list[torch.device]) -> None:
    """Start this run's peak: CUDA's counters, or on Linux the process's peak RSS, which the earlier jobs of a
    multirun in the same process would otherwise have set (peak_memory then depended on job order)."""
    if any(d.type == "cuda" for d in devices):
        placement.reset_peak_memory(devices)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size (VmHWM)
    except OSError:
        pass


def peak_memory(devices: list[torch.device]) -> tuple[int, str, str | None]:
    """(peak bytes summed over the GPUs, kind, JSON per GPU); on CPU this run's peak RSS."""
    if any(d.type == "cuda" for d in devices):
        return placement.peak_memory(devices)
    try:  # VmHWM follows reset_peak_memory; getrusage's ru_maxrss never goes down
        status = Path("/proc/self/status").read_text()
        return int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM:"))) * 1024, "cpu_rss", None
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_rss", None


def evaluate(cfg: DictConfig) -> dict:
    checked = preflight(cfg)  # every config, data and run-folder error, before the model loads
    if checked.state.finished:
        row = pd.read_parquet(checked.run_dir / RUN_FILE).iloc[0].to_dict()
        print(f"[{checked.run_dir.name}] already finished; nothing to do ({checked.run_dir})", file=sys.stderr)
        print(format_summary([row]))
        return row
    started = provenance.collect()  # the code that runs is the code at start, whatever is committed meanwhile
    problems, prompts, gen = checked.problems, checked.prompts, checked.gen
    loaded = load_model(cfg.model, cfg.hub_timeout_s)
    if loaded.device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    model, tokenizer = loaded.model, loaded.tokenizer
    shape = ModelShape.of(model)
    method = checked.method
    if shape != checked.shape:  # the loaded model sits elsewhere than its config said: rebuild for where it is
        method = build_method(cfg, shape)
    method.prepare_model(model)
    devices = placement.devices_of(model)
    reset_peak_memory(devices)

    label = checked.label
    with RunDir(cfg.results_dir, cfg, label) as rd:
        done = rd.done_problem_ids()
        # Problems go to generate in fixed groups of `generation.batch_problems` (by index, so a resumed run
        # samples the same groups with the same seeds; `auto`'s choice is kept in the run folder); a group's rows
        # are written together.
        longest = max(checked.prompt_tokens.values()) + gen["max_new_tokens"]
        batching = batching_for(cfg, model, method, longest, len(problems), rd.path)
        size = batching.batch_problems
        groups = [list(range(k, min(k + size, len(problems)))) for k in range(0, len(problems), size)]
        todo = [g for g in groups if any(problems[i].id not in done for i in g)]
        sink = WandbSink(cfg.logger, rd.name, OmegaConf.to_container(cfg, resolve=True), rd.path, sweep_group())
        print(f"[{rd.name}] {len(problems)} problems, {len(done)} already done, {size} per generate call"
              f"{batching.describe()}; writing to {rd.path}", file=sys.stderr)
        bar = tqdm(total=sum(len(g) for g in todo), desc=label, unit="problem", disable=not cfg.progress,
                   file=sys.stderr)
        correct = total = 0
        saved = len(done)
        try:
            for group in todo:
                seed = cfg.seed + group[0]
                outs = generate_batch(model, tokenizer, method, [prompts[problems[i].id] for i in group],
                                      cfg.task.n_samples, gen, seed, cfg.attention.decode_kernel,
                                      GraphSettings.from_config(cfg.attention), cfg.get("stop_check", "deferred"),
                                      cfg.attention.get("cache", "harness"))
                rows, call_tokens = [], 0
                for index, out in zip(group, outs):
                    problem = problems[index]
                    prompt_tokens = checked.prompt_tokens[problem.id]
                    grades = grade_many(out.texts, [problem.answer] * len(out.texts), cfg.task.grader,
                                        cfg.grading_workers)
                    rows += [
                        {
                            "problem_id": problem.id, "problem_index": index, "sample_index": s, "gold": problem.answer,
                            "question": problem.question, "question_sha256": provenance.text_sha256(problem.question),
                            "prompt_tokens": prompt_tokens, "response": out.texts[s], "extracted": grades[s].extracted, "correct": grades[s].correct,
                            "n_tokens": len(out.token_ids[s]), "truncated": out.truncated[s], "token_ids": out.token_ids[s],
                            # gen_seconds: this problem's share of its generate call (`problems_in_call` problems)
                            "seed": seed, "gen_seconds": out.seconds, "problems_in_call": len(group),
                            "kv_peak_allocated_bytes": out.kv_peak_allocated_bytes, "decode_kernels": out.decode_kernels,
                            # decode steps of the call replayed from CUDA graphs (None: graphs off or not possible)
                            "graph_replayed_steps": out.graph_counts.replayed if out.graph_counts else None,
                            **out.cache_stats[s],
                        }
                        for s in range(len(out.texts))
                    ]
                    correct += sum(g.correct for g in grades)
                    total += len(grades)
                    tokens = sum(len(t) for t in out.token_ids)
                    call_tokens += tokens
                    sink.log_problem({"problem_index": index, "accuracy": sum(g.correct for g in grades) / len(grades),
                                      "tokens_per_s": tokens / out.seconds})
                rd.append_samples(rows)
                saved += len(group)
                bar.update(len(group))
                bar.set_postfix(acc=f"{correct / total:.0%}", tok_s=f"{call_tokens / (outs[0].seconds * len(group)):.0f}")
            bar.close()
        except Interrupted as e:
            stop_workers()
            bar.close()
            sink.finish()
            raise Interrupted(e.signum, f"{saved} of {len(problems)} problems saved in {rd.path}; "
                                        "rerun the same command to resume") from None
        row = run_row(cfg, rd, method, loaded, devices, started)
        row["batch_problems"] = size  # what `auto` chose, or the config's number
        row["problems_sha256"] = provenance.problems_sha256(problems)
        rd.write_run_row(row)
        sink.log_summary(row)
        sink.log_samples(rd.read_samples())
        sink.log_files(rd.name, [rd.config_path, rd.samples_path, rd.run_path])
        sink.finish()
    print(format_summary([row]))
    return row


def run_row(cfg: DictConfig, rd: RunDir, method, loaded, devices: list[torch.device], started: dict) -> dict:
    """The run's one summary row: metrics over every written sample, bits, memory, provenance."""
    samples = rd.read_samples()
    row = {
        "run_name": rd.name, "run_dir": str(rd.path), "twin_key": twin_key(cfg), "method": cfg.method.name, "label": rd.label, "nominal_bits": method.nominal_bits, "storage": cfg.storage,
        "model": cfg.model.name, "model_source": loaded.source, "dtype": str(loaded.dtype).removeprefix("torch."),
        "model_revision": loaded.revision, "model_weights_sha256": loaded.weights_sha256,
        "task": cfg.task.name, "decode_kernel": cfg.attention.decode_kernel, "seed": cfg.seed,
        "pack_kernel": cfg.quant.get("pack_kernel", "auto"),  # who packed the stores' writes (the same bits)
        # agreement with bf16 means chance under sampling, a deterministic comparison under greedy decoding
        "decoding": "sampled" if cfg.generation.do_sample else "greedy",
        # what `decode_kernel` resolved to: the kernels that produced the speed figures (older samples lack it)
        "decode_kernels_used": "+".join(sorted(set(samples["decode_kernels"].dropna())))
        if "decode_kernels" in samples else None,
        **metrics.summarize(samples),
    }
    reference = find_reference(cfg.results_dir, cfg)
    if reference is not None and cfg.method.name != "bf16":
        row.update(metrics.agreement(samples, pd.read_parquet(reference / "samples.parquet")))
    if cfg.storage == "packed":
        peak, kind, per_device = peak_memory(devices)  # summed over the GPUs, and per GPU
        row.update(peak_mem_bytes=peak, peak_mem_kind=kind, peak_mem_per_device=per_device,
                   kv_peak_allocated_bytes=int(samples["kv_peak_allocated_bytes"].max()))
    else:  # fake storage saves no memory and is not timed: those fields stay empty (METHODS.md §3)
        row.update(peak_mem_bytes=None, peak_mem_kind=None, peak_mem_per_device=None, kv_peak_allocated_bytes=None,
                   tokens_per_s=None, kv_bytes_final=None, kv_bytes_vs_bf16=None)
    row.update(started, device=provenance.device_name(devices[0]), gpus=sum(d.type == "cuda" for d in devices))
    return row

