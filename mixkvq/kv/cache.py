"""The quantized KV cache: a `transformers.Cache` with one layer object per decoder layer.

A layer holds two `Stream`s (keys, values). A stream is sink (full precision) + quantized store + full
precision window. New tokens enter the sink until it is full, then the window; after each step's attention
the stream's window rule releases tokens from the window into the store. A method is the choice of window
rule, residual length, sink and store for each stream, plus an optional hook that picks per-channel widths
(MixKVQ). Storage, packing, byte accounting and attention are shared.

`update()` stores the new tokens and returns the exact K/V it was given: prefill attention uses them as is.
Decode attention never sees them; it reads the layer through the decode kernel (see attention.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from mixkvq.kv.ragged import Ragged, RaggedBuffer, left_align, ragged_cat, split_front
from mixkvq.kv.storage import ChannelGroupStore, TokenGroupStore

# How many window tokens each row releases after a step, given its window lengths w and residual R. A rule is
# elementwise (each row's count from its own length), so it is tabulated once per stream (`RULE_TABLE` lengths):
# a step whose windows the table covers decides without an op.
WINDOW_RULES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "keep": lambda w, r: torch.zeros_like(w),  # bf16 reference: nothing is ever quantized
    "flush": lambda w, r: (w // r) * r,  # modulo-R buffer: whole R-blocks leave once the buffer is full
    "sliding": lambda w, r: (w - r).clamp_min(0),  # the last R tokens stay at full precision
}
RULE_TABLE = 8192  # window lengths tabulated per stream (longer windows evaluate the rule on their lengths)


class Stream:
    """Keys or values of one layer."""

    def __init__(self, batch, heads, dim, dtype, device, window: str | Callable, residual: int, sink: int,
                 store: ChannelGroupStore | TokenGroupStore | None, widths_fn=None):
        # A name from WINDOW_RULES, or a method's own rule with the same signature (KVmix's RPC ratio).
        self.window_rule = WINDOW_RULES[window] if isinstance(window, str) else window
        self.residual, self.sink_tokens = residual, sink
        self.window = RaggedBuffer(batch, heads, dim, dtype, device)
        self.sink = RaggedBuffer(batch, heads, dim, dtype, device) if sink else None
        self.sink_full = not sink  # every row's sink holds its `sink` tokens: new tokens go straight to the window
        self.store = store
        self.widths_fn = widths_fn
        self.reserved_tokens: int | None = None  # set by reserve()
        self.fp_bits = torch.empty((), dtype=dtype).element_size() * 8
        self.fp_token_bytes = heads * dim * self.fp_bits // 8
        # Tokens each window length releases, and the shortest that releases any: with the rows' common window
        # length (or their longest below it) a step decides on the host alone.
        table = self.window_rule(torch.arange(RULE_TABLE), residual) if store is not None else None
        self.release_table: list[int] = table.tolist() if table is not None else []
        self.quiet_below = next((w for w, n in enumerate(self.release_table) if n > 0),
                                RULE_TABLE if store is not None else float("inf"))
        self.releases = 0  # store appends so far: readers that keep derived state (the reference decoder) compare it
        self.last_release: int | None = None  # tokens per row of the last one when every row moved as many
        self.newest: Ragged | None = None  # a decode step's token (the reference decoder copies it; not a prefill's)

    def append(self, r: Ragged) -> None:
        self.newest = r if r.common == 1 else None  # a prefill's K/V are not kept alive past their step
        if not self.sink_full:
            room = (self.sink_tokens - self.sink.lens).clamp_min(0)
            head, r = split_front(r, torch.minimum(room, r.lens))
            self.sink.append(head)
            self.sink_full = min(self.sink.lens.tolist()) >= self.sink_tokens
        self.window.append(r)

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` tokens per row, allocated now: the sink, the window when it keeps everything (bf16),
        and the store. Other windows hold a residual's worth after the prefill and keep growing as needed."""
        self.reserved_tokens = tokens
        if self.sink is not None:
            self.sink.reserve(self.sink_tokens)
        if self.window_rule is WINDOW_RULES["keep"]:
            self.window.reserve(tokens)
        elif self.store is not None:  # a decode step's window: the residual, the step's token and one to release
            self.window.reserve(min(self.residual + 2, tokens))
        if self.store is not None:
            self.store.reserve(tokens)

    def release(self, ahead: int = 0) -> None:
        """Move the tokens the window rule releases into the store. `ahead=1`: as the rule decides once the step's
        token is in the window, before it is appended (a layer that releases before attention, ahead of a step a
        CUDA graph replays; `replay_release` made sure the step's own token is not among them)."""
        if self.store is None:
            return
        window = self.window
        common = window.common
        if common is not None and common + ahead < len(self.release_table):  # equal windows: the table decides
            k = self.release_table[common + ahead]
            if k:
                self._move(torch.tensor([k] * len(window.lens)), k)
            return
        if window.top + ahead < self.quiet_below:  # no row's window is long enough to release anything
            return
        n = self.window_rule(window.lens + ahead if ahead else window.lens, self.residual)
        counts = n.tolist()
        if max(counts) > 0:
            self._move(n, counts[0] if min(counts) == max(counts) else None)

    def release_due(self, ahead: int = 0) -> bool:
        """Whether some row's window may release now (host lengths only; `release` then decides exactly)."""
        return self.store is not None and self.window.top + ahead >= self.quiet_below

    def replay_release(self, before_attention: bool = False) -> tuple[int, int | None] | None:
        """When this stream's next decode step writes and reads by device tensors alone (a CUDA graph can replay it):
        (tokens per row the step itself releases into the store, 0 or 1; the window's length before the step when it
        releases, since the window's shift copies that many), else None.

        Such a step appends its token at the window's device lengths, into room already there; a full sink stays as
        it is; a store takes part only if it keeps its token count on the device (`device_count`). A release of one
        token per row by device positions (`appends_one_by_device`) runs inside the step. Any other release (a
        block, a ragged window's) is left out of it: `QuantizedCache.release_outside` makes it with eager ops, after
        the step or, for a layer that releases before attention (`before_attention`), before it, from the window's
        oldest tokens (never the step's own). The window attended over is at most `quiet_below` tokens long (the CUDA
        kernel plans its tail for that: kernels/fragment.py)."""
        w, store = self.window, self.store
        if w.top >= w.capacity or not self.sink_full:
            return None
        if store is None:  # (the Triton kernel's device lengths of such a layer are its windows': no sink)
            return (0, None) if self.window_rule is WINDOW_RULES["keep"] and self.sink is None else None
        if getattr(store, "device_count", None) is None or w.top >= self.quiet_below:
            return None
        if w.top + 1 < self.quiet_below:  # no row's window reaches a release
            return 0, None
        common = w.common
        if common is not None and common + 1 < len(self.release_table):
            k = self.release_table[common + 1]
            if before_attention:  # every release before the step, none in it
                return (0, None) if k <= common else None
            if (k == 1 and getattr(store, "appends_one_by_device", False) and store.has_room(1)
                    and w.shrinks_to(common) is None):
                return 1, common
            return 0, None
        if before_attention and bool((self.window_rule(w.lens + 1, self.residual) > w.lens).any()):
            return None
        return 0, None

    def track_on_device(self) -> None:
        """Keep the window's (and a sink's) lengths on the device from here on (`RaggedBuffer.track_on_device`)."""
        self.window.track_on_device()
        if self.sink is not None:
            self.sink.track_on_device()

    def replay_buffers(self) -> list:
        """(address, shape) of every device tensor a replayable step of this stream writes or reads."""
        bufs = [self.window.data, self.window.device_lens]
        if self.sink is not None:
            bufs += [self.sink.data, self.sink.device_lens]
        if self.store is not None:
            bufs += self.store.replay_buffers()
        return [(t.data_ptr(), tuple(t.shape)) for t in bufs if t is not None]

    def advance_host(self, release: tuple[int, int | None]) -> None:
        """The host side of a decode step a CUDA graph replayed: the window took a token and released
        `release[0]` per row into the store (what `append` and `release` do on the host)."""
        k = release[0]
        self.window.advance(1 - k)
        if k:
            self.store.advance_host(k)
            self.releases += 1
            self.last_release = k
        self.newest = None

    def _move(self, n: torch.Tensor, k: int | None) -> None:
        """Store the first n[b] window tokens of each row (`k`: their common count), then drop them from the window:
        the store reads them in place, so the window shifts once, after."""
        self.store.append(self.window.front(n, k), self.widths_fn)
        self.window.drop_front(n, k)
        self.releases += 1
        self.last_release = k

    def ragged(self) -> Ragged:
        """Every stored token of each row in order, dequantized (the reference attention's input)."""
        parts = [self.sink.view()] if self.sink is not None else []
        if self.store is not None:
            parts.append(self.store.ragged())
        parts.append(self.window.view())
        return ragged_cat(parts) if len(parts) > 1 else parts[0]

    def fp_tokens(self) -> torch.Tensor:
        return self.window.lens + (self.sink.lens if self.sink is not None else 0)

    def tokens(self) -> torch.Tensor:
        return self.fp_tokens() + (self.store.tokens() if self.store is not None else 0)

    def code_bits(self) -> torch.Tensor:
        """Per row: code bits of every element, full-precision elements at their dtype width."""
        fp = self.fp_tokens().to(torch.float64) * self.fp_token_bytes * 8
        return fp + (self.store.code_bits if self.store is not None else 0)

    def live_bytes(self) -> torch.Tensor:
        """Per row: bytes held for the stored tokens (codes, scales, zeros, indices, full-precision tokens)."""
        fp = self.fp_tokens() * self.fp_token_bytes
        return fp + (self.store.live_bytes if self.store is not None else 0)

    def allocated_bytes(self) -> int:
        bufs = [self.window] + ([self.sink] if self.sink is not None else [])
        total = sum(b.allocated_bytes() for b in bufs)
        return total + (self.store.allocated_bytes() if self.store is not None else 0)


class QuantizedLayer(CacheLayerMixin):
    """One decoder layer's cache. Subclasses add method state (e.g. MixKVQ's query accumulator)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, layer_idx: int, key_stream: Stream, value_stream: Stream, pad: torch.Tensor,
                 heads: int, dim: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.key_stream, self.value_stream = key_stream, value_stream
        self.pad = pad  # left padding of each row in the prompt: never stored
        self.least_pad = int(pad.min()) if len(pad) else 0
        self.heads, self.dim = heads, dim
        self.seq_len = 0  # rectangular length as transformers counts it (pads included)
        self.query_start = pad  # per row: first real position of the current step's queries
        # A decode step's constants, made once: its queries start at 0 and each row stores one token.
        self.no_pad, self.one_each = torch.zeros_like(pad), torch.ones_like(pad)
        self.is_prefill = True  # set by each update(): the first one is the prefill
        self.is_initialized = True
        self.decode_fn = None  # set by attention.bind()
        self.graph_tokens: int | None = None  # while a CUDA graph records a decode step: the tokens its splits plan for
        self.releases_outside = False  # while set, the step's releases are left to `release_outside` (graphs.py) ...
        self.in_step: tuple | None = None  # ... but for those `replay_step` put in it (each stream's `replay_release`)
        self.probe = None  # fidelity diagnostics (mixkvq/eval/fidelity.py): sees the exact K/V and each decode output

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    # -- transformers cache API ------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != len(self.pad):
            raise ValueError(
                f"cache was built for batch {len(self.pad)} but got {key_states.shape[0]} rows; build it for "
                "batch_size * num_return_sequences"
            )
        self.is_prefill = self.seq_len == 0
        if self.is_prefill:
            start = self.pad
            keys, values = left_align(key_states, start), left_align(value_states, start)
        else:
            if key_states.shape[2] != 1:
                raise NotImplementedError("quantized caches decode one token per step (no chunked prefill)")
            start = self.no_pad
            keys, values = Ragged(key_states, self.one_each, 1), Ragged(value_states, self.one_each, 1)
        self.query_start = start
        self.key_stream.append(keys)
        self.value_stream.append(values)
        if self.probe is not None:
            self.probe.on_update(key_states, value_states, start)
        self.on_keys(key_states, start)
        self.seq_len += key_states.shape[2]
        if self.releases_before_attention and not self.releases_outside:
            self.key_stream.release()
            self.value_stream.release()
        return key_states, value_states

    # -- decode steps replayed from a CUDA graph (mixkvq/kv/graphs.py) ----------------------------------------

    # A subclass whose hooks cannot run outside a recorded step sets False; one whose host state per step follows from
    # the step alone adds it in `advance_host` (MixKVQ's query count); host work after attention that may write the
    # stores goes in `release_outside` (PM-KVQ's budget check).
    replays_decode_steps = True
    # Whether the window rules release right after the step's token is stored, before its attention (KVmix), rather
    # than after attention.
    releases_before_attention = False

    def replay_step(self) -> tuple[int, tuple] | None:
        """When the next decode step can be replayed from a CUDA graph (every write and read by device tensors):
        (an upper bound on the longest row's tokens after it, each stream's `replay_release`), else None. When it
        can, the streams keep their lengths on the device from here on (`Stream.track_on_device`)."""
        if not self.replays_decode_steps or self.probe is not None or self.seq_len == 0:
            return None
        ks, vs = self.key_stream, self.value_stream
        before = self.releases_before_attention
        releases = (ks.replay_release(before), vs.replay_release(before))
        if None in releases:
            return None
        ks.track_on_device(), vs.track_on_device()
        return self.seq_len + 1 - self.least_pad, releases  # each row holds seq_len - pad tokens

    def replay_buffers(self) -> tuple:
        """Where the device tensors a replayable step writes and reads live (address and shape): a recorded step is
        valid only while they stay where they were when it was recorded."""
        return tuple(self.key_stream.replay_buffers() + self.value_stream.replay_buffers())

    def release_outside(self, before_step: bool) -> bool:
        """The releases a step left out (`Stream.replay_release`), as eager ops at host positions: before the step
        for a layer that releases before attention, after it for the others. True when a store was written."""
        if before_step != self.releases_before_attention:
            return False
        ahead = 1 if before_step else 0
        moved = False
        for stream in (self.key_stream, self.value_stream):
            if stream.release_due(ahead):
                done = stream.releases
                stream.release(ahead)
                moved |= stream.releases != done
        return moved

    def advance_host(self, releases: tuple) -> None:
        """The host side of one decode step whose device work a CUDA graph replayed (what `update` and the
        attention's hooks do on the host for a step that `replay_step` allowed, with the releases it named)."""
        self.is_prefill = False
        self.query_start = self.no_pad
        self.key_stream.advance_host(releases[0])
        self.value_stream.advance_host(releases[1])
        self.seq_len += 1

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_len + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("build a new cache per generate call (the method factory does this)")

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("beam search and cache cropping are not supported by quantized caches")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported

    # -- hooks for methods ------------------------------------------------------------------------------------

    def on_keys(self, keys: torch.Tensor, start: torch.Tensor) -> None:
        """Sees every new key (post-RoPE) before it is stored away."""

    def observe_queries(self, query: torch.Tensor) -> None:
        """Sees every query (post-RoPE) of this layer before attention (MixKVQ's importance)."""

    def after_attention(self) -> None:
        if self.releases_outside:  # a step replays will make: only its in-step releases (`replay_step`)
            for stream, (k, _) in zip((self.key_stream, self.value_stream), self.in_step):
                if k:
                    stream.release()
        elif not self.releases_before_attention:
            self.key_stream.release()
            self.value_stream.release()

    def over_budget(self) -> torch.Tensor | None:
        """Per row: whether the layer holds more than a method's byte budget after this step (None: no budget)."""
        return None

    def budget_flags(self) -> torch.Tensor | None:
        """`over_budget()` as the step's statistics read it: None also when the method knows no row is over."""
        return self.over_budget()

    # -- accounting --------------------------------------------------------------------------------------------

    def tokens(self) -> torch.Tensor:
        return self.key_stream.tokens()

    def code_bits(self) -> torch.Tensor:
        return self.key_stream.code_bits() + self.value_stream.code_bits()

    def live_bytes(self) -> torch.Tensor:
        return self.key_stream.live_bytes() + self.value_stream.live_bytes()

    def elements(self) -> torch.Tensor:
        return (self.key_stream.tokens() + self.value_stream.tokens()) * self.heads * self.dim

    def allocated_bytes(self) -> int:
        return self.key_stream.allocated_bytes() + self.value_stream.allocated_bytes()

    def reserve(self, tokens: int) -> None:
        self.key_stream.reserve(tokens)
        self.value_stream.reserve(tokens)


class QuantizedCache(Cache):
    """All layers of one generate call, plus per-step statistics for the bits accounting (METHODS.md §2)."""

    def __init__(self, layers: list[QuantizedLayer], method: str, storage: str):
        super().__init__(layers=layers)
        self.method, self.storage = method, storage
        self.snapshots: list[dict[str, torch.Tensor]] = []  # one per forward step, per row
        self.peak_allocated_bytes = 0
        # Per row: the forward step at which a method ended the sample (PM-KVQ budget overflow), else -1.
        # Forward j produces token j+1, so a row stopped at j keeps its first j generated tokens.
        self.stop_step = torch.full((len(layers[0].pad) if layers else 0,), -1, dtype=torch.int64)
        # step_totals' per-store figures (by stream) and their sums, as of each store's last write.
        self._store_state: dict = {"entries": {}, "sums": None}
        self._deltas: dict[tuple, dict | None] = {}  # a replayed step's totals delta per pattern of releases
        self._left_out = False  # within `releases_left_out`: a step's forward records no statistics
        self._moved_outside = False  # a release left out of the current step wrote a store

    def stop_rows(self, rows: torch.Tensor) -> None:
        """End these rows' samples at the current forward step (the first stop of a row wins)."""
        rows = rows.to("cpu")
        fresh = rows[self.stop_step[rows] < 0]
        self.stop_step[fresh] = len(self.snapshots)

    def stopped(self) -> torch.Tensor:
        return self.stop_step >= 0

    def step_done(self, layer_idx: int, replayed: tuple | None = None) -> None:
        """Called after each layer's attention; after the last layer the step's totals are recorded. `replayed`: the
        releases of a step a CUDA graph replayed (it allocates nothing, and its totals follow from the last ones)."""
        if layer_idx != len(self.layers) - 1 or self._left_out:
            return
        if replayed is not None and self.snapshots:
            delta = self._replay_delta(replayed)
            if delta is not None:
                last = self.snapshots[-1]
                self.snapshots.append({**{k: last[k] + d for k, d in delta.items()},
                                       "over_budget": torch.zeros_like(last["over_budget"])})
                return
        over = torch.zeros(len(self.stop_step), dtype=torch.bool)
        for layer in self.layers:
            flags = layer.budget_flags()
            if flags is not None:
                over |= flags.cpu()
        self.snapshots.append({**self.step_totals(), "over_budget": over})
        if self.storage == "packed" and replayed is None:
            self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes())

    def _replay_delta(self, releases: tuple) -> dict[str, int] | None:
        """What a replayed step adds to every row's totals; the same at every replay of one pattern of releases."""
        if releases not in self._deltas:
            self._deltas[releases] = self._delta_of(releases)
        return self._deltas[releases]

    def _delta_of(self, releases: tuple) -> dict[str, int] | None:
        """Each stream took one full-precision token and moved k of its tokens into its store at the store's cost per
        token (`token_cost`). None when such a store does not know that cost, or a method keeps a byte budget: the
        step's totals are then counted as an eager step's."""
        bits = nbytes = elements = 0
        for layer, rel in zip(self.layers, releases):
            if type(layer).over_budget is not QuantizedLayer.over_budget:
                return None
            elements += 2 * layer.heads * layer.dim
            for stream, (k, _) in zip((layer.key_stream, layer.value_stream), rel):
                fp = stream.fp_token_bytes
                bits, nbytes = bits + 8 * fp, nbytes + fp
                if k:
                    cost = getattr(stream.store, "token_cost", None)
                    if cost is None:
                        return None
                    code_bits, live_bytes = cost()
                    bits, nbytes = bits + k * (code_bits - 8 * fp), nbytes + k * (live_bytes - fp)
        return {"code_bits": bits, "live_bytes": nbytes, "elements": elements}

    def step_totals(self) -> dict[str, torch.Tensor]:
        """Per row, summed over layers and streams: code bits, live bytes and elements (what `code_bits()`,
        `live_bytes()` and `elements()` of every layer add up to), in a few ops whatever the number of layers.

        Every stream holds each row's seq_len - pad tokens; those not in a store are at full precision. What the
        stores hold changes only when they are written (a release, a rewrite), so their sums are kept in between.
        Every value is an integer (code bits in float64, exact below 2^53), so the order of the sums changes none.
        """
        first = self.layers[0]
        streams = [s for layer in self.layers for s in (layer.key_stream, layer.value_stream)]
        fp_bytes = first.key_stream.fp_token_bytes
        assert all(s.fp_token_bytes == fp_bytes for s in streams), "streams of one cache share dtype and shape"
        tokens = first.seq_len - first.pad  # [B]: pads are never stored
        fp = tokens * len(streams)
        stored = self._store_sums(streams)
        if stored is not None:
            fp = fp - stored[0]
        code_bits = fp.to(torch.float64) * (fp_bytes * 8)
        live_bytes = fp * fp_bytes
        if stored is not None:
            code_bits, live_bytes = code_bits + stored[1], live_bytes + stored[2]
        elements = tokens * sum(2 * layer.heads * layer.dim for layer in self.layers)
        return {"code_bits": code_bits, "live_bytes": live_bytes, "elements": elements}

    def _store_sums(self, streams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(tokens, code bits, live bytes) per row over every store, recomputed only after a store was written."""
        held = self._store_state
        changed = False
        for s in streams:
            if s.store is None:
                continue
            key = (id(s.store), s.releases, s.store.version)
            entry = held["entries"].get(id(s))
            if entry is None or entry[0] != key:
                held["entries"][id(s)] = (key, s.store.tokens(), s.store.code_bits, s.store.live_bytes)
                changed = True
        if changed:
            entries = list(held["entries"].values())
            held["sums"] = tuple(torch.stack([e[i] for e in entries]).sum(0) for i in (1, 2, 3))
        return held["sums"]

    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes() for layer in self.layers)

    def replay_step(self) -> tuple[int, tuple] | None:
        """When every layer can replay the next decode step from a CUDA graph: (an upper bound on the longest row's
        tokens after it, every layer's releases: what a recording of the step is valid for), else None."""
        steps = []
        for layer in self.layers:
            step = layer.replay_step()
            if step is None:
                return None
            steps.append(step)
        return max(t for t, _ in steps), tuple(r for _, r in steps)

    def replay_buffers(self) -> tuple:
        return tuple(layer.replay_buffers() for layer in self.layers)

    def release_outside(self, before_step: bool) -> bool:
        """The releases every layer's step left out (`QuantizedLayer.release_outside`): those due before the step
        (layers that release before attention) or after it. True when a store was written."""
        moved = False
        for layer in self.layers:
            moved |= layer.release_outside(before_step)
        self._moved_outside |= moved
        return moved

    @contextmanager
    def releases_left_out(self, releases: tuple):
        """Within the block a decode step's forward (a CUDA graph records it, or it runs eagerly as a replay would)
        makes only the releases `replay_step` put in the step (`releases`: each layer's, one token per row at device
        positions) and records no statistics; `finish_step` makes the others and records them after it. On leaving,
        checks that the step made exactly those in-step releases: `advance_host` assumes them for its replays."""
        made = []
        for layer, planned in zip(self.layers, releases):
            layer.releases_outside, layer.in_step = True, planned
            made.append((layer.key_stream.releases, layer.value_stream.releases))
        self._left_out = True
        try:
            yield
        finally:
            for layer in self.layers:
                layer.releases_outside, layer.in_step = False, None
            self._left_out = False
        for layer, planned, before in zip(self.layers, releases, made):
            got = tuple(s.releases - n for s, n in zip((layer.key_stream, layer.value_stream), before))
            if got != tuple(int(k > 0) for k, _ in planned):
                raise RuntimeError(f"layer {layer.layer_idx}: a step planned with in-step releases {planned} made "
                                   f"{got} store appends (key, value)")

    def finish_step(self, replayed: tuple | None = None) -> bool:
        """After a step that left its releases out: make those due after it, then record the step's statistics (for a
        replayed step `replayed`, its releases: the last step's plus a constant delta, unless a release left out of
        the step wrote a store). True when a store was written, before or after the step."""
        self.release_outside(before_step=False)
        moved, self._moved_outside = self._moved_outside, False
        self.step_done(len(self.layers) - 1, replayed=None if moved else replayed)
        return moved

    def advance_host(self, releases: tuple) -> bool:
        """The host side of a decode step a CUDA graph replayed (`releases`: what `replay_step` said before it):
        every layer's, then `finish_step`. True when a release left out of the step wrote a store."""
        for layer, r in zip(self.layers, releases):
            layer.advance_host(r)
        return self.finish_step(replayed=releases)

    def reserve(self, tokens: int) -> None:
        """Allocate every layer for `tokens` tokens per row (prompt + max_new_tokens, known when generate starts)."""
        self.capacity = tokens
        for layer in self.layers:
            layer.reserve(tokens)

    def sequence_stats(self, n_generated: torch.Tensor) -> list[dict]:
        """Bits and bytes of each row at its own end (`*_final`) and averaged over its decode steps (`*_mean`).

        The forward that produced token k is snapshot k-1 (snapshot 0 is the prefill), so a row that generated
        n tokens ended at snapshot n-1; tokens a finished row keeps receiving afterwards are not counted.
        """
        if not self.snapshots:
            return [{} for _ in n_generated]
        stacked = {k: torch.stack([s[k] for s in self.snapshots]).to(torch.float64) for k in self.snapshots[0]}
        over = stacked["over_budget"]
        payload = stacked["code_bits"] / stacked["elements"]
        storage = stacked["live_bytes"] * 8 / stacked["elements"]
        out = []
        for b, n in enumerate(n_generated.tolist()):
            last = max(min(n, len(self.snapshots)) - 1, 0)
            steps = slice(1, last + 1) if last >= 1 else slice(0, 1)
            elements = stacked["elements"][last, b]
            out.append(
                {
                    "payload_bits_final": float(payload[last, b]),
                    "payload_bits_mean": float(payload[steps, b].mean()),
                    "storage_bits_final": float(storage[last, b]),
                    "storage_bits_mean": float(storage[steps, b].mean()),
                    "kv_bytes_final": int(stacked["live_bytes"][last, b]) if self.storage == "packed" else None,
                    "kv_bytes_bf16_final": int(elements) * 2,
                    # Steps that ended with some layer over its KV budget (PM-KVQ halves once per step).
                    "budget_over_steps": int(over[: last + 1, b].sum()),
                }
            )
        return out
