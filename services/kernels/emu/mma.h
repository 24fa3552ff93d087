// Emulator stand-in for CUDA's <mma.h>: nvcuda::wmma for 16x16x16 tiles of __half / __nv_bfloat16 with float
// accumulators.
//
// A fragment holds the WHOLE tile in every lane (the real per-lane layout is opaque; these kernels only move
// fragments through memory and mma_sync). Every op except fill_fragment is warp-collective (.sync.aligned): all
// 32 lanes must reach it at the same call site with the same pointer / ldm / layout (else the run aborts), and it
// acts as a warp barrier on entry. Loads read memory for all lanes at that one moment (the last arrival performs
// them). A store writes element e of the tile from lane e % 32's fragment, each lane when it resumes, WITHOUT a
// barrier afterwards: a lane that reads the stored tile without a __syncwarp can see elements another lane has not
// written yet (as on the GPU, where that is a data race). mma_sync accumulates in f32 (products of 16-bit values are
// exact in f32; the summation order differs from the tensor cores).
//
// NOT emulated: other shapes (m32n8k16, ...), tf32/int8/double fragments, x[] element layouts, any timing.
#pragma once
#include <type_traits>

#include "cuda_emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 WMMA tiles are emulated");
  static constexpr int num_elements = 256;
  T x[256];  // the tile, row-major: (row, col) at row * 16 + col
};

namespace detail {
inline float f32(float v) { return v; }
inline float f32(__half v) { return __half2float(v); }
inline float f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// One lane's operands of a collective load or store.
struct Op {
  const void* ptr;
  unsigned ldm;
  bool col;
  void* frag;
  int elem;  // element size, for the agreement check
};

inline void check_agree(emu::Fiber* const* lanes, int n, const char* what) {
  const Op* a = static_cast<const Op*>(lanes[0]->arg);
  for (int i = 1; i < n; ++i) {
    const Op* b = static_cast<const Op*>(lanes[i]->arg);
    if (b->ptr != a->ptr || b->ldm != a->ldm || b->col != a->col)
      emu::fail("wmma::%s: lane %d passes (%p, ldm %u, %s) but lane 0 passes (%p, ldm %u, %s)", what, i, b->ptr,
                b->ldm, b->col ? "col" : "row", a->ptr, a->ldm, a->col ? "col" : "row");
  }
  if (a->ldm % (16 / a->elem) != 0) emu::fail("wmma::%s: ldm %u is not a multiple of 16 bytes", what, a->ldm);
  if (reinterpret_cast<uintptr_t>(a->ptr) % 32 != 0) emu::fail("wmma::%s: pointer %p not 256-bit aligned", what, a->ptr);
}

template <typename T>
void load_all(emu::Fiber* const* lanes, int n) {
  check_agree(lanes, n, "load_matrix_sync");
  for (int l = 0; l < n; ++l) {
    const Op* op = static_cast<const Op*>(lanes[l]->arg);
    const T* p = static_cast<const T*>(op->ptr);
    T* dst = static_cast<T*>(op->frag);
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) dst[r * 16 + c] = op->col ? p[(size_t)c * op->ldm + r] : p[(size_t)r * op->ldm + c];
  }
}

inline void agree_only(emu::Fiber* const* lanes, int n) { check_agree(lanes, n, "store_matrix_sync"); }

template <typename T>
void collective_load(T* frag, const T* p, unsigned ldm, bool col, const std::source_location& loc) {
  Op op{p, ldm, col, frag, (int)sizeof(T)};
  emu::arrive(emu::Scope::Warp, "wmma::load_matrix_sync", loc, load_all<T>, &op);
}
}  // namespace detail

template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm,
                             std::source_location loc = std::source_location::current()) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  detail::collective_load(f.x, p, ldm, std::is_same_v<L, col_major>, loc);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout, std::source_location loc = std::source_location::current()) {
  detail::collective_load(f.x, p, ldm, layout == mem_col_major, loc);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout, std::source_location loc = std::source_location::current()) {
  detail::Op op{p, ldm, layout == mem_col_major, nullptr, 4};
  emu::arrive(emu::Scope::Warp, "wmma::store_matrix_sync", loc, detail::agree_only, &op);
  const int lane = emu::rt.cur->tid % 32;
  for (int e = lane; e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    p[op.col ? (size_t)c * ldm + r : (size_t)r * ldm + c] = f.x[e];
  }
}

template <typename Use, int M, int N, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  T t;
  if constexpr (std::is_same_v<T, float>) t = v;
  else if constexpr (std::is_same_v<T, __half>) t = __float2half(v);
  else t = __float2bfloat16(v);
  for (auto& e : f.x) e = t;
}

namespace detail {
template <typename T, typename LA, typename LB>
void mma(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
         const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c,
         const std::source_location& loc) {
  emu::arrive(emu::Scope::Warp, "wmma::mma_sync", loc);
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) acc += f32(a.x[i * 16 + k]) * f32(b.x[k * 16 + j]);
      out[i * 16 + j] = acc;
    }
  for (int e = 0; e < 256; ++e) d.x[e] = out[e];
}
}  // namespace detail

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c,
                     std::source_location loc = std::source_location::current()) {
  detail::mma(d, a, b, c, loc);
}

}  // namespace wmma
}  // namespace nvcuda
