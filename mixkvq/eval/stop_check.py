"""generate's stop flag read one step late, so the host queues a decode step while the device runs the last one.

transformers' sampling loop reads `unfinished_sequences.max() == 0` on the host after every step: the host waits
for the device, then spends its own time (the loop's Python, logits processors, the cache's bookkeeping, a graph
replay's launch) while the device idles. With the step replayed from a CUDA graph that host time is 2.5-4.5 ms of a
10-15 ms step on an H200. transformers 5.23 already has the cure, `DeferredStopCheck`: the flag is copied to pinned
memory and read one step later, and the one extra forward made after every row finished is dropped from the output.
It enables it on MPS only, and for a cache that `generate` returns it rolls that cache back with `crop`, which a
quantized cache cannot do. Here it is enabled for the listed device types and the cache keeps the extra forward:
every row has finished by then, so the extra token is padding, which `QuantizedCache.sequence_stats` leaves out
(each row's statistics end at its own last token). The tokens are exactly those of the per-step check: the same
ops run in the same order, only the host reads the flag later.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager

import torch
import transformers.generation.utils as generation_utils

STOP_CHECKS = ("deferred", "every_step")


def deferred_stop_check(device_types: tuple[str, ...]) -> type:
    """A stand-in for transformers' `DeferredStopCheck` (same constructor and `is_supported`), enabled on
    `device_types`, never rolling the cache back; on a device without events (CPU) the flag is a plain tensor."""

    class OneStepLate(generation_utils.StopCheck):
        def __init__(self, input_ids, max_length, cache, cache_is_returned, streamer=None):
            super().__init__(streamer)
            self.max_length = max_length
            cuda = input_ids.device.type == "cuda"
            # Two slots: a slot's copy has run (its event was waited on) before the slot is written again.
            self.slots = deque((torch.zeros((), dtype=torch.bool, pin_memory=True), torch.cuda.Event())
                               for _ in range(2)) if cuda else None
            self.pending = None  # the last step's flag, read at the next step
            self.stop_reported = False

        @staticmethod
        def is_supported(device, cache, cache_is_returned, is_assistant) -> bool:
            return device.type in device_types and not is_assistant

        def __call__(self, unfinished_sequences, tokens, length: int) -> bool:
            if self.streamer is not None:
                self.streamer.put(tokens.cpu())
            done = unfinished_sequences.max() == 0
            if self.slots is not None:
                host, copied = self.slots[0]
                host.copy_(done, non_blocking=True)
                copied.record()
                self.slots.rotate()
                done = (host, copied)
            last, self.pending = self.pending, done
            if last is not None:
                if self.slots is not None:
                    last[1].synchronize()
                    last = last[0]
                self.stop_reported = bool(last)
            return self.stop_reported or (self.max_length is not None and length >= self.max_length)

        def finish(self) -> int:
            """The forward made after the last row finished is undone in the output (the cache keeps it)."""
            return 1 if self.stop_reported else 0

    return OneStepLate


@contextmanager
def stop_check(mode: str, device_types: tuple[str, ...] = ("cuda",)):
    """Within the block, generate reads its stop flag as `mode` says (`STOP_CHECKS`); "every_step" is transformers'
    own behaviour on CUDA and CPU."""
    if mode not in STOP_CHECKS:
        raise ValueError(f"stop_check={mode!r}: expected one of {', '.join(STOP_CHECKS)}")
    if mode == "every_step":
        yield
        return
    stock = generation_utils.DeferredStopCheck
    generation_utils.DeferredStopCheck = deferred_stop_check(device_types)
    try:
        yield
    finally:
        generation_utils.DeferredStopCheck = stock
