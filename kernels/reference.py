"""PyTorch reference decode attention: every stored token of the layer, dequantized, then SDPA.

It is the ground truth the fused kernels are tested against, and the path used on CPU. It uses the same
SDPA entry point as transformers, so the bf16 method reproduces a plain DynamicCache run token for token.

Stored blocks never change once written, so the reference decodes each one from the packed store the first
time it is read and keeps the result (`ReferenceState`) for later steps: without that, every step would
dequantize the whole history. The kept copy is working memory of this kernel, not part of the cache, and is
not counted in the cache's byte figures. A store that rewrites its tokens bumps `version` to invalidate it.
"""

from __future__ import annotations

import weakref

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mixkvq.kv.ragged import Ragged, RaggedBuffer, ragged_cat, split_front


class ReferenceState:
    """Tokens of one store already decoded by the reference, per row."""

    def __init__(self, store, like: torch.Tensor):
        self.version = store.version
        self.decoded = RaggedBuffer(like.shape[0], like.shape[1], like.shape[3], like.dtype, like.device)

    def read(self, store) -> Ragged:
        have, total = self.decoded.lens, store.tokens()
        if bool((total > have).any()):
            start = int(have.min())
            start -= start % store.layout().read_unit  # e.g. channel groups decode whole blocks
            _, new = split_front(store.ragged(start), have - start)
            self.decoded.append(new)
        return self.decoded.view()


# store -> its ReferenceState: held while the store lives (a layer whose stores are replaced starts afresh).
_STATES: "weakref.WeakKeyDictionary[object, ReferenceState]" = weakref.WeakKeyDictionary()


def stream_tokens(layer, name: str) -> Ragged:
    stream = getattr(layer, name)
    parts = [stream.sink.view()] if stream.sink is not None else []
    store = stream.store
    if store is not None:
        state = _STATES.get(store)
        if state is None or state.version != store.version:
            state = _STATES[store] = ReferenceState(store, stream.window.data)
        parts.append(state.read(store))
    parts.append(stream.window.view())
    return ragged_cat(parts) if len(parts) > 1 else parts[0]


def decode_attention(module, query: torch.Tensor, layer, scaling: float) -> torch.Tensor:
    """query [B, Hq, 1, D] -> output [B, 1, Hq, D] over the layer's sink + quantized store + window."""
    return attend(module, query, stream_tokens(layer, "key_stream"), stream_tokens(layer, "value_stream"), scaling)


def attend(module, query: torch.Tensor, keys: Ragged, values: Ragged, scaling: float) -> torch.Tensor:
    """SDPA of a one-token query over per-row key/value runs (also the fidelity probe's exact attention)."""
    lens = keys.lens
    mask = None
    if int(lens.min()) != keys.data.shape[2]:  # rows of different lengths: hide each row's tail
        valid = torch.arange(keys.data.shape[2])[None, :] < lens[:, None]
        mask = valid[:, None, None, :].to(query.device)
    out, _ = sdpa_attention_forward(module, query, keys.data, values.data, mask, dropout=0.0, scaling=scaling)
    return out
