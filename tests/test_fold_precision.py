"""scripts/fold_precision.py's model of the fragment kernel's folded-scale arithmetic: exact folds reproduce attention
over the exact dequantized values, and coarser operand rounding costs more."""

from __future__ import annotations

import torch

from tiny import load_script


def test_exact_folds_are_attention_over_the_exact_dequantized_tokens_and_rounding_costs():
    fp = load_script("fold_precision")
    gen = torch.Generator().manual_seed(0)
    keys, values, nq, kq, vq = fp.row_operands(gen, 300, 2, 64)
    q = fp.rand(gen, 4, 64)
    scaling = 64**-0.5
    # exact: code * s + z without the model dtype's rounding, the window as it is
    kc, ks, kz = (t.double() for t in kq)
    vc, vs, vz = (t.double() for t in vq)
    k = torch.cat(((kc * ks[..., None] + kz[..., None]).transpose(2, 3).reshape(2, nq, 64), keys[:, nq:].double()), 1)
    v = torch.cat(((vc * vs[..., None] + vz[..., None]).reshape(2, nq, 64), values[:, nq:].double()), 1)
    kr, vr = k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)
    p = torch.softmax((kr @ q.double()[:, :, None])[..., 0] * scaling, dim=-1)
    want = (p[:, None, :] @ vr)[:, 0]
    exact = fp.fold_model(q, keys, values, nq, kq, vq, None, scaling)
    assert fp.sqnr(exact, want) > 200  # the same sums, in another order
    db = {dt: fp.sqnr(fp.fold_model(q, keys, values, nq, kq, vq, dt, scaling), want)
          for dt in (torch.float16, torch.bfloat16)}
    assert 30 < db[torch.bfloat16] < db[torch.float16] < 80, db
