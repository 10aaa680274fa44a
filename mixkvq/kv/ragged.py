"""Ragged per-row token buffers: rows of a batch hold different numbers of real tokens (left padding, finished
samples), so every buffer keeps a per-row length and no pad token is ever stored. Lengths live on the host (they
drive Python-side flush decisions without device syncs); data lives on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor (indices, lengths) on `device` without stalling the host.

    A plain `.to("cuda")` of pageable memory synchronizes the stream: on the decode path that is one stall per
    call, hundreds per step. Through pinned memory the copy is queued like a kernel (the pinned block is not
    reused before the copy has run: PyTorch's host allocator records the stream). An expanded view cannot be pinned
    in place, so it is made contiguous first.
    """
    if t.device.type != "cpu" or torch.device(device).type != "cuda":
        return t.to(device)
    if torch.cuda.is_current_stream_capturing():
        # A recorded copy would read this host buffer's contents at every replay, not the values of that step.
        raise RuntimeError("a host tensor is copied to the device inside a decode step that a CUDA graph records; "
                           "that step's layer must not say it replays (QuantizedLayer.replay_tokens)")
    return t.contiguous().pin_memory().to(device, non_blocking=True)


@dataclass
class Ragged:
    """Left-aligned per-row runs: row b's tokens are data[b, :, :lens[b]] (lens: int64 on the host)."""

    data: torch.Tensor  # [B, H, T, X]
    lens: torch.Tensor  # [B]
    # Every row's length when they are all equal and the producer knows it without reading `lens` (a decode step's
    # one token per row): lets a buffer append without an op on the lengths. None: not known, read `lens`.
    common: int | None = None


def token_index(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, h, _, x = like.shape
    return idx[:, None, :, None].expand(b, h, idx.shape[1], x)


def left_align(x: torch.Tensor, start: torch.Tensor) -> Ragged:
    """Tokens x[b, :, start[b]:] of a left-padded batch as a left-aligned Ragged."""
    t = x.shape[2]
    if int(start.max()) == 0:
        return Ragged(x, torch.full_like(start, t), t)
    idx = to_device((torch.arange(t)[None, :] + start[:, None]).clamp_max(t - 1), x.device)
    return Ragged(x.gather(2, token_index(idx, x)), t - start)


def split_front(r: Ragged, n: torch.Tensor) -> tuple[Ragged, Ragged]:
    """(first n[b] tokens of each row, the rest)."""
    head = Ragged(r.data[:, :, : max(int(n.max()), 0)], n.clone())
    rest = r.lens - n
    width = max(int(rest.max()), 0)
    if bool((n == n[0]).all()):  # every row gives up as many tokens (a decode step): the rest is a slice
        return head, Ragged(r.data[:, :, int(n[0]):int(n[0]) + width], rest)
    idx = (torch.arange(width)[None, :] + n[:, None]).clamp_max(max(r.data.shape[2] - 1, 0))
    return head, Ragged(r.data.gather(2, token_index(to_device(idx, r.data.device), r.data)), rest)


def rectangular(r: Ragged) -> bool:
    return bool((r.lens == r.data.shape[2]).all())


def ragged_cat(parts: list[Ragged]) -> Ragged:
    """Concatenate per row, in order (sink, quantized store, window)."""
    parts = [p for p in parts if p.data.shape[2] > 0]
    lens = sum(p.lens for p in parts)
    if all(rectangular(p) for p in parts):  # equal rows (n samples of one prompt): a plain concatenation
        return Ragged(torch.cat([p.data for p in parts], dim=2), lens)
    width = int(lens.max())
    cat = torch.cat([p.data for p in parts], dim=2)
    j = torch.arange(width)[None, :]
    idx = torch.zeros(len(lens), width, dtype=torch.int64)
    base, offset = 0, torch.zeros_like(lens)
    for p in parts:
        inside = (j >= offset[:, None]) & (j < (offset + p.lens)[:, None])
        idx = torch.where(inside, base + j - offset[:, None], idx)
        base += p.data.shape[2]
        offset = offset + p.lens
    return Ragged(cat.gather(2, token_index(to_device(idx, cat.device), cat)), lens)


def from_token(r: Ragged, start: int) -> Ragged:
    if r.common is not None:  # equal rows: the lengths from the host, no op
        common = max(r.common - start, 0)
        return Ragged(r.data[:, :, start:], torch.tensor([common] * len(r.lens)), common)
    return Ragged(r.data[:, :, start:], (r.lens - start).clamp_min(0))


def grow(t: torch.Tensor, dim: int, need: int) -> torch.Tensor:
    """Amortised doubling along `dim`; what is stored is copied once, never re-quantized."""
    if t.shape[dim] >= need:
        return t
    shape = list(t.shape)
    shape[dim] = max(need, 2 * t.shape[dim], 16)
    grown = torch.zeros(shape, dtype=t.dtype, device=t.device)
    grown.narrow(dim, 0, t.shape[dim]).copy_(t)
    return grown


def reserve(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """`t` with room for exactly n entries along `dim` (unchanged when it has them): a known final size is
    allocated once, so no doubling slack is held or counted."""
    if t.shape[dim] >= n:
        return t
    shape = list(t.shape)
    shape[dim] = n
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


class RaggedBuffer:
    """A growable [B, H, capacity, X] tensor with per-row lengths (`reserve` sets the capacity once).

    `lens` (host) is the truth. The buffer also keeps the longest row's length, and the rows' common length while
    they are all equal, as Python ints, so that a decode step's append, read and release dispatch no op on the
    lengths. Assigning `lens` drops those ints (they are read back from the tensor when next needed): change the
    lengths by assigning them, never in place through a reference to the tensor.
    """

    def __init__(self, batch: int, heads: int, width: int, dtype: torch.dtype, device, capacity: int = 0):
        self.data = torch.zeros(batch, heads, capacity, width, dtype=dtype, device=device)
        self._lens = torch.zeros(batch, dtype=torch.int64)
        self._top, self._common = 0, 0
        self.floor = capacity  # the capacity a release never shrinks the buffer below (`reserve`)
        # The lengths on the data's device (`track_on_device`), so that a decode step writes and reads by device
        # tensors alone and can be replayed from a CUDA graph: one-token appends and common drops update it there;
        # any other change of the lengths copies them over it.
        self.device_lens: torch.Tensor | None = None

    @property
    def lens(self) -> torch.Tensor:
        return self._lens

    @lens.setter
    def lens(self, value: torch.Tensor) -> None:
        self._lens = value
        self._top = None
        self._refresh_device_lens()

    def track_on_device(self) -> torch.Tensor:
        """Start keeping the lengths on the device (see `device_lens`); returns them."""
        if self.device_lens is None:
            self.device_lens = to_device(self._lens, self.data.device).clone()
        return self.device_lens

    def _refresh_device_lens(self) -> None:
        # Copied into the tensor already tracked, which stays where it is: a recorded step that reads it stays valid.
        if self.device_lens is not None:
            self.device_lens.copy_(to_device(self._lens, self.data.device))

    @property
    def capacity(self) -> int:
        return self.data.shape[2]

    def advance(self, k: int) -> None:
        """The host side of appending k tokens to every row (k < 0: dropping -k from the front of every row), for a
        step whose device work a CUDA graph replays."""
        top, common = self._shape()
        self._lens += k
        self._top, self._common = top + k, None if common is None else common + k

    def _shape(self) -> tuple[int, int | None]:
        if self._top is None:
            lens = self._lens.tolist()  # a host read, no op
            self._top = max(lens, default=0)
            self._common = lens[0] if lens and min(lens) == self._top else None
        return self._top, self._common

    @property
    def top(self) -> int:
        """The longest row's length."""
        return self._shape()[0]

    @property
    def common(self) -> int | None:
        """Every row's length while they are all equal, else None."""
        return self._shape()[1]

    def append(self, r: Ragged) -> None:
        top, common = self._shape()
        k = r.common
        if k is not None:  # every row appends k tokens (a decode step): no op on the lengths but their update
            if k == 0:
                return
            self.data = grow(self.data, 2, top + k)
            if self.device_lens is not None and k == 1:  # at the device lengths: the same ops at every step
                b, h, _, x = r.data.shape
                self.data.scatter_(2, self.device_lens[:, None, None, None].expand(b, h, 1, x), r.data[:, :, :1])
                self.device_lens += 1
                self.advance(1)
                return
            if common is not None:  # ... at the same place
                self.data[:, :, common:common + k] = r.data[:, :, :k]
            else:  # ... each at its own length: one scatter
                b, h, _, x = r.data.shape
                at = to_device(self._lens, self.data.device)[:, None, None, None]
                if k > 1:
                    at = at + torch.arange(k, device=self.data.device)[:, None]
                self.data.scatter_(2, at.expand(b, h, k, x), r.data[:, :, :k])
            self.advance(k)
            self._refresh_device_lens()
            return
        if int(r.lens.max()) == 0:
            return
        self.data = grow(self.data, 2, int((self._lens + r.lens).max()))
        if rectangular(r) and common is not None:  # every row appends at the same place
            self.data[:, :, common:common + r.data.shape[2]] = r.data
        else:
            valid = torch.arange(r.data.shape[2])[None, :] < r.lens[:, None]
            b, j = valid.nonzero(as_tuple=True)
            b, dst, j = to_device(torch.stack((b, self._lens[b] + j, j)), self.data.device)
            self.data[b, :, dst] = r.data[b, :, j]
        self._lens += r.lens
        self._top = None
        self._refresh_device_lens()

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` tokens per row, kept from here on (a release does not give it back)."""
        self.data = reserve(self.data, 2, tokens)
        self.floor = max(self.floor, tokens)

    def view(self) -> Ragged:
        top, common = self._shape()
        return Ragged(self.data[:, :, :top], self._lens, common)

    def front(self, n: torch.Tensor, k: int | None = None) -> Ragged:
        """The first n[b] tokens of each row, as a view of the buffer (`k`: n's common value, when known)."""
        if k is not None:
            return Ragged(self.data[:, :, :k], n, k)
        return Ragged(self.data[:, :, : max(int(n.max()), 0)], n)

    def drop_front(self, n: torch.Tensor, k: int | None = None) -> None:
        """Remove the first n[b] tokens of each row (`k`: n's common value, when known: a shift by one slice)."""
        top, common = self._shape()
        if k is not None:
            if top > k:  # source and destination overlap: the rest is copied out before it moves over
                self.data[:, :, : top - k] = self.data[:, :, k:top].clone()
            self.advance(-k)
            if self.device_lens is not None:
                self.device_lens -= k
        else:
            _, rest = split_front(self.view(), n)
            # The rest may be a view of this buffer (split_front's slice): copy it out before it is moved over.
            self.data[:, :, : rest.data.shape[2]] = rest.data.clone()
            self.lens = rest.lens
        keep = self.shrinks_to(self.top)
        if keep is not None:  # a prefill's worth left the window: give its room back
            self.data = self.data[:, :, :keep].clone()

    def shrinks_to(self, top: int) -> int | None:
        """The capacity a release that leaves `top` tokens shrinks the buffer to (None: it keeps its room)."""
        keep = max(2 * max(top, 16), self.floor)
        return keep if self.data.shape[2] > max(keep, 1024) else None

    def pop_front(self, n: torch.Tensor) -> Ragged:
        """The first n[b] tokens of each row, removed from the buffer (a copy)."""
        head = self.front(n)
        head = Ragged(head.data.clone(), n.clone())
        self.drop_front(n)
        return head

    def allocated_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def whole_blocks(r: Ragged, block: int):
    """The released tokens of each row (a multiple of `block` per row) as blocks: (blocks per row [B], row of each
    block [N], its index among its row's new blocks [N], blocks [N, H, block, D]), or None when there are none."""
    nb = r.lens // block
    assert bool((nb * block == r.lens).all()), "channel-group stores take whole blocks"
    if int(nb.sum()) == 0:
        return None
    b, h, _, d = r.data.shape
    rows = torch.repeat_interleave(torch.arange(b), nb)
    first = torch.cumsum(nb, 0) - nb
    local = torch.arange(len(rows)) - first[rows]
    dev = r.data.device
    grid = r.data[:, :, : int(nb.max()) * block].reshape(b, h, -1, block, d)
    rows_d, local_d = to_device(torch.stack((rows, local)), dev)
    return nb, rows, local, grid[rows_d, :, local_d]
