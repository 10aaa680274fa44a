"""Counting the tensor ops a decode step's cache work dispatches: the CPU stand-in for kernel launches.

A GPU decode step is bound by host overhead: each tensor op the cache dispatches costs a launch (or, on host-side
lengths, a dispatcher round trip) whatever its size. `CacheOpCounter` counts, per (forward step, layer), the aten
ops dispatched inside the cache's own code (`CACHE_CODE`: a layer's `update`, and the registered quantized-KV
attention function with every hook it calls: query observer, decode kernel, window release, step statistics), less
the model's own attention (`MODEL_CODE`: the SDPA call transformers makes with a DynamicCache too). Ops that launch
no kernel are left out (`launches`).

Attribution is by Python call frames (`sys.setprofile`), so caches built anywhere (tests, `run.py`'s protocol) are
counted without wrapping or patching anything; the profile hook makes the counted run slower, so time nothing
under it.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that launch no kernel (the rest would launch one each on a GPU): views and other aliases (`func.is_view`:
# view, as_strided, transpose, expand, slice, select, (un)squeeze, permute, t, alias, detach, split, unbind...),
# metadata-only reshapes (_unsafe_view, _reshape_alias), bare allocations (empty*, new_empty*: the caching
# allocator, no kernel), and reading one value to the host (_local_scalar_dense: `int(t)`; on host-side lengths
# it is free, and the decode path reads no device tensor).
NO_LAUNCH = frozenset({
    "_unsafe_view", "_reshape_alias", "lift_fresh", "empty", "empty_strided", "empty_like", "new_empty",
    "new_empty_strided", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
})


def launches(func) -> bool:
    """Whether an aten op would launch a device kernel (see NO_LAUNCH)."""
    return not func.is_view and func.overloadpacket.__name__ not in NO_LAUNCH


def on_data(args, kwargs, out) -> bool:
    """Whether an op touches cache data rather than per-row bookkeeping: a tensor of 3 or more dimensions ([B, H, T,
    D] buffers, [B, H, D] statistics) among its operands or results. On a GPU the others (lengths [B], index plans
    [B, T]) are host tensors: they cost dispatch time but launch nothing."""
    found = []
    for x in (args, kwargs or {}, out):
        torch.utils._pytree.tree_map(lambda t: found.append(t.dim() >= 3) if isinstance(t, torch.Tensor) else None, x)
    return any(found)


def _cache_code() -> tuple[set, set]:
    """(code objects whose ops are cache work, code objects of the model's own attention inside them)."""
    from transformers.cache_utils import DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from mixkvq.kv.attention import quantized_kv_attention
    from mixkvq.kv.cache import QuantizedLayer
    from mixkvq.kv.methods import METHODS

    for name in METHODS.names():  # every registered method's layer classes (the registry imports lazily)
        METHODS.get(name)
    layers, todo = [], [QuantizedLayer]
    while todo:
        cls = todo.pop()
        layers.append(cls)
        todo += cls.__subclasses__()
    cache = {cls.__dict__["update"].__code__ for cls in layers if "update" in cls.__dict__}
    cache |= {quantized_kv_attention.__code__, DynamicLayer.update.__code__}  # DynamicCache: the plain comparison
    return cache, {sdpa_attention_forward.__code__}


def _layer_of(frame):
    """The cache layer a cache-code frame works on (`update`'s self, the attention function's bound layer)."""
    loc = frame.f_locals
    if "self" in loc:
        return loc["self"]
    module = loc.get("module")
    return getattr(module, "kv_cache_layer", None)


def _store_state(layer) -> tuple:
    """(tokens per row of each stream's store, store versions): what a step's release or shrink changes."""
    out = []
    for name in ("key_stream", "value_stream"):
        stream = getattr(layer, name, None)
        store = getattr(stream, "store", None)
        if store is not None:
            out.append((store.tokens().clone(), store.version))
    return tuple(out)


@dataclass
class StepOps:
    """Cache work of one layer in one forward step."""

    step: int  # forward step: 0 is the prefill
    layer: int
    ops: Counter = field(default_factory=Counter)  # op name -> calls
    data_ops: Counter = field(default_factory=Counter)  # of those, the ops on cache data (`on_data`)
    before: tuple = ()
    after: tuple = ()
    # prefill; flush: a step with an `event`, or the one after it or after the prefill (a decoder that keeps
    # dequantized tokens reads the new blocks then); decode: any other step (nothing left a window, or one token per
    # row: a sliding window's slide).
    kind: str = "decode"

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def data_total(self) -> int:
        return sum(self.data_ops.values())

    @property
    def released(self) -> int:
        """Most tokens any row moved from a window into a store in this step (over both streams)."""
        moved = [int((a[0] - b[0]).max()) for a, b in zip(self.after, self.before)]
        return max(moved, default=0)

    @property
    def rewritten(self) -> bool:
        """Whether a store rewrote its stored tokens (PM-KVQ's width halving)."""
        return any(a[1] != b[1] for a, b in zip(self.after, self.before))

    @property
    def event(self) -> bool:
        """Whether a window released a block (more than one token in some row) or a store was rewritten."""
        return self.released > 1 or self.rewritten


class _Ops(TorchDispatchMode):
    def __init__(self, counter: "CacheOpCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        rec = self.counter._current()
        out = func(*args, **(kwargs or {}))
        if rec is not None and launches(func):
            name = func.overloadpacket.__name__
            rec.ops[name] += 1
            if on_data(args, kwargs, out):
                rec.data_ops[name] += 1
        return out


class CacheOpCounter:
    """`with CacheOpCounter() as c: model.generate(...)`, then `c.steps` (one StepOps per forward step and layer)."""

    def __init__(self):
        self.cache_code, self.model_code = _cache_code()
        self.steps: list[StepOps] = []
        self._stack: list[StepOps | None] = []  # innermost scope last: a record (cache work) or None (the model's)
        self._open: dict[int, StepOps] = {}  # id(layer) -> its record of the current step
        self._mode = _Ops(self)

    def _current(self) -> StepOps | None:
        return self._stack[-1] if self._stack else None

    def _record(self, layer, new_step: bool) -> StepOps:
        """The layer's record of the current step; a layer's outermost `update` opens its next step."""
        rec = self._open.get(id(layer))
        if rec is None or new_step:
            idx = getattr(layer, "layer_idx", None)
            if idx is None:  # DynamicLayer does not know its index: the order layers were first seen in
                idx = len({r.layer for r in self.steps}) if rec is None else rec.layer
            rec = StepOps(rec.step + 1 if rec is not None else 0, idx, before=_store_state(layer))
            self._open[id(layer)] = rec
            self.steps.append(rec)
        return rec

    def _profile(self, frame, event, arg):
        if event != "call" and event != "return":
            return
        code = frame.f_code
        if code in self.cache_code:
            if event == "call":
                layer = _layer_of(frame)
                outer = not self._stack
                opens = outer and code.co_name == "update"
                self._stack.append(self._record(layer, opens) if layer is not None else self._current())
            else:
                rec = self._stack.pop()
                if rec is not None and not self._stack:
                    rec.after = _store_state(_layer_of(frame))
        elif code in self.model_code:
            if event == "call":
                self._stack.append(None)
            else:
                self._stack.pop()

    def __enter__(self) -> "CacheOpCounter":
        self._mode.__enter__()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)
        self._mode.__exit__(*exc)

    # -- summaries -------------------------------------------------------------------------------------------

    def by_kind(self) -> dict[str, list[StepOps]]:
        out: dict[str, list[StepOps]] = {}
        previous: dict[int, StepOps] = {}
        for rec in self.steps:
            before = previous.get(rec.layer)
            # The prefill counts as an event: the first decode step is where decoders first read what it stored.
            rec.kind = "prefill" if rec.step == 0 else \
                "flush" if rec.event or (before is not None and (before.event or before.step == 0)) else "decode"
            previous[rec.layer] = rec
            out.setdefault(rec.kind, []).append(rec)
        return out

    def summary(self) -> dict[str, dict]:
        """Per step kind: records, and the mean and largest ops per layer and step."""
        out = {}
        for kind, recs in self.by_kind().items():
            totals = [r.total for r in recs]
            data = [r.data_total for r in recs]
            out[kind] = dict(records=len(recs), mean=sum(totals) / len(totals), max=max(totals),
                             data_mean=sum(data) / len(data), data_max=max(data))
        return out
