// Host-side interface of the selective-scan CUDA kernels. Plain C++ + CUDA runtime types only:
// no torch/ATen headers, so every .cu file compiles with `nvcc -c` on a machine without torch.
#pragma once

#include <cuda_runtime.h>

namespace selective_scan {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Tokens per chunk: the unit of shared-memory staging and of the saved forward states (chunk_carry).
constexpr int kChunk = 64;
// Groups per carry segment (the carry kernels scan segments of groups, then the groups inside a segment).
constexpr int kSegChunks = 32;

// All tensors are contiguous, except z, whose batch stride is z_batch_stride (rows of seqlen, stride 1).
// Shapes: u, delta, z, out, dout, du, ddelta, dz: (batch, dim, seqlen) in `dtype`; A: (dim, dstate) fp32;
// Bm, Cm: (batch, 1, dstate, seqlen) in `dtype`; D, delta_bias: (dim) fp32 or null;
// chunk_carry: (batch, nchunks, dstate, dim) fp32; group_local, group_carry: (batch, ngroups, dstate, dim) fp32;
// group_dsum: (batch, ngroups, dim) fp32; seg_agg: (batch, nseg, dstate + 1, dim) fp32 with
// nseg = ceil(ngroups / kSegChunks); last_state: (batch, dim, dstate) fp32 or null;
// dB, dC: (batch, 1, dstate, seqlen) fp32 (zero-filled by the backward's first walk when zero_bc, which the caller
// sets when channel_tiles() > 1: the main kernel then adds into them with atomics);
// dA_part: (batch, ngroups, dstate, dim); dD_part, dbias_part: (batch, ngroups, dim) fp32 (per-block partial sums
// of the backward main kernel); dA: (dim, dstate), dD, dbias: (dim) fp32, their sums over batch and groups
// (dD / dbias null when there is no D / delta_bias).
struct Params {
  int batch = 0, dim = 0, seqlen = 0, dstate = 0;
  int nchunks = 0, nseg = 0;
  // The sequence is cut into groups of chunks_per_group chunks; one block walks one group serially (chunk
  // after chunk, carrying the state), and only group boundaries go through the carry kernels.
  int chunks_per_group = 1, ngroups = 0;
  DType dtype = DType::kFloat32;
  bool delta_softplus = false;
  bool prefetch = true;  // issue the next chunk's loads before walking the current one
  bool vec_io = false;   // rows are 16-byte aligned (seqlen % 8 == 0, aligned pointers): vector loads/stores
  bool reverse = false;  // walk the sequence last-to-first: logical token t is memory position seqlen - 1 - t
  bool lane_kernels = true;  // d_state <= 16: one thread per channel holding all 16 states (selective_scan_lane.cuh)
  int lane_threads = 0;      // block size of the lane kernels: 96, 128 or 0 (chosen from dim)
  int bwd_main_variant = 1;  // backward main kernel: 0 bwd_main_kernel (the previous one), else bwd_main2_kernel

  const void* u = nullptr;
  const void* delta = nullptr;
  const void* z = nullptr;
  long long z_batch_stride = 0;  // z may be a channel slice of a larger tensor: (batch, ·, seqlen) rows
  const void* Bm = nullptr;
  const void* Cm = nullptr;
  const float* A = nullptr;
  const float* D = nullptr;
  const float* delta_bias = nullptr;

  void* out = nullptr;
  float* last_state = nullptr;

  float* group_local = nullptr;   // per-group walk from zero (forward: end state; backward: message leaving it)
  float* group_dsum = nullptr;    // per-group sum of delta (after bias/softplus); saved for backward
  float* group_carry = nullptr;   // forward: state entering each group; backward: message entering from the right
  float* chunk_carry = nullptr;   // forward: state entering each chunk (written by the output walk, saved)
  float* seg_agg = nullptr;

  const void* dout = nullptr;
  void* du = nullptr;
  void* ddelta = nullptr;
  void* dz = nullptr;
  float* dB = nullptr;
  float* dC = nullptr;
  float* dA_part = nullptr;
  float* dD_part = nullptr;
  float* dbias_part = nullptr;
  float* dA = nullptr;
  float* dD = nullptr;
  float* dbias = nullptr;
  // Zero dB and dC in the backward's first walk (set when the main kernel adds into them atomically).
  bool zero_bc = false;
};

// Padded state count used by the kernels (16, 32 or 64); 0 if dstate is unsupported (> 64).
int padded_dstate(int dstate);
// Number of channel tiles (blocks along the channel axis). dB/dC need atomics when this is > 1.
int channel_tiles(int dim, int dstate);

// Each returns cudaSuccess or the first CUDA error. `stream` is the caller's current stream.
cudaError_t forward(const Params& p, cudaStream_t stream);
cudaError_t backward(const Params& p, cudaStream_t stream);

}  // namespace selective_scan
