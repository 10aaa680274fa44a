"""PyTorch reference decode attention: every stored token of the layer, dequantized, then SDPA.

It is the ground truth the fused kernels are tested against, and the path used on CPU. It uses the same
SDPA entry point as transformers, so the bf16 method reproduces a plain DynamicCache run token for token.

A stream's tokens in order are sink | store | window, and a token keeps its place in that order when it moves from
the window into the store. So the reference keeps, per stream, one buffer of every token of each row as attention
reads it (`ReferenceState`): a decode step writes the step's token into it (one copy) and, after the store was
written, the newly stored tokens dequantized over their full-precision copies; attention reads the buffer as it is,
with no concatenation. Stored tokens never change once written, so each is dequantized once. The buffer is working
memory of this kernel, not part of the cache, and is not counted in the cache's byte figures. A store that rewrites
its tokens bumps `version`, and the buffer is rebuilt.
"""

from __future__ import annotations

import weakref

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mixkvq.kv.ragged import Ragged, RaggedBuffer, ragged_cat, split_front, to_device


class ReferenceState:
    """Every token of one stream, per row, in order, as the reference attends over it (see the module doc)."""

    def __init__(self, stream):
        b, h, _, d = stream.window.data.shape
        self.tokens = RaggedBuffer(b, h, d, stream.window.data.dtype, stream.window.data.device)
        if stream.reserved_tokens is not None:
            self.tokens.reserve(stream.reserved_tokens)
        self.version = stream.store.version
        self.seq_len = -1  # the layer's length when last read: -1 builds the buffer from the stream
        self.releases = stream.releases
        self.stored = stream.store.tokens().clone()  # per row: store tokens already dequantized in `tokens`
        self.stored_common: int | None = None  # their common value while every row has as many
        self.offset = stream.sink_tokens if stream.sink is not None else 0  # a stored token's place after the sink

    def read(self, layer, stream) -> Ragged:
        store, newest = stream.store, stream.newest
        if store.version != self.version:
            self._build(stream)
        elif layer.seq_len == self.seq_len:  # read again within a step (tests): only a release can have come since
            if stream.releases != self.releases:
                self._add_stored(stream)
        elif layer.seq_len != self.seq_len + 1 or newest is None or newest.common != 1:  # not one decode step since
            self._build(stream)
        else:
            self.tokens.append(newest)  # this step's token (a release below may overwrite it: KVmix, KIVI-pmkvq)
            if stream.releases != self.releases:
                self._add_stored(stream)
        self.seq_len = layer.seq_len
        return self.tokens.view()

    def _build(self, stream) -> None:
        parts = [stream.sink.view()] if stream.sink is not None else []
        parts += [stream.store.ragged(), stream.window.view()]
        self.tokens.lens = torch.zeros_like(self.tokens.lens)
        self.tokens.append(ragged_cat(parts))
        self._stored_now(stream)

    def _stored_now(self, stream) -> None:
        self.stored = stream.store.tokens().clone()
        have = self.stored.tolist()
        self.stored_common = have[0] if have and min(have) == max(have) else None
        self.version, self.releases = stream.store.version, stream.releases

    def _add_stored(self, stream) -> None:
        """Dequantize the tokens stored since the last read over their full-precision copies."""
        store, dst = stream.store, self.tokens.data
        # One release since the last read, of k tokens in every row (a decode step's), or anything else.
        k = stream.last_release if stream.releases == self.releases + 1 else None
        unit = store.layout().read_unit  # e.g. channel-group stores decode whole blocks
        if k is not None and self.stored_common is not None:  # every row stored k tokens after as many: slices
            have = self.stored_common
            start = have - have % unit
            fresh = store.ragged(start)
            dst[:, :, self.offset + have:self.offset + have + k] = fresh.data[:, :, have - start:have - start + k]
            self.stored += k
            self.stored_common, self.releases = have + k, stream.releases
            return
        start = min(self.stored.tolist())
        start -= start % unit
        fresh = store.ragged(start)
        if k is not None:  # k tokens in every row, each after its own count: one gather and one scatter
            b, h, _, d = dst.shape
            src = (self.stored - start)[:, None] + torch.arange(k)
            idx = to_device(torch.stack((src, src + (self.offset + start))), dst.device)[:, :, None, :, None]
            dst.scatter_(2, idx[1].expand(b, h, k, d), fresh.data.gather(2, idx[0].expand(b, h, k, d)))
            self.stored += k
            self.releases = stream.releases
            return
        _, r = split_front(fresh, self.stored - start)
        valid = torch.arange(r.data.shape[2])[None, :] < r.lens[:, None]
        b, j = valid.nonzero(as_tuple=True)
        b, at, j = to_device(torch.stack((b, self.offset + self.stored[b] + j, j)), dst.device)
        dst[b, :, at] = r.data[b, :, j]
        self._stored_now(stream)


# Working state of this kernel, held beside the objects it serves and dropped with them (never stored on them):
# stream -> its ReferenceState; cache -> the step's row mask.
_STATES: "weakref.WeakKeyDictionary[object, ReferenceState]" = weakref.WeakKeyDictionary()
_MASKS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def stream_tokens(layer, name: str) -> Ragged:
    stream = getattr(layer, name)
    if stream.store is None and stream.sink is None:
        return stream.window.view()  # every token is in the window (bf16)
    if stream.store is None:
        return ragged_cat([stream.sink.view(), stream.window.view()])
    state = _STATES.get(stream)
    if state is None:
        state = _STATES[stream] = ReferenceState(stream)
    return state.read(layer, stream)


def decode_attention(module, query: torch.Tensor, layer, scaling: float) -> torch.Tensor:
    """query [B, Hq, 1, D] -> output [B, 1, Hq, D] over the layer's sink + quantized store + window."""
    keys, values = stream_tokens(layer, "key_stream"), stream_tokens(layer, "value_stream")
    return attend(module, query, keys, values, scaling, _step_mask(layer, keys, query.device))


def _step_mask(layer, keys: Ragged, device) -> torch.Tensor | None:
    """`row_mask` of this step, made by the first layer that needs it and shared by the others: every layer holds
    each row's seq_len - pad tokens, so one step's rows have the same lengths in every layer. `keys` is a buffer's
    view, whose `common` is None exactly when its rows differ."""
    if keys.common is not None:
        return None
    cache = getattr(layer, "cache", None)
    if cache is None:
        return row_mask(keys, device, ragged=True)
    key = (layer.seq_len, keys.data.shape[2], device)
    held = _MASKS.setdefault(cache, {})
    if key not in held:
        held.clear()
        held[key] = row_mask(keys, device, ragged=True)
    return held[key]


def row_mask(keys: Ragged, device, ragged: bool = False) -> torch.Tensor | None:
    """[B, 1, 1, T] True where row b has a token, or None when every row fills the width (`ragged`: known not to)."""
    lens, width = keys.lens, keys.data.shape[2]
    if not ragged and (keys.common == width if keys.common is not None else int(lens.min()) == width):
        return None
    valid = torch.arange(width)[None, :] < lens[:, None]
    return valid[:, None, None, :].to(device)


def attend(module, query: torch.Tensor, keys: Ragged, values: Ragged, scaling: float,
           mask: torch.Tensor | None | str = "rows") -> torch.Tensor:
    """SDPA of a one-token query over per-row key/value runs (also the fidelity probe's exact attention). `mask`:
    the rows' mask when the caller has it (None: every row fills the width), else made here from `keys.lens`."""
    if isinstance(mask, str):
        mask = row_mask(keys, query.device)
    out, _ = sdpa_attention_forward(module, query, keys.data, values.data, mask, dropout=0.0, scaling=scaling)
    return out
