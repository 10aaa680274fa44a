"""How closely the CUDA decode kernels follow fp64 attention, over many seeds (GPU only).

The GPU tests (tests/test_fragment_kernel.py, tests/test_tiered_kernel.py) check one random seed per run against a
floor; this prints the distribution behind that floor: per case, the kernel's SQNR against the fp64 ground truth
over `--seeds` seeds, beside bf16 SDPA over the same dequantized tokens (what bf16 arithmetic alone costs).

    python scripts/kernel_sqnr.py --out results/bench --cases 1x64,7x128 --seeds 30    # kernel_sqnr.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the GPU tests' layers and ground truth

from kernels import fragment, tiered  # noqa: E402
from kernels.reference import stream_tokens  # noqa: E402
from test_fragment_kernel import decoded, sqnr  # noqa: E402

KERNELS = {"cuda": ("kivi", [], fragment, fragment.fragment_decode),
           "cuda-tiered": ("mixkvq", [], tiered, tiered.tiered_decode)}


def sdpa_bf16(layer, query: torch.Tensor) -> torch.Tensor:
    """Per row, SDPA in the model's dtype over the layer's dequantized tokens, as [B, 1, Hq, D] fp64."""
    keys, values = stream_tokens(layer, "key_stream"), stream_tokens(layer, "value_stream")
    g = query.shape[1] // keys.data.shape[1]
    out = torch.empty(query.shape[0], 1, query.shape[1], query.shape[3], dtype=torch.float64)
    for b, n in enumerate(keys.lens.tolist()):
        k, v = (t.data[b:b + 1, :, :n].repeat_interleave(g, 1) for t in (keys, values))
        o = torch.nn.functional.scaled_dot_product_attention(query[b:b + 1], k, v, scale=query.shape[-1] ** -0.5)
        out[b, 0] = o[0, :, 0].double().cpu()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--kernel", choices=sorted(KERNELS), default="cuda")
    ap.add_argument("--cases", default="1x64,4x128,7x128,7x64,8x128", help="GQA x head_dim, comma-separated")
    ap.add_argument("--seeds", type=int, default=30)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_sqnr.py needs a CUDA device")
    name, overrides, module, decode = KERNELS[args.kernel]
    lines = [f"# {args.kernel} kernel against fp64 attention, {torch.cuda.get_device_name()}, "
             f"{datetime.date.today().isoformat()}", "",
             f"`python scripts/kernel_sqnr.py --kernel {args.kernel} --cases {args.cases} --seeds {args.seeds}`: "
             f"{name}, bf16, the layers of the GPU tests (rows of 301, 250 and 77 tokens, 20 decode steps), seeds 0 to "
             f"{args.seeds - 1}. SQNR in dB.", "",
             "| GQA x head_dim | kernel median | kernel lowest | bf16 SDPA median | bf16 SDPA lowest |",
             "|---|---|---|---|---|"]
    args.out.mkdir(parents=True, exist_ok=True)
    for case in args.cases.split(","):
        gqa, head_dim = (int(x) for x in case.split("x"))
        kernel_db, sdpa_db = [], []
        for seed in range(args.seeds):
            captured = {}

            def run(query, layer, scaling):  # the query too, for SDPA over the same tokens
                captured["query"] = query
                return decode(query, layer, scaling)

            layer, got, want = decoded(name, overrides, seed, gqa=gqa, head_dim=head_dim, steps=20, kernel=module,
                                       decode=run)
            kernel_db.append(sqnr(got, want))
            sdpa_db.append(sqnr(sdpa_bf16(layer, captured["query"]), want))
        lines.append(f"| {case} | {statistics.median(kernel_db):.1f} | {min(kernel_db):.1f} | "
                     f"{statistics.median(sdpa_db):.1f} | {min(sdpa_db):.1f} |")
        print(lines[-1], flush=True)
        (args.out / "kernel_sqnr.md").write_text("\n".join(lines) + "\n")  # after every case


if __name__ == "__main__":
    main()
