"""Run-to-run determinism and fake == packed on CUDA for KIVI (3 repetitions each), on a tiny bf16 Qwen2.

Usage on a GPU machine: python scripts/gpu_determinism_check.py
"""
import sys; sys.path.insert(0, "tests")
import torch
from tiny import build, generate, generate_dynamic, left_pad, random_prompts, tiny_model
model = tiny_model("qwen2", dtype=torch.bfloat16, q_heads=8, kv_heads=2, head_dim=128).to("cuda")
ids, mask = left_pad([p.cuda() for p in random_prompts([20, 161, 90], seed=3)])
L = dict(max_new_tokens=300, min_new_tokens=300)
d1 = generate_dynamic(model, ids, mask, **L); d2 = generate_dynamic(model, ids, mask, **L)
print("dynamic run-to-run equal:", torch.equal(d1, d2))
for name in ["kivi4", "kivi"]:
    runs = {st: [generate(model, build(name, model=model, storage=st), ids, mask, **L)[0] for _ in range(3)]
            for st in ("packed", "fake")}
    for st, r in runs.items():
        print(name, st, "run-to-run equal:", [torch.equal(r[0], x) for x in r[1:]])
    print(name, "fake==packed per run:", [torch.equal(a, b) for a, b in zip(runs["packed"], runs["fake"])])
