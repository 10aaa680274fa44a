"""ChannelGroupStore's lockstep writes: when every row holds as many blocks as the others and releases the same whole
blocks (the rows of one prompt), a uniform-width store writes them by slices; it must store what the general path
stores, bit for bit, with the same counts, on the PyTorch path and through the Triton pack kernel."""

from __future__ import annotations

import pytest
import torch

from mixkvq.kv.quantizer import QuantSpec
from mixkvq.kv.ragged import Ragged
from mixkvq.kv.storage import ChannelGroupStore
from test_pack_kernels import DEVICES, assert_same_stores

B, H, D = 3, 2, 64
CASES = [(2, 32, 32, False), (4, 64, 32, False), (3, 33, 11, True)]  # (width, block, group, KVmix's 11 per word)


def stores(width, block, group, pack11, pack_kernel, device):
    spec = QuantSpec("half_even", "clamp", 1e-6, torch.bfloat16)
    made = [ChannelGroupStore(B, H, D, block, group, torch.bfloat16, device, spec, True, width, pack11=pack11,
                              pack_kernel=pack_kernel) for _ in range(2)]
    for st in made:
        st.reserve(6 * block)
    return made


def tokens(n, seed, device):
    x = torch.randn(B, H, n, D, generator=torch.Generator().manual_seed(seed)) * 3
    return x.to(torch.bfloat16).to(device)


def check_same(lockstep, general):
    assert_same_stores(lockstep, general)
    assert lockstep.tier_counts == general.tier_counts


def run(lockstep, general, appends):
    general._lockstep = False  # forces the general path (the flag only ever enables the slices)
    for r in appends:
        used_slices = lockstep._in_lockstep(r)
        for st in (lockstep, general):
            st.append(r, None)
        yield used_slices


@pytest.mark.parametrize("width,block,group,pack11", CASES)
@pytest.mark.parametrize("pack_kernel", ["torch", "triton"])
@pytest.mark.parametrize("device", DEVICES)
def test_lockstep_writes_store_what_the_general_path_stores(width, block, group, pack11, pack_kernel, device):
    a, b = stores(width, block, group, pack11, pack_kernel, device)
    common = [Ragged(tokens(2 * block, 1, device), torch.full((B,), 2 * block), 2 * block),  # a prefill's 2 blocks
              Ragged(tokens(block, 2, device), torch.full((B,), block), block)]  # a decode step's release
    assert list(run(a, b, common)) == [True, True]
    check_same(a, b)
    assert int(a.nblocks.min()) == 3 and a.tier_counts == {width: B * 3 * H * D}


@pytest.mark.parametrize("width,block,group,pack11", CASES)
def test_rows_out_of_step_take_the_general_path_until_every_row_is_level(width, block, group, pack11):
    a, b = stores(width, block, group, pack11, "torch", "cpu")
    ragged = Ragged(tokens(2 * block, 3, "cpu"), torch.tensor([block, 2 * block, 0]))  # prompts of other lengths
    even = Ragged(tokens(block, 4, "cpu"), torch.full((B,), block), block)
    catch_up = Ragged(tokens(2 * block, 5, "cpu"), torch.tensor([block, 0, 2 * block]))
    assert list(run(a, b, [ragged, even, catch_up, even])) == [False, False, False, True]
    check_same(a, b)
