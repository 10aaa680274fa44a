"""Decode speed of one method on the default model on CPU: n samples of one prompt, fixed length.

    python scripts/cpu_decode_speed.py METHOD [DTYPE] [--tokens N] [--samples N] [--threads N]

Prints generated tokens per second (all samples together). CPU figures say how fast the reference path is
on this machine, not how fast a method is: speed claims come from the GPU kernels.
"""

from __future__ import annotations

import argparse
import time

import torch

from mixkvq.config import load_config
from mixkvq.eval.models import load_model
from mixkvq.eval.protocol import build_prompt, generate_samples
from mixkvq.kv.methods import build_method


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("method")
    ap.add_argument("dtype", nargs="?", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config([f"method={args.method}", f"model.dtype={args.dtype}"])
    loaded = load_model(cfg.model)
    method = build_method(cfg, loaded.model)
    prompt = build_prompt(loaded.tokenizer, "What is 17 * 23 + 4?", cfg.prompt, loaded.think_prefix)
    gen = dict(do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    start = time.perf_counter()
    generate_samples(loaded.model, loaded.tokenizer, method, prompt, args.samples, gen, 0, "auto")
    seconds = time.perf_counter() - start
    print(f"{args.method} {args.dtype} samples={args.samples} tokens={args.tokens} threads={args.threads}: "
          f"{args.samples * args.tokens / seconds:.1f} tok/s")


if __name__ == "__main__":
    main()
