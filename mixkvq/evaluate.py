"""One run: config -> model, method, problems -> generate, grade, write rows -> summary.

Everything that can be wrong with the config or the data is checked before the first generate call. Rows
are written after every problem (atomically), so a killed run loses at most the problem it was on, and a
restarted run skips what is already written.
"""

from __future__ import annotations

import sys

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kernels import decode_kernel_names
from mixkvq import metrics, placement, provenance
from mixkvq.errors import ConfigError
from mixkvq.grading import grade_many
from mixkvq.methods import ModelShape, build_method, method_config
from mixkvq.models import check_context, load_model
from mixkvq.protocol import build_prompt, generate_batch
from mixkvq.quantizer import QuantSpec
from mixkvq.results import RUN_FILE, RunDir, find_finished, find_reference, twin_key
from mixkvq.sinks import WandbSink, sweep_group
from mixkvq.summary import format_summary
from mixkvq.tasks import load_task


def generation_kwargs(cfg: DictConfig) -> dict:
    g = cfg.generation
    max_new = g.max_new_tokens if g.max_new_tokens is not None else cfg.model.max_new_tokens
    if not isinstance(max_new, int) or max_new <= 0:
        raise ConfigError(f"generation.max_new_tokens={max_new!r} must be a positive integer")
    if not g.do_sample and cfg.task.n_samples != 1:
        raise ConfigError(f"generation.do_sample=false (greedy) gives identical samples; with it set task.n_samples=1, "
                          f"not {cfg.task.n_samples}")
    batch = g.get("batch_problems", 1)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise ConfigError(f"generation.batch_problems={batch!r} must be a positive integer (problems per generate "
                          "call)")
    kwargs = {"do_sample": bool(g.do_sample), "max_new_tokens": max_new}
    if g.do_sample:
        kwargs.update(temperature=float(g.temperature), top_p=float(g.top_p))
    return kwargs


def check_cache_config(cfg: DictConfig) -> None:
    """The method, decode kernel and storage settings every entry point shares, checked without a model."""
    method_config(cfg.method)
    if cfg.attention.decode_kernel not in decode_kernel_names():
        raise ConfigError(f"attention.decode_kernel={cfg.attention.decode_kernel!r} is not available; "
                          f"choose one of {decode_kernel_names()}")
    if cfg.storage not in ("packed", "fake"):
        raise ConfigError(f"storage={cfg.storage!r} is not valid; choose one of ['packed', 'fake']")


def check_static(cfg: DictConfig) -> None:
    """Checks that need no model: fail fast, before any loading."""
    check_cache_config(cfg)
    generation_kwargs(cfg)


def finished_row(cfg: DictConfig) -> dict | None:
    """The row of this config's finished run, if any: a re-run sweep job then exits at once."""
    path = find_finished(cfg.results_dir, cfg)
    if path is None:
        return None
    row = pd.read_parquet(path / RUN_FILE).iloc[0].to_dict()
    print(f"[{path.name}] already finished; nothing to do ({path})", file=sys.stderr)
    return row


def evaluate(cfg: DictConfig) -> dict:
    check_static(cfg)
    row = finished_row(cfg)
    if row is not None:
        print(format_summary([row]))
        return row
    started = provenance.collect()  # the code that runs is the code at start, whatever is committed meanwhile
    problems = load_task(cfg.task)
    gen = generation_kwargs(cfg)
    loaded = load_model(cfg.model)
    if loaded.device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    model, tokenizer = loaded.model, loaded.tokenizer
    shape = ModelShape.of(model)
    method = build_method(cfg.method, shape, QuantSpec.from_config(cfg.quant, shape.dtype), cfg.storage, cfg.model)
    method.prepare_model(model)
    prompts = {p.id: build_prompt(tokenizer, p.question, cfg.prompt, loaded.think_prefix) for p in problems}
    longest = max(len(tokenizer(t, add_special_tokens=False).input_ids) for t in prompts.values())
    check_context(loaded, longest, gen["max_new_tokens"])
    devices = placement.devices_of(model)
    placement.reset_peak_memory(devices)

    label = f"{cfg.method.name}-{method.nominal_bits}"
    with RunDir(cfg.results_dir, cfg, label) as rd:
        done = rd.done_problem_ids()
        # Problems go to generate in fixed groups of `generation.batch_problems` (by index, so a resumed run
        # samples the same groups with the same seeds); a group's rows are written together.
        size = cfg.generation.get("batch_problems", 1)
        groups = [list(range(k, min(k + size, len(problems)))) for k in range(0, len(problems), size)]
        todo = [g for g in groups if any(problems[i].id not in done for i in g)]
        sink = WandbSink(cfg.logger, rd.name, OmegaConf.to_container(cfg, resolve=True), rd.path, sweep_group())
        print(f"[{rd.name}] {len(problems)} problems, {len(done)} already done; writing to {rd.path}", file=sys.stderr)
        bar = tqdm(total=sum(len(g) for g in todo), desc=label, unit="problem", disable=not cfg.progress,
                   file=sys.stderr)
        correct = total = 0
        for group in todo:
            seed = cfg.seed + group[0]
            outs = generate_batch(model, tokenizer, method, [prompts[problems[i].id] for i in group],
                                  cfg.task.n_samples, gen, seed, cfg.attention.decode_kernel)
            rows, call_tokens = [], 0
            for index, out in zip(group, outs):
                problem = problems[index]
                prompt_tokens = len(tokenizer(prompts[problem.id], add_special_tokens=False).input_ids)
                grades = grade_many(out.texts, [problem.answer] * len(out.texts), cfg.task.grader,
                                    cfg.grading_workers)
                rows += [
                    {
                        "problem_id": problem.id, "problem_index": index, "sample_index": s, "gold": problem.answer,
                        "prompt_tokens": prompt_tokens, "response": out.texts[s], "extracted": grades[s].extracted, "correct": grades[s].correct,
                        "n_tokens": len(out.token_ids[s]), "truncated": out.truncated[s], "token_ids": out.token_ids[s],
                        # gen_seconds: this problem's share of its generate call (`problems_in_call` problems)
                        "seed": seed, "gen_seconds": out.seconds, "problems_in_call": len(group),
                        "kv_peak_allocated_bytes": out.kv_peak_allocated_bytes, "decode_kernels": out.decode_kernels,
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
            bar.update(len(group))
            bar.set_postfix(acc=f"{correct / total:.0%}", tok_s=f"{call_tokens / (outs[0].seconds * len(group)):.0f}")
        bar.close()
        row = run_row(cfg, rd, method, loaded, devices, started)
        rd.write_run_row(row)
        sink.log_summary(row)
        sink.finish()
    print(format_summary([row]))
    return row


def run_row(cfg: DictConfig, rd: RunDir, method, loaded, devices: list[torch.device], started: dict) -> dict:
    """The run's one summary row: metrics over every written sample, bits, memory, provenance."""
    samples = rd.read_samples()
    row = {
        "run_name": rd.name, "run_dir": str(rd.path), "twin_key": twin_key(cfg), "method": cfg.method.name, "nominal_bits": method.nominal_bits, "storage": cfg.storage,
        "model": cfg.model.name, "model_source": loaded.source, "dtype": str(loaded.dtype).removeprefix("torch."),
        "task": cfg.task.name, "decode_kernel": cfg.attention.decode_kernel, "seed": cfg.seed,
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
        peak, kind, per_device = placement.peak_memory(devices)  # summed over the GPUs, and per GPU
        row.update(peak_mem_bytes=peak, peak_mem_kind=kind, peak_mem_per_device=per_device,
                   kv_peak_allocated_bytes=int(samples["kv_peak_allocated_bytes"].max()))
    else:  # fake storage saves no memory and is not timed: those fields stay empty (METHODS.md §3)
        row.update(peak_mem_bytes=None, peak_mem_kind=None, peak_mem_per_device=None, kv_peak_allocated_bytes=None,
                   tokens_per_s=None, kv_bytes_final=None, kv_bytes_vs_bf16=None)
    row.update(started, device=provenance.device_name(devices[0]), gpus=sum(d.type == "cuda" for d in devices))
    return row

