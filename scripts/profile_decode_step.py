"""Where a decode step's time goes in a real `generate` call: wall time per step, host (Python) time by function,
kernel launches and device syncs per step, and the tensor ops of the cache's own work per layer and step (the
model's ops left out; mixkvq/kv/op_count.py), for bf16 DynamicCache and the harness's methods.

Random-weight model from a config folder (shapes and speed only), one prompt repeated to `--batch` samples
through `mixkvq.eval.protocol.generate_samples` (the path `run.py` takes), `--new-tokens` sampled tokens.

    python scripts/profile_decode_step.py --config-dir DIR --out results/bench/decode_step_profile   # GPU
    python scripts/profile_decode_step.py --config-dir DIR --out OUT --device cpu --layers 2 --batch 2 \
        --prompt-tokens 160 --new-tokens 160   # cache ops per layer and step on CPU
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import pstats
import time
from pathlib import Path

import torch


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}  # the protocol of run.py
EAGER = "attention.cuda_graphs=never"
# KVmix without its calibration artifact (a random-weight model has no gradient profile to rank layers by): the
# repo's number of high-width layers for R1-7B's 28, 2 x floor(0.1 x 28) = 4, taken first. Speed depends on the count.
_KVMIX_LAYERS = 28
KVMIX_BITS = ("method.layer_bits={key:[%s],value:[%s]}"
              % (",".join(["3"] * 4 + ["2"] * (_KVMIX_LAYERS - 4)), ",".join(["4"] * 4 + ["2"] * (_KVMIX_LAYERS - 4))))
# PM-KVQ without its calibration artifact: uniform 2-bit final widths, no key reparameterization; its budget (for
# 32k tokens) leaves a few-thousand-token context at its starting 16 bits.
PMKVQ = ["method=pmkvq", "method.allocation=uniform", "method.reparameterize=false", "method.fbit=2"]
METHODS = {"bf16-dynamic": None, "bf16": ["method=bf16", EAGER],
           "bf16-sdpa": ["method=bf16", "attention.decode_kernel=torch", EAGER],
           "bf16-graphs": ["method=bf16"], "kivi-2": ["method=kivi"], "kivi-2-eager": ["method=kivi", EAGER],
           "mixkvq": ["method=mixkvq"], "mixkvq-eager": ["method=mixkvq", EAGER],
           "mixkvq-tiered": ["method=mixkvq", "attention.decode_kernel=cuda-tiered"],
           "kvmix": ["method=kvmix", KVMIX_BITS], "kvmix-eager": ["method=kvmix", KVMIX_BITS, EAGER],
           "pmkvq": PMKVQ, "pmkvq-eager": [*PMKVQ, EAGER]}
# The graphed rows with generate's stop flag read every step (transformers' own wait) instead of a step late.
METHODS.update({f"{name}-every-step": [*o, "stop_check=every_step"] for name, o in list(METHODS.items())
                if o is not None and EAGER not in o})


def build(config_dir: Path, layers: int | None, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(config_dir)
    if layers:
        cfg.num_hidden_layers = layers
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return model, AutoTokenizer.from_pretrained(config_dir)


def make_generate(model, tokenizer, overrides, batch: int, device: str):
    """A function (prompt ids, new tokens) -> seconds, generating `batch` samples the way run.py does."""
    if overrides is None:
        def plain(ids, new):
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), num_return_sequences=batch, **SAMPLING,
                               max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
            sync(device)
            return time.perf_counter() - t0
        return plain

    from mixkvq.config import load_config
    from mixkvq.eval.protocol import generate_samples
    from mixkvq.kv.graphs import GraphSettings
    from mixkvq.kv.methods import build_method

    cfg = load_config([*overrides, "model=deepseek-r1-distill-7b", "storage=packed", "~task", "~logger"])
    method = build_method(cfg, model)
    method.prepare_model(model)

    def harness(ids, new):
        prompt = tokenizer.decode(ids[0])
        gen = {**SAMPLING, "max_new_tokens": new, "min_new_tokens": new}
        out = generate_samples(model, tokenizer, method, prompt, batch, gen, 0, cfg.attention.decode_kernel,
                               GraphSettings.from_config(cfg.attention), cfg.stop_check)
        harness.graph_counts = vars(out.graph_counts) if out.graph_counts is not None else None
        return out.seconds
    return harness


def host_profile(fn, ids, new: int, top: int) -> list[dict]:
    prof = cProfile.Profile()
    prof.enable()
    fn(ids, new)
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in stats.stats.items():
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}({name})"
        rows.append(dict(function=where, calls_per_step=nc / new, self_us_per_step=tt / new * 1e6,
                         cum_us_per_step=ct / new * 1e6))
    return sorted(rows, key=lambda r: -r["self_us_per_step"])[:top]


def sync_sites(fn, ids, new: int, top: int = 12) -> list[dict]:
    """Python lines that synchronized the stream, per step (torch's sync debug mode)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(ids, new)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sites = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"
            sites[key] = sites.get(key, 0) + 1
    return [dict(site=k, per_step=v / new) for k, v in sorted(sites.items(), key=lambda kv: -kv[1])[:top]]


def _profiled(fn, ids, new: int, device: str) -> tuple[dict, dict]:
    """(calls by name, device ms by kernel) of one call generating `new` tokens."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn(ids, new)
    counts, busy = {}, {}
    for e in prof.key_averages():
        counts[e.key] = counts.get(e.key, 0) + e.count
        if e.device_type == torch.autograd.DeviceType.CUDA:
            busy[e.key] = busy.get(e.key, 0.0) + e.self_device_time_total / 1e3
    return counts, busy


def launch_profile(fn, ids, new: int, device: str) -> dict:
    """Per decode step: launches, syncs, copies, device time and aten ops, as the difference between a call of
    1 + `new` tokens and a call of 1 (the prefill and its token), so the prefill is not spread over the steps."""
    (c1, b1), (cn, bn) = _profiled(fn, ids, 1, device), _profiled(fn, ids, 1 + new, device)

    def per_step(a: dict, b: dict) -> dict:
        return {k: (b.get(k, 0) - a.get(k, 0)) / new for k in b}

    counts, busy = per_step(c1, cn), per_step(b1, bn)
    keys = {"launches": ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC"),
            "syncs": ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"),
            "memcpy": ("cudaMemcpyAsync", "cudaMemcpy")}
    out = {k: sum(counts.get(n, 0) for n in names) for k, names in keys.items()}
    # Device time per step (kernels and copies): far below ms/step means the host (Python, launches) bounds the
    # step; near it, the device's work does.
    out["gpu_busy_ms"] = sum(busy.values())
    out["gpu_top"] = dict(sorted(busy.items(), key=lambda kv: -kv[1])[:8])
    out["aten_ops_per_step"] = dict(sorted(((k, v) for k, v in counts.items() if k.startswith("aten::")),
                                           key=lambda kv: -kv[1])[:25])
    return out


def op_profile(fn, ids, new: int) -> dict:
    """Cache-only ops per layer and step (mixkvq/kv/op_count.py), mean over ordinary decode steps and over flush steps;
    `data`: those on cache data (the rest are host-side lengths on a GPU)."""
    from mixkvq.kv.op_count import CacheOpCounter

    with CacheOpCounter() as counter:
        fn(ids, new)
    out = {}
    for kind, recs in counter.by_kind().items():
        if kind != "prefill":
            out[f"{kind}_ops"] = sum(r.total for r in recs) / len(recs)
            out[f"{kind}_data_ops"] = sum(r.data_total for r in recs) / len(recs)
    return out


def write_markdown(out: Path, meta: dict, rows: list[dict]) -> None:
    """profile.md from the rows of profile.json (also for rows merged from several calls)."""
    lines = [f"# Decode step profile ({meta['device']}, {meta['date']}, torch {meta['torch']})", "",
             f"Random-weight model, {meta['layers']} layers, batch {meta['batch']}, prompt {meta['prompt_tokens']} "
             f"tokens, {meta['new_tokens']} sampled new tokens; `python scripts/profile_decode_step.py`. Launches, "
             f"syncs, copies and device time per step come from calls of {meta.get('profile_tokens', 16)} new "
             "tokens.", "",
             "Cache ops: the aten ops of the cache's own work per layer and step (the model's SDPA and the rest of its "
             "forward left out), mean over ordinary decode steps / over flush steps (a block moved into a store, and "
             "the step after); in brackets those on cache data, the rest being host-side lengths on a GPU.", "",
             "| method | ms/step | GPU busy ms/step | tok/s | launches/step | syncs/step | memcpy/step "
             "| cache ops/layer/step (decode, flush) |",
             "|---|---|---|---|---|---|---|---|"]

    def ops(r, kind):
        return f"{r[f'{kind}_ops']:.0f} [{r[f'{kind}_data_ops']:.0f}]" if f"{kind}_ops" in r else "-"

    for r in rows:
        busy = f"{r['gpu_busy_ms']:.1f}" if "gpu_busy_ms" in r else "-"
        lines.append(f"| {r['method']} | {r['step_ms']:.1f} | {busy} | {r['tok_s']:.0f} | {r['launches']:.0f} | "
                     f"{r['syncs']:.0f} | {r['memcpy']:.0f} | {ops(r, 'decode')}, {ops(r, 'flush')} |")
    for r in rows:
        if r.get("graph_counts"):
            c = r["graph_counts"]
            lines += ["", f"{r['method']}: of the timed call's forwards, {c['replayed']} replayed from CUDA graphs, "
                      f"{c['recorded']} recorded, {c['eager']} eager (prefill, first step of a bucket)."]
    for r in rows:
        if r.get("gpu_top"):
            lines += ["", f"## {r['method']}: device time by kernel (per step)", "", "| kernel | ms |", "|---|---|"]
            lines += [f"| `{k[:90]}` | {v:.2f} |" for k, v in r["gpu_top"].items()]
        if "host" not in r:
            continue
        lines += ["", f"## {r['method']}: lines that synchronized the stream (per step)", ""]
        lines += [f"- `{x['site']}`: {x['per_step']:.1f}" for x in r["sync_sites"]] or ["- none"]
        lines += ["", f"## {r['method']}: host time by function ({meta.get('profile_tokens', 16)} steps, per step)", "",
                  "| function | calls | self us | cum us |", "|---|---|---|---|"]
        lines += [f"| `{h['function']}` | {h['calls_per_step']:.0f} | {h['self_us_per_step']:.0f} | "
                  f"{h['cum_us_per_step']:.0f} |" for h in r["host"]]
    (out / "profile.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--profile-tokens", type=int, default=16,
                    help="new tokens of the profiled calls (launches, device time, host time); the timed call makes "
                         "--new-tokens. Startup's eager steps weigh on a short one")
    ap.add_argument("--quick", action="store_true", help="step times, launches and device time only")
    ap.add_argument("--device", default="cuda", help="cpu: timings are a smoke test; the cache ops count as on a GPU")
    args = ap.parse_args()
    device = args.device

    model, tokenizer = build(args.config_dir, args.layers, device)
    ids = torch.randint(1000, 20000, (1, args.prompt_tokens), device=device)
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                date=datetime.date.today().isoformat(), torch=torch.__version__,
                batch=args.batch, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                profile_tokens=args.profile_tokens, layers=model.config.num_hidden_layers)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.methods.split(","):
        fn = make_generate(model, tokenizer, METHODS[name], args.batch, device)
        fn(ids, 4)  # warm-up: kernels built and tuned
        prefill = min(fn(ids, 1) for _ in range(2))
        total = fn(ids, args.new_tokens)
        step_ms = (total - prefill) / (args.new_tokens - 1) * 1e3
        graph_counts = getattr(fn, "graph_counts", None)  # of the timed call
        row = dict(method=name, step_ms=step_ms, prefill_ms=prefill * 1e3,
                   tok_s=args.batch * args.new_tokens / total, graph_counts=graph_counts,
                   **launch_profile(fn, ids, args.profile_tokens, device))
        if not args.quick:
            row.update(**op_profile(fn, ids, args.new_tokens),
                       host=host_profile(fn, ids, args.profile_tokens, args.top),
                       sync_sites=sync_sites(fn, ids, 8) if device == "cuda" else [])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("host", "aten_ops_per_step", "sync_sites")}),
              flush=True)
        # both records after every method: a call cut short keeps the methods it finished
        (args.out / "profile.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        write_markdown(args.out, meta, rows)


if __name__ == "__main__":
    main()
