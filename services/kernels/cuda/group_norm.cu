// Fused GroupNorm (+ optional SiLU) over a contiguous (B, C, spatial...) tensor in three launches instead of the
// ~10 elementwise/reduction kernels of the unfused version:
//   gn_stats_*:  grid (chunks, B*G): each block reduces one chunk of one group to (mean, M2, count), f32, with
//                the values shifted by the chunk's first element for accuracy;
//   gn_finalize: one thread per group merges its chunks (Chan's parallel variance) into mean and 1/sqrt(var+eps);
//   gn_apply_*:  per (b, c) plane: x * (rstd * gamma[c]) + (beta[c] - mean * rstd * gamma[c]), then SiLU when
//                asked; gamma/beta are f32.
// Variance is the population variance (divide by n), as in PyTorch.
#include "common.cuh"

namespace {

constexpr int THREADS = 256;

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = (threadIdx.x < blockDim.x / 32) ? scratch[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  return v;  // valid in thread 0
}

template <typename T>
__device__ void gn_stats(const T* __restrict__ x, float* __restrict__ part, long long group_len, int chunk_len) {
  __shared__ float scratch[32];
  const int chunks = gridDim.x;
  const long long group = blockIdx.y;
  const long long start = (long long)blockIdx.x * chunk_len;
  const long long end = min(group_len, start + chunk_len);
  const T* g = x + group * group_len;
  float* out = part + (group * chunks + blockIdx.x) * 3;
  if (start >= end) {
    if (threadIdx.x == 0) {
      out[0] = 0.f;
      out[1] = 0.f;
      out[2] = 0.f;
    }
    return;
  }
  const float shift = to_f32(g[start]);
  float s1 = 0.f;
  float s2 = 0.f;
  for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float d = to_f32(g[i]) - shift;
    s1 += d;
    s2 += d * d;
  }
  s1 = block_sum(s1, scratch);
  s2 = block_sum(s2, scratch);
  if (threadIdx.x == 0) {
    const float n = (float)(end - start);
    const float mean_d = s1 / n;
    out[0] = shift + mean_d;
    out[1] = fmaxf(s2 - s1 * mean_d, 0.f);
    out[2] = n;
  }
}

// Grid (x: blocks over the plane, y: one (b, c) plane); no per-element integer division.
template <typename T>
__device__ void gn_apply(const T* __restrict__ x, const float* __restrict__ stats, const float* __restrict__ gamma,
                         const float* __restrict__ beta, T* __restrict__ y, long long spatial, int channels,
                         int channels_per_group, int silu) {
  const int plane = blockIdx.y;  // b * C + c
  const int c = plane % channels;
  const int group = plane / channels_per_group;  // b * G + c / (C / G)
  const float scale = stats[2 * group + 1] * gamma[c];
  const float shift = beta[c] - stats[2 * group] * scale;
  const T* xp = x + (long long)plane * spatial;
  T* yp = y + (long long)plane * spatial;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < spatial;
       i += (long long)gridDim.x * blockDim.x) {
    float v = to_f32(xp[i]) * scale + shift;
    if (silu) v = v / (1.f + __expf(-v));
    yp[i] = from_f32<T>(v);
  }
}

}  // namespace

// part: (groups, chunks, 3) -> stats: (groups, 2) = (mean, rstd)
extern "C" __global__ void gn_finalize(const float* part, float* stats, int groups, int chunks, float eps) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const float* p = part + (long long)g * chunks * 3;
  float n = 0.f, mean = 0.f, m2 = 0.f;
  for (int c = 0; c < chunks; ++c) {
    const float nb = p[3 * c + 2];
    if (nb == 0.f) continue;
    const float delta = p[3 * c] - mean;
    const float nn = n + nb;
    mean += delta * nb / nn;
    m2 += p[3 * c + 1] + delta * delta * n * nb / nn;
    n = nn;
  }
  stats[2 * g] = mean;
  stats[2 * g + 1] = rsqrtf(m2 / fmaxf(n, 1.f) + eps);
}

#define GROUP_NORM(SUFFIX, T)                                                                                  \
  extern "C" __global__ void __launch_bounds__(THREADS) gn_stats_##SUFFIX(const T* x, float* part,            \
                                                                          long long group_len, int chunk_len) { \
    gn_stats<T>(x, part, group_len, chunk_len);                                                                \
  }                                                                                                            \
  extern "C" __global__ void gn_apply_##SUFFIX(const T* x, const float* stats, const float* gamma,             \
                                               const float* beta, T* y, long long spatial, int channels,       \
                                               int channels_per_group, int silu) {                             \
    gn_apply<T>(x, stats, gamma, beta, y, spatial, channels, channels_per_group, silu);                        \
  }

GROUP_NORM(f32, float)
GROUP_NORM(f16, __half)
GROUP_NORM(bf16, __nv_bfloat16)
