"""Where the bytes of MixKVQ's tiered key pages go (CPU, no GPU): per section of a 32-token page, the bytes the
layout stores against the bytes of the codes the method chose (without padding), for the mixes the kernel benchmark
times. The layers are filled as `scripts/bench_decode_kernel.py` fills them (mixkvq/kv/synthetic.py: random keys
through MixKVQ's own flush), with R1-7B's attention shape.

    python scripts/tiered_page_bytes.py --out results/bench/tiered_kernel/page_bytes.md
"""

from __future__ import annotations

import argparse
import datetime
from collections import Counter
from pathlib import Path

import torch

from mixkvq.config import load_config
from mixkvq.kv.layout import TIER_WIDTHS
from mixkvq.kv.methods import ModelShape, build_method
from mixkvq.kv.synthetic import fill_layer
from mixkvq.kv.tiered import to_tiered_pages

Q_HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128  # R1-7B, as the kernel benchmark
MIXES = {"mixkvq-k2.3": ["method.target_bits=2.15"], "mixkvq-k2.7": ["method.target_bits=2.35"],
         "mixkvq-C3.4": []}  # the kernel benchmark's mixes, and the R1-7B default


def filled_layer(overrides: list[str], batch: int, context: int, seed: int = 0):
    cfg = load_config(["method=mixkvq", *overrides, "model=deepseek-r1-distill-7b", "storage=packed", "~task",
                       "~logger"])
    shape = ModelShape(layers=1, kv_heads=KV_HEADS, q_heads=Q_HEADS, head_dim=HEAD_DIM, dtype=torch.bfloat16,
                       device=torch.device("cpu"))
    layer = build_method(cfg, shape).new_cache(batch).layers[0]
    to_tiered_pages(layer)
    fill_layer(layer, context, Q_HEADS, torch.Generator().manual_seed(seed))
    return layer


def page_bytes_by_section(layer) -> tuple[Counter, int]:
    """(bytes summed over the whole pages of the layer's blocks, per section and per tier's chosen codes; pages)."""
    store = layer.key_stream.store
    tiers = store.layout().tiers
    counts = store.block_tier_counts()
    counts = counts[counts.sum(-1) > 0]  # [blocks, 3]: the stored blocks
    per_tier = tuple(counts.unbind(-1))
    pages_per_block = tiers.block // 32
    pages = len(counts) * pages_per_block
    total = Counter({name: int(n.sum()) * pages_per_block for name, (_, n) in tiers.page_sections(per_tier).items()})
    for w, n in zip(TIER_WIDTHS, per_tier):  # the codes themselves: 32 tokens x channels x bits
        bits = 16 if w == 0 else w
        total[f"chosen codes, {bits}-bit"] = int(n.sum()) * 32 * bits // 8 * pages_per_block
    return total, pages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="markdown file to write")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    lines = [f"# MixKVQ's tiered key pages: bytes per 32-token page by section (CPU, {datetime.date.today()})", "",
             f"R1-7B attention shape (head_dim {HEAD_DIM}), {args.batch} rows x {KV_HEADS} KV heads x "
             f"{args.context} random tokens each, filled as the kernel benchmark fills them; "
             "`python scripts/tiered_page_bytes.py`. Sections: what the layout stores (tiers padded to whole "
             "16-channel k-steps, with their scales and zeros); `chosen codes`: the widths MixKVQ chose, unpadded.",
             ""]
    results = {name: page_bytes_by_section(filled_layer(ov, args.batch, args.context)) for name, ov in MIXES.items()}
    rows = sorted({k for total, _ in results.values() for k in total})
    lines += ["| bytes per page | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for key in rows:
        lines.append(f"| {key} | " + " | ".join(f"{total[key] / pages:.0f}" for total, pages in results.values())
                     + " |")
    stored = [sum(v for k, v in total.items() if not k.startswith("chosen")) / pages for total, pages in
              results.values()]
    lines.append("| **stored, all sections** | " + " | ".join(f"**{s:.0f}**" for s in stored) + " |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
