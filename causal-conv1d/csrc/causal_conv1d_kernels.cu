// Depthwise causal conv1d: out[b,d,t] = act(bias_d + Σ_{k<W} w[d,k] · x[b,d,t-(W-1)+k]), x = 0 before t = 0
// (or of the sequence read last-to-first, Params::reverse).
// One block per (batch, channel, tile of kTile tokens); the tile plus its halo is staged in shared memory,
// so every global access is coalesced along the sequence. Backward recomputes the pre-activation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "causal_conv1d.h"

namespace causal_conv1d {
namespace {

constexpr int kThreads = 256;

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float ld(const float* p) { return *p; }
  static __device__ __forceinline__ void st(float* p, float v) { *p = v; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float ld(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void st(__half* p, float v) { *p = __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

// Memory position of logical token t. With p.reverse the kernels compute the causal conv of the flipped
// sequence (out[t] depends on x[t .. t + W - 1]) and write it unflipped, without flipped copies.
__device__ __forceinline__ int mpos(const Params& p, int t) { return p.reverse ? p.seqlen - 1 - t : t; }

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + __expf(-x)); }

template <typename T, int W>
__global__ void __launch_bounds__(kThreads) conv_fwd_kernel(Params p) {
  __shared__ float sx[kTile + W - 1];
  const int b = blockIdx.z, d = blockIdx.y, t0 = blockIdx.x * kTile;
  const size_t base = ((size_t)b * p.dim + d) * p.seqlen;
  const T* x = static_cast<const T*>(p.x) + (size_t)b * p.x_batch_stride + (size_t)d * p.seqlen;
  for (int i = threadIdx.x; i < kTile + W - 1; i += kThreads) {
    const int t = t0 - (W - 1) + i;
    sx[i] = (t >= 0 && t < p.seqlen) ? Cvt<T>::ld(x + mpos(p, t)) : 0.f;
  }
  float w[W];
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = p.weight[d * W + k];
  const float bias = p.bias ? p.bias[d] : 0.f;
  __syncthreads();
  T* out = static_cast<T*>(p.out) + base;
  for (int i = threadIdx.x; i < kTile; i += kThreads) {
    const int t = t0 + i;
    if (t >= p.seqlen) break;
    float acc = bias;
#pragma unroll
    for (int k = 0; k < W; ++k) acc += w[k] * sx[i + k];
    if (p.silu) acc *= sigmoid_f(acc);
    Cvt<T>::st(out + mpos(p, t), acc);
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kThreads) conv_bwd_kernel(Params p) {
  __shared__ float sx[kTile + 2 * (W - 1)];  // x over [t0 - (W-1), t0 + kTile + W - 1)
  __shared__ float sg[kTile + W - 1];        // dout · act'(pre) over [t0, t0 + kTile + W - 1)
  __shared__ float sred[kThreads / 32][W + 1];
  const int b = blockIdx.z, d = blockIdx.y, t0 = blockIdx.x * kTile;
  const size_t base = ((size_t)b * p.dim + d) * p.seqlen;
  const T* x = static_cast<const T*>(p.x) + (size_t)b * p.x_batch_stride + (size_t)d * p.seqlen;
  const T* dout = static_cast<const T*>(p.dout) + base;
  for (int i = threadIdx.x; i < kTile + 2 * (W - 1); i += kThreads) {
    const int t = t0 - (W - 1) + i;
    sx[i] = (t >= 0 && t < p.seqlen) ? Cvt<T>::ld(x + mpos(p, t)) : 0.f;
  }
  float w[W];
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = p.weight[d * W + k];
  const float bias = p.bias ? p.bias[d] : 0.f;
  __syncthreads();
  for (int i = threadIdx.x; i < kTile + W - 1; i += kThreads) {
    const int t = t0 + i;
    float g = 0.f;
    if (t < p.seqlen) {
      g = Cvt<T>::ld(dout + mpos(p, t));
      if (p.silu) {
        float pre = bias;
#pragma unroll
        for (int k = 0; k < W; ++k) pre += w[k] * sx[i + k];
        const float s = sigmoid_f(pre);
        g *= s * (1.f + pre * (1.f - s));
      }
    }
    sg[i] = g;
  }
  __syncthreads();
  float dw[W + 1];
#pragma unroll
  for (int k = 0; k <= W; ++k) dw[k] = 0.f;
  T* dx = static_cast<T*>(p.dx) + base;
  for (int i = threadIdx.x; i < kTile; i += kThreads) {
    const int t = t0 + i;
    if (t >= p.seqlen) break;
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < W; ++k) acc += w[k] * sg[i + (W - 1) - k];
    Cvt<T>::st(dx + mpos(p, t), acc);
    const float g = sg[i];
#pragma unroll
    for (int k = 0; k < W; ++k) dw[k] += g * sx[i + k];
    dw[W] += g;
  }
#pragma unroll
  for (int k = 0; k <= W; ++k) {
    float v = dw[k];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if ((threadIdx.x & 31) == 0) sred[threadIdx.x >> 5][k] = v;
  }
  __syncthreads();
  if (threadIdx.x <= W) {
    float v = 0.f;
#pragma unroll
    for (int wp = 0; wp < kThreads / 32; ++wp) v += sred[wp][threadIdx.x];
    p.dw_part[(((size_t)b * p.ntiles + blockIdx.x) * p.dim + d) * (W + 1) + threadIdx.x] = v;
  }
}

template <typename T, int W>
cudaError_t launch(const Params& p, bool backward, cudaStream_t stream) {
  const dim3 grid((unsigned)p.ntiles, (unsigned)p.dim, (unsigned)p.batch);
  if (backward) conv_bwd_kernel<T, W><<<grid, kThreads, 0, stream>>>(p);
  else conv_fwd_kernel<T, W><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_width(const Params& p, bool backward, cudaStream_t stream) {
  switch (p.width) {
    case 2: return launch<T, 2>(p, backward, stream);
    case 3: return launch<T, 3>(p, backward, stream);
    case 4: return launch<T, 4>(p, backward, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t dispatch(const Params& p, bool backward, cudaStream_t stream) {
  if (p.dim > 65535 || p.batch > 65535) return cudaErrorInvalidConfiguration;
  switch (p.dtype) {
    case DType::kFloat32: return dispatch_width<float>(p, backward, stream);
    case DType::kFloat16: return dispatch_width<__half>(p, backward, stream);
    case DType::kBFloat16: return dispatch_width<__nv_bfloat16>(p, backward, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t forward(const Params& p, cudaStream_t stream) { return dispatch(p, false, stream); }
cudaError_t backward(const Params& p, cudaStream_t stream) { return dispatch(p, true, stream); }

}  // namespace causal_conv1d
