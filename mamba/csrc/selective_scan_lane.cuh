// Lane-layout selective-scan walks for d_state <= 16: one thread per channel, holding all 16 states.
// Included by selective_scan_{fwd,bwd}.cu after selective_scan_kernels.cuh (CUDA headers and our own only).
//
// Why: in the state-split layout every token costs each thread two shared-memory reads of its channel's Δ and
// u, the softplus/silu work is done once per channel but read 4 times, and the output needs a 2-level shuffle
// reduction over the 4 lanes of a channel. Here a thread does the per-token channel work once for 16 states and
// sums y in registers; the walk is bound by the 16 exp2 per token (the MUFU unit), not by issue.
//
// Layout. Block = 96 or 128 threads = as many consecutive channels (96 when the channel count is a multiple of
// 96 but not of 128, e.g. the model's d_inner 96 and 192, so that no warp idles; warps wholly past `dim` skip
// the walk but still stage B/C). Grid = (channel tiles, groups, batch); a block walks its group chunk by chunk.
//   - Per-channel rows (Δ, u, z, dout) are read by each thread directly from global memory in sub-chunks of
//     8 tokens (16-byte granules), the next sub-chunk issued before the current one is walked. Lanes of a warp
//     read 32 different rows, but each 32-byte sector is used in full (16-bit: by two sub-chunks, via L1).
//   - B and C (shared by all channels) are staged per chunk into [token][state] shared-memory tiles, double
//     buffered: the next chunk's values are loaded into registers while the current chunk is walked.
//   - reverse: logical token t is memory position seqlen-1-t. Vector granules are loaded from the mirrored
//     position and read back to front (get()); the scalar path stores into the same mirrored slots.
#pragma once

#include "selective_scan_kernels.cuh"

namespace selective_scan {
namespace detail {

constexpr int kLaneN = 16;             // states per thread
constexpr int kLaneBS = Geo<16>::BS;   // row stride of the [token][state] B/C tiles
constexpr int kLaneTile = kChunk * kLaneBS;

// One channel row's sub-chunk of kSub = 8 tokens in raw input precision: 16-byte granules, two for fp32, one
// for 16-bit types (whose 32-byte sector is then read by two consecutive sub-chunks; the second hits L1). Eight
// tokens keep the unrolled walk body small.
template <typename T>
struct LaneRow {
  static constexpr int kG = 16 / (int)sizeof(T);  // tokens per granule
  static constexpr int kSub = 8;                   // tokens per sub-chunk
  static constexpr int kNG = kSub / kG;            // granules per sub-chunk
  struct alignas(16) Gran { T e[kG]; };
  Gran g[kNG];

  // Logical tokens [t, t + kSub) of `row` (a (seqlen) row); zeros past the end or when !active.
  __device__ __forceinline__ void load(const Params& p, const T* row, int t, bool active) {
    if (p.vec_io) {  // seqlen % 8 == 0: a granule is wholly inside or wholly outside the row
#pragma unroll
      for (int gi = 0; gi < kNG; ++gi) {
        const int tt = t + gi * kG;
        if (active && tt < p.seqlen) {
          g[gi] = *reinterpret_cast<const Gran*>(row + mem_vec<kG>(p, tt));
        } else {
#pragma unroll
          for (int j = 0; j < kG; ++j) g[gi].e[j] = Cvt<T>::to(0.f);
        }
      }
    } else {
#pragma unroll
      for (int gi = 0; gi < kNG; ++gi)
#pragma unroll
        for (int j = 0; j < kG; ++j) {
          const int tt = t + gi * kG + j;
          const T v = (active && tt < p.seqlen) ? row[mem_pos(p, tt)] : Cvt<T>::to(0.f);
          if (p.reverse) g[gi].e[kG - 1 - j] = v; else g[gi].e[j] = v;
        }
    }
  }
  // Value of logical token t + i (i a compile-time index after unrolling).
  __device__ __forceinline__ float get(const Params& p, int i) const {
    const int gi = i / kG, j = i % kG;
    return Cvt<T>::f(p.reverse ? g[gi].e[kG - 1 - j] : g[gi].e[j]);
  }
};

// The three per-channel rows a walk reads together (Δ, u, z forward; Δ, dout, z backward); z may be absent.
template <typename T>
struct LaneRows3 {
  LaneRow<T> a, b, c;
  __device__ __forceinline__ void load(const Params& p, const T* ra, const T* rb, const T* rc, int t, bool active) {
    a.load(p, ra, t, active);
    b.load(p, rb, t, active);
    if (rc != nullptr) c.load(p, rc, t, active);
  }
};

// B and C tiles of one chunk: 16 state rows x kChunk tokens read as 16-byte vectors by a block of >= 96
// threads (held in registers, raw, so the loads of the next chunk are in flight while the current one is
// walked), then written as a [token][state] tile. Without aligned rows (!vec_io) the scalar path loads and
// stores in one go at store() time.
template <typename T>
struct LaneBC {
  static constexpr int kV = 16 / (int)sizeof(T);   // tokens per vector
  static constexpr int kVPR = kChunk / kV;         // vectors per state row
  static constexpr int kVecs = kLaneN * kVPR;      // vectors per tile
  static constexpr int kPer = (kVecs + 95) / 96;   // vectors per thread (blockDim >= 96)
  struct alignas(16) Raw { T e[kV]; };
  Raw r[kPer];
  __device__ __forceinline__ void load(const Params& p, const void* src, int b, int t0) {
    if (!p.vec_io) return;
    const T* base = static_cast<const T*>(src) + (size_t)b * p.dstate * p.seqlen;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int vi = threadIdx.x + k * blockDim.x;
      const int n = vi / kVPR, tt = t0 + (vi % kVPR) * kV;
      if (vi < kVecs && n < p.dstate && tt < p.seqlen) {
        r[k] = *reinterpret_cast<const Raw*>(base + (size_t)n * p.seqlen + mem_vec<kV>(p, tt));
      } else {
#pragma unroll
        for (int i = 0; i < kV; ++i) r[k].e[i] = Cvt<T>::to(0.f);
      }
    }
  }
  __device__ __forceinline__ void store(const Params& p, const void* src, int b, int t0, float* tile) const {
    if (p.vec_io) {
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int vi = threadIdx.x + k * blockDim.x;
        if (vi >= kVecs) continue;
        const int n = vi / kVPR, t = (vi % kVPR) * kV;
#pragma unroll
        for (int i = 0; i < kV; ++i) tile[(t + (p.reverse ? kV - 1 - i : i)) * kLaneBS + n] = Cvt<T>::f(r[k].e[i]);
      }
    } else {
      const T* base = static_cast<const T*>(src) + (size_t)b * p.dstate * p.seqlen;
      for (int e = threadIdx.x; e < kLaneN * kChunk; e += blockDim.x) {
        const int n = e / kChunk, t = e % kChunk, tt = t0 + t;
        tile[t * kLaneBS + n] = (n < p.dstate && tt < p.seqlen) ? Cvt<T>::ld(base + (size_t)n * p.seqlen + mem_pos(p, tt)) : 0.f;
      }
    }
  }
};

// Writes logical tokens [t, t + kSub) of a row from v (valid tokens only).
template <typename T>
__device__ __forceinline__ void lane_store(const Params& p, T* row, int t, const float (&v)[LaneRow<T>::kSub]) {
  using R = LaneRow<T>;
  if (p.vec_io) {
#pragma unroll
    for (int gi = 0; gi < R::kNG; ++gi) {
      const int tt = t + gi * R::kG;
      if (tt >= p.seqlen) continue;
      typename R::Gran o;
#pragma unroll
      for (int j = 0; j < R::kG; ++j) {
        const float x = v[gi * R::kG + j];
        if (p.reverse) o.e[R::kG - 1 - j] = Cvt<T>::to(x); else o.e[j] = Cvt<T>::to(x);
      }
      *reinterpret_cast<typename R::Gran*>(row + mem_vec<R::kG>(p, tt)) = o;
    }
  } else {
#pragma unroll
    for (int i = 0; i < R::kSub; ++i) {
      const int tt = t + i;
      if (tt < p.seqlen) row[mem_pos(p, tt)] = Cvt<T>::to(v[i]);
    }
  }
}

// The 16 states of token row r of a [token][state] tile (all lanes read the same address: a broadcast).
__device__ __forceinline__ void lane_states(const float* tile, int r, float (&v)[kLaneN]) {
  const float4* q = reinterpret_cast<const float4*>(tile + r * kLaneBS);
#pragma unroll
  for (int k = 0; k < kLaneN / 4; ++k) {
    const float4 x = q[k];
    v[4 * k] = x.x;
    v[4 * k + 1] = x.y;
    v[4 * k + 2] = x.z;
    v[4 * k + 3] = x.w;
  }
}

struct LaneWho {
  int d, b, grp, ch_begin, ch_end;
  bool active, warp_active;
  __device__ __forceinline__ explicit LaneWho(const Params& p) {
    d = blockIdx.x * blockDim.x + threadIdx.x;
    active = d < p.dim;
    warp_active = (int)(blockIdx.x * blockDim.x + (threadIdx.x & ~31)) < p.dim;
    b = blockIdx.z;
    grp = blockIdx.y;
    ch_begin = grp * p.chunks_per_group;
    ch_end = min(ch_begin + p.chunks_per_group, p.nchunks);
  }
  __device__ __forceinline__ size_t row(const Params& p) const { return ((size_t)b * p.dim + (active ? d : 0)) * p.seqlen; }
};

__device__ __forceinline__ void lane_A2(const Params& p, const LaneWho& w, float (&A2)[kLaneN]) {
#pragma unroll
  for (int n = 0; n < kLaneN; ++n) A2[n] = (w.active && n < p.dstate) ? p.A[(size_t)w.d * p.dstate + n] * kLog2e : 0.f;
}

__device__ __forceinline__ void lane_load_group(const Params& p, const LaneWho& w, const float* arr,
                                                float (&h)[kLaneN]) {
#pragma unroll
  for (int n = 0; n < kLaneN; ++n) h[n] = (w.active && n < p.dstate) ? arr[group_idx(p, w.b, w.grp, n, w.d)] : 0.f;
}

__device__ __forceinline__ void lane_store_group(const Params& p, const LaneWho& w, float* arr,
                                                 const float (&h)[kLaneN]) {
  if (!w.active) return;
#pragma unroll
  for (int n = 0; n < kLaneN; ++n)
    if (n < p.dstate) arr[group_idx(p, w.b, w.grp, n, w.d)] = h[n];
}

// Forward walk of one group. kOut = false: from a zero state, writing group_local and group_dsum.
// kOut = true: from group_carry, writing out, chunk_carry (state entering each chunk) for the backward.
template <typename T, bool kOut>
__global__ void __launch_bounds__(kThreads, kOut ? 3 : 4) fwd_lane_kernel(Params p) {
  using R = LaneRow<T>;
  constexpr int kSubs = kChunk / R::kSub;
  extern __shared__ float4 smem4[];
  float* s_B = reinterpret_cast<float*>(smem4);  // 2 buffers
  float* s_C = s_B + 2 * kLaneTile;              // 2 buffers (kOut only)
  const LaneWho w(p);
  float A2[kLaneN], h[kLaneN];
  lane_A2(p, w, A2);
  if (kOut) lane_load_group(p, w, p.group_carry, h);
  else {
#pragma unroll
    for (int n = 0; n < kLaneN; ++n) h[n] = 0.f;
  }
  const float bias = (w.active && p.delta_bias != nullptr) ? p.delta_bias[w.d] : 0.f;
  const float Dd = (kOut && w.active && p.D != nullptr) ? p.D[w.d] : 0.f;
  const bool has_z = kOut && p.z != nullptr;
  const size_t row = w.row(p);
  const T* delta_row = static_cast<const T*>(p.delta) + row;
  const T* u_row = static_cast<const T*>(p.u) + row;
  const T* zr = has_z ? static_cast<const T*>(p.z) + z_row(p, w.b, row) : nullptr;
  T* out_row = kOut ? static_cast<T*>(p.out) + row : nullptr;

  LaneBC<T> rB, rC;
  auto stage_load = [&](int ch) {
    rB.load(p, p.Bm, w.b, ch * kChunk);
    if (kOut) rC.load(p, p.Cm, w.b, ch * kChunk);
  };
  auto stage_store = [&](int ch, int buf) {
    rB.store(p, p.Bm, w.b, ch * kChunk, s_B + buf * kLaneTile);
    if (kOut) rC.store(p, p.Cm, w.b, ch * kChunk, s_C + buf * kLaneTile);
  };
  stage_load(w.ch_begin);
  stage_store(w.ch_begin, 0);
  __syncthreads();

  LaneRows3<T> cur;  // Δ, u, z of the sub-chunk being walked
  cur.load(p, delta_row, u_row, zr, w.ch_begin * kChunk, w.active);
  const R &cd = cur.a, &cu = cur.b, &cz = cur.c;
  float dsum = 0.f;
  for (int ch = w.ch_begin; ch < w.ch_end; ++ch) {
    const int buf = (ch - w.ch_begin) & 1;
    const bool more_chunks = ch + 1 < w.ch_end;
    if (more_chunks) stage_load(ch + 1);
    if (kOut && w.active) {
#pragma unroll
      for (int n = 0; n < kLaneN; ++n)
        if (n < p.dstate) p.chunk_carry[chunk_idx(p, w.b, ch, n, w.d)] = h[n];
    }
    if (w.warp_active) {
      const float* tB = s_B + buf * kLaneTile;
      const float* tC = s_C + buf * kLaneTile;
#pragma unroll 1
      for (int s = 0; s < kSubs; ++s) {
        const int t = ch * kChunk + s * R::kSub;
        LaneRows3<T> nxt;
        if (s + 1 < kSubs || more_chunks) nxt.load(p, delta_row, u_row, zr, t + R::kSub, w.active);
        float o[R::kSub];
#pragma unroll
        for (int i = 0; i < R::kSub; ++i) {
          const int r = s * R::kSub + i;
          const float x = cd.get(p, i) + bias;
          float dl = p.delta_softplus ? softplus_f(x) : x;
          if (t + i >= p.seqlen) dl = 0.f;  // past the end (zero-filled inputs): no decay, no input
          const float u = cu.get(p, i);
          const float du = dl * u;
          float bv[kLaneN];
          lane_states(tB, r, bv);
          if (kOut) {
            float cv[kLaneN];
            lane_states(tC, r, cv);
            float y = 0.f;
#pragma unroll
            for (int n = 0; n < kLaneN; ++n) {
              h[n] = fast_exp2(dl * A2[n]) * h[n] + du * bv[n];
              y += cv[n] * h[n];
            }
            float g = 1.f;
            if (has_z) {
              const float z = cz.get(p, i);
              g = z * sigmoid_f(z);
            }
            o[i] = (y + Dd * u) * g;
          } else {
#pragma unroll
            for (int n = 0; n < kLaneN; ++n) h[n] = fast_exp2(dl * A2[n]) * h[n] + du * bv[n];
            dsum += dl;
          }
        }
        if (kOut && w.active) lane_store<T>(p, out_row, t, o);
        cur = nxt;
      }
    }
    if (more_chunks) stage_store(ch + 1, buf ^ 1);
    __syncthreads();
  }
  if (!kOut) {
    lane_store_group(p, w, p.group_local, h);
    if (w.active) p.group_dsum[group_dsum_idx(p, w.b, w.grp, w.d)] = dsum;
  }
}

// Reverse walk of the adjoint over one group from a zero message: group_local = message leaving the group's
// first token. m_t = a_t (dy_t C_t + m_{t+1}), dy = dout · silu(z) (or dout).
template <typename T>
__global__ void __launch_bounds__(kThreads, 4) bwd_lane_local_kernel(Params p) {
  using R = LaneRow<T>;
  constexpr int kSubs = kChunk / R::kSub;
  extern __shared__ float4 smem4[];
  float* s_C = reinterpret_cast<float*>(smem4);  // 2 buffers
  const LaneWho w(p);
  float A2[kLaneN], m[kLaneN];
  lane_A2(p, w, A2);
#pragma unroll
  for (int n = 0; n < kLaneN; ++n) m[n] = 0.f;
  const float bias = (w.active && p.delta_bias != nullptr) ? p.delta_bias[w.d] : 0.f;
  const bool has_z = p.z != nullptr;
  const size_t row = w.row(p);
  const T* delta_row = static_cast<const T*>(p.delta) + row;
  const T* dout_row = static_cast<const T*>(p.dout) + row;
  const T* zr = has_z ? static_cast<const T*>(p.z) + z_row(p, w.b, row) : nullptr;

  LaneBC<T> rC;
  rC.load(p, p.Cm, w.b, (w.ch_end - 1) * kChunk);
  rC.store(p, p.Cm, w.b, (w.ch_end - 1) * kChunk, s_C);
  __syncthreads();

  LaneRows3<T> cur;  // Δ, dout, z of the sub-chunk being walked
  cur.load(p, delta_row, dout_row, zr, (w.ch_end - 1) * kChunk + (kSubs - 1) * R::kSub, w.active);
  const R &cd = cur.a, &cg = cur.b, &cz = cur.c;
  for (int ch = w.ch_end - 1; ch >= w.ch_begin; --ch) {
    const int buf = (w.ch_end - 1 - ch) & 1;
    const bool more_chunks = ch - 1 >= w.ch_begin;
    if (more_chunks) rC.load(p, p.Cm, w.b, (ch - 1) * kChunk);
    if (w.warp_active) {
      const float* tC = s_C + buf * kLaneTile;
#pragma unroll 1
      for (int s = kSubs - 1; s >= 0; --s) {
        const int t = ch * kChunk + s * R::kSub;
        LaneRows3<T> nxt;
        if (s > 0 || more_chunks) nxt.load(p, delta_row, dout_row, zr, t - R::kSub, w.active);
#pragma unroll
        for (int i = R::kSub - 1; i >= 0; --i) {
          const int r = s * R::kSub + i;
          const float x = cd.get(p, i) + bias;
          float dl = p.delta_softplus ? softplus_f(x) : x;
          if (t + i >= p.seqlen) dl = 0.f;  // past the end (zero-filled inputs): no decay, no input
          float dy = cg.get(p, i);
          if (has_z) {
            const float z = cz.get(p, i);
            dy *= z * sigmoid_f(z);
          }
          float cv[kLaneN];
          lane_states(tC, r, cv);
#pragma unroll
          for (int n = 0; n < kLaneN; ++n) m[n] = fast_exp2(dl * A2[n]) * (dy * cv[n] + m[n]);
        }
        cur = nxt;
      }
    }
    if (more_chunks) rC.store(p, p.Cm, w.b, (ch - 1) * kChunk, s_C + (buf ^ 1) * kLaneTile);
    __syncthreads();
  }
  lane_store_group(p, w, p.group_local, m);
}

// 96 threads when the channel count splits into warps by 3 but not by 4 (no idle warps), else 128.
inline int lane_threads(const Params& p) {
  if (p.lane_threads == 96 || p.lane_threads == 128) return p.lane_threads;
  const int warps = (p.dim + 31) / 32;
  return (warps % 3 == 0 && warps % 4 != 0) ? 96 : kThreads;
}

inline dim3 lane_grid(const Params& p, int threads) {
  return dim3((unsigned)((p.dim + threads - 1) / threads), (unsigned)p.ngroups, (unsigned)p.batch);
}

template <typename T>
cudaError_t forward_lane(const Params& p, cudaStream_t stream) {
  const int nt = lane_threads(p);
  const dim3 grid = lane_grid(p, nt);
  const size_t smem_local = 2 * kLaneTile * sizeof(float);
  const size_t smem_out = 4 * kLaneTile * sizeof(float);
  cudaError_t err;
  fwd_lane_kernel<T, false><<<grid, nt, smem_local, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if ((err = launch_carry(p, /*reverse=*/false, p.group_local, p.group_carry, stream)) != cudaSuccess) return err;
  fwd_lane_kernel<T, true><<<grid, nt, smem_out, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd_lane_local(const Params& p, cudaStream_t stream) {
  const int nt = lane_threads(p);
  bwd_lane_local_kernel<T><<<lane_grid(p, nt), nt, 2 * kLaneTile * sizeof(float), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace selective_scan
