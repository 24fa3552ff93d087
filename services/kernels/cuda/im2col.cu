// im2col for a 2-D convolution with zero padding, any stride and dilation 1: from a contiguous NCHW input to the
// Caffe-style column matrix (B, K, P) with K = C * KH * KW ordered (c, ky, kx) and P the output positions of the
// rows [row0, row0 + P / W_out) in row-major order, so that `weight (C_out, K) @ col` is the convolution's output
// (B, C_out, P), already NCHW.
//
// Grid (x: blocks over P, y: one input channel, z: one image), one thread per output position: consecutive threads
// take consecutive positions (x fastest), so the KH * KW reads of one (ky, kx) and the writes of one column row are
// coalesced. One 32-bit division per thread; the plan checks that H * W and P fit in 31 bits (the per-image and
// per-channel bases are 64-bit).
#include "common.cuh"

namespace {

template <typename T>
__device__ void im2col(const T* __restrict__ x, T* __restrict__ col, int h, int w, int kh, int kw, int stride,
                       int pad, int w_out, int row0, int positions) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= positions) return;
  const int c = blockIdx.y;
  const long long plane = (long long)blockIdx.z * gridDim.y + c;  // b * C + c
  const int r = p / w_out;
  const int iy0 = (row0 + r) * stride - pad;
  const int ix0 = (p - r * w_out) * stride - pad;
  const T* src = x + plane * h * w;
  T* dst = col + plane * kh * kw * positions + p;  // row (b, c * KH * KW) of the column matrix, column p
  const T zero = from_f32<T>(0.f);
  for (int ky = 0; ky < kh; ++ky) {
    const int iy = iy0 + ky;
    const bool row_in = iy >= 0 && iy < h;
    for (int kx = 0; kx < kw; ++kx) {
      const int ix = ix0 + kx;
      *dst = (row_in && ix >= 0 && ix < w) ? src[iy * w + ix] : zero;
      dst += positions;
    }
  }
}

}  // namespace

#define IM2COL(SUFFIX, T)                                                                                     \
  extern "C" __global__ void im2col_##SUFFIX(const T* x, T* col, int h, int w, int kh, int kw, int stride,  \
                                             int pad, int w_out, int row0, int positions) {                 \
    im2col<T>(x, col, h, w, kh, kw, stride, pad, w_out, row0, positions);                                    \
  }

IM2COL(f32, float)
IM2COL(f16, __half)
IM2COL(bf16, __nv_bfloat16)
