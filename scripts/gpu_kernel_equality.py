"""Greedy decoding on a real model with the fused Triton decode kernel and with the PyTorch reference: same tokens?

For each method and question, generates `--tokens` tokens greedily twice (attention.decode_kernel=triton, then
torch) and records whether the token sequences are identical and, if not, where they first differ.

    python scripts/gpu_kernel_equality.py --questions questions.jsonl --out results/bench   # GPU only
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from mixkvq.config import load_config
from mixkvq.eval.models import load_model
from mixkvq.eval.protocol import build_prompt, generate_samples
from mixkvq.kv.methods import build_method


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=Path, required=True, help="JSONL with a 'question' field per line")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", default="bf16,kivi,kivi4,mixkvq")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--limit", type=int, default=4, help="questions to use")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this check needs a CUDA device")
    questions = [json.loads(line)["question"] for line in args.questions.read_text().splitlines() if line.strip()]
    questions = questions[: args.limit]
    rows = []
    for name in args.methods.split(","):
        cfg = load_config([f"method={name}", f"model={args.model}", "~task", "~logger"])
        loaded = load_model(cfg.model)
        method = build_method(cfg, loaded.model)
        gen = dict(do_sample=False, max_new_tokens=args.tokens)
        for i, q in enumerate(questions):
            prompt = build_prompt(loaded.tokenizer, q, cfg.prompt, loaded.think_prefix)
            fused = generate_samples(loaded.model, loaded.tokenizer, method, prompt, 1, gen, 0, "triton")
            ref = generate_samples(loaded.model, loaded.tokenizer, method, prompt, 1, gen, 0, "torch")
            diff = first_difference(fused.token_ids[0], ref.token_ids[0])
            rows.append(dict(method=name, question=i, tokens=len(ref.token_ids[0]), same=diff is None, first_diff=diff))
            print(rows[-1], flush=True)
    meta = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(), model=args.model,
                torch=torch.__version__)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_equality.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Fused kernel vs PyTorch reference, greedy, {args.model}, {meta['device']}, {meta['date']}", "",
             "| method | question | tokens | same tokens | first difference |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['question']} | {r['tokens']} | {r['same']} | {r['first_diff']} |" for r in rows]
    (args.out / "kernel_equality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
