// CUDA execution emulator, part 2: the language shim that lets unmodified .cu sources compile with a host C++20
// compiler (g++ -std=c++20 -fno-strict-aliasing -I emu). It provides the qualifiers (as nothing, or `static` for
// __shared__), the built-in index variables and dim3/uint3/uint4 (emu_sched.h), __syncthreads/__syncwarp,
// __shfl_xor_sync, the math intrinsics the kernels use, and __half / __nv_bfloat16 as 16-bit storage types with
// round-to-nearest-even conversions.
//
// NOT emulated: fast-math accuracy (__expf is expf, rsqrtf is 1/sqrtf: results may differ from the GPU in the
// last bits), denormal flushing, arithmetic operators on __half (conversions only), other intrinsics.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "emu_sched.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Shared variables are function-local statics; emu_shared.h finds them in the program's symbol table and fills them
// with 0xff (NaN) before each block: a kernel that reads shared memory it never wrote sees NaN, as it may see
// garbage on the GPU.
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct __attribute__((aligned(16))) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// ---- synchronisation -------------------------------------------------------------------------------------------

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  emu::arrive(emu::Scope::Block, "__syncthreads", loc);
}

inline void check_full_mask(unsigned mask, const char* what, const std::source_location& loc) {
  if (mask != 0xffffffffu) emu::fail("%s: mask %#x (only 0xffffffff is emulated)", emu::where(what, loc).c_str(), mask);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location loc = std::source_location::current()) {
  check_full_mask(mask, "__syncwarp", loc);
  emu::arrive(emu::Scope::Warp, "__syncwarp", loc);
}

namespace emu {
struct ShflXor {
  static void run(Fiber* const* lanes, int n) {
    uint32_t in[32];
    const int lane_mask = (int)(intptr_t)lanes[0]->arg;
    for (int i = 0; i < n; ++i) {
      if ((int)(intptr_t)lanes[i]->arg != lane_mask) fail("__shfl_xor_sync: lanes disagree on the lane mask");
      in[i] = lanes[i]->value;
    }
    for (int i = 0; i < n; ++i) lanes[i]->value = in[(i ^ lane_mask) & 31];
  }
};
}  // namespace emu

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         std::source_location loc = std::source_location::current()) {
  static_assert(sizeof(T) == 4, "only 32-bit shuffles are emulated");
  check_full_mask(mask, "__shfl_xor_sync", loc);
  if (width != 32) emu::fail("%s: width %d (only 32)", emu::where("__shfl_xor_sync", loc).c_str(), width);
  std::memcpy(&emu::rt.cur->value, &v, 4);
  emu::Fiber* self = emu::rt.cur;
  emu::arrive(emu::Scope::Warp, "__shfl_xor_sync", loc, emu::ShflXor::run, (void*)(intptr_t)lane_mask);
  T out;
  std::memcpy(&out, &self->value, 4);
  return out;
}

// ---- 16-bit floating point storage types -----------------------------------------------------------------------

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

namespace emu {
inline uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace emu

// Round to nearest even, subnormals kept, overflow to infinity, NaN kept quiet.
inline __half __float2half(float f) {
  const uint32_t x = emu::bits(f);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return __half{(uint16_t)(sign | 0x7e00u)};
  if (ax >= 0x47800000u) return __half{(uint16_t)(sign | 0x7c00u)};  // >= 65536 (and inf)
  if (ax < 0x38800000u) {                                               // below 2^-14: subnormal half
    const float scaled = emu::from_bits(ax) * 16777216.0f;              // exact: times 2^24
    return __half{(uint16_t)(sign | (uint16_t)std::nearbyint(scaled))};
  }
  const uint32_t mant = ax & 0x7fffffu;
  const uint32_t exp = (ax >> 23) - 127 + 15;
  uint32_t h = (exp << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is still correct (inf too)
  return __half{(uint16_t)(sign | h)};
}

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16;
  const uint32_t exp = (h.x >> 10) & 0x1fu;
  const uint32_t mant = h.x & 0x3ffu;
  if (exp == 0) {
    const float v = (float)mant / 16777216.0f;  // mant * 2^-24
    return sign ? -v : v;
  }
  if (exp == 31) return emu::from_bits(sign | 0x7f800000u | (mant << 13));
  return emu::from_bits(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

inline __nv_bfloat16 __float2bfloat16(float f) {
  const uint32_t x = emu::bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((x >> 16) | 0x40u)};
  const uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return __nv_bfloat16{(uint16_t)(rounded >> 16)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return emu::from_bits((uint32_t)b.x << 16); }
