"""scripts/tiered_page_bytes.py: bytes of MixKVQ's tiered key pages by section, from the stored blocks' counts."""

from __future__ import annotations

from tiny import load_script


def test_sections_add_up_to_the_stored_pages_and_hold_the_chosen_codes():
    script = load_script("tiered_page_bytes")
    layer = script.filled_layer(["method.target_bits=2.35"], batch=1, context=512)
    total, pages = script.page_bytes_by_section(layer)
    store = layer.key_stream.store
    per_block = store.block_tier_counts().sum(-1)  # every stored block's tiers hold all its channels
    assert per_block.shape[2] == 512 // store.layout().tiers.block and bool((per_block == script.HEAD_DIM).all())
    assert pages == 4 * script.KV_HEADS * (512 // store.layout().tiers.block)
    stored = sum(v for k, v in total.items() if not k.startswith("chosen"))
    assert stored == int(store.live_bytes.sum()) - pages // 4 * (store.layout().tiers.header_bytes + 8)
    for bits, section in ((16, "fp_values"), (4, "k4_codes"), (2, "k2_codes")):  # padding only adds
        assert 0 < total[f"chosen codes, {bits}-bit"] <= total[section]
