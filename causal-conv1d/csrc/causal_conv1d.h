// Host-side interface of the causal conv1d CUDA kernels. CUDA runtime types only (no torch headers).
#pragma once

#include <cuda_runtime.h>

namespace causal_conv1d {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Tokens per block.
constexpr int kTile = 2048;

// x: (batch, dim, seqlen) rows with batch stride x_batch_stride; out, dout, dx: contiguous in `dtype`; weight: (dim, width) fp32; bias: (dim) fp32
// or null; dw_part: (batch, ntiles, dim, width + 1) fp32 (last slot: bias gradient), summed by the caller.
struct Params {
  int batch = 0, dim = 0, seqlen = 0, width = 0, ntiles = 0;
  DType dtype = DType::kFloat32;
  bool silu = false;
  bool reverse = false;  // anti-causal: logical token t is memory position seqlen - 1 - t (a flipped sequence)
  const void* x = nullptr;
  long long x_batch_stride = 0;  // x may be a channel slice of a larger tensor (rows of seqlen, stride 1)
  const float* weight = nullptr;
  const float* bias = nullptr;
  void* out = nullptr;
  const void* dout = nullptr;
  void* dx = nullptr;
  float* dw_part = nullptr;
};

cudaError_t forward(const Params& p, cudaStream_t stream);
cudaError_t backward(const Params& p, cudaStream_t stream);

}  // namespace causal_conv1d
