// Decode attention over MixKVQ's tiered key blocks (mixkvq/kv/layout.py TieredPageLayout) and values-only fragment
// pages: the fragment kernel (fragment_decode.cuh) with its key product run once per tier.
//
// One CTA per (split, KV head, row). A main split is a run of whole blocks (block_pages pages of 32 tokens); a warp
// takes one block at a time. Per block, the header's permutation gathers the GQA group's query columns into each
// tier's B fragments, once, in the warp's shared memory. Per page, every tier runs as a uniform key tile of its
// (padded) channel count into the same score accumulator:
//   full precision: the raw 16-bit values are the A fragments as stored;
//   4-bit and 2-bit: codes become 16-bit floats by lop3, the page's scales fold into the query (q' = q * s) and the
//   zeros give one bias row per tier (z . q), as in the fragment kernel.
// A tier's padding channels hold zero values, codes, scales and zeros, so the query columns they meet add nothing.
// The page's values (a values-only fragment page) and the softmax are the fragment kernel's (`Accum`). Pages are read
// from global memory directly (no cp.async ring yet). Tail splits are the fragment kernel's, with stored keys
// decoded element by element from the blocks (`TieredKeys`).
#pragma once

#include "fragment_decode.cuh"

namespace fpd {

constexpr int TIERS = 3;  // full precision, 4-bit, 2-bit (mixkvq/kv/layout.py TIER_WIDTHS)

// A block's tiers, from its counts: channels, padded channels, first slot in the permutation, words per lane of a
// 16-token tile, and the byte offset of each section within a page (TieredPageLayout.page_sections).
struct Tiers {
  int n[TIERS], c[TIERS], start[TIERS], words[TIERS];
  int code[TIERS], scale[TIERS], zero[TIERS];  // section offsets (scale, zero: quantized tiers only)
  int page_bytes;

  __host__ __device__ static constexpr int bits(int tier) { return tier == 0 ? 16 : (tier == 1 ? 4 : 2); }

  __device__ __forceinline__ explicit Tiers(uint32_t counts) {
    int at = 0, slot = 0;
#pragma unroll
    for (int i = 0; i < TIERS; ++i) {
      n[i] = (counts >> (8 * i)) & 0xFF;
      c[i] = (n[i] + 15) / 16 * 16;
      start[i] = slot;
      slot += n[i];
      const int cw = (c[i] * bits(i) + 63) / 64 * 64 / bits(i);  // tile_channels
      words[i] = cw * bits(i) / 64;
      code[i] = at;
      at += PAGE_TOKENS * cw * bits(i) / 8;
      scale[i] = at;
      zero[i] = at + (i ? 2 * c[i] : 0);
      at += i ? 4 * c[i] : 0;
    }
    page_bytes = at;
  }
};

template <int D>
__device__ __forceinline__ int header_words() { return (D + 16) / 4; }

// The block of row b, head h holding stored token u, and the page of u within it.
__device__ __forceinline__ const int32_t* tier_block(const Params& p, int b, int h, int k) {
  return p.pool + b * p.pool_sb + h * p.pool_sh + p.offsets[b * p.off_sb + h * p.off_sh + k];
}

// Stored keys of the tail from the tiered blocks: DPL channels from d0 of token u, exactly as the reference
// dequantizes them (code * scale + zero in fp32, rounded to the model dtype; full precision: the raw value).
template <typename T, int D>
struct TieredKeys {
  __device__ __forceinline__ static int whole(const Params& p, int kq, int vq) {
    const int bt = p.block_pages * PAGE_TOKENS;
    return min(kq, vq) / bt * bt;
  }

  template <int DPL>
  __device__ static void load(const Params& p, const int32_t*, int b, int h, int u, int d0, float (&k)[DPL]) {
    const int bt = p.block_pages * PAGE_TOKENS;
    const int32_t* blk = tier_block(p, b, h, u / bt);
    const uint8_t* perm = reinterpret_cast<const uint8_t*>(blk);
    const Tiers tr(static_cast<uint32_t>(blk[D / 4]));
    const char* pg = reinterpret_cast<const char*>(blk + header_words<D>()) + ((u % bt) / PAGE_TOKENS) * tr.page_bytes;
    const int row = u % PAGE_TOKENS, m = row >> 4, rr = row & 15;
#pragma unroll
    for (int j = 0; j < DPL; ++j) {
      int slot = 0;
      for (int i = 0; i < D; ++i) slot = perm[i] == d0 + j ? i : slot;
      const int tier = slot < tr.start[1] ? 0 : (slot < tr.start[2] ? 1 : 2);
      const int idx = slot - tr.start[tier], col = idx & 15, kk = idx >> 4;
      const int reg = (rr >> 3) | ((col >> 3) << 1), half = col & 1;
      const int lane = (rr & 7) * 4 + ((col & 7) >> 1);
      const int bits = tier == 0 ? 16 : (tier == 1 ? 4 : 2), rpw = 16 / bits, r = kk * 4 + reg;
      const uint32_t* words = reinterpret_cast<const uint32_t*>(pg + tr.code[tier]);
      const uint32_t word = words[(m * 32 + lane) * tr.words[tier] + r / rpw];
      const uint32_t code = (word >> (16 * half + (r % rpw) * bits)) & ((1u << bits) - 1u);
      if (tier == 0) {
        const uint16_t raw = static_cast<uint16_t>(code);
        k[j] = Num<T>::to_f(*reinterpret_cast<const T*>(&raw));
      } else {
        const int at = ((col & 7) >> 1) * (tr.c[tier] / 4) + kk * 4 + half + 2 * (col >> 3);  // channel_meta_order
        const T* s = reinterpret_cast<const T*>(pg + tr.scale[tier]);
        const T* z = reinterpret_cast<const T*>(pg + tr.zero[tier]);
        k[j] = Num<T>::to_f(Num<T>::from_f(__fadd_rn(__fmul_rn(float(code), Num<T>::to_f(s[at])),
                                                     Num<T>::to_f(z[at]))));
      }
    }
  }
};

// One quantized tier of one page into the scores (two 16-token tiles) and the bias: the fragment kernel's key
// product over `nk` k-steps of this tier's tile, the query fragments from the warp's gather `qf` (this tier's).
template <typename T, int BITS, int KK>
__device__ __forceinline__ void tier_scores(const char* pg, const Tiers& tr, int tier, const uint32_t* qf, int lane,
                                            int g, int t, float (&s)[2][4], float (&s2)[2][4],
                                            float (&bias)[2][4]) {
  constexpr bool BF16 = sizeof(T) == 2 && Num<T>::MANT == 7;
  constexpr int RPW = Unpack<T, BITS>::RPW;
  const int nk = tr.c[tier] / 16, w = tr.words[tier];
  const uint32_t* kc = reinterpret_cast<const uint32_t*>(pg + tr.code[tier]);
  const uint32_t* ksc = reinterpret_cast<const uint32_t*>(pg + tr.scale[tier]) + t * (tr.c[tier] / 8);
  const uint32_t* kzr = reinterpret_cast<const uint32_t*>(pg + tr.zero[tier]) + t * (tr.c[tier] / 8);
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    if (kk >= nk) break;
    const uint2 qq = *reinterpret_cast<const uint2*>(qf + (kk * 32 + lane) * 2);
    {
      uint32_t a[4] = {g == 0 ? kzr[2 * kk] : 0u, 0u, g == 0 ? kzr[2 * kk + 1] : 0u, 0u};
      mma16816(bias[kk & 1], a, qq.x, qq.y, BF16);
    }
    const uint32_t q0 = mul2<T>(qq.x, ksc[2 * kk]), q1 = mul2<T>(qq.y, ksc[2 * kk + 1]);
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const uint32_t word = kc[(m * 32 + lane) * w + kk * 4 / RPW];
      uint32_t a[4];
#pragma unroll
      for (int reg = 0; reg < 4; ++reg) a[reg] = Unpack<T, BITS>::get(word, (kk * 4 + reg) % RPW);
      mma16816(kk & 1 ? s2[m] : s[m], a, q0, q1, BF16);
    }
  }
}

// Shared memory of a warp of the main splits: the block's permutation, then each tier's query fragments.
template <int D>
struct TieredSmem {
  static constexpr int WARP = D + TIERS * (D / 16) * 32 * 2 * 4;
};

template <typename T, int D, int VB, int VG, int WARPS, int MIN_CTAS = 1>
__global__ void __launch_bounds__(WARPS * 32, MIN_CTAS) tpd_split(const __grid_constant__ Params p) {
  using PV = Page<D, 0, VB, VG>;
  constexpr bool BF16 = sizeof(T) == 2 && Num<T>::MANT == 7;
  constexpr int KK = D / 16;
  constexpr int WS = TieredSmem<D>::WARP;
  extern __shared__ __align__(16) char smem[];
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  if (split >= p.n_main) {
    tail_split<T, D, 0, VB, VG, WARPS, TieredKeys<T, D>>(p, b, h, split - p.n_main, smem);
    return;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int4 L = row_lens(p, b);
  const int blocks = min(L.y, L.z) / (p.block_pages * PAGE_TOKENS);
  const int first = split * p.pages_per_split;  // here: blocks per split
  const int last = min(first + p.pages_per_split, blocks);
  uint8_t* perm = reinterpret_cast<uint8_t*>(smem + warp * WS);
  uint32_t* qf = reinterpret_cast<uint32_t*>(smem + warp * WS + D);  // [TIERS][KK][32 lanes][2]
  const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_sb + (h * p.gqa + g) * p.q_sh;  // head g of the group
  const int32_t* vrow = p.pages + b * p.pg_sb + h * p.pg_sh;
  Accum<T, D, VB, VG> acc;

  for (int k = first + warp; k < last; k += WARPS) {
    const int32_t* blk = tier_block(p, b, h, k);
    __syncwarp();  // the last block's gathers are read
    for (int i = lane; i < D / 4; i += 32) reinterpret_cast<uint32_t*>(perm)[i] = static_cast<uint32_t>(blk[i]);
    const Tiers tr(static_cast<uint32_t>(blk[D / 4]));
    __syncwarp();
    // The query's columns in each tier's order, as B fragments: slots start + 16 kk + 2t + {0, 1} (+ 8).
#pragma unroll
    for (int tier = 0; tier < TIERS; ++tier)
#pragma unroll
      for (int kk = 0; kk < KK; ++kk) {
        if (kk * 16 >= tr.c[tier]) break;
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          const int s0 = tr.start[tier] + 16 * kk + 2 * t + 8 * x;
          float v[2];
#pragma unroll
          for (int e = 0; e < 2; ++e)
            v[e] = g < p.gqa && s0 + e < D ? Num<T>::to_f(q[perm[s0 + e]]) : 0.f;
          qf[((tier * KK + kk) * 32 + lane) * 2 + x] = Num<T>::pack2(v[0], v[1]);
        }
      }
    __syncwarp();
    const char* pg = reinterpret_cast<const char*>(blk + header_words<D>());
    for (int j = 0; j < p.block_pages; ++j, pg += tr.page_bytes) {
      float s[2][4] = {}, s2[2][4] = {}, bias[2][4] = {};
      {  // full precision: the raw values are the A fragments
        const uint32_t* kc = reinterpret_cast<const uint32_t*>(pg + tr.code[0]);
        const int nk = tr.c[0] / 16, w = tr.words[0];
#pragma unroll
        for (int kk = 0; kk < KK; ++kk) {
          if (kk >= nk) break;
          const uint2 qq = *reinterpret_cast<const uint2*>(qf + (kk * 32 + lane) * 2);
#pragma unroll
          for (int m = 0; m < 2; ++m) {
            const uint4 a4 = *reinterpret_cast<const uint4*>(kc + (m * 32 + lane) * w + kk * 4);
            const uint32_t a[4] = {a4.x, a4.y, a4.z, a4.w};
            mma16816(kk & 1 ? s2[m] : s[m], a, qq.x, qq.y, BF16);
          }
        }
      }
      tier_scores<T, 4, KK>(pg, tr, 1, qf + KK * 32 * 2, lane, g, t, s, s2, bias);
      tier_scores<T, 2, KK>(pg, tr, 2, qf + 2 * KK * 32 * 2, lane, g, t, s, s2, bias);
      {
        // bias of lane (0, t): heads 2t, 2t + 1 of the zero rows; every token of the page adds it.
        const float b0 = __shfl_sync(0xffffffffu, bias[0][0] + bias[1][0], t);
        const float b1 = __shfl_sync(0xffffffffu, bias[0][1] + bias[1][1], t);
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          s[m][0] += s2[m][0] + b0; s[m][1] += s2[m][1] + b1; s[m][2] += s2[m][2] + b0; s[m][3] += s2[m][3] + b1;
        }
      }
      const char* vpage = reinterpret_cast<const char*>(vrow) + size_t(k * p.block_pages + j) * PV::BYTES;
      acc.template page<PV>(s, vpage, p.scale_log2, lane, g, t);
    }
  }
  acc.template write<WARPS>(p, b, h, split, smem, warp, g, t, false);
}

}  // namespace fpd
