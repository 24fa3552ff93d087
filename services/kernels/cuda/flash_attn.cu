// Fused multi-head attention, flash-attention style: one pass over the keys with an online softmax, the score
// matrix never written to global memory. f16/bf16 inputs, tensor cores through WMMA (16x16x16 tiles), f32
// accumulation and f32 softmax statistics.
//
// Layout: q (B, H, Lq, D), k/v (B, H, Lk, D) given by element strides for (b, h, l) and a contiguous last axis;
// the output is written as (B, Lq, H*D) contiguous (heads already merged, ready for the output projection).
// A block handles BR = 64 query rows of one (b, h): four warps of 16 rows each, key tiles of BC = 32 rows.
#include <mma.h>

#include "common.cuh"

using namespace nvcuda;

namespace {

constexpr int BR = 64;
constexpr int BC = 32;
constexpr int WARPS = BR / 16;

struct Strides {
  long long b, h, l;
};

// Copies `rows` rows of D elements (row stride `stride`) into a dense shared tile of `tile_rows` rows, zero-filling
// rows past `rows`. 16-byte vector copies: D is a multiple of 8 and every row start is 16-byte aligned (the host
// checks offsets and strides).
template <typename T, int D>
__device__ __forceinline__ void load_tile(T (*dst)[D], const T* src, long long stride, int rows, int tile_rows) {
  constexpr int VEC = 8;  // 8 x 16-bit = 16 bytes
  constexpr int PER_ROW = D / VEC;
  for (int i = threadIdx.x; i < tile_rows * PER_ROW; i += blockDim.x) {
    const int r = i / PER_ROW;
    const int c = (i % PER_ROW) * VEC;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < rows) val = *reinterpret_cast<const uint4*>(src + r * stride + c);
    *reinterpret_cast<uint4*>(&dst[r][c]) = val;
  }
}

template <typename T, int D>
__device__ void flash_attn(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           T* __restrict__ o, int heads, int lq, int lk, float scale, Strides sq, Strides sk,
                           Strides sv) {
  __shared__ __align__(32) T qs[BR][D];
  __shared__ __align__(32) T ks[BC][D];
  __shared__ __align__(32) T vs[BC][D];
  __shared__ __align__(32) float ss[WARPS][16][BC];
  __shared__ __align__(32) T ps[WARPS][16][BC];
  __shared__ __align__(32) float os[WARPS][16][D];
  __shared__ float row_m[WARPS][16];
  __shared__ float row_l[WARPS][16];

  const int bh = blockIdx.y;
  const int b = bh / heads;
  const int h = bh % heads;
  const int q0 = blockIdx.x * BR;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const T* qb = q + b * sq.b + h * sq.h + q0 * sq.l;
  const T* kb = k + b * sk.b + h * sk.h;
  const T* vb = v + b * sv.b + h * sv.h;

  load_tile<T, D>(qs, qb, sq.l, min(BR, lq - q0), BR);
  for (int i = lane; i < 16 * D; i += 32) os[warp][i / D][i % D] = 0.f;
  if (lane < 16) {
    row_m[warp][lane] = -INFINITY;
    row_l[warp][lane] = 0.f;
  }
  __syncthreads();

  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[D / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) wmma::load_matrix_sync(qf[kk], &qs[warp * 16][kk * 16], D);

  // Each row of the warp's 16 is handled by two lanes, each with half of the tile's columns.
  const int r = lane / 2;
  const int part = lane % 2;

  for (int k0 = 0; k0 < lk; k0 += BC) {
    __syncthreads();  // every warp is done with the previous K/V tile
    const int rows = min(BC, lk - k0);
    load_tile<T, D>(ks, kb + k0 * sk.l, sk.l, rows, BC);
    load_tile<T, D>(vs, vb + k0 * sv.l, sv.l, rows, BC);
    __syncthreads();

    // S = Q K^T for this warp's 16 rows: K stored row-major (key, dim) is K^T in column-major.
#pragma unroll
    for (int j = 0; j < BC / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
      wmma::fill_fragment(sf, 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
        wmma::load_matrix_sync(kf, &ks[j * 16][kk * 16], D);
        wmma::mma_sync(sf, qf[kk], kf, sf);
      }
      wmma::store_matrix_sync(&ss[warp][0][j * 16], sf, BC, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax over this tile (columns past lk are masked out; column 0 is always a real key).
    float mx = -INFINITY;
    for (int c = part * (BC / 2); c < (part + 1) * (BC / 2); ++c) {
      const float s = (k0 + c < lk) ? ss[warp][r][c] * scale : -INFINITY;
      ss[warp][r][c] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_old = row_m[warp][r];
    const float m_new = fmaxf(m_old, mx);
    float sum = 0.f;
    for (int c = part * (BC / 2); c < (part + 1) * (BC / 2); ++c) {
      const float p = __expf(ss[warp][r][c] - m_new);
      ps[warp][r][c] = from_f32<T>(p);
      sum += p;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    const float alpha = __expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
    for (int c = part * (D / 2); c < (part + 1) * (D / 2); ++c) os[warp][r][c] *= alpha;
    __syncwarp();
    if (part == 0) {
      row_m[warp][r] = m_new;
      row_l[warp][r] = row_l[warp][r] * alpha + sum;
    }
    __syncwarp();

    // O = O * alpha + P V
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
      wmma::load_matrix_sync(of, &os[warp][0][n * 16], D, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < BC / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
        wmma::load_matrix_sync(pf, &ps[warp][0][kk * 16], BC);
        wmma::load_matrix_sync(vf, &vs[kk * 16][n * 16], D);
        wmma::mma_sync(of, pf, vf, of);
      }
      wmma::store_matrix_sync(&os[warp][0][n * 16], of, D, wmma::mem_row_major);
    }
    __syncwarp();
  }

  // (B, Lq, H*D): row stride H*D, head h at column h*D.
  const long long out_row = (long long)heads * D;
  for (int i = lane; i < 16 * D; i += 32) {
    const int rr = i / D;
    const int c = i % D;
    const int row = q0 + warp * 16 + rr;
    if (row < lq) {
      o[((long long)b * lq + row) * out_row + h * D + c] = from_f32<T>(os[warp][rr][c] / row_l[warp][rr]);
    }
  }
}

}  // namespace

#define FLASH_ATTN(NAME, T, D)                                                                               \
  extern "C" __global__ void __launch_bounds__(BR * 2) NAME(                                                 \
      const T* q, const T* k, const T* v, T* o, int heads, int lq, int lk, float scale, long long qb,         \
      long long qh, long long ql, long long kb, long long kh, long long kl, long long vb, long long vh,      \
      long long vl) {                                                                                        \
    flash_attn<T, D>(q, k, v, o, heads, lq, lk, scale, Strides{qb, qh, ql}, Strides{kb, kh, kl},             \
                     Strides{vb, vh, vl});                                                                   \
  }

FLASH_ATTN(flash_attn_f16_d16, __half, 16)
FLASH_ATTN(flash_attn_f16_d32, __half, 32)
FLASH_ATTN(flash_attn_f16_d64, __half, 64)
FLASH_ATTN(flash_attn_bf16_d16, __nv_bfloat16, 16)
FLASH_ATTN(flash_attn_bf16_d32, __nv_bfloat16, 32)
FLASH_ATTN(flash_attn_bf16_d64, __nv_bfloat16, 64)
