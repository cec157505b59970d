// Selective-scan forward: local group walks, carry, output walks. See selective_scan_kernels.cuh.
#include "selective_scan_kernels.cuh"
#include "selective_scan_lane.cuh"

namespace selective_scan {
namespace detail {

// Walk each group from a zero state: group_local = end state, group_dsum = Σ Δ over the group.
template <typename T, int NP, bool kPrefetch>
__global__ void __launch_bounds__(kThreads, kPrefetch ? 1 : kFwdLocalMinBlocks) fwd_local_kernel(Params p) {
  using G = Geo<NP>;
  extern __shared__ float4 smem4[];
  float* s_delta = reinterpret_cast<float*>(smem4);
  float* s_u = s_delta + G::kTile;
  float* s_B = s_u + G::kTile;
  const Who<NP> w(p.dim);
  const int b = blockIdx.z;
  float A2[kNPT];
  load_A2<NP>(p, w, A2);
  const int ch_begin = blockIdx.y * p.chunks_per_group;
  const int ch_end = min(ch_begin + p.chunks_per_group, p.nchunks);
  RowRegs<T, NP> r_delta, r_u;
  BCRegs<T, NP> r_B;
  auto prefetch = [&](int ch) {
    const long long bs = (long long)p.dim * p.seqlen;
    r_delta.load(p, p.delta, b, ch * kChunk, bs);
    r_u.load(p, p.u, b, ch * kChunk, bs);
    r_B.load(p, p.Bm, b, ch * kChunk);
  };
  if (kPrefetch && ch_begin < ch_end) prefetch(ch_begin);
  float h[kNPT] = {0.f, 0.f, 0.f, 0.f};
  float dsum = 0.f;
  for (int ch = ch_begin; ch < ch_end; ++ch) {
    const int t0 = ch * kChunk;
    __syncthreads();
    if (!kPrefetch) prefetch(ch);
    r_delta.commit(p, t0, s_delta, [&](float v, bool valid, int d) { return valid ? delta_in(p, v, d) : 0.f; });
    r_u.commit(p, t0, s_u, [](float v, bool, int) { return v; });
    r_B.store(p, s_B);
    __syncthreads();
    if (kPrefetch && ch + 1 < ch_end) prefetch(ch + 1);
#pragma unroll 4
    for (int t = 0; t < kChunk; ++t) {
      dsum += walk_token<NP>(s_delta, s_u, s_B, t, w, A2, h);
    }
  }
  store_state<NP>(p, w, p.group_local, p.ngroups, b, blockIdx.y, h);
  if (w.active && w.q == 0) p.group_dsum[group_dsum_idx(p, b, blockIdx.y, w.d)] = dsum;
}

// Walk each group from its true incoming state and write out = (Σ_n C h + D u) · silu(z), and the state
// entering every chunk (chunk_carry, for the backward).
template <typename T, int NP, bool kPrefetch>
__global__ void __launch_bounds__(kThreads, kPrefetch ? 1 : (NP == 64 ? 4 : kFwdOutMinBlocks)) fwd_out_kernel(Params p) {
  using G = Geo<NP>;
  extern __shared__ float4 smem4[];
  float* s_delta = reinterpret_cast<float*>(smem4);
  float* s_u = s_delta + G::kTile;
  float* s_zo = s_u + G::kTile;  // silu(z) in, output out (the same thread reads then writes a slot)
  float* s_B = s_zo + G::kTile;
  float* s_C = s_B + G::kBC;
  const Who<NP> w(p.dim);
  const int b = blockIdx.z;
  float A2[kNPT];
  load_A2<NP>(p, w, A2);
  const float Dd = (p.D != nullptr && w.active) ? p.D[w.d] : 0.f;
  const bool has_z = p.z != nullptr;
  const int ch_begin = blockIdx.y * p.chunks_per_group;
  const int ch_end = min(ch_begin + p.chunks_per_group, p.nchunks);
  RowRegs<T, NP> r_delta, r_u, r_z;
  BCRegs<T, NP> r_B, r_C;
  auto prefetch = [&](int ch) {
    const long long bs = (long long)p.dim * p.seqlen;
    r_delta.load(p, p.delta, b, ch * kChunk, bs);
    r_u.load(p, p.u, b, ch * kChunk, bs);
    if (has_z) r_z.load(p, p.z, b, ch * kChunk, p.z_batch_stride);
    r_B.load(p, p.Bm, b, ch * kChunk);
    r_C.load(p, p.Cm, b, ch * kChunk);
  };
  if (kPrefetch && ch_begin < ch_end) prefetch(ch_begin);
  float h[kNPT];
  load_state<NP>(p, w, p.group_carry, p.ngroups, b, blockIdx.y, h);
  for (int ch = ch_begin; ch < ch_end; ++ch) {
    const int t0 = ch * kChunk;
    store_state<NP>(p, w, p.chunk_carry, p.nchunks, b, ch, h);
    __syncthreads();
    if (!kPrefetch) prefetch(ch);
    r_delta.commit(p, t0, s_delta, [&](float v, bool valid, int d) { return valid ? delta_in(p, v, d) : 0.f; });
    r_u.commit(p, t0, s_u, [](float v, bool, int) { return v; });
    r_z.commit(p, t0, s_zo, [&](float z, bool, int) { return has_z ? z * sigmoid_f(z) : 1.f; });
    r_B.store(p, s_B);
    r_C.store(p, s_C);
    __syncthreads();
    if (kPrefetch && ch + 1 < ch_end) prefetch(ch + 1);
#pragma unroll 4
    for (int t = 0; t < kChunk; ++t) {
      const float dl = s_delta[t * G::TS + w.c];
      const float u = s_u[t * G::TS + w.c];
      const float du = dl * u;
      const float4 bv = state4<NP>(s_B, t, w.q);
      const float4 cv = state4<NP>(s_C, t, w.q);
      h[0] = fast_exp2(dl * A2[0]) * h[0] + du * bv.x;
      h[1] = fast_exp2(dl * A2[1]) * h[1] + du * bv.y;
      h[2] = fast_exp2(dl * A2[2]) * h[2] + du * bv.z;
      h[3] = fast_exp2(dl * A2[3]) * h[3] + du * bv.w;
      float y = cv.x * h[0] + cv.y * h[1] + cv.z * h[2] + cv.w * h[3];
      y = sum_states<NP>(y);
      if (w.q == 0) s_zo[t * G::TS + w.c] = (y + Dd * u) * s_zo[t * G::TS + w.c];
    }
    __syncthreads();
    store_tile<T, NP>(p, p.out, s_zo, b, t0);
  }
}

template <typename T, int NP>
cudaError_t forward_impl(const Params& p, cudaStream_t stream) {
  using G = Geo<NP>;
  const dim3 grid = main_grid(p, G::CPB);
  const size_t smem_local = (2 * G::kTile + G::kBC) * sizeof(float);
  const size_t smem_out = (3 * G::kTile + 2 * G::kBC) * sizeof(float);
  if (NP == 16 && p.lane_kernels) return forward_lane<T>(p, stream);
  cudaError_t err = cudaSuccess;
  for (const void* f : {(const void*)fwd_out_kernel<T, NP, true>, (const void*)fwd_out_kernel<T, NP, false>}) {
    if ((err = cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_out)) != cudaSuccess)
      return err;
  }
  for (const void* f : {(const void*)fwd_local_kernel<T, NP, true>, (const void*)fwd_local_kernel<T, NP, false>}) {
    if ((err = cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_local)) != cudaSuccess)
      return err;
  }
  if (p.prefetch) fwd_local_kernel<T, NP, true><<<grid, kThreads, smem_local, stream>>>(p);
  else fwd_local_kernel<T, NP, false><<<grid, kThreads, smem_local, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if ((err = launch_carry(p, /*reverse=*/false, p.group_local, p.group_carry, stream)) != cudaSuccess) return err;
  if (p.prefetch) fwd_out_kernel<T, NP, true><<<grid, kThreads, smem_out, stream>>>(p);
  else fwd_out_kernel<T, NP, false><<<grid, kThreads, smem_out, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_dispatch_n(const Params& p, cudaStream_t stream) {
  switch (padded_dstate(p.dstate)) {
    case 16: return forward_impl<T, 16>(p, stream);
    case 32: return forward_impl<T, 32>(p, stream);
    case 64: return forward_impl<T, 64>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace detail

int padded_dstate(int dstate) {
  if (dstate < 1) return 0;
  if (dstate <= 16) return 16;
  if (dstate <= 32) return 32;
  if (dstate <= 64) return 64;
  return 0;
}

int channel_tiles(int dim, int dstate) {
  const int np = padded_dstate(dstate);
  if (np == 0) return 0;
  const int cpb = detail::kThreads / (np / detail::kNPT);
  return (dim + cpb - 1) / cpb;
}

cudaError_t forward(const Params& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return detail::forward_dispatch_n<float>(p, stream);
    case DType::kFloat16: return detail::forward_dispatch_n<__half>(p, stream);
    case DType::kBFloat16: return detail::forward_dispatch_n<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace selective_scan
