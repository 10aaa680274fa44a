"""Single-GPU offload check: the same greedy fp32 tokens with half the layers offloaded to the CPU as on one GPU.

A random-weight DeepSeek-R1-Distill-Qwen-7B cut to `--layers` layers (real widths) is written once as a checkpoint,
then loaded twice through `mixkvq.eval.models.load_model`: on one GPU, and with `model.device_map` putting the first half
of the layers on GPU 0 and offloading the rest to the CPU (accelerate keeps their weights in host memory and runs
them on GPU 0, so their caches live there). Every method generates greedily in fp32 through the harness's own path
(`mixkvq.eval.protocol.generate_samples`, EOS masked for `--tokens` tokens); the tokens must be identical.
Writes <out>.json and <out>.md; exits 1 on any difference.

    python scripts/gpu_offload_check.py --model-path .gpu/r1-7b --out results/bench/offload_check
    python scripts/gpu_offload_check.py --model-path <folder> --cpu-smoke --layers 2 --tokens 8 --out /tmp/check
        (no GPU: both loads on the CPU, every module mapped to 'cpu'; checks the flow, offloads nothing)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, run from anywhere

from mixkvq.config import load_config
from mixkvq.eval import placement
from mixkvq.eval.models import load_model, model_config
from mixkvq.eval.protocol import build_prompt, generate_samples
from mixkvq.kv.methods import ModelShape, build_method
from mixkvq.runs import provenance

MODEL = "deepseek-r1-distill-7b"
QUESTION = "A train leaves at 3 pm and travels 180 km at 60 km/h. When does it arrive?"
# --cpu-smoke: narrow layers (the real vocabulary), so two CPU cores run the flow in about a minute
SMOKE_WIDTHS = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}


def method_overrides(layers: int) -> dict[str, list[str]]:
    """Every method, with settings that need no calibration artifact. PM-KVQ cannot fold key scales into offloaded
    weights; a 32-token window and budgets for 512 tokens make its cache fill and shrink within the check."""
    low = [2] * (layers - 1)
    return {
        "bf16": [], "kivi": [], "kivi4": [], "mixkvq": [],
        "kvmix": [f"method.layer_bits={{key: {[3, *low]}, value: {[4, *low]}}}"],
        "pmkvq": ["method.allocation=uniform", "method.reparameterize=false", "method.max_len=512",
                  "method.window_tokens=32"],
    }


def split_map(layers: int, gpu: int | str) -> dict[str, int | str]:
    """Embeddings, norm, head and the first half of the layers on `gpu`; the second half offloaded to the CPU."""
    out: dict[str, int | str] = {"model.embed_tokens": gpu, "model.rotary_emb": gpu, "model.norm": gpu, "lm_head": gpu}
    out.update({f"model.layers.{i}": gpu if i < layers // 2 else "cpu" for i in range(layers)})
    return out


def write_checkpoint(model_path: str, overrides: dict, folder: Path) -> None:
    """Random weights (bf16, seeded) with the real tokenizer; the head scaled so greedy choices are not near-ties."""
    mc = model_config(MODEL, path=model_path, random_init=True, dtype="bfloat16", device="cpu", device_map=None,
                      config_overrides=overrides)
    loaded = load_model(mc)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(8.0)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


def weights_placement(model) -> dict[str, int]:
    """Layers by where their weights are: a device, or 'offloaded' (meta in the model, host memory in accelerate)."""
    from mixkvq.kv.attention import attention_modules

    counts: dict[str, int] = {}
    for mod in attention_modules(model):
        dev = mod.k_proj.weight.device
        key = "offloaded" if dev.type == "meta" else str(dev)
        counts[key] = counts.get(key, 0) + 1
    return counts


def run_all(mc, methods: dict[str, list[str]], tokens: int) -> dict:
    loaded = load_model(mc)
    model, tokenizer = loaded.model, loaded.tokenizer
    shape = ModelShape.of(model)
    devices = placement.devices_of(model)
    out = {"layers_run_on": placement.describe(model), "weights": weights_placement(model), "methods": {}}
    for name, overrides in methods.items():
        cfg = load_config([f"method={name}", "storage=packed", f"model={MODEL}", "~task", "~logger", *overrides])
        method = build_method(cfg, shape)
        method.prepare_model(model)
        prompt = build_prompt(tokenizer, QUESTION, cfg.prompt, loaded.think_prefix)
        placement.reset_peak_memory(devices)
        gen = {"do_sample": False, "max_new_tokens": tokens, "min_new_tokens": tokens}
        got = generate_samples(model, tokenizer, method, prompt, 1, gen, 0, cfg.attention.decode_kernel)
        peak, kind, per_device = placement.peak_memory(devices)
        out["methods"][name] = {"label": f"{name}-{method.nominal_bits}", "token_ids": got.token_ids,
                                "decode_kernels": got.decode_kernels, "seconds": got.seconds,
                                "payload_bits": round(got.cache_stats[0].get("payload_bits_final", float("nan")), 3),
                                "kv_peak_allocated_bytes": got.kv_peak_allocated_bytes, "peak_mem_bytes": peak,
                                "peak_mem_kind": kind, "peak_mem_per_device": per_device}
        print(f"  {name}: {len(got.token_ids[0])} tokens, {got.decode_kernels}, {got.seconds:.1f} s", flush=True)
    del model, loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(single: dict, split: dict) -> list[dict]:
    rows = []
    for name, ref in single["methods"].items():
        off = split["methods"][name]
        firsts = [first_difference(a, b) for a, b in zip(ref["token_ids"], off["token_ids"])]
        rows.append({"method": ref["label"], "equal": all(f is None for f in firsts), "first_difference": firsts,
                     "tokens": [len(t) for t in ref["token_ids"]],
                     "payload_bits": [ref["payload_bits"], off["payload_bits"]],
                     "kernels_single": ref["decode_kernels"], "kernels_offload": off["decode_kernels"],
                     "seconds_single": round(ref["seconds"], 2), "seconds_offload": round(off["seconds"], 2),
                     "peak_single": ref["peak_mem_per_device"] or ref["peak_mem_bytes"],
                     "peak_offload": off["peak_mem_per_device"] or off["peak_mem_bytes"]})
    return rows


def markdown(record: dict) -> str:
    lines = [f"# Offload check: {record['device']}", "",
             f"Random-weight {MODEL} cut to {record['layers']} layers, fp32, greedy, {record['tokens']} new tokens "
             f"per method (EOS masked). Single device: layers run on "
             f"{record['single']['layers_run_on']}, weights {record['single']['weights']}. Offload "
             f"(`model.device_map`): layers run on {record['offload']['layers_run_on']}, weights "
             f"{record['offload']['weights']}.", "",
             f"Same tokens for every method: **{record['all_equal']}**. {record['provenance']}", "",
             "| method | same tokens | first difference | payload bits at the end (single / offload) "
             "| kernels (single / offload) | s (single / offload) | peak bytes (single / offload) |",
             "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        bits = " / ".join(str(b) for b in r["payload_bits"])
        lines.append(f"| {r['method']} | {r['equal']} | {r['first_difference']} | {bits} | {r['kernels_single']} / "
                     f"{r['kernels_offload']} | {r['seconds_single']} / {r['seconds_offload']} | {r['peak_single']} / "
                     f"{r['peak_offload']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True, help="folder with the R1-Distill-Qwen-7B config and tokenizer")
    ap.add_argument("--out", type=Path, default=Path("results/bench/offload_check"), help="writes <out>.json, .md")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=160, help="new tokens: past the 128-token flush of the methods")
    ap.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(method_overrides(2)))
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: run the flow on the CPU, offloading nothing")
    args = ap.parse_args()
    if args.layers < 2:
        raise SystemExit("--layers must be at least 2 (half on the GPU, half offloaded)")
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA device (or --cpu-smoke)")
    methods = method_overrides(args.layers)
    if args.methods:
        unknown = sorted(set(args.methods.split(",")) - set(methods))
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; choose from {sorted(methods)}")
        methods = {m: methods[m] for m in args.methods.split(",")}
    gpu = "cpu" if args.cpu_smoke else 0
    common = dict(random_init=False, dtype="float32", max_new_tokens=args.tokens)
    with tempfile.TemporaryDirectory(prefix="offload-check-") as tmp:
        overrides = {"num_hidden_layers": args.layers, **(SMOKE_WIDTHS if args.cpu_smoke else {})}
        write_checkpoint(args.model_path, overrides, Path(tmp))
        print("single device", flush=True)
        single = run_all(model_config(MODEL, path=tmp, device="cpu" if args.cpu_smoke else "cuda:0", device_map=None,
                                      **common), methods, args.tokens)
        print("offload", flush=True)
        split = run_all(model_config(MODEL, path=tmp, device="auto", device_map=split_map(args.layers, gpu), **common),
                        methods, args.tokens)
    if not args.cpu_smoke and split["weights"].get("offloaded", 0) != args.layers - args.layers // 2:
        raise SystemExit(f"the device map did not offload the second half of the layers: {split['weights']}")
    rows = compare(single, split)
    prov = provenance.collect("cpu" if args.cpu_smoke else "cuda:0")
    record = {"device": prov["device"], "layers": args.layers, "tokens": args.tokens,
              "cpu_smoke": args.cpu_smoke, "all_equal": all(r["equal"] for r in rows), "rows": rows,
              "single": {k: single[k] for k in ("layers_run_on", "weights")},
              "offload": {k: split[k] for k in ("layers_run_on", "weights")},
              "provenance": f"git {prov['git_sha']} (dirty: {prov['git_dirty']}), {prov['versions']}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    return 0 if record["all_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
