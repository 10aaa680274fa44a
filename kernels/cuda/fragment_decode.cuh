// Decode attention over fragment pages (mixkvq/layout.py FragmentPageLayout), for Hopper (sm_90a) and Ampere.
//
// One CTA per (split, KV head, row). A split is a run of whole pages (main splits) or a run of the tokens that are
// not in a whole page of both streams (tail splits: sink, the incomplete last page, the full-precision windows).
//
// Main splits, per warp and page (32 tokens), everything in registers:
//   keys as the MMA A operand (M = 16 tokens, K = 16 channels), the GQA group's queries as B (N = 8 heads):
//     S^T = C^T q'^T + bias, with q' = q * s (the page's per-channel key scales, one bf16x2 multiply per pair) and
//     bias = z . q (the zeros as the only row of one more A tile);
//   codes become 16-bit floats with one lop3 (magic-number exponent) and one fma per register pair;
//   online softmax on the accumulator; P^T fragments by movmatrix.trans;
//   values as A (M = 16 channels, K = 16 tokens): O^T += C_v^T (P' )^T with P' = P * s_v per channel group, and
//   the zero term Z_v^T P^T accumulated by one MMA per 16 tokens into its own accumulator.
// Pages stream through shared memory with cp.async, STAGES pages ahead per warp; codes never leave registers
// once dequantized.
//
// Tail splits dequantize element by element exactly as the PyTorch reference does (code * scale + zero in fp32,
// rounded to the model dtype) and run on CUDA cores: a warp per token, a lane per D / 32 channels.
//
// Splits write unnormalized partial outputs with their running max and sum (base 2); `fpd_merge` combines them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace fpd {

constexpr int PAGE_TOKENS = 32;
constexpr int HEADS = 8;        // the MMA's N: query heads of one KV head, padded with zero queries
constexpr int MAX_ROWS = 512;   // batch rows whose lengths travel in the kernel parameters

struct Params {
  const int32_t* pages;  // [B, H, pages, page_words]
  int64_t pg_sb, pg_sh;  // strides in int32 words
  const void* q;         // [B, Hq, 1, D]
  int64_t q_sb, q_sh;
  const void* kwin; int64_t kw_sb, kw_sh, kw_st;
  const void* vwin; int64_t vw_sb, vw_sh, vw_st;
  const void* ksink; int64_t ksk_sb, ksk_sh, ksk_st;
  const void* vsink; int64_t vsk_sb, vsk_sh, vsk_st;
  float* part_o;    // [B, H, n_splits, HEADS, D]
  float* part_ml;   // [B, H, n_splits, HEADS, 2]: running max (log2 units) and sum
  void* out;        // [B, 1, Hq, D]
  int n_splits, n_main, pages_per_split, tail_per_split;
  int gqa, n_kv;
  float scale_log2;  // softmax scale * log2(e)
  int4 lens[MAX_ROWS];  // per row: sink tokens, key store tokens, value store tokens, tokens after the sink
  // When set (a step a CUDA graph replays), the counts are read from these device arrays instead of `lens`:
  // key store, value store and key window tokens per row, and the sink's (null: none).
  const int64_t* dev_kq; const int64_t* dev_vq; const int64_t* dev_kw; const int64_t* dev_sink;
  // MixKVQ's tiered key blocks (tiered_decode.cuh; `pages` then holds values only): [B, H, words] pools, block
  // offsets [B, H, blocks] in words, pages per block.
  const int32_t* pool; int64_t pool_sb, pool_sh;
  const int64_t* offsets; int64_t off_sb, off_sh;
  int block_pages;
};

// Row b's (sink, key store, value store, tokens after the sink).
__device__ __forceinline__ int4 row_lens(const Params& p, int b) {
  if (p.dev_kq == nullptr) return p.lens[b];
  const int kq = int(p.dev_kq[b]);
  return make_int4(p.dev_sink ? int(p.dev_sink[b]) : 0, kq, int(p.dev_vq[b]), kq + int(p.dev_kw[b]));
}

template <typename T> struct Num;
template <> struct Num<__nv_bfloat16> {
  using T = __nv_bfloat16;
  using T2 = __nv_bfloat162;
  static constexpr int MANT = 7;             // mantissa bits: codes sit below them
  static constexpr uint32_t MAGIC = 0x4300;  // 128.0: its unit in the last place is 1
  __device__ static float to_f(T x) { return __bfloat162float(x); }
  __device__ static T from_f(float x) { return __float2bfloat16_rn(x); }
  __device__ static uint32_t pack2(float a, float b) {
    T2 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __host__ __device__ static constexpr uint32_t pow2(int e) { return uint32_t(127 + e) << 7; }  // 2^e, bits
};
template <> struct Num<__half> {
  using T = __half;
  using T2 = __half2;
  static constexpr int MANT = 10;
  static constexpr uint32_t MAGIC = 0x6400;  // 1024.0
  __device__ static float to_f(T x) { return __half2float(x); }
  __device__ static T from_f(float x) { return __float2half_rn(x); }
  __device__ static uint32_t pack2(float a, float b) {
    T2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __host__ __device__ static constexpr uint32_t pow2(int e) { return uint32_t(15 + e) << 10; }
};

template <typename T>
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
  using T2 = typename Num<T>::T2;
  T2 r = __hmul2(*reinterpret_cast<T2*>(&a), *reinterpret_cast<T2*>(&b));
  return *reinterpret_cast<uint32_t*>(&r);
}

template <typename T>
__device__ __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
  using T2 = typename Num<T>::T2;
  T2 r = __hfma2(*reinterpret_cast<T2*>(&a), *reinterpret_cast<T2*>(&b), *reinterpret_cast<T2*>(&c));
  return *reinterpret_cast<uint32_t*>(&r);
}

__device__ __forceinline__ uint32_t lop_and_or(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));  // (a & mask) | magic
  return r;
}

// Where register j of a word of BITS-bit codes is read from: the word shifted right by `shift(j)` leaves the
// codes of the pair at bits [j*BITS - shift, ... + BITS) of each half, below the mantissa's top, so one lop3
// makes (MAGIC + code * 2^(j*BITS - shift)) and one fma with (2^-(...), -MAGIC * 2^-(...)) leaves the code.
template <typename T, int BITS>
struct Unpack {
  static constexpr int RPW = 16 / BITS;           // registers (code pairs) per word
  static constexpr int WIN = Num<T>::MANT / BITS;  // codes that fit below the mantissa's top at one shift
  // Register j of `w` as a pair of 16-bit floats holding the two codes (j a constant after unrolling).
  __device__ __forceinline__ static uint32_t get(uint32_t w, int j) {
    const int s = j / WIN * WIN * BITS, pos = j % WIN * BITS;
    const uint32_t mask = ((1u << BITS) - 1u) << pos;
    const uint32_t x = lop_and_or(w >> s, mask | (mask << 16), Num<T>::MAGIC | (Num<T>::MAGIC << 16));
    // x * 2^-pos - MAGIC * 2^-pos: exact, the code itself (MAGIC = 2^MANT)
    const uint32_t mul = Num<T>::pow2(-pos) * 0x10001u;
    const uint32_t add = (0x8000u | Num<T>::pow2(Num<T>::MANT - pos)) * 0x10001u;
    return fma2<T>(x, mul, add);
  }
};

__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, bool bf16) {
  if (bf16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 2^x on the special-function unit, without exp2f's range fix-up: x <= 0 here, and the result is rounded to
// 16 bits right after.
__device__ __forceinline__ float ex2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ uint32_t movmatrix_t(uint32_t x) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// A lane's N code words of one tile (N = 2, 4 or 8: 8-, 16- or 32-byte aligned) in vector loads.
template <int N>
__device__ __forceinline__ void load_words(uint32_t* w, const uint32_t* src) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int x = 0; x < N; x += 4) *reinterpret_cast<uint4*>(w + x) = *reinterpret_cast<const uint4*>(src + x);
  } else {
    static_assert(N == 2, "a lane holds 2, 4 or 8 words of a tile");
    *reinterpret_cast<uint2*>(w) = *reinterpret_cast<const uint2*>(src);
  }
}

// Byte offsets of a page's sections (mixkvq/layout.py FragmentPageLayout.sections: 16-byte aligned).
template <int D, int KB, int VB, int VG>
struct Page {
  static constexpr int up16(int n) { return (n + 15) / 16 * 16; }
  static constexpr int NCG = D / VG;
  static constexpr int KC = 0;
  static constexpr int DK = KB ? D : 0;  // a values-only page (KB = 0) has empty key sections
  static constexpr int KS = KC + up16(PAGE_TOKENS * DK * KB / 8);
  static constexpr int KZ = KS + up16(DK * 2);
  static constexpr int VC = KZ + up16(DK * 2);
  static constexpr int VS = VC + up16(PAGE_TOKENS * D * VB / 8);
  static constexpr int VZ = VS + up16(PAGE_TOKENS * NCG * 2);
  static constexpr int BYTES = VZ + up16(PAGE_TOKENS * NCG * 2);
  static constexpr int KEY_BYTES = VC;                 // what a keys-only pass reads
  static constexpr int KW = D * KB / 64;               // key code words per lane per 16-token tile
  static constexpr int VW = D * VB / 64;
};

// ---- the tail: exact element-wise dequantization, CUDA cores ------------------------------------------------

template <typename T, int D, int KB, int VB, int VG>
__device__ __forceinline__ float key_element(const int32_t* page, int u, int d) {
  using P = Page<D, KB, VB, VG>;
  constexpr int RPW = 16 / KB;
  const int m = u >> 4, row = u & 15, col = d & 15, kk = d >> 4;
  const int reg = (row >> 3) | ((col >> 3) << 1), half = col & 1;
  const int lane = (row & 7) * 4 + ((col & 7) >> 1);
  const int r = kk * 4 + reg;
  const uint32_t word = reinterpret_cast<const uint32_t*>(page + P::KC / 4)[(m * 32 + lane) * P::KW + r / RPW];
  const uint32_t code = (word >> (16 * half + (r % RPW) * KB)) & ((1u << KB) - 1u);
  const int t = (col & 7) >> 1, i = half + 2 * (col >> 3);
  const int at = t * (D / 4) + kk * 4 + i;  // channel_meta_order
  const T* s = reinterpret_cast<const T*>(reinterpret_cast<const char*>(page) + P::KS);
  const T* z = reinterpret_cast<const T*>(reinterpret_cast<const char*>(page) + P::KZ);
  return Num<T>::to_f(Num<T>::from_f(__fadd_rn(__fmul_rn(float(code), Num<T>::to_f(s[at])), Num<T>::to_f(z[at]))));
}

template <typename T, int D, int KB, int VB, int VG>
__device__ __forceinline__ float value_element(const int32_t* page, int u, int d) {
  using P = Page<D, KB, VB, VG>;
  constexpr int RPW = 16 / VB;
  const int ks = u >> 4, col = u & 15, row = d & 15, mt = d >> 4;
  const int reg = (row >> 3) | ((col >> 3) << 1), half = col & 1;
  const int lane = (row & 7) * 4 + ((col & 7) >> 1);
  const int r = mt * 4 + reg;
  const uint32_t word = reinterpret_cast<const uint32_t*>(page + P::VC / 4)[(ks * 32 + lane) * P::VW + r / RPW];
  const uint32_t code = (word >> (16 * half + (r % RPW) * VB)) & ((1u << VB) - 1u);
  const int t = (col & 7) >> 1, i = half + 2 * (col >> 3), cg = d / VG;
  const int at = ((ks * 4 + t) * P::NCG + cg) * 4 + i;  // token_meta_order
  const T* s = reinterpret_cast<const T*>(reinterpret_cast<const char*>(page) + P::VS);
  const T* z = reinterpret_cast<const T*>(reinterpret_cast<const char*>(page) + P::VZ);
  return Num<T>::to_f(Num<T>::from_f(__fadd_rn(__fmul_rn(float(code), Num<T>::to_f(s[at])), Num<T>::to_f(z[at]))));
}

// Combine the warps' (max, sum, output) of one CTA through shared memory and write the split's partial.
// Each warp has written smax[w][n], ssum[w][n] and so[w][n][d].
template <int D, int WARPS>
__device__ __forceinline__ void write_partial(const Params& p, int b, int h, int split, const float* smax,
                                              const float* ssum, const float* so) {
  const int tid = threadIdx.x;
  const size_t base = ((size_t(b) * p.n_kv + h) * p.n_splits + split) * HEADS;
  for (int e = tid; e < HEADS * D; e += WARPS * 32) {
    const int n = e / D, d = e % D;
    float m = -INFINITY;
    for (int w = 0; w < WARPS; ++w) m = fmaxf(m, smax[w * HEADS + n]);
    float o = 0.f, l = 0.f;
    if (m != -INFINITY) {
      for (int w = 0; w < WARPS; ++w) {
        const float a = exp2f(smax[w * HEADS + n] - m);
        o += a * so[(w * HEADS + n) * D + d];
        l += a * ssum[w * HEADS + n];
      }
    }
    p.part_o[(base + n) * D + d] = o;
    if (d == 0) {
      p.part_ml[(base + n) * 2] = m;
      p.part_ml[(base + n) * 2 + 1] = l;
    }
  }
}

// Stored keys of the tail from fragment pages: DPL channels from d0 of token u (`pages`: the row and head's pages).
template <typename T, int D, int KB, int VB, int VG>
struct PageKeys {
  // Tokens of the row in whole pages of both stores: the main splits' (the tail starts there).
  __device__ __forceinline__ static int whole(const Params&, int kq, int vq) {
    return min(kq, vq) / PAGE_TOKENS * PAGE_TOKENS;
  }

  template <int DPL>
  __device__ __forceinline__ static void load(const Params& p, const int32_t* pages, int b, int h, int u, int d0,
                                              float (&k)[DPL]) {
    constexpr int PW = Page<D, KB, VB, VG>::BYTES / 4;
    const int32_t* pg = pages + (u / PAGE_TOKENS) * PW;
#pragma unroll
    for (int j = 0; j < DPL; ++j) k[j] = key_element<T, D, KB, VB, VG>(pg, u % PAGE_TOKENS, d0 + j);
  }
};

// `Keys`: where the tail's stored keys come from (`PageKeys`, or MixKVQ's tiered blocks); values are in the pages.
template <typename T, int D, int KB, int VB, int VG, int WARPS, typename Keys = PageKeys<T, D, KB, VB, VG>>
__device__ void tail_split(const Params& p, int b, int h, int tsplit, char* smem) {
  constexpr int DPL = D / 32;
  const int4 L = row_lens(p, b);
  const int sink = L.x, kq = L.y, vq = L.z, total = L.w;
  const int full = Keys::whole(p, kq, vq);
  const int n_tail = sink + total - full;
  const int i0 = tsplit * p.tail_per_split, i1 = min(i0 + p.tail_per_split, n_tail);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int d0 = lane * DPL;
  float q[HEADS][DPL], o[HEADS][DPL], mx[HEADS], sm[HEADS];
  const T* qp = reinterpret_cast<const T*>(p.q) + b * p.q_sb;
#pragma unroll
  for (int n = 0; n < HEADS; ++n) {
#pragma unroll
    for (int j = 0; j < DPL; ++j) {
      q[n][j] = n < p.gqa ? Num<T>::to_f(qp[(h * p.gqa + n) * p.q_sh + d0 + j]) : 0.f;
      o[n][j] = 0.f;
    }
    mx[n] = -INFINITY;
    sm[n] = 0.f;
  }
  const int32_t* pages = p.pages + b * p.pg_sb + h * p.pg_sh;
  constexpr int PW = Page<D, KB, VB, VG>::BYTES / 4;
  for (int i = i0 + warp; i < i1; i += WARPS) {
    float k[DPL], v[DPL];
    if (i < sink) {
      const T* kp = reinterpret_cast<const T*>(p.ksink) + b * p.ksk_sb + h * p.ksk_sh + i * p.ksk_st + d0;
      const T* vp = reinterpret_cast<const T*>(p.vsink) + b * p.vsk_sb + h * p.vsk_sh + i * p.vsk_st + d0;
#pragma unroll
      for (int j = 0; j < DPL; ++j) { k[j] = Num<T>::to_f(kp[j]); v[j] = Num<T>::to_f(vp[j]); }
    } else {
      const int u = full + (i - sink);
      if (u < kq) {
        Keys::load(p, pages, b, h, u, d0, k);
      } else {
        const T* kp = reinterpret_cast<const T*>(p.kwin) + b * p.kw_sb + h * p.kw_sh + (u - kq) * p.kw_st + d0;
#pragma unroll
        for (int j = 0; j < DPL; ++j) k[j] = Num<T>::to_f(kp[j]);
      }
      if (u < vq) {
        const int32_t* pg = pages + (u / PAGE_TOKENS) * PW;
#pragma unroll
        for (int j = 0; j < DPL; ++j) v[j] = value_element<T, D, KB, VB, VG>(pg, u % PAGE_TOKENS, d0 + j);
      } else {
        const T* vp = reinterpret_cast<const T*>(p.vwin) + b * p.vw_sb + h * p.vw_sh + (u - vq) * p.vw_st + d0;
#pragma unroll
        for (int j = 0; j < DPL; ++j) v[j] = Num<T>::to_f(vp[j]);
      }
    }
#pragma unroll
    for (int n = 0; n < HEADS; ++n) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < DPL; ++j) s = fmaf(q[n][j], k[j], s);
#pragma unroll
      for (int x = 16; x > 0; x >>= 1) s += __shfl_xor_sync(0xffffffffu, s, x);
      s *= p.scale_log2;
      const float m = fmaxf(mx[n], s);
      const float a = exp2f(mx[n] - m), e = exp2f(s - m);
      sm[n] = sm[n] * a + e;
#pragma unroll
      for (int j = 0; j < DPL; ++j) o[n][j] = fmaf(o[n][j], a, e * v[j]);
      mx[n] = m;
    }
  }
  float* smax = reinterpret_cast<float*>(smem);
  float* ssum = smax + WARPS * HEADS;
  float* so = ssum + WARPS * HEADS;
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < HEADS; ++n) { smax[warp * HEADS + n] = mx[n]; ssum[warp * HEADS + n] = sm[n]; }
  }
#pragma unroll
  for (int n = 0; n < HEADS; ++n)
#pragma unroll
    for (int j = 0; j < DPL; ++j) so[(warp * HEADS + n) * D + d0 + j] = o[n][j];
  __syncthreads();
  write_partial<D, WARPS>(p, b, h, p.n_main + tsplit, smax, ssum, so);
}

// A warp's running softmax and output over the pages it reads (its quad's heads 2t, 2t + 1), shared by the kernels
// over fragment pages and over MixKVQ's tiered blocks, whose value pages are alike (`P`: the page's layout).
template <typename T, int D, int VB, int VG>
struct Accum {
  static constexpr int KK = D / 16;  // m-tiles of the value product
  static constexpr bool BF16 = sizeof(T) == 2 && Num<T>::MANT == 7;
  float acc_o[KK][4];  // O^T: channel 16 mt + g (+8), heads 2t, 2t + 1
  float acc_zv[4];     // Z_v^T P^T: channel group g, heads 2t, 2t + 1
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};  // heads 2t, 2t + 1

  __device__ __forceinline__ Accum() {
#pragma unroll
    for (int i = 0; i < KK; ++i)
#pragma unroll
      for (int x = 0; x < 4; ++x) acc_o[i][x] = 0.f;
#pragma unroll
    for (int x = 0; x < 4; ++x) acc_zv[x] = 0.f;
  }

  // One page: its scores s (two 16-token tiles, in the softmax's units once scaled here) and its value sections
  // (codes, scales, zeros at P's offsets from pg).
  template <typename P>
  __device__ __forceinline__ void page(float (&s)[2][4], const char* pg, float scale_log2, int lane, int g, int t) {
  // -- online softmax over the page's 32 tokens, per head --
  float mx[2];
#pragma unroll
  for (int x = 0; x < 2; ++x) {
#pragma unroll
    for (int m = 0; m < 2; ++m) { s[m][x] *= scale_log2; s[m][x + 2] *= scale_log2; }
    mx[x] = fmaxf(fmaxf(s[0][x], s[0][x + 2]), fmaxf(s[1][x], s[1][x + 2]));
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) mx[x] = fmaxf(mx[x], __shfl_xor_sync(0xffffffffu, mx[x], o));
    mx[x] = fmaxf(mx[x], mrow[x]);
  }
  if (__any_sync(0xffffffffu, mx[0] != mrow[0] || mx[1] != mrow[1])) {
    const float a0 = ex2(mrow[0] - mx[0]), a1 = ex2(mrow[1] - mx[1]);
    lrow[0] *= a0; lrow[1] *= a1;
#pragma unroll
    for (int i2 = 0; i2 < KK; ++i2) {
      acc_o[i2][0] *= a0; acc_o[i2][1] *= a1; acc_o[i2][2] *= a0; acc_o[i2][3] *= a1;
    }
    acc_zv[0] *= a0; acc_zv[1] *= a1; acc_zv[2] *= a0; acc_zv[3] *= a1;
    mrow[0] = mx[0]; mrow[1] = mx[1];
  }
  uint32_t pb[2][2];  // P^T fragments (B operand) of the two 16-token k-steps
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    float e[4];
#pragma unroll
    for (int x = 0; x < 4; ++x) e[x] = ex2(s[m][x] - mrow[x & 1]);
    lrow[0] += e[0] + e[2];
    lrow[1] += e[1] + e[3];
    pb[m][0] = movmatrix_t(Num<T>::pack2(e[0], e[1]));
    pb[m][1] = movmatrix_t(Num<T>::pack2(e[2], e[3]));
  }
  // -- values --
  const uint32_t* vsc = reinterpret_cast<const uint32_t*>(pg + P::VS);
  const uint32_t* vzr = reinterpret_cast<const uint32_t*>(pg + P::VZ);
  const uint32_t* vc = reinterpret_cast<const uint32_t*>(pg + P::VC);
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) {
    const int meta = (ks * 4 + t) * P::NCG * 2;  // words: the quad's four tokens of every group
    uint32_t pp[P::NCG][2];
#pragma unroll
    for (int cg = 0; cg < P::NCG; ++cg) {
      pp[cg][0] = mul2<T>(pb[ks][0], vsc[meta + 2 * cg]);
      pp[cg][1] = mul2<T>(pb[ks][1], vsc[meta + 2 * cg + 1]);
    }
    {
      const bool row = g < P::NCG;
      uint32_t a[4] = {row ? vzr[meta + 2 * g] : 0u, 0u, row ? vzr[meta + 2 * g + 1] : 0u, 0u};
      mma16816(acc_zv, a, pb[ks][0], pb[ks][1], BF16);
    }
    uint32_t w[P::VW];
    load_words<P::VW>(w, vc + (ks * 32 + lane) * P::VW);
#pragma unroll
    for (int mt = 0; mt < KK; ++mt) {
      uint32_t a[4];
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) {
        const int r = mt * 4 + reg;
        a[reg] = Unpack<T, VB>::get(w[r / Unpack<T, VB>::RPW], r % Unpack<T, VB>::RPW);
      }
      const int cg = mt * 16 / VG;
      mma16816(acc_o[mt], a, pp[cg][0], pp[cg][1], BF16);
    }
  }
  }

  // The warps' rows combined through shared memory (reused: the caller's rings are done) into the split's partial.
  template <int WARPS>
  __device__ __forceinline__ void write(const Params& p, int b, int h, int split, char* smem, int warp, int g, int t,
                                        bool keys_only) {
    // Row sums over the quad's rows; the zero term of each channel group into its channels.
#pragma unroll
    for (int x = 0; x < 2; ++x)
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) lrow[x] += __shfl_xor_sync(0xffffffffu, lrow[x], o);
#pragma unroll
    for (int mt = 0; mt < KK; ++mt) {
      const int src = (mt * 16 / VG) * 4 + t;
      const float z0 = __shfl_sync(0xffffffffu, acc_zv[0], src), z1 = __shfl_sync(0xffffffffu, acc_zv[1], src);
      acc_o[mt][0] += z0; acc_o[mt][1] += z1; acc_o[mt][2] += z0; acc_o[mt][3] += z1;
    }
    __syncthreads();  // every warp is done with its ring: reuse shared memory for the combine
    float* smax = reinterpret_cast<float*>(smem);
    float* ssum = smax + WARPS * HEADS;
    float* so = ssum + WARPS * HEADS;
    if (g == 0) {
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        smax[warp * HEADS + 2 * t + x] = keys_only ? 0.f : mrow[x];
        ssum[warp * HEADS + 2 * t + x] = lrow[x];
      }
    }
#pragma unroll
    for (int mt = 0; mt < KK; ++mt)
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int n = 2 * t + (x & 1), d = 16 * mt + g + 8 * (x >> 1);
        so[(warp * HEADS + n) * D + d] = acc_o[mt][x];
      }
    __syncthreads();
    write_partial<D, WARPS>(p, b, h, split, smax, ssum, so);
  }
};

// ---- the main splits: whole pages on tensor cores -----------------------------------------------------------

template <typename T, int D, int KB, int VB, int VG, int WARPS, int STAGES, bool KEYS_ONLY, int MIN_CTAS = 1>
__global__ void __launch_bounds__(WARPS * 32, MIN_CTAS) fpd_split(const __grid_constant__ Params p) {
  using P = Page<D, KB, VB, VG>;
  constexpr bool BF16 = sizeof(T) == 2 && Num<T>::MANT == 7;
  constexpr int KK = D / 16;  // k-steps of the key product, m-tiles of the value product
  constexpr int COPY = KEYS_ONLY ? P::KEY_BYTES : P::BYTES;
  extern __shared__ __align__(16) char smem[];
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  if (split >= p.n_main) {
    tail_split<T, D, KB, VB, VG, WARPS>(p, b, h, split - p.n_main, smem);
    return;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int4 L = row_lens(p, b);
  const int full_pages = min(L.y, L.z) / PAGE_TOKENS;
  const int first = split * p.pages_per_split;
  const int last = min(first + p.pages_per_split, full_pages);
  const int mine = last > first + warp ? (last - first - warp + WARPS - 1) / WARPS : 0;  // pages of this warp

  // The query fragment (B operand): head g, channels 16 kk + 2t + {0, 1} and + 8.
  uint32_t qb[KK][2];
  {
    const T* qp = reinterpret_cast<const T*>(p.q) + b * p.q_sb + (h * p.gqa + g) * p.q_sh;
#pragma unroll
    for (int kk = 0; kk < KK; ++kk)
#pragma unroll
      for (int x = 0; x < 2; ++x)
        qb[kk][x] = g < p.gqa ? *reinterpret_cast<const uint32_t*>(qp + 16 * kk + 2 * t + 8 * x) : 0u;
  }
  Accum<T, D, VB, VG> acc;

  char* ring = smem + warp * STAGES * COPY;
  const char* gpage = reinterpret_cast<const char*>(p.pages + b * p.pg_sb + h * p.pg_sh) +
                      size_t(first + warp) * (P::BYTES);
  const size_t step = size_t(WARPS) * P::BYTES;
  auto fetch = [&](int i) {
    const char* src = gpage + i * step;
    char* dst = ring + (i % STAGES) * COPY;
#pragma unroll
    for (int c = lane; c < COPY / 16; c += 32) cp_async16(dst + 16 * c, src + 16 * c);
  };
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) {
    if (i < mine) fetch(i);
    cp_async_commit();
  }
  for (int i = 0; i < mine; ++i) {
    cp_async_wait<STAGES - 2>();
    __syncwarp();
    if (i + STAGES - 1 < mine) fetch(i + STAGES - 1);
    cp_async_commit();
    const char* pg = ring + (i % STAGES) * COPY;

    // -- scores: bias from the zeros, q' from the scales, then the codes --
    const uint32_t* ksc = reinterpret_cast<const uint32_t*>(pg + P::KS) + t * (D / 8);
    const uint32_t* kzr = reinterpret_cast<const uint32_t*>(pg + P::KZ) + t * (D / 8);
    // Two accumulators per product halve the chains of dependent MMAs (latency, not throughput, bounds a page).
    float bias[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) {
      uint32_t a[4] = {g == 0 ? kzr[2 * kk] : 0u, 0u, g == 0 ? kzr[2 * kk + 1] : 0u, 0u};
      mma16816(bias[kk & 1], a, qb[kk][0], qb[kk][1], BF16);
    }
    float s[2][4], s2[2][4] = {};
    const uint32_t* kc = reinterpret_cast<const uint32_t*>(pg + P::KC);
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int x = 0; x < 4; ++x) s[m][x] = 0.f;
      uint32_t w[P::KW];
      load_words<P::KW>(w, kc + (m * 32 + lane) * P::KW);
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) {
        uint32_t a[4];
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) {
          const int r = kk * 4 + reg;
          a[reg] = Unpack<T, KB>::get(w[r / Unpack<T, KB>::RPW], r % Unpack<T, KB>::RPW);
        }
        const uint32_t q0 = mul2<T>(qb[kk][0], ksc[2 * kk]), q1 = mul2<T>(qb[kk][1], ksc[2 * kk + 1]);
        mma16816(kk & 1 ? s2[m] : s[m], a, q0, q1, BF16);
      }
    }
    {
      // bias of lane (0, t): heads 2t, 2t + 1 of the zero row; every token of the page adds it.
      const float b0 = __shfl_sync(0xffffffffu, bias[0][0] + bias[1][0], t);
      const float b1 = __shfl_sync(0xffffffffu, bias[0][1] + bias[1][1], t);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        s[m][0] += s2[m][0] + b0; s[m][1] += s2[m][1] + b1; s[m][2] += s2[m][2] + b0; s[m][3] += s2[m][3] + b1;
      }
    }
    if (KEYS_ONLY) {  // gate 2: the key product alone (a sum keeps the compiler from dropping it)
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int x = 0; x < 4; ++x) acc.lrow[x & 1] += s[m][x];
      continue;
    }
    acc.template page<P>(s, pg, p.scale_log2, lane, g, t);
  }
  cp_async_wait<0>();
  acc.template write<WARPS>(p, b, h, split, smem, warp, g, t, KEYS_ONLY);
}

// The splits' partials into the normalized output: one CTA per (row, KV head, query head), of SG groups of D
// threads. Warp 0 turns the head's (max, sum) pairs into weights in shared memory (lanes over splits); then each
// group sums every SG-th split's partial for its channel (independent loads), and the groups' sums add up in shared
// memory. One CTA per (row, KV head) summing all its heads in turn was a chain of gqa x splits loads per thread: on
// an H200 at batch 1 and 4k tokens that merge took 22 us per layer, against 13 us for the split kernel.
template <typename T, int D, int SG>
__global__ void __launch_bounds__(D * SG) fpd_merge(const __grid_constant__ Params p) {
  extern __shared__ float merge_smem[];  // weight[n_splits], then sums[SG][D]
  float* weight = merge_smem;
  float* sums = merge_smem + p.n_splits;
  const int n = blockIdx.x % p.gqa, bh = blockIdx.x / p.gqa;
  const int b = bh / p.n_kv, h = bh % p.n_kv;
  const int d = threadIdx.x % D, grp = threadIdx.x / D, S = p.n_splits;
  const size_t base = (size_t(b) * p.n_kv + h) * S;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float m = -INFINITY;
    for (int s = lane; s < S; s += 32) m = fmaxf(m, p.part_ml[((base + s) * HEADS + n) * 2]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.f;
    for (int s = lane; s < S; s += 32) {
      const size_t at = ((base + s) * HEADS + n) * 2;
      const float ms = p.part_ml[at];
      const float a = ms == -INFINITY ? 0.f : exp2f(ms - m);
      weight[s] = a;
      l += a * p.part_ml[at + 1];
    }
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    for (int s = lane; s < S; s += 32) weight[s] /= l;  // each lane its own entries
  }
  __syncthreads();
  float o = 0.f;
#pragma unroll 4
  for (int s = grp; s < S; s += SG) o += weight[s] * p.part_o[((base + s) * HEADS + n) * D + d];
  sums[grp * D + d] = o;
  __syncthreads();
  if (grp == 0) {
#pragma unroll
    for (int g = 1; g < SG; ++g) o += sums[g * D + d];
    T* out = reinterpret_cast<T*>(p.out) + (size_t(b) * p.n_kv * p.gqa + h * p.gqa + n) * D + d;
    *out = Num<T>::from_f(o);
  }
}

// Thread groups per merge CTA: 512 threads.
template <int D>
constexpr int merge_groups() { return 512 / D; }

}  // namespace fpd
