// Selective-scan forward: local chunk walks, carry, output walks. See selective_scan_kernels.cuh.
#include "selective_scan_kernels.cuh"

namespace selective_scan {
namespace detail {

// Walk each chunk from a zero state: chunk_local = end state, chunk_dsum = Σ Δ over the chunk.
template <typename T, int NP>
__global__ void __launch_bounds__(kThreads) fwd_local_kernel(Params p) {
  using G = Geo<NP>;
  extern __shared__ float4 smem4[];
  float* s_delta = reinterpret_cast<float*>(smem4);
  float* s_u = s_delta + G::kTile;
  float* s_B = s_u + G::kTile;
  const Who<NP> w(p.dim);
  const int b = blockIdx.z;
  float A2[kNPT];
  load_A2<NP>(p, w, A2);
  const float* dbias = p.delta_bias;
  const int ch_begin = blockIdx.y * p.chunks_per_group;
  const int ch_end = min(ch_begin + p.chunks_per_group, p.nchunks);
  for (int ch = ch_begin; ch < ch_end; ++ch) {
    const int t0 = ch * kChunk;
    __syncthreads();
    for_tile<NP>(p, b, t0, [&](int c, int t, bool valid, size_t row) {
      float dl = 0.f, u = 0.f;
      if (valid) {
        const int d = blockIdx.x * G::CPB + c;
        dl = Cvt<T>::ld(static_cast<const T*>(p.delta) + row) + (dbias ? dbias[d] : 0.f);
        if (p.delta_softplus) dl = softplus_f(dl);
        u = Cvt<T>::ld(static_cast<const T*>(p.u) + row);
      }
      s_delta[t * G::TS + c] = dl;
      s_u[t * G::TS + c] = u;
    });
    stage_bc<T, NP>(p, p.Bm, s_B, b, t0);
    __syncthreads();
    float h[kNPT] = {0.f, 0.f, 0.f, 0.f};
    float dsum = 0.f;
#pragma unroll 4
    for (int t = 0; t < kChunk; ++t) {
      const float dl = s_delta[t * G::TS + w.c];
      const float du = dl * s_u[t * G::TS + w.c];
      const float4 bv = *reinterpret_cast<const float4*>(s_B + t * NP + w.q * kNPT);
      h[0] = exp2f(dl * A2[0]) * h[0] + du * bv.x;
      h[1] = exp2f(dl * A2[1]) * h[1] + du * bv.y;
      h[2] = exp2f(dl * A2[2]) * h[2] + du * bv.z;
      h[3] = exp2f(dl * A2[3]) * h[3] + du * bv.w;
      dsum += dl;
    }
    store_chunk_state<NP>(p, w, p.chunk_local, b, ch, h);
    if (w.active && w.q == 0) p.chunk_dsum[((size_t)b * p.nchunks + ch) * p.dim + w.d] = dsum;
  }
}

// Walk each chunk from its true incoming state and write out = (Σ_n C h + D u) · silu(z).
template <typename T, int NP>
__global__ void __launch_bounds__(kThreads) fwd_out_kernel(Params p) {
  using G = Geo<NP>;
  extern __shared__ float4 smem4[];
  float* s_delta = reinterpret_cast<float*>(smem4);
  float* s_u = s_delta + G::kTile;
  float* s_zo = s_u + G::kTile;  // silu(z) in, output out (same thread reads then writes a slot)
  float* s_B = s_zo + G::kTile;
  float* s_C = s_B + G::kBC;
  const Who<NP> w(p.dim);
  const int b = blockIdx.z;
  float A2[kNPT];
  load_A2<NP>(p, w, A2);
  const float Dd = (p.D != nullptr && w.active) ? p.D[w.d] : 0.f;
  const bool has_z = p.z != nullptr;
  const float* dbias = p.delta_bias;
  const int ch_begin = blockIdx.y * p.chunks_per_group;
  const int ch_end = min(ch_begin + p.chunks_per_group, p.nchunks);
  for (int ch = ch_begin; ch < ch_end; ++ch) {
    const int t0 = ch * kChunk;
    __syncthreads();
    for_tile<NP>(p, b, t0, [&](int c, int t, bool valid, size_t row) {
      float dl = 0.f, u = 0.f, zs = 1.f;
      if (valid) {
        const int d = blockIdx.x * G::CPB + c;
        dl = Cvt<T>::ld(static_cast<const T*>(p.delta) + row) + (dbias ? dbias[d] : 0.f);
        if (p.delta_softplus) dl = softplus_f(dl);
        u = Cvt<T>::ld(static_cast<const T*>(p.u) + row);
        if (has_z) {
          const float z = Cvt<T>::ld(static_cast<const T*>(p.z) + z_row(p, b, row));
          zs = z * sigmoid_f(z);
        }
      }
      s_delta[t * G::TS + c] = dl;
      s_u[t * G::TS + c] = u;
      s_zo[t * G::TS + c] = zs;
    });
    stage_bc<T, NP>(p, p.Bm, s_B, b, t0);
    stage_bc<T, NP>(p, p.Cm, s_C, b, t0);
    __syncthreads();
    float h[kNPT];
    load_chunk_state<NP>(p, w, p.chunk_carry, b, ch, h);
#pragma unroll 4
    for (int t = 0; t < kChunk; ++t) {
      const float dl = s_delta[t * G::TS + w.c];
      const float u = s_u[t * G::TS + w.c];
      const float du = dl * u;
      const float4 bv = *reinterpret_cast<const float4*>(s_B + t * NP + w.q * kNPT);
      const float4 cv = *reinterpret_cast<const float4*>(s_C + t * NP + w.q * kNPT);
      h[0] = exp2f(dl * A2[0]) * h[0] + du * bv.x;
      h[1] = exp2f(dl * A2[1]) * h[1] + du * bv.y;
      h[2] = exp2f(dl * A2[2]) * h[2] + du * bv.z;
      h[3] = exp2f(dl * A2[3]) * h[3] + du * bv.w;
      float y = cv.x * h[0] + cv.y * h[1] + cv.z * h[2] + cv.w * h[3];
      y = sum_states<NP>(y);
      if (w.q == 0) s_zo[t * G::TS + w.c] = (y + Dd * u) * s_zo[t * G::TS + w.c];
    }
    __syncthreads();
    for_tile<NP>(p, b, t0, [&](int c, int t, bool valid, size_t row) {
      if (valid) Cvt<T>::st(static_cast<T*>(p.out) + row, s_zo[t * G::TS + c]);
    });
  }
}

template <typename T, int NP>
cudaError_t forward_impl(const Params& p, cudaStream_t stream) {
  using G = Geo<NP>;
  const dim3 grid = main_grid(p, G::CPB);
  const size_t smem_local = (2 * G::kTile + G::kBC) * sizeof(float);
  const size_t smem_out = (3 * G::kTile + 2 * G::kBC) * sizeof(float);
  cudaError_t err = cudaFuncSetAttribute(fwd_out_kernel<T, NP>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)smem_out);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(fwd_local_kernel<T, NP>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)smem_local);
  if (err != cudaSuccess) return err;
  fwd_local_kernel<T, NP><<<grid, kThreads, smem_local, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if ((err = launch_carry(p, /*reverse=*/false, p.chunk_local, p.chunk_carry, stream)) != cudaSuccess) return err;
  fwd_out_kernel<T, NP><<<grid, kThreads, smem_out, stream>>>(p);
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
