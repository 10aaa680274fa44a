// PyTorch binding of the tiered-block decode kernel (tiered_decode.cuh): MixKVQ, one call per layer and decode
// step. An extension of its own (kernels/tiered.py), so that a layer on fragment pages never waits for it to build.
#include "decode_binding.h"
#include "tiered_decode.cuh"

using namespace fpd_host;

namespace {

template <typename T, int D, int VB, int VG>
void launch_tiered(fpd::Params& p, int batch, cudaStream_t stream) {
  // Resident CTAs per SM: 3 (at most 168 registers, no spills); each warp's ring as deep as three CTAs' rings fit an
  // SM's 228 KiB (1 KiB reserved per CTA).
  constexpr int CTAS = 3;
  constexpr auto fits = [](int ring) {
    return CTAS * (WARPS * fpd::tiered_warp_smem<D, VB, VG>(ring) + 1024) <= 228 * 1024;
  };
  constexpr int RING = fits(4) ? 4 : (fits(3) ? 3 : 2);
  launch_splits<T, D, fpd::tpd_split<T, D, VB, VG, WARPS, RING, CTAS>>(
      size_t(WARPS) * fpd::TieredSmem<D, VB, VG, RING>::WARP, true, p, batch, stream);
}

}  // namespace

// MixKVQ: keys in tiered blocks (pool [B, H, words] int32, offsets [B, H, blocks] int64 in words, `block_tokens`
// per block), values in values-only fragment pages [B, H, NP, W]; the rest as `decode`. Main splits run over whole
// blocks of both stores.
torch::Tensor tiered_decode(torch::Tensor q, torch::Tensor pool, torch::Tensor offsets, torch::Tensor vpages,
                            torch::Tensor kwin, torch::Tensor vwin, c10::optional<torch::Tensor> ksink,
                            c10::optional<torch::Tensor> vsink, c10::optional<torch::Tensor> sink_lens,
                            torch::Tensor key_store_lens, torch::Tensor value_store_lens,
                            torch::Tensor key_window_lens, double scale_log2, int64_t block_tokens,
                            int64_t value_bits, int64_t value_group, std::vector<int64_t> tuning,
                            std::vector<torch::Tensor> device_counts, std::vector<int64_t> bounds) {
  const int batch = q.size(0), d = q.size(3);
  TORCH_CHECK(pool.scalar_type() == torch::kInt32 && pool.stride(2) == 1 && offsets.scalar_type() == torch::kInt64 &&
              offsets.stride(2) == 1 && vpages.is_contiguous() && vpages.scalar_type() == torch::kInt32,
              "tiered decode: pool int32, offsets int64, value pages int32");
  TORCH_CHECK(vpages.size(3) * 4 == page_bytes(d, 0, value_bits, value_group), "tiered decode: value page size");
  TORCH_CHECK(block_tokens % fpd::PAGE_TOKENS == 0, "tiered decode: blocks of whole pages");
  const c10::cuda::CUDAGuard guard(q.device());
  fpd::Params p{};
  p.pages = vpages.data_ptr<int32_t>(); p.pg_sb = vpages.stride(0); p.pg_sh = vpages.stride(1);
  p.pool = pool.data_ptr<int32_t>(); p.pool_sb = pool.stride(0); p.pool_sh = pool.stride(1);
  p.offsets = offsets.data_ptr<int64_t>(); p.off_sb = offsets.stride(0); p.off_sh = offsets.stride(1);
  p.block_pages = int(block_tokens / fpd::PAGE_TOKENS);
  const auto extent = set_common(p, q, vpages.size(1), kwin, vwin, ksink, vsink, sink_lens, key_store_lens,
                                 value_store_lens, key_window_lens, scale_log2, device_counts, bounds,
                                 int(block_tokens));
  torch::Tensor part_o, part_ml;
  auto out = plan_and_allocate(p, q, extent, tuning, false, part_o, part_ml);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf16 || q.scalar_type() == torch::kHalf, "tiered decode: bf16 or fp16 queries");
#define TPD_CASE(T, D, VB, VG) \
  if (d == D && value_bits == VB && value_group == VG) return launch_tiered<T, D, VB, VG>(p, batch, stream), out;
  if (bf16) {
    TPD_CASE(__nv_bfloat16, 128, 2, 32) TPD_CASE(__nv_bfloat16, 128, 4, 32)
    TPD_CASE(__nv_bfloat16, 64, 2, 32) TPD_CASE(__nv_bfloat16, 64, 4, 32)
  } else {
    TPD_CASE(__half, 128, 2, 32) TPD_CASE(__half, 128, 4, 32) TPD_CASE(__half, 64, 2, 32) TPD_CASE(__half, 64, 4, 32)
  }
#undef TPD_CASE
  TORCH_CHECK(false, "tiered decode: no kernel for head_dim ", d, ", value bits ", value_bits, ", value group ",
              value_group);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tiered_decode", &tiered_decode, "decode attention over MixKVQ's tiered key blocks and value pages");
}
