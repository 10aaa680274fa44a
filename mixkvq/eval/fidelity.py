"""Teacher-forced fidelity: how much a method's KV cache changes the model, token by token.

For each problem a reference continuation (the bf16 model's own greedy answer, or the task's worked solution) is
fed through the method's cache exactly as generation feeds its own tokens: prefill on the exact prompt, then
one-token decode steps through the real flush and pack path and the decode kernel, batched over problems with
left padding. In lockstep the same tokens go through the unmodified model with a plain transformers
`DynamicCache`: its next-token distribution p is the reference. Per reference token: KL(p || q_method), top-1
agreement and the NLL of the reference token under both (ΔNLL = NLL_method - NLL_bf16). Per layer: the relative
L2 error of the decode attention output against exact attention over the same layer's unquantized history, and
the SQNR of the dequantized keys and values.

Rows (one per problem) carry the per-token values, so means, 95th percentiles and position buckets are computed
from the files, and a killed run resumes after the last batch it wrote (README, "Fidelity").
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import torch
from omegaconf import DictConfig, OmegaConf
from tabulate import tabulate
from tqdm.auto import tqdm
from transformers import DynamicCache

from kernels import kernels_in_use
from kernels.reference import attend
from mixkvq.errors import ConfigError
from mixkvq.eval.fidelity_metrics import layer_table, summarize
from mixkvq.eval.models import check_context, load_model
from mixkvq.eval.placement import input_device
from mixkvq.eval.preflight import check_cache_config
from mixkvq.eval.protocol import build_prompt, eos_ids
from mixkvq.eval.tasks import Problem, load_task
from mixkvq.kv.attention import bind
from mixkvq.kv.methods import Method, ModelShape, build_method
from mixkvq.kv.ragged import RaggedBuffer, left_align
from mixkvq.registry import Registry
from mixkvq.runs import provenance
from mixkvq.runs.results import RUN_FILE, RunDir, _read_table, _write_table, config_hash, find_finished, twin_key
from mixkvq.runs.sinks import WandbSink, sweep_group

LAYERS_FILE = "layers.parquet"
REFERENCES_DIR = ".references"  # dot-prefixed: never taken for a run directory
KIND = "fidelity"  # run rows of fidelity runs carry kind=fidelity (tables keep them apart from evaluation runs)


# ---------------------------------------------------------------- references


@dataclass
class Reference:
    problem_id: str
    prompt_ids: list[int]
    tokens: list[int]
    natural_tokens: int  # tokens before the bf16 model would have ended (EOS); len(tokens) if it never did


REFERENCES: Registry = Registry("fidelity.reference")
# Worked-solution text of a task's problem, for fidelity.reference=gold.
SOLUTIONS: Registry = Registry("task for fidelity.reference=gold")


@SOLUTIONS.register("gsm8k")
def _gsm8k_solution(p: Problem) -> str:
    # Calculator annotations (<<48/2=24>>) are tool markup, not text; the '#### N' line becomes the boxed answer
    # the prompt asks for.
    text = re.sub(r"<<[^>]*>>", "", p.solution or "")
    body, _, answer = text.rpartition("#### ")
    return f"{body.strip()}\nThe answer is \\boxed{{{answer.strip().replace(',', '')}}}."


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.int64)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as generate derives them from the attention mask."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


@torch.no_grad()
def greedy_references(model, prompts: list[list[int]], length: int, eos: set[int], continue_past_eos: bool,
                      pad_id: int) -> list[tuple[list[int], int]]:
    """The unmodified model's greedy continuations (plain DynamicCache), batched with left padding.

    With `continue_past_eos` the EOS tokens are masked so every reference reaches `length` (long contexts from
    a model that stops early); where argmax would have been EOS is recorded as the natural end."""
    device = input_device(model)
    ids, mask = left_pad(prompts, pad_id, device)
    cache, pos = DynamicCache(), positions(mask)
    out = torch.zeros(len(prompts), length, dtype=torch.int64)
    natural = torch.full((len(prompts),), length, dtype=torch.int64)
    ended = torch.zeros(len(prompts), dtype=torch.bool)
    eos_t = torch.tensor(sorted(eos), dtype=torch.int64)
    step_ids, step_pos = ids, pos
    for t in range(length):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                       logits_to_keep=1).logits[:, -1].float().cpu()
        at_eos = torch.isin(logits.argmax(-1), eos_t)
        natural = torch.where(at_eos & (natural == length), torch.full_like(natural, t), natural)
        if continue_past_eos:
            logits[:, eos_t] = -math.inf
        nxt = torch.where(ended, torch.full_like(natural, pad_id), logits.argmax(-1))
        out[:, t] = nxt
        ended |= torch.isin(nxt, eos_t)
        if bool(ended.all()):
            break
        step_ids = nxt[:, None].to(device)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_pos = step_pos[:, -1:] + 1
    refs = []
    for row, n in zip(out.tolist(), natural.tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))  # keep the EOS itself: it is scored
        refs.append((row[:end], min(n, end)))
    return refs


# A reference maker: (cfg, model, tokenizer, problems, their prompt ids, eos ids, pad id) -> (tokens, natural end)
# per problem.
@REFERENCES.register("greedy")
def _greedy(cfg, model, tokenizer, problems, prompts, eos, pad_id):
    f = cfg.fidelity
    return greedy_references(model, prompts, int(f.tokens), eos, bool(f.continue_past_eos), pad_id)


@REFERENCES.register("gold")
def _gold(cfg, model, tokenizer, problems, prompts, eos, pad_id):
    solution = SOLUTIONS.get(cfg.task.name)
    refs = []
    for p in problems:
        ids = tokenizer(solution(p), add_special_tokens=False).input_ids + [min(eos)]  # the turn ends: EOS scored
        refs.append((ids[:int(cfg.fidelity.tokens)], min(len(ids), int(cfg.fidelity.tokens))))
    return refs


def reference_key(cfg: DictConfig) -> str:
    """Identifies a set of references: model, task, prompt, reference settings and batching (padding changes
    bf16 greedy numerics, so the batch size is part of the key)."""
    f = cfg.fidelity
    node = {"model": cfg.model, "task": cfg.task, "prompt": cfg.prompt, "reference": f.reference,
            "tokens": f.tokens, "continue_past_eos": f.continue_past_eos, "batch_size": f.batch_size}
    return config_hash(OmegaConf.create(OmegaConf.to_container(OmegaConf.create(node), resolve=True)))


def load_references(cfg: DictConfig, model, tokenizer, problems: list[Problem], prompts: dict[str, list[int]],
                    show: bool) -> dict[str, Reference]:
    """References of `problems`, generated once per reference key and shared by every method's run (in
    <results_dir>/.references/); generated in batches of fidelity.batch_size, each written as soon as done."""
    f = cfg.fidelity
    folder = Path(cfg.results_dir) / REFERENCES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cfg.model.name}_{cfg.task.name}_{f.reference}{f.tokens}_{reference_key(cfg)}.parquet"
    eos = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs of one sweep wait for each other's references, never redo them
        have = {}
        if path.exists():
            have = {r["problem_id"]: Reference(**r) for r in _read_table(path).to_pylist()}
        make = REFERENCES.get(f.reference)
        batches = [problems[i:i + f.batch_size] for i in range(0, len(problems), f.batch_size)]
        batches = [b for b in batches if any(p.id not in have for p in b)]
        for batch in tqdm(batches, desc=f"{f.reference} references", unit="batch", disable=not show,
                          file=sys.stderr):
            made = make(cfg, model, tokenizer, batch, [prompts[p.id] for p in batch], eos, pad_id)
            have.update({p.id: Reference(p.id, prompts[p.id], t, n) for p, (t, n) in zip(batch, made)})
            _write_table(path, pa.Table.from_pylist([vars(r) for r in have.values()]))
    return have


# ---------------------------------------------------------------- per-layer probe


class LayerProbe:
    """Keeps a layer's exact (unquantized) K/V as the cache receives them; on every `every`-th decode step it
    compares the layer's attention output with exact attention over that history."""

    def __init__(self, layer, every: int):
        data = layer.key_stream.window.data
        b = len(layer.pad)
        self.keys = RaggedBuffer(b, layer.heads, layer.dim, data.dtype, data.device)
        self.values = RaggedBuffer(b, layer.heads, layer.dim, data.dtype, data.device)
        self.every, self.step = every, 0
        self.err_sum = torch.zeros(b, dtype=torch.float64)
        self.err_n = torch.zeros(b, dtype=torch.int64)

    def on_update(self, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor) -> None:
        self.keys.append(left_align(keys, start))
        self.values.append(left_align(values, start))

    def on_decode(self, module, query: torch.Tensor, scaling: float, out: torch.Tensor) -> None:
        self.step += 1
        if self.step % self.every:
            return
        exact = attend(module, query, self.keys.view(), self.values.view(), scaling).float().flatten(1)
        err = (out.float().flatten(1) - exact).norm(dim=1) / exact.norm(dim=1).clamp_min(1e-30)
        self.err_sum += err.double().cpu()
        self.err_n += 1

    def sqnr_terms(self, layer) -> dict[str, torch.Tensor]:
        """Per row: signal and noise energy of the dequantized keys and values against the exact ones."""
        out = {}
        for name, exact in (("key", self.keys.view()), ("value", self.values.view())):
            stored = getattr(layer, f"{name}_stream").ragged()
            if not torch.equal(stored.lens, exact.lens):
                raise RuntimeError(f"layer {layer.layer_idx}: the cache holds {stored.lens.tolist()} {name} tokens "
                                   f"per row but received {exact.lens.tolist()}")
            width = int(exact.lens.max())
            x = exact.data[:, :, :width].float()
            d = stored.data[:, :, :width].float() - x
            valid = (torch.arange(width)[None, :] < exact.lens[:, None]).to(x.device)[:, None, :, None]
            out[f"{name}_signal"] = (x.square() * valid).sum(dim=(1, 2, 3)).double().cpu()
            out[f"{name}_noise"] = (d.square() * valid).sum(dim=(1, 2, 3)).double().cpu()
        return out


# ---------------------------------------------------------------- driving one batch


@torch.no_grad()
def drive(model, ref_model, method: Method, refs: list[Reference], pad_id: int, decode_kernel: str = "auto",
          layer_every: int = 0) -> list[dict]:
    """Feed each reference through the method's cache and, in lockstep, through `ref_model` with a DynamicCache.

    One row per reference: per-token KL, top-1 agreement and NLLs (lists), the cache's bits, per-layer attention
    error and SQNR terms. A row a KV budget stops (PM-KVQ) is scored up to the step generation would have
    ended it."""
    device = input_device(model)
    ids, mask = left_pad([r.prompt_ids for r in refs], pad_id, device)
    b, steps = len(refs), max(len(r.tokens) for r in refs)
    tokens = torch.full((b, steps), pad_id, dtype=torch.int64)
    for i, r in enumerate(refs):
        tokens[i, :len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.int64)
    cache = method.new_cache(b, (mask == 0).sum(dim=1).cpu())
    probes = []
    if layer_every:
        for layer in cache.layers:
            layer.probe = LayerProbe(layer, layer_every)
            probes.append(layer.probe)
    ref_cache = DynamicCache()
    kl, top1, nll, nll_ref = (torch.zeros(b, steps) for _ in range(4))
    step_ids, step_pos = ids, positions(mask)
    kernels = set()
    for t in range(steps):
        # Bound per step: the reference forward may be the same model object with its own attention.
        with bind(model, cache, decode_kernel):
            q = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                      logits_to_keep=1).logits[:, -1]
            kernels.update(kernels_in_use(cache.layers).split("+"))
        p = ref_model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=ref_cache,
                      logits_to_keep=1).logits[:, -1]
        lp, lq = torch.log_softmax(p.float(), -1), torch.log_softmax(q.float(), -1)
        kl[:, t] = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0).cpu()  # clamp: float rounding at KL ~ 0
        top1[:, t] = (lp.argmax(-1) == lq.argmax(-1)).float().cpu()
        tok = tokens[:, t:t + 1].to(device)
        nll[:, t], nll_ref[:, t] = -lq.gather(1, tok)[:, 0].cpu(), -lp.gather(1, tok)[:, 0].cpu()
        step_ids = tok
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_pos = step_pos[:, -1:] + 1
    # Forward j predicts reference token j; a row stopped at forward j keeps j tokens (protocol.generate_samples).
    stop = cache.stop_step.tolist()
    scored = [min(len(r.tokens), s) if s >= 0 else len(r.tokens) for r, s in zip(refs, stop)]
    stats = cache.sequence_stats(torch.tensor([max(n, 1) for n in scored]))
    layer_terms = [probe.sqnr_terms(layer) for probe, layer in zip(probes, cache.layers)]
    rows = []
    for i, (r, n) in enumerate(zip(refs, scored)):
        row = {
            "problem_id": r.problem_id, "sample_index": 0, "prompt_tokens": len(r.prompt_ids),
            "reference_tokens": len(r.tokens), "natural_tokens": r.natural_tokens, "n_tokens": n,
            "truncated_by_budget": stop[i] >= 0 and stop[i] < len(r.tokens),
            "kl": kl[i, :n].tolist(), "top1": top1[i, :n].bool().tolist(), "nll": nll[i, :n].tolist(),
            "nll_ref": nll_ref[i, :n].tolist(), "decode_kernels": "+".join(sorted(kernels)), **stats[i],
        }
        if probes:
            row["attn_err_sum"] = [float(p.err_sum[i]) for p in probes]
            row["attn_err_n"] = [int(p.err_n[i]) for p in probes]
            for key in ("key_signal", "key_noise", "value_signal", "value_noise"):
                row[key] = [float(terms[key][i]) for terms in layer_terms]
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the run


def check_static(cfg: DictConfig) -> None:
    """Every config error before a model is loaded."""
    check_cache_config(cfg)
    f = cfg.fidelity
    REFERENCES.get(f.reference)
    if f.reference == "gold":
        SOLUTIONS.get(cfg.task.name)
    for key in ("tokens", "batch_size"):
        v = f[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"fidelity.{key}={v!r} must be a positive integer")
    if isinstance(f.layer_stats_every, bool) or not isinstance(f.layer_stats_every, int) or f.layer_stats_every < 0:
        raise ConfigError(f"fidelity.layer_stats_every={f.layer_stats_every!r} must be an integer >= 0 (0: off)")
    b = list(f.buckets)
    if len(b) < 2 or b[0] != 0 or any(not isinstance(x, int) or y <= x for x, y in zip(b, b[1:])):
        raise ConfigError(f"fidelity.buckets={b!r} must be increasing integers starting at 0")



def run(cfg: DictConfig) -> dict:
    check_static(cfg)
    done_path = find_finished(cfg.results_dir, cfg)
    if done_path is not None:
        row = pd.read_parquet(done_path / RUN_FILE).iloc[0].to_dict()
        print(f"[{done_path.name}] already finished; nothing to do ({done_path})", file=sys.stderr)
        print(format_table([row]))
        return row
    started = provenance.collect()
    problems = load_task(cfg.task)
    loaded = load_model(cfg.model)
    if loaded.device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    model, tokenizer = loaded.model, loaded.tokenizer
    shape = ModelShape.of(model)
    method = build_method(cfg, shape)
    # A method that rewrites weights (PM-KVQ folds key scales into q/k projections) gets its own copy: the
    # reference stays the unmodified model.
    rewrites = type(method).prepare_model is not Method.prepare_model
    ref_model = copy.deepcopy(model) if rewrites else model
    method.prepare_model(model)
    f = cfg.fidelity
    prompts = {p.id: tokenizer(build_prompt(tokenizer, p.question, cfg.prompt, loaded.think_prefix),
                               add_special_tokens=False).input_ids for p in problems}
    check_context(loaded.max_context, loaded.name, max(len(v) for v in prompts.values()), int(f.tokens))
    eos = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)

    label = f"{cfg.method.name}-{method.nominal_bits}"
    with RunDir(cfg.results_dir, cfg, label) as rd:
        done = rd.done_problem_ids()
        todo = [p for p in problems if p.id not in done]
        print(f"[{rd.name}] {len(problems)} problems, {len(done)} already done; writing to {rd.path}",
              file=sys.stderr)
        refs = load_references(cfg, ref_model, tokenizer, problems, prompts, cfg.progress) if todo else {}
        sink = WandbSink(cfg.logger, rd.name, OmegaConf.to_container(cfg, resolve=True), rd.path, sweep_group(),
                         job_type="fidelity")
        bar = tqdm(total=len(todo), desc=f"{label} fidelity", unit="problem", disable=not cfg.progress,
                   file=sys.stderr)
        for i in range(0, len(todo), f.batch_size):
            batch = [refs[p.id] for p in todo[i:i + f.batch_size]]
            start = time.perf_counter()
            rows = drive(model, ref_model, method, batch, pad_id, cfg.attention.decode_kernel,
                         int(f.layer_stats_every))
            seconds = time.perf_counter() - start
            for r in rows:
                r["batch_seconds"] = seconds
            rd.append_samples(rows)
            part = summarize(pd.DataFrame(rows), list(f.buckets))
            bar.update(len(rows))
            bar.set_postfix(kl=f"{part['kl_mean']:.4f}", top1=f"{part['top1']:.1%}")
            sink.log_problem({"problem_index": i, "kl_mean": part["kl_mean"], "top1": part["top1"],
                              "dnll": part["dnll"]})
        bar.close()
        samples = rd.read_samples()
        layers = layer_table(samples)
        _write_table(rd.path / LAYERS_FILE, pa.Table.from_pandas(layers, preserve_index=False))
        row = {
            "kind": KIND, "run_name": rd.name, "run_dir": str(rd.path), "twin_key": twin_key(cfg),
            "method": cfg.method.name, "nominal_bits": method.nominal_bits, "storage": cfg.storage,
            "model": cfg.model.name, "model_source": loaded.source, "dtype": str(loaded.dtype).removeprefix("torch."),
            "task": cfg.task.name, "reference": f.reference, "reference_length": int(f.tokens),
            "decode_kernel": cfg.attention.decode_kernel, "seed": cfg.seed,
            "pack_kernel": cfg.quant.get("pack_kernel", "auto"),
            "decode_kernels_used": "+".join(sorted(set("+".join(samples["decode_kernels"]).split("+")))),
            "position_buckets": json.dumps(list(f.buckets)),
            **summarize(samples, list(f.buckets)),
            "attn_rel_err_mean": float(layers["attn_rel_err"].mean()) if len(layers) else None,
            **started, "device": provenance.device_name(shape.device),
        }
        rd.write_run_row(row)
        sink.log_summary({k: v for k, v in row.items() if k != "by_position"})
        sink.finish()
    print(format_table([row]))
    return row


# ---------------------------------------------------------------- the printed table


def _f(v, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * scale:{spec}}"


def table_rows(rows: list[dict]) -> list[dict]:
    return [{
        "method": r.get("label") or f"{r['method']}-{r['nominal_bits']}",
        "reference": f"{r.get('reference', '-')} {r.get('reference_length', '')}".strip(),
        "payload b": _f(r.get("payload_bits_mean"), ".2f"), "storage b": _f(r.get("storage_bits_mean"), ".2f"),
        "KL mean": _f(r.get("kl_mean"), ".4f"), "KL p95": _f(r.get("kl_p95"), ".4f"),
        "top-1 %": _f(r.get("top1"), ".1f", 100), "ΔNLL": _f(r.get("dnll"), "+.4f"),
        "KL answer": _f(r.get("kl_mean_answer"), ".4f"),  # before bf16's own EOS only
        "attn err": _f(r.get("attn_rel_err_mean"), ".4f"),
        "problems": _f(r.get("n_problems"), ".0f"), "tokens": _f(r.get("n_tokens"), ".0f"),
    } for r in rows]


def format_table(rows: list[dict]) -> str:
    """Plain-text table of fidelity run rows, then KL by position bucket."""
    if not rows:
        return "(no fidelity runs)"
    out = [tabulate(table_rows(rows), headers="keys", tablefmt="simple", disable_numparse=True)]
    buckets = []
    for r in rows:
        cells = {"method": r.get("label") or f"{r['method']}-{r['nominal_bits']}"}
        for b in json.loads(r.get("by_position") or "[]"):
            cells[f"KL {b['lo']}-{b['hi']}"] = _f(b["kl_mean"], ".4f")
        buckets.append(cells)
    out.append("\nmean KL by reference position (tokens):")
    out.append(tabulate(pd.DataFrame(buckets).fillna("-"), headers="keys", tablefmt="simple", showindex=False,
                        disable_numparse=True))
    return "\n".join(out)
