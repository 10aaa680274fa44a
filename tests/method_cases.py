"""The method matrix: every method config the cache contract tests run, with what each needs to run on the tiny
random models (modelled on kvpress's tests/default_presses.py).

A method registered without a row here fails `test_every_registered_method_has_a_case`: a new method gets the
padded-batch, fake-versus-packed and storage-size checks by adding its row. Rows hold no calibration artifacts;
where a method needs one, the overrides give the settings calibration would choose.
"""

from __future__ import annotations

from dataclasses import dataclass

# PM-KVQ without a calibration artifact (uniform allocation, no key-scale folding); a 32-token window and a small
# budget, so that rows shrink within a few hundred tokens (`max_len=N`: a layer holds N tokens at 2 bits, N/8 at
# 16; the 16-bit sink and window count).
PMKVQ_NO_ARTIFACT = ["method.allocation=uniform", "method.reparameterize=false", "method.window_tokens=32",
                     "method.fbit=2"]


@dataclass(frozen=True)
class MethodCase:
    config: str  # configs/method/<config>.yaml
    overrides: tuple[str, ...] = ()
    quantized: bool = True  # holds quantized tokens, so storage is well below bf16's
    min_stored: int = 256  # tokens each layer's key store holds after 290 (what the contract tests feed)

    def build(self, model, storage: str = "packed"):
        from tiny import build

        return build(self.config, self.overrides, model=model, storage=storage)


METHOD_CASES = {
    "bf16": MethodCase("bf16", quantized=False),
    "kivi": MethodCase("kivi"),
    "kivi4": MethodCase("kivi4"),
    "mixkvq": MethodCase("mixkvq"),
    # two layers of the tiny models: the repo's 11-per-word 3-bit keys in layer 0, 2-bit in layer 1
    "kvmix": MethodCase("kvmix", ("method.layer_bits={key:[3,2],value:[4,2]}",)),
    # rows end at 4 or 2 bits after 300 new tokens, none stops on its budget
    "pmkvq": MethodCase("pmkvq", (*PMKVQ_NO_ARTIFACT, "method.max_len=1024")),
}
