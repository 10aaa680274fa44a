"""Decode-attention kernel benchmark on one GPU: the fused kernel per method format against bf16 SDPA.

Shapes of DeepSeek-R1-Distill-Qwen-7B's attention (28 query heads, 4 KV heads, head_dim 128). For each (B, L),
each method's layer is filled with L random tokens per row through its own flush and pack path
(mixkvq/kv/synthetic.py), then one decode step's attention is timed with `triton.testing.do_bench` (median), side
by side with `scaled_dot_product_attention` over a bf16 cache of the same length (GQA-native, `enable_gqa`).
Bytes read are the layer's live bytes (codes, scales, zeros, width maps, full-precision windows) plus the query;
GB/s is bytes / time; the device-to-device copy bandwidth is measured in the same process for reference.

    python scripts/bench_decode_kernel.py --out results/bench            # writes decode_kernel.{json,md}
    python scripts/bench_decode_kernel.py --out results/bench --kernels triton,cuda   # both kernels, side by side
    python scripts/bench_decode_kernel.py --out results/bench --gates    # the CUDA kernel's gates: fragment_gates.*

`--kernels` names the kernels timed per method: `triton` (kernels/decode.py), `cuda` (kernels/fragment.py, the
uniform 2/4-bit formats on fragment pages) and `cuda-tiered` (kernels/tiered.py, MixKVQ's tiered blocks); methods a
kernel cannot read are skipped for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import time
from pathlib import Path

import torch
import triton

from kernels import decode, fragment, tiered
from mixkvq.config import load_config
from mixkvq.kv.methods import ModelShape, build_method
from mixkvq.kv.synthetic import fill_layer

Q_HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
SHAPES = [(1, 4096), (1, 32768), (8, 32768), (64, 32768)]
# Kernel configurations a run can compare side by side (`--configs`): fields of kernels/decode.py's TritonTuning.
CONFIGS = {
    "default": {},
    "one-kernel": dict(lean_min_tiles=None),  # whole tiles and the rest in one kernel
    "lean": dict(lean_min_tiles=0, lean_max_registers=None),  # whole tiles in their own kernel
    "lean-r168": dict(lean_min_tiles=0, lean_max_registers=168),
    "lean-r128": dict(lean_min_tiles=0, lean_max_registers=128),
    "lean-r96": dict(lean_min_tiles=0, lean_max_registers=96),
    "lean-r80": dict(lean_min_tiles=0, lean_max_registers=80),
    "pps8": dict(split_programs_per_sm=8),  # more, shorter programs: less idle SM time in the last wave
    "pps16": dict(split_programs_per_sm=16),
    "pps32": dict(split_programs_per_sm=32),
    "lean-pps8": dict(lean_min_tiles=0, split_programs_per_sm=8),
    "lean-pps16": dict(lean_min_tiles=0, split_programs_per_sm=16),
    "lean-pps32": dict(lean_min_tiles=0, split_programs_per_sm=32),
}


def tuning_of(config: str, base: decode.TritonTuning = decode.DEFAULT_TUNING) -> decode.TritonTuning:
    """The kernel settings of a named configuration, over `base`."""
    return dataclasses.replace(base, **CONFIGS[config])


# name -> config overrides. MixKVQ's `target_bits` is the mean over K and V codes with 2-bit values, so the
# keys average 2 * target - 2 bits: 2.15 -> 2.3 key bits, 2.35 -> 2.7 key bits.
METHODS = {
    "kivi-2": ["method=kivi"],
    "kivi-4": ["method=kivi4"],
    "mixkvq-k2.3": ["method=mixkvq", "method.target_bits=2.15"],
    "mixkvq-k2.7": ["method=mixkvq", "method.target_bits=2.35"],
    # KVmix's layers: the 2-bit ones (24 of 28 at its default), the 3/4-bit ones in the repository's format (11 codes
    # per word: Triton) and with plain 3-bit groups of 32 (`key3_format=g32`: the CUDA kernel, 4-bit page slots)
    "kvmix-k2v2": ["method=kvmix", "method.layer_bits={key:[2],value:[2]}"],
    "kvmix-k3v4": ["method=kvmix", "method.layer_bits={key:[3],value:[4]}"],
    "kvmix-k3v4-g32": ["method=kvmix", "method.layer_bits={key:[3],value:[4]}", "method.key3_format=g32"],
    # PM-KVQ at 2 bits (its budget: rows end at 2 bits); key reparameterization off (no calibration artifact; it
    # changes the keys' values, not the decode's cost)
    "pmkvq-2": ["method=pmkvq_fbit2", "method.reparameterize=false"],
}


def build(overrides: list[str]):
    cfg = load_config([*overrides, "model=deepseek-r1-distill-7b", "storage=packed", "~task", "~logger"])
    shape = ModelShape(layers=1, kv_heads=KV_HEADS, q_heads=Q_HEADS, head_dim=HEAD_DIM, dtype=torch.bfloat16,
                       device=torch.device("cuda"))
    return build_method(cfg, shape)


def copy_bandwidth() -> float:
    x = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (ms * 1e-3) / 1e9


def key_bits(layer) -> float:
    store = layer.key_stream.store
    if hasattr(store, "tiers"):  # tiered blocks: the widths they were written with
        counts = store.tier_counts
        return sum((16 if w == 0 else w) * n for w, n in counts.items()) / sum(counts.values())
    if not hasattr(store, "block_widths"):  # fragment pages (one width), PM-KVQ's rows: code bits per element
        return float(store.code_bits.sum()) / float(store.tokens().sum() * layer.heads * layer.dim)
    widths = store.block_widths()[:, :, : int(store.nblocks.min())].to(torch.int64)
    return float(torch.where(widths == 0, 16, widths).float().mean())


def bench_sdpa(bsz: int, ctx: int, gen) -> tuple[float, int]:
    q = torch.randn(bsz, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(bsz, KV_HEADS, ctx, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    f = torch.nn.functional.scaled_dot_product_attention
    ms = triton.testing.do_bench(lambda: f(q, k, v, enable_gqa=True))
    return ms, 2 * k.numel() * 2 + q.numel() * 2


def wall_us(fn, n: int = 200) -> float:
    """Microseconds per call of `fn` called back to back, host time included (what a decode step pays)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def filled(overrides, bsz: int, ctx: int, gen, kernel: str):
    method = build(overrides)
    layer = method.new_cache(bsz).layers[0]
    if kernel in KERNEL_LAYOUTS:
        supports, prepare = KERNEL_LAYOUTS[kernel]
        if supports(layer) is not None:
            return None, None
        prepare(layer)
    fill_layer(layer, ctx, Q_HEADS, gen)
    return method, layer


KERNEL_FNS = {  # name -> (query, layer, scaling, Triton tuning) -> output
    "triton": lambda q, layer, scaling, tuning: decode.fused_decode(q, layer, scaling, tuning=tuning),
    "cuda": lambda q, layer, scaling, tuning: fragment.fragment_decode(q, layer, scaling),
    "cuda-tiered": lambda q, layer, scaling, tuning: tiered.tiered_decode(q, layer, scaling),
}
# Kernels with a storage layout of their own: (why it cannot serve a layer, put a fresh layer into its layout).
KERNEL_LAYOUTS = {"cuda": (fragment.supports, fragment.prepare), "cuda-tiered": (tiered.supports, tiered.prepare)}


def bench_method(overrides, bsz: int, ctx: int, gen, tuning: decode.TritonTuning = decode.DEFAULT_TUNING,
                 kernel: str = "triton") -> dict | None:
    """One method's decode step timed with `kernel` (the Triton kernel with `tuning`); None if it cannot run it."""
    method, layer = filled(overrides, bsz, ctx, gen, kernel)
    if layer is None:
        return None
    run = functools.partial(KERNEL_FNS[kernel], tuning=tuning)
    q = torch.randn(bsz, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    scaling = HEAD_DIM**-0.5
    out = run(q, layer, scaling)
    ref = reference_output(q, layer, scaling) if bsz * ctx <= 8 * 32768 else None
    ms = triton.testing.do_bench(lambda: run(q, layer, scaling))
    nbytes = int(layer.live_bytes().sum()) + q.numel() * 2
    row = dict(ms=ms, bytes=nbytes, key_bits=key_bits(layer), wall_us=wall_us(lambda: run(q, layer, scaling)))
    if ref is not None:
        err = (out.float() - ref).double()
        row["sqnr_db"] = float(10 * torch.log10(ref.double().pow(2).sum() / err.pow(2).sum()))
    del layer, method
    torch.cuda.empty_cache()
    return row


def sdpa_wall(bsz: int, ctx: int, gen) -> float:
    q = torch.randn(bsz, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(bsz, KV_HEADS, ctx, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    f = torch.nn.functional.scaled_dot_product_attention
    return wall_us(lambda: f(q, k, v, enable_gqa=True))


def gates(out: Path) -> None:
    """The CUDA kernel's gates (KERNEL-ANCHORS.md section 6), each side by side with bf16 SDPA in this process."""
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_gbs = copy_bandwidth()
    scaling = HEAD_DIM**-0.5
    rows = []

    def add(gate, what, bsz, ctx, us, nbytes, sdpa_us, target, ok, **extra):
        rows.append(dict(gate=gate, what=what, B=bsz, L=ctx, us=us, bytes=nbytes, tbs=nbytes / us / 1e6,
                         sdpa_us=sdpa_us, speedup=sdpa_us / us if sdpa_us else None, target=target, met=bool(ok),
                         **extra))
        print(f"gate {gate} {what:34s} B={bsz:3d} L={ctx:6d} {us:8.1f} us {nbytes / us / 1e6:6.2f} TB/s "
              f"{'' if not sdpa_us else f'x{sdpa_us / us:.2f} '}[{target}] {'met' if ok else 'MISSED'}", flush=True)

    sdpa = {}
    for bsz, ctx in [(64, 32768), (8, 32768), (1, 4096), (1, 32768)]:
        sdpa[(bsz, ctx)] = bench_sdpa(bsz, ctx, gen)[0] * 1e3
    for name in ("kivi-2", "kivi-4"):
        _, layer = filled(METHODS[name], 64, 32768, gen, "cuda")
        pages = layer.key_stream.store.pages.data
        q = torch.randn(64, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        run = lambda: fragment.fragment_decode(q, layer, scaling)  # noqa: E731
        nbytes = int(layer.live_bytes().sum()) + q.numel() * 2
        if name == "kivi-2":
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            us = triton.testing.do_bench(lambda: fragment.read_pages(pages, sms * 8)) * 1e3
            add(1, "stream read of the pages", 64, 32768, us, pages.numel() * 4, None, "<= 230 us, >= 3.6 TB/s",
                us <= 230)
            us = triton.testing.do_bench(lambda: fragment.fragment_decode(q, layer, scaling, keys_only=True)) * 1e3
            key_bytes = int(layer.key_stream.live_bytes().sum())
            add(2, "keys only (QK)", 64, 32768, us, key_bytes, None, "<= 130 us", us <= 130)
        us = triton.testing.do_bench(run) * 1e3
        ref = reference_output(q, layer, scaling)
        err = (run().float() - ref).double()
        sqnr = float(10 * torch.log10(ref.double().pow(2).sum() / err.pow(2).sum()))
        target = 4.0 if name == "kivi-2" else 2.5
        add(3, f"{name} decode attention", 64, 32768, us, nbytes, sdpa[(64, 32768)], f">= {target}x SDPA",
            sdpa[(64, 32768)] / us >= target, sqnr_db=sqnr)
        if name == "kivi-2":  # other (pages in flight, CTAs per SM) builds, side by side
            for v, (stages, ctas) in fragment.VARIANTS.items():
                if v == 0:
                    continue
                tune = fragment.Tuning(ctas_per_sm=ctas, variant=v)
                us = triton.testing.do_bench(lambda: fragment.fragment_decode(q, layer, scaling, tune)) * 1e3
                add("3v", f"{name} [{stages} pages in flight, {ctas} CTAs/SM]", 64, 32768, us, nbytes,
                    sdpa[(64, 32768)], f">= {target}x SDPA", sdpa[(64, 32768)] / us >= target)
        del layer, pages
        torch.cuda.empty_cache()
    for bsz, ctx in [(8, 32768), (1, 4096), (1, 32768)]:
        _, layer = filled(METHODS["kivi-2"], bsz, ctx, gen, "cuda")
        q = torch.randn(bsz, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
        run = lambda: fragment.fragment_decode(q, layer, scaling)  # noqa: E731
        nbytes = int(layer.live_bytes().sum()) + q.numel() * 2
        if bsz == 8:
            us = triton.testing.do_bench(run) * 1e3
            add(3, "kivi-2 decode attention", bsz, ctx, us, nbytes, sdpa[(bsz, ctx)], ">= 3x SDPA",
                sdpa[(bsz, ctx)] / us >= 3)
        else:
            us = wall_us(run)
            sdpa_us = sdpa_wall(bsz, ctx, gen)
            target = "<= 25 us per call, host included" if ctx == 4096 else "<= 2x SDPA per call, host included"
            ok = us <= 25 if ctx == 4096 else us <= 2 * sdpa_us
            add(4, "kivi-2 call, host included", bsz, ctx, us, nbytes, sdpa_us, target, ok,
                gpu_us=triton.testing.do_bench(run) * 1e3)
        del layer
        torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), torch=torch.__version__,
                copy_gbs=copy_gbs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fragment_gates.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# CUDA decode kernel gates, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}; 28 query heads, 4 KV heads, head_dim 128, bf16; device copy bandwidth "
             f"{copy_gbs:.0f} GB/s (read + write). Times: do_bench medians, except gate 4 (wall time per call, back "
             "to back, host included). TB/s: the bytes the step must read over its time.", "",
             "| gate | what | B | L | time (us) | TB/s | SDPA (us) | speedup | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        sd = f"{r['sdpa_us']:.1f}" if r["sdpa_us"] else "-"
        lines.append(f"| {r['gate']} | {r['what']} | {r['B']} | {r['L']} | {r['us']:.1f} | {r['tbs']:.2f} | {sd} | "
                     f"{sp} | {r['target']} | {'yes' if r['met'] else 'no'} |")
    (out / "fragment_gates.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def reference_output(q, layer, scaling):
    from kernels.reference import stream_tokens

    k, v = stream_tokens(layer, "key_stream").data.float(), stream_tokens(layer, "value_stream").data.float()
    f = torch.nn.functional.scaled_dot_product_attention
    return f(q.float(), k, v, scale=scaling, enable_gqa=True).transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for decode_kernel.json and decode_kernel.md")
    ap.add_argument("--shapes", default=",".join(f"{b}x{l}" for b, l in SHAPES), help="BxL,BxL,...")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {list(METHODS)}")
    ap.add_argument("--num-warps", type=int, default=decode.DEFAULT_TUNING.num_warps,
                    help="warps per program of the split kernel")
    ap.add_argument("--max-registers", type=int, default=decode.DEFAULT_TUNING.max_registers,
                    help="registers per thread of the split kernel (fewer: more programs resident per SM)")
    ap.add_argument("--configs", default="default",
                    help=f"kernel configurations timed side by side, comma-separated, from {list(CONFIGS)}")
    ap.add_argument("--kernels", default="triton", help=f"kernels timed per method, from {list(KERNEL_FNS)}")
    ap.add_argument("--gates", action="store_true", help="measure the CUDA kernel's gates (fragment_gates.{json,md})")
    args = ap.parse_args()
    if args.gates:
        return gates(args.out)
    base = dataclasses.replace(decode.DEFAULT_TUNING, num_warps=args.num_warps, max_registers=args.max_registers)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    names = args.methods.split(",")
    configs = args.configs.split(",")
    if sorted(set(configs) - set(CONFIGS)):
        raise SystemExit(f"unknown config(s) {sorted(set(configs) - set(CONFIGS))}; choose from {list(CONFIGS)}")
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_gbs = copy_bandwidth()
    rows = []
    for bsz, ctx in shapes:
        sdpa_ms, sdpa_bytes = bench_sdpa(bsz, ctx, gen)
        rows.append(dict(method="bf16-sdpa", B=bsz, L=ctx, ms=sdpa_ms, bytes=sdpa_bytes, speedup=1.0,
                         gbs=sdpa_bytes / sdpa_ms / 1e6, key_bits=16.0, wall_us=sdpa_wall(bsz, ctx, gen)))
        for name in names:
            for config, kernel in [(c, k) for c in configs for k in args.kernels.split(",")]:
                r = bench_method(METHODS[name], bsz, ctx, gen, tuning_of(config, base), kernel)
                if r is None:
                    continue
                label = name if config == "default" else f"{name} [{config}]"
                label = label if kernel == "triton" else f"{label} [{kernel}]"
                rows.append(dict(method=label, B=bsz, L=ctx, speedup=sdpa_ms / r["ms"], gbs=r["bytes"] / r["ms"] / 1e6,
                                 **r))
                print(f"B={bsz:3d} L={ctx:6d} {label:24s} {r['ms'] * 1e3:8.1f} us  x{sdpa_ms / r['ms']:.2f}", flush=True)
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                torch=torch.__version__, triton=triton.__version__, copy_gbs=copy_gbs, num_warps=args.num_warps,
                tile=decode.TILE_TOKENS, max_registers=args.max_registers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_kernel.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Decode attention kernel, {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; 28 query heads, 4 KV heads, head_dim 128, bf16. "
             f"Measured device copy bandwidth: {copy_gbs:.0f} GB/s (read + write). "
             "Bytes: what the kernel must read (packed codes, scales, zeros, width maps, bf16 windows, query).", "",
             "`time`: GPU time (do_bench median); `call`: wall time per call back to back, host included.", "",
             "| B | L | method | key bits | time (us) | call (us) | MB read | GB/s | % of copy BW | speedup vs SDPA "
             "| SQNR dB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sq = f"{r['sqnr_db']:.1f}" if "sqnr_db" in r else "-"
        lines.append(f"| {r['B']} | {r['L']} | {r['method']} | {r['key_bits']:.2f} | {r['ms'] * 1e3:.1f} | "
                     f"{r['wall_us']:.1f} | {r['bytes'] / 1e6:.1f} | {r['gbs']:.0f} | {100 * r['gbs'] / copy_gbs:.0f}% | "
                     f"{r['speedup']:.2f}x | {sq} |")
    (args.out / "decode_kernel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
