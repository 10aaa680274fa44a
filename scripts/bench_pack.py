"""Quantize-and-pack writes of the cache's flush paths: Triton kernels (kernels/pack.py) against the PyTorch path.

    python scripts/bench_pack.py OUT_DIR [--batch 1 64] [--layers 28] [--heads 4] [--dim 128] [--block 128]

GPU only. For each case, one step's worth of store writes (one append per layer, `--layers` layers of
`--heads` KV heads of `--dim` channels, bf16 model) is timed with CUDA events, through the same store
`append` the cache calls, once with stores built with `pack_kernel="triton"` and once with "torch":
- token release: KIVI values, sliding window: each row releases 1 token per step (TokenGroupStore);
- value block flush: MixKVQ values, lazy buffer: each row releases a block of `--block` tokens;
- key block flush: KIVI keys, uniform `--key-bits` per-channel groups (ChannelGroupStore);
- mixed key block flush: MixKVQ keys, per-channel widths drawn bf16/4/2-bit (`--mixed-shares`).
Both paths start from identical stores and inputs; the table says whether they stored identical bits.
Writes bench_pack.md and bench_pack.json to OUT_DIR and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from mixkvq.kv.quantizer import QuantSpec, words_for
from mixkvq.kv.ragged import Ragged, RaggedBuffer
from mixkvq.kv.storage import FULL_PRECISION, ChannelGroupStore, TokenGroupStore

DEVICE = "cuda"
CASES = ("token_release", "value_block_flush", "key_block_flush", "mixed_key_block_flush")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="directory for bench_pack.md and bench_pack.json")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128, help="tokens per block flush (R)")
    ap.add_argument("--key-bits", type=int, default=2)
    ap.add_argument("--key-group", type=int, default=32, help="tokens per per-channel key group")
    ap.add_argument("--value-bits", type=int, default=2)
    ap.add_argument("--value-group", type=int, default=32, help="channels per per-token value group")
    ap.add_argument("--mixed-shares", type=float, nargs=3, default=[0.1, 0.3, 0.6],
                    metavar=("BF16", "INT4", "INT2"), help="share of key channels at each MixKVQ width")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per case (each step: one append per layer)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    args = ap.parse_args(argv)
    for what, total, group in (("--key-group", args.block, args.key_group), ("--value-group", args.dim,
                                                                             args.value_group)):
        if group <= 0 or total % group:
            ap.error(f"{what}={group} must divide {total}")
    if abs(sum(args.mixed_shares) - 1) > 1e-6:
        ap.error("--mixed-shares must sum to 1")
    return args


def _token_store(args, batch, dtype, spec, capacity, pack_kernel):
    st = TokenGroupStore(batch, args.heads, args.dim, args.value_group, args.value_bits, dtype, DEVICE, spec, True,
                         pack_kernel)
    for buf in (st.codes, st.scale, st.zero):  # steady state: no growth inside the timed loop
        buf.data = torch.zeros(batch, args.heads, capacity, buf.data.shape[3], dtype=buf.data.dtype, device=DEVICE)
    return st


def _channel_store(args, batch, dtype, spec, blocks, width, pack_kernel):
    st = ChannelGroupStore(batch, args.heads, args.dim, args.block, args.key_group, dtype, DEVICE, spec, True, width,
                           pack_kernel=pack_kernel)
    fp_words = args.block * torch.finfo(dtype).bits // 32
    per_block = args.dim * (words_for(args.block, width) if width else max(fp_words, 1))
    st.pool = torch.zeros(batch, args.heads, blocks * per_block, dtype=torch.int32, device=DEVICE)
    ng = args.block // args.key_group
    st.scale = torch.zeros(batch, args.heads, blocks, args.dim, ng, dtype=spec.meta_dtype, device=DEVICE)
    st.zero = torch.zeros_like(st.scale)
    if width is None:
        st.widths = torch.zeros(batch, args.heads, blocks, args.dim, dtype=torch.uint8, device=DEVICE)
        st.offsets = torch.zeros(batch, args.heads, blocks, dtype=torch.int64, device=DEVICE)
    return st


def _widths_fn(args):
    tiers = torch.tensor([FULL_PRECISION, 4, 2], dtype=torch.uint8)
    shares = torch.tensor(args.mixed_shares)

    def widths_fn(blocks, rows):
        gen = torch.Generator().manual_seed(int(rows.sum()) + len(rows))
        pick = torch.multinomial(shares, blocks.shape[0] * blocks.shape[1] * blocks.shape[3], True, generator=gen)
        return tiers[pick].reshape(blocks.shape[0], blocks.shape[1], blocks.shape[3]).to(blocks.device)

    return widths_fn


def _case(args, name, batch, dtype, spec):
    """(make_stores(pack_kernel) -> per-layer stores, the per-step inputs, widths_fn)."""
    total = args.warmup + args.steps
    tokens = 1 if name == "token_release" else args.block
    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    x = [torch.randn(batch, args.heads, tokens, args.dim, generator=gen, device=DEVICE).to(dtype)
         for _ in range(args.layers)]
    r = [Ragged(t, torch.full((batch,), tokens, dtype=torch.int64)) for t in x]
    if name in ("token_release", "value_block_flush"):
        def make(pack_kernel):
            return [_token_store(args, batch, dtype, spec, total * tokens, pack_kernel) for _ in range(args.layers)]
        return make, r, None
    width = args.key_bits if name == "key_block_flush" else None
    def make(pack_kernel):
        return [_channel_store(args, batch, dtype, spec, total, width, pack_kernel) for _ in range(args.layers)]
    return make, r, _widths_fn(args) if width is None else None


def _run(stores, inputs, widths_fn, args) -> float:
    """Mean milliseconds per step (one append per layer) over the timed steps."""
    def step():
        for st, r in zip(stores, inputs):
            st.append(r, widths_fn)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / args.steps


def _same_bits(a, b) -> bool:
    def tensors(st):
        out = []
        for v in vars(st).values():
            if isinstance(v, RaggedBuffer):
                out += [v.data, v.lens]
            elif isinstance(v, torch.Tensor):
                out.append(v)
        return out

    def bits(t):
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

    return all(torch.equal(bits(x.cpu()), bits(y.cpu())) for x, y in zip(tensors(a), tensors(b)))


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_pack.py needs a CUDA device (it times the Triton kernels against the PyTorch path)")
    import triton

    import kernels.pack  # noqa: F401  (import errors surface here, not inside the timed loop)

    dtype = getattr(torch, args.dtype)
    spec = QuantSpec("half_even", "clamp", 1e-6, dtype)
    rows = []
    for name in args.cases:
        for batch in args.batch:
            make, inputs, widths_fn = _case(args, name, batch, dtype, spec)
            times, stores = {}, {}
            for mode in ("torch", "triton"):
                stores[mode] = make(mode)
                times[mode] = _run(stores[mode], inputs, widths_fn, args)
            same = all(_same_bits(a, b) for a, b in zip(stores["triton"], stores["torch"]))
            rows.append({
                "case": name, "batch": batch, "tokens_per_row": inputs[0].data.shape[2], "layers": args.layers,
                "torch_ms_per_step": times["torch"], "triton_ms_per_step": times["triton"],
                "torch_us_per_call": 1e3 * times["torch"] / args.layers,
                "triton_us_per_call": 1e3 * times["triton"] / args.layers,
                "speedup": times["torch"] / times["triton"], "identical_bits": same,
            })
            del stores
            torch.cuda.empty_cache()
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "dtype": args.dtype,
        "shape": {"heads": args.heads, "dim": args.dim, "block": args.block, "layers": args.layers},
        "key": {"bits": args.key_bits, "group": args.key_group}, "value": {"bits": args.value_bits,
                                                                         "group": args.value_group},
        "mixed_shares_bf16_int4_int2": args.mixed_shares, "steps": args.steps, "warmup": args.warmup,
    }
    header = ("| case | B | tokens/row | torch µs/call | triton µs/call | torch ms/step | triton ms/step | speedup "
              "| identical |\n|---|---|---|---|---|---|---|---|---|\n")
    table = header + "".join(
        f"| {r['case']} | {r['batch']} | {r['tokens_per_row']} | {r['torch_us_per_call']:.1f} | "
        f"{r['triton_us_per_call']:.1f} | {r['torch_ms_per_step']:.3f} | {r['triton_ms_per_step']:.3f} | "
        f"{r['speedup']:.2f}x | {'yes' if r['identical_bits'] else 'NO'} |\n" for r in rows)
    md = (f"# Pack kernels vs PyTorch store writes\n\n{meta['device']}, torch {meta['torch']}, triton "
          f"{meta['triton']}, {args.dtype}; H={args.heads}, D={args.dim}, {args.layers} layers per step "
          f"(a call is one layer's append).\n\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_pack.md").write_text(md)
    (args.out / "bench_pack.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(md)
    if not all(r["identical_bits"] for r in rows):
        sys.exit("the kernel and PyTorch paths stored different bits (see the table)")


if __name__ == "__main__":
    main()
