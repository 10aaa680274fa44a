// PyTorch binding of the fragment-page decode kernel (fragment_decode.cuh): one call per layer and decode step.
// Built by torch.utils.cpp_extension.load at first use (kernels/fragment.py).
#include "decode_binding.h"

using namespace fpd_host;

namespace {

template <typename T, int D, int KB, int VB, int VG, bool KEYS_ONLY, int ST = STAGES, int MC = MIN_CTAS>
void launch(fpd::Params& p, int batch, cudaStream_t stream) {
  constexpr size_t page = fpd::Page<D, KB, VB, VG>::BYTES, key_page = fpd::Page<D, KB, VB, VG>::KEY_BYTES;
  launch_splits<T, D, fpd::fpd_split<T, D, KB, VB, VG, WARPS, ST, KEYS_ONLY, MC>>(
      size_t(WARPS) * ST * (KEYS_ONLY ? key_page : page), !KEYS_ONLY, p, batch, stream);
}

template <typename T, int D>
void dispatch_bits(fpd::Params& p, int batch, cudaStream_t s, int kb, int vb, int vg) {
#define FPD_CASE(KB, VB, VG)                                          \
  if (kb == KB && vb == VB && vg == VG) {                             \
    if constexpr (D % VG == 0) return launch<T, D, KB, VB, VG, false>(p, batch, s); \
  }
  FPD_CASE(2, 2, 32) FPD_CASE(4, 4, 32) FPD_CASE(2, 4, 32) FPD_CASE(4, 2, 32)
  FPD_CASE(2, 2, 64) FPD_CASE(4, 4, 64) FPD_CASE(2, 2, 128) FPD_CASE(4, 4, 128)
#undef FPD_CASE
  TORCH_CHECK(false, "fragment decode: no kernel for key bits ", kb, ", value bits ", vb, ", value group ", vg);
}

}  // namespace

// q [B, Hq, 1, D]; pages [B, H, NP, W] int32; windows and sinks [B, H, T, D]; per-row token counts as int64 host
// tensors [B] (sink, key store, value store, key window; the layer's own counters, read here so the Python side
// does no arithmetic); returns [B, 1, Hq, D]. `tuning`: CTAs per SM, most splits, fewest tail tokens per split
// (kernels/fragment.py Tuning); keys_only times the key product alone.
torch::Tensor decode(torch::Tensor q, torch::Tensor pages, torch::Tensor kwin, torch::Tensor vwin,
                     c10::optional<torch::Tensor> ksink, c10::optional<torch::Tensor> vsink,
                     c10::optional<torch::Tensor> sink_lens, torch::Tensor key_store_lens,
                     torch::Tensor value_store_lens, torch::Tensor key_window_lens,
                     double scale_log2, int64_t key_bits, int64_t value_bits, int64_t value_group,
                     std::vector<int64_t> tuning, bool keys_only, int64_t variant,
                     std::vector<torch::Tensor> device_counts, std::vector<int64_t> bounds) {
  const int batch = q.size(0), d = q.size(3);
  TORCH_CHECK(pages.is_contiguous() && pages.scalar_type() == torch::kInt32);
  TORCH_CHECK(pages.size(3) * 4 == page_bytes(d, key_bits, value_bits, value_group), "fragment decode: page size");
  const c10::cuda::CUDAGuard guard(q.device());
  fpd::Params p{};
  p.pages = pages.data_ptr<int32_t>();
  p.pg_sb = pages.stride(0);
  p.pg_sh = pages.stride(1);
  const auto extent = set_common(p, q, pages.size(1), kwin, vwin, ksink, vsink, sink_lens, key_store_lens,
                                 value_store_lens, key_window_lens, scale_log2, device_counts, bounds,
                                 fpd::PAGE_TOKENS);
  torch::Tensor part_o, part_ml;
  auto out = plan_and_allocate(p, q, extent, tuning, keys_only, part_o, part_ml);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf16 || q.scalar_type() == torch::kHalf, "fragment decode: bf16 or fp16 queries");
#define FPD_DTYPE(T, D) dispatch_bits<T, D>(p, batch, stream, key_bits, value_bits, value_group);
  const bool kivi2 = bf16 && d == 128 && key_bits == 2 && value_bits == 2 && value_group == 32;
  TORCH_CHECK(variant == 0 || kivi2, "kernel variants: KIVI-2 bf16 head_dim 128 only");
  if (keys_only) {  // gate 2 only: KIVI-2 keys, bf16, head_dim 128
    TORCH_CHECK(kivi2, "keys_only: KIVI-2 bf16 head_dim 128 only");
    launch<__nv_bfloat16, 128, 2, 2, 32, true>(p, batch, stream);
  } else if (variant != 0) {  // benchmark-only (STAGES, MIN_CTAS) settings, timed side by side with the default
    using B16 = __nv_bfloat16;
    switch (variant) {
      case 1: launch<B16, 128, 2, 2, 32, false, 4, 4>(p, batch, stream); break;
      case 2: launch<B16, 128, 2, 2, 32, false, 6, 3>(p, batch, stream); break;
      case 3: launch<B16, 128, 2, 2, 32, false, 3, 4>(p, batch, stream); break;
      case 4: launch<B16, 128, 2, 2, 32, false, 2, 5>(p, batch, stream); break;
      case 5: launch<B16, 128, 2, 2, 32, false, 8, 2>(p, batch, stream); break;
      default: TORCH_CHECK(false, "kernel variant ", variant, " unknown (0-5)");
    }
  } else if (d == 128) {
    if (bf16) { FPD_DTYPE(__nv_bfloat16, 128) } else { FPD_DTYPE(__half, 128) }
  } else {
    TORCH_CHECK(d == 64, "fragment decode: head_dim 64 or 128");
    if (bf16) { FPD_DTYPE(__nv_bfloat16, 64) } else { FPD_DTYPE(__half, 64) }
  }
#undef FPD_DTYPE
  return keys_only ? part_ml : out;
}

// Gate 1: read every page of the given rows once (16-byte loads) and fold them into one word per CTA.
__global__ void stream_read(const int4* __restrict__ pages, int64_t n16, int64_t per_cta, int* __restrict__ sink) {
  const int64_t first = blockIdx.x * per_cta, last = min(first + per_cta, n16);
  int4 acc = make_int4(0, 0, 0, 0);
  for (int64_t i = first + threadIdx.x; i < last; i += blockDim.x) {
    int4 v;
    asm volatile("ld.global.cs.v4.s32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(pages + i));
    acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w;
  }
  int x = acc.x ^ acc.y ^ acc.z ^ acc.w;
  for (int o = 16; o > 0; o >>= 1) x ^= __shfl_xor_sync(0xffffffffu, x, o);
  if ((threadIdx.x & 31) == 0) atomicXor(sink, x);
}

torch::Tensor read_pages(torch::Tensor pages, int64_t ctas) {
  const c10::cuda::CUDAGuard guard(pages.device());
  TORCH_CHECK(pages.is_contiguous() && (pages.numel() * pages.element_size()) % 16 == 0);
  auto sink = torch::zeros({1}, pages.options().dtype(torch::kInt32));
  const int64_t n16 = pages.numel() * pages.element_size() / 16;
  const int64_t per = (n16 + ctas - 1) / ctas;
  stream_read<<<ctas, 512, 0, c10::cuda::getCurrentCUDAStream()>>>(reinterpret_cast<const int4*>(pages.data_ptr()),
                                                                    n16, per, sink.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sink;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "decode attention over fragment pages");
  m.def("read_pages", &read_pages, "stream every byte of a page buffer once (bandwidth gate)");
  m.def("plan", &plan, "(pages per main split, tail tokens per split) for a call's shape");
}
