// Selective-scan backward. See selective_scan_kernels.cuh for the parallel structure.
//
// Adjoint: g_t[n] = dy_t C_t[n] with dy = dout·silu(z) (or dout); λ_t = g_t + a_{t+1} λ_{t+1}. The "message"
// m = a_t λ_t is what token t passes to token t-1; the message entering chunk c from the right is the carry.
// Gradients: q_t = λ_t a_t h_{t-1};  dΔ_t = Σ_n (A q_t + λ_t B_t u_t);  du_t = Δ_t Σ_n λ_t B_t + D dy_t;
// dB_t[n] = Σ_d λ_t Δ_t u_t;  dC_t[n] = Σ_d dy_t h_t;  dA = Σ_t q_t Δ_t;  dD = Σ_t dy_t u_t;
// dz_t = dout_t y_t σ(z)(1 + z(1 − σ(z)));  dδ_t = dΔ_t σ(δ_t + bias) (softplus) or dΔ_t;  dbias = Σ_t dδ_t.
#include "selective_scan_kernels.cuh"
#include "selective_scan_lane.cuh"

namespace selective_scan {
namespace detail {

// Reduce v[0..8) (4 dB + 4 dC values) over the CPW channels of a warp. Afterwards lane holds R sums:
// v[r] is the sum of original index r + Σ_l bit_l(channel-in-warp)·(4 >> l).
template <int NP>
__device__ __forceinline__ void reduce_scatter_channels(float (&v)[8], int lane) {
  using G = Geo<NP>;
#pragma unroll
  for (int l = 0; l < G::LEVELS; ++l) {
    const int h = 4 >> l;
    const int mask = G::LPC << l;
    const bool upper = (lane & mask) != 0;
#pragma unroll
    for (int i = 0; i < h; ++i) {
      const float send = upper ? v[i] : v[i + h];
      const float keep = upper ? v[i + h] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, mask);
    }
  }
}

// Raw per-token inputs of the backward for one chunk tile (registers), and their conversion into tiles:
// Δ, u, dy = dout·silu(z) (or dout), dout·dsilu(z), σ(δ + bias) (1 without softplus).
template <typename T, int NP>
struct BwdRegs {
  using M = TileMap<T, NP>;
  RowRegs<T, NP> delta, u, dout, z;
  float bias[M::kVecs];  // delta_bias of each vector's channel (vector path), loaded with the rows
  __device__ __forceinline__ void load(const Params& p, int b, int t0, bool need_u) {
    const long long bs = (long long)p.dim * p.seqlen;
    delta.load(p, p.delta, b, t0, bs);
    if (need_u) u.load(p, p.u, b, t0, bs);
    dout.load(p, p.dout, b, t0, bs);
    if (p.z != nullptr) z.load(p, p.z, b, t0, p.z_batch_stride);
#pragma unroll
    for (int k = 0; k < M::kVecs; ++k) {
      const int d = M::d(true, k * M::kV);
      bias[k] = (p.vec_io && p.delta_bias != nullptr && d < p.dim) ? p.delta_bias[d] : 0.f;
    }
  }
  __device__ __forceinline__ void commit(const Params& p, int t0, float* s_delta, float* s_u, float* s_dy,
                                         float* s_dzf, float* s_sig) const {
    const bool has_z = p.z != nullptr;
    const bool vec = p.vec_io;
#pragma unroll
    for (int j = 0; j < M::kPer; ++j) {
      const int c = M::c(vec, j), t = M::t(vec, j), d = blockIdx.x * Geo<NP>::CPB + c;
      const bool valid = d < p.dim && t0 + t < p.seqlen;
      const int o = t * Geo<NP>::TS + c;
      float dl = 0.f, sig = 0.f, dy = dout.get(p, j), dzf = 0.f;
      if (valid) {
        const float bias_d = vec ? bias[j / M::kV] : (p.delta_bias ? p.delta_bias[d] : 0.f);
        const float x = delta.get(p, j) + bias_d;
        if (p.delta_softplus) {
          dl = softplus_sigmoid_f(x, sig);
        } else {
          dl = x;
          sig = 1.f;
        }
      }
      if (has_z) {
        const float zz = z.get(p, j), sz = sigmoid_f(zz);
        dzf = dy * sz * (1.f + zz * (1.f - sz));
        dy = dy * zz * sz;
      }
      s_delta[o] = dl;
      s_dy[o] = dy;
      if (s_u) s_u[o] = u.get(p, j);
      if (s_dzf) s_dzf[o] = dzf;
      if (s_sig) s_sig[o] = sig;
    }
  }
};

// Reverse walk of the adjoint over each group from a zero message: group_local = message leaving the group's
// first token.
template <typename T, int NP, bool kPrefetch>
__global__ void __launch_bounds__(kThreads, kPrefetch ? 1 : kBwdLocalMinBlocks) bwd_local_kernel(Params p) {
  using G = Geo<NP>;
  extern __shared__ float4 smem4[];
  float* s_delta = reinterpret_cast<float*>(smem4);
  float* s_dy = s_delta + G::kTile;
  float* s_C = s_dy + G::kTile;
  zero_bc_share(p);
  const Who<NP> w(p.dim);
  const int b = blockIdx.z;
  float A2[kNPT];
  load_A2<NP>(p, w, A2);
  const int ch_begin = blockIdx.y * p.chunks_per_group;
  const int ch_end = min(ch_begin + p.chunks_per_group, p.nchunks);
  BwdRegs<T, NP> r;
  BCRegs<T, NP> r_C;
  auto prefetch = [&](int ch) {
    r.load(p, b, ch * kChunk, /*need_u=*/false);
    r_C.load(p, p.Cm, b, ch * kChunk);
  };
  if (kPrefetch && ch_begin < ch_end) prefetch(ch_end - 1);
  float m[kNPT] = {0.f, 0.f, 0.f, 0.f};
  for (int ch = ch_end - 1; ch >= ch_begin; --ch) {
    const int t0 = ch * kChunk;
    __syncthreads();
    if (!kPrefetch) prefetch(ch);
    r.commit(p, t0, s_delta, nullptr, s_dy, nullptr, nullptr);
    r_C.store(p, s_C);
    __syncthreads();
    if (kPrefetch && ch - 1 >= ch_begin) prefetch(ch - 1);
#pragma unroll 4
    for (int t = kChunk - 1; t >= 0; --t) {
      const float dl = s_delta[t * G::TS + w.c];
      const float dy = s_dy[t * G::TS + w.c];
      const float4 cv = state4<NP>(s_C, t, w.q);
      m[0] = fast_exp2(dl * A2[0]) * (dy * cv.x + m[0]);
      m[1] = fast_exp2(dl * A2[1]) * (dy * cv.y + m[1]);
      m[2] = fast_exp2(dl * A2[2]) * (dy * cv.z + m[2]);
      m[3] = fast_exp2(dl * A2[3]) * (dy * cv.w + m[3]);
    }
  }
  store_state<NP>(p, w, p.group_local, p.ngroups, b, blockIdx.y, m);
}

// Stages one chunk for the backward main kernels: five [token][channel] tiles from s_delta on (Δ, u, dy,
// dout·dsilu(z), σ(δ + bias)), then the B and C [token][state] tiles from s_B on; all loads are issued before
// any is used.
template <typename T, int NP, bool kSplitBC = false>
__device__ __forceinline__ void stage_main_chunk(const Params& p, int b, int t0, float* s_delta, float* s_B) {
  using G = Geo<NP>;
  BwdRegs<T, NP> r;
  BCRegs<T, NP> r_B, r_C;
  r.load(p, b, t0, /*need_u=*/true);
  r_B.load(p, p.Bm, b, t0);
  r_C.load(p, p.Cm, b, t0);
  r.commit(p, t0, s_delta, s_delta + G::kTile, s_delta + 2 * G::kTile, s_delta + 3 * G::kTile,
           s_delta + 4 * G::kTile);
  r_B.template store<kSplitBC>(p, s_B);
  r_C.template store<kSplitBC>(p, s_B + G::kBC);
}

template <int NP>
__host__ __device__ constexpr int bwd_main_smem_floats() {
  return 5 * Geo<NP>::kTile + 2 * Geo<NP>::kBC + (kSegsPerChunk - 1) * kNPT * kThreads +
         2 * kSeg * Geo<NP>::R * kThreads;
}

template <typename T, int NP>
__global__ void __launch_bounds__(kThreads) bwd_main_kernel(Params p, bool atomic_bc) {
  using G = Geo<NP>;
  extern __shared__ float4 smem4[];
  float* s_delta = reinterpret_cast<float*>(smem4);
  float* s_u = s_delta + G::kTile;
  float* s_dy = s_u + G::kTile;     // dy in; du out (written by lane q == 0 after its last read)
  float* s_dzf = s_dy + G::kTile;   // dout·dsilu(z) in; dz out
  float* s_sig = s_dzf + G::kTile;  // σ(δ + bias) in; dδ out
  float* s_B = s_sig + G::kTile;
  float* s_C = s_B + G::kBC;
  // State before segment seg >= 1 (before segment 0 it is the chunk's carried state, re-read from global:
  // not keeping it here lets three blocks share an SM for NP = 16).
  float* s_ckpt = s_C + G::kBC;
  float* s_red0 = s_ckpt + (kSegsPerChunk - 1) * kNPT * kThreads;  // two buffers: one barrier per segment
  const Who<NP> w(p.dim);
  const int b = blockIdx.z;
  const int tid = threadIdx.x;
  float A2[kNPT];
  load_A2<NP>(p, w, A2);
  const float Dd = (p.D != nullptr && w.active) ? p.D[w.d] : 0.f;
  float dA_acc[kNPT] = {0.f, 0.f, 0.f, 0.f};
  float dD_acc = 0.f, dbias_acc = 0.f;
  const int ch_begin = blockIdx.y * p.chunks_per_group;
  const int ch_end = min(ch_begin + p.chunks_per_group, p.nchunks);
  // Adjoint message entering the group from the right; chunks are walked last to first, carrying it.
  float m[kNPT];
  load_state<NP>(p, w, p.group_carry, p.ngroups, b, blockIdx.y, m);

  for (int ch = ch_end - 1; ch >= ch_begin; --ch) {
    const int t0 = ch * kChunk;
    __syncthreads();
    stage_main_chunk<T, NP>(p, b, t0, s_delta, s_B);
    __syncthreads();

    // Phase 1: walk forward from the chunk's incoming state, checkpointing the state before each segment.
    float h[kNPT];
    load_state<NP>(p, w, p.chunk_carry, p.nchunks, b, ch, h);
    for (int seg = 0; seg < kSegsPerChunk; ++seg) {
      if (seg > 0) {
#pragma unroll
        for (int k = 0; k < kNPT; ++k) s_ckpt[((seg - 1) * kNPT + k) * kThreads + tid] = h[k];
      }
#pragma unroll
      for (int i = 0; i < kSeg; ++i) walk_token<NP>(s_delta, s_u, s_B, seg * kSeg + i, w, A2, h);
    }

    // Phase 2: segments last to first; recompute decays and states, then walk the adjoint backwards.
    for (int seg = kSegsPerChunk - 1; seg >= 0; --seg) {
      float* s_red = s_red0 + (seg & 1) * kSeg * G::R * kThreads;
      if (seg > 0) {
#pragma unroll
        for (int k = 0; k < kNPT; ++k) h[k] = s_ckpt[((seg - 1) * kNPT + k) * kThreads + tid];
      } else {
        load_state<NP>(p, w, p.chunk_carry, p.nchunks, b, ch, h);
      }
      float a[kSeg][kNPT], hp[kSeg][kNPT];
#pragma unroll
      for (int i = 0; i < kSeg; ++i) {
        const int t = seg * kSeg + i;
        const float dl = s_delta[t * G::TS + w.c];
        const float du = dl * s_u[t * G::TS + w.c];
        const float4 bv = state4<NP>(s_B, t, w.q);
        const float bk[kNPT] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int k = 0; k < kNPT; ++k) {
          a[i][k] = fast_exp2(dl * A2[k]);
          hp[i][k] = h[k];
          h[k] = a[i][k] * h[k] + du * bk[k];
        }
      }
#pragma unroll
      for (int i = kSeg - 1; i >= 0; --i) {
        const int t = seg * kSeg + i;
        const int o = t * G::TS + w.c;
        const float dl = s_delta[o];
        const float u = s_u[o];
        const float dy = s_dy[o];
        const float dlu = dl * u;
        const float4 bv = state4<NP>(s_B, t, w.q);
        const float4 cv = state4<NP>(s_C, t, w.q);
        const float bk[kNPT] = {bv.x, bv.y, bv.z, bv.w};
        const float ck[kNPT] = {cv.x, cv.y, cv.z, cv.w};
        float dl_part = 0.f, du_part = 0.f, y_part = 0.f;
        float v[8];
#pragma unroll
        for (int k = 0; k < kNPT; ++k) {
          const float lam = dy * ck[k] + m[k];
          const float ah = a[i][k] * hp[i][k];
          const float hk = ah + dlu * bk[k];
          const float qk = lam * ah;
          dl_part += A2[k] * qk;
          du_part += lam * bk[k];
          y_part += ck[k] * hk;
          dA_acc[k] += qk * dl;
          v[k] = lam * dlu;
          v[kNPT + k] = dy * hk;
          m[k] = a[i][k] * lam;
        }
        dl_part = sum_states<NP>(dl_part);
        du_part = sum_states<NP>(du_part);
        y_part = sum_states<NP>(y_part);
        __syncwarp();  // the other lanes of this channel have read s_dy[o] before lane q == 0 overwrites it
        if (w.q == 0) {
          const float ddelta = (dl_part * kLn2 + du_part * u) * s_sig[o];
          dbias_acc += ddelta;
          dD_acc += dy * u;
          s_dy[o] = du_part * dl + Dd * dy;
          s_sig[o] = ddelta;
          s_dzf[o] = (y_part + Dd * u) * s_dzf[o];
        }
        reduce_scatter_channels<NP>(v, w.lane);
#pragma unroll
        for (int r = 0; r < G::R; ++r) s_red[(i * G::R + r) * kThreads + tid] = v[r];
      }
      __syncthreads();
      // Sum the warps' partial dB/dC of this segment and write them (once per channel tile).
      for (int e = tid; e < kSeg * 32 * G::R; e += kThreads) {
        const int i = e / (32 * G::R);
        const int rem = e - i * 32 * G::R;
        const int ln = rem / G::R, r = rem - ln * G::R;
        float s = 0.f;
#pragma unroll
        for (int wp = 0; wp < kThreads / 32; ++wp) s += s_red[(i * G::R + r) * kThreads + wp * 32 + ln];
        const int q = ln % G::LPC, cw = ln / G::LPC;
        int idx = r;
#pragma unroll
        for (int l = 0; l < G::LEVELS; ++l)
          if ((cw >> l) & 1) idx += (4 >> l);
        const int n = q * kNPT + (idx & 3);
        const int tt = t0 + seg * kSeg + i;
        if (n < p.dstate && tt < p.seqlen) {
          float* dst = ((idx >> 2) ? p.dC : p.dB) + ((size_t)b * p.dstate + n) * p.seqlen + io_pos<kIOAny>(p, tt);
          if (atomic_bc) atomicAdd(dst, s); else *dst = s;
        }
      }
      // No second barrier: the next segment writes the other s_red buffer, and the one after that is
      // separated from this read by the next segment's barrier.
    }

    // Per-token outputs of this chunk (every lane's writes are behind the last segment's barrier).
    __syncthreads();
    store_tile<T, NP>(p, p.du, s_dy, b, t0);
    store_tile<T, NP>(p, p.ddelta, s_sig, b, t0);
    if (p.z != nullptr) store_tile<T, NP>(p, p.dz, s_dzf, b, t0);
  }

  // Per-block partial sums over its chunks (summed over blocks by the caller).
  const int g = blockIdx.y;
  if (w.active) {
#pragma unroll
    for (int k = 0; k < kNPT; ++k) {
      const int n = w.q * kNPT + k;
      if (n < p.dstate) p.dA_part[(((size_t)b * p.ngroups + g) * p.dstate + n) * p.dim + w.d] = dA_acc[k];
    }
    if (w.q == 0) {
      p.dD_part[((size_t)b * p.ngroups + g) * p.dim + w.d] = dD_acc;
      p.dbias_part[((size_t)b * p.ngroups + g) * p.dim + w.d] = dbias_acc;
    }
  }
}

// Tokens per epilogue window of bwd_main2_kernel: the per-token sums over a channel's LPC lanes (dΔ, du, y
// parts) are reduce-scattered over a window of W tokens, so that each lane finishes one token of the window.
template <int NP>
__host__ __device__ constexpr int epilogue_window() {
  return Geo<NP>::LPC < kSeg ? Geo<NP>::LPC : kSeg;
}

// One segment's partial dB/dC sums in bwd_main2_kernel's write-out buffer: 32·R rows (value r of lane l after the
// reduce-scatter is row r·32 + l) of kSeg·(kThreads / 32) columns (token i of the segment, warp wp: column
// i·(kThreads / 32) + wp), padded to the odd row stride kMain2RedStride.
constexpr int kMain2RedStride = kSeg * (kThreads / 32) + 1;
template <int NP>
__host__ __device__ constexpr int bwd_main2_red_floats() {
  return 32 * Geo<NP>::R * kMain2RedStride;
}

template <int NP>
__host__ __device__ constexpr int bwd_main2_smem_floats() {
  return 5 * Geo<NP>::kTile + 2 * Geo<NP>::kBC + (kSegsPerChunk - 1) * kNPT * kThreads +
         2 * bwd_main2_red_floats<NP>();
}

// bwd_main2_kernel's reduce-scatter of v[0..8) over the CPW channels of a warp: v[k] is dB and v[4 + k] dC of the
// state in register k, which is state q·kNPT + (k ^ perm) with perm = 2·(cw & 1) (main2_perm). Level 0 (partner
// channel cw ^ 1) splits state bit 1: with the pairs of odd channels swapped in the registers, every lane keeps
// registers {0, 1, 4, 5} and sends {2, 3, 6, 7}, so the level needs no selects (reduce_scatter_channels picks
// the halves to keep and send per lane: about 2.4 instructions per pair in the sm_90 code, 4 pairs per token at this
// level); level 1 (cw ^ 2) splits state bit 0 and level 2 (cw ^ 4) dB / dC, with selects (2 + 1 pairs). The
// swap costs one more shared-memory load per B or C row read (state4_perm). Afterwards the lane holds R sums:
// out[r] is (main2_red_value) the sum over the warp's channels of dB or dC of one state.
template <int NP>
__device__ __forceinline__ int main2_perm(const Who<NP>& w) { return (w.cw & 1) * 2; }

template <int NP>
__device__ __forceinline__ void reduce_scatter_swz(float (&v)[8], int lane, float (&out)[Geo<NP>::R]) {
  using G = Geo<NP>;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int r = (e & 1) + (e >> 1) * 4;  // 0, 1, 4, 5
    v[r] += __shfl_xor_sync(kFullMask, v[r | 2], G::LPC);
  }
  if constexpr (G::LEVELS == 1) {
    out[0] = v[0];
    out[1] = v[1];
    out[2] = v[4];
    out[3] = v[5];
  } else {
    const bool up1 = (lane & (G::LPC << 1)) != 0;
#pragma unroll
    for (int r = 0; r < 8; r += 4) {
      const float send = up1 ? v[r] : v[r + 1];
      const float keep = up1 ? v[r + 1] : v[r];
      v[r] = keep + __shfl_xor_sync(kFullMask, send, G::LPC << 1);
    }
    if constexpr (G::LEVELS == 2) {
      out[0] = v[0];
      out[1] = v[4];
    } else {
      const bool up2 = (lane & (G::LPC << 2)) != 0;
      const float send = up2 ? v[0] : v[4];
      const float keep = up2 ? v[4] : v[0];
      out[0] = keep + __shfl_xor_sync(kFullMask, send, G::LPC << 2);
    }
  }
}

// What out[r] of lane ln holds after reduce_scatter_swz: dB (type 0) or dC (type 1) of state n.
template <int NP>
__device__ __forceinline__ void main2_red_value(int r, int ln, int& type, int& n) {
  using G = Geo<NP>;
  const int q = ln % G::LPC, cw = ln / G::LPC;
  if constexpr (G::LEVELS == 1) {
    type = r >> 1;
    n = q * kNPT + 2 * (cw & 1) + (r & 1);
  } else {
    type = G::LEVELS == 2 ? r : (cw >> 2) & 1;
    n = q * kNPT + 2 * (cw & 1) + ((cw >> 1) & 1);
  }
}

// Sums of P[x][j] (x: the three per-token parts, j: token of the window) over the LPC lanes of a channel,
// scattered: afterwards P[x][0] of lane q holds the sum for window token q % W (lanes q >= W hold copies).
template <int NP>
__device__ __forceinline__ void reduce_scatter_tokens(float (&P)[3][epilogue_window<NP>()], int q) {
  constexpr int W = epilogue_window<NP>();
#pragma unroll
  for (int m = W / 2; m >= 1; m >>= 1) {
    const bool upper = (q & m) != 0;
#pragma unroll
    for (int x = 0; x < 3; ++x)
#pragma unroll
      for (int j = 0; j < m; ++j) {
        const float send = upper ? P[x][j] : P[x][j + m];
        const float keep = upper ? P[x][j + m] : P[x][j];
        P[x][j] = keep + __shfl_xor_sync(kFullMask, send, m);
      }
  }
#pragma unroll
  for (int m = W; m < Geo<NP>::LPC; m <<= 1)
#pragma unroll
    for (int x = 0; x < 3; ++x) P[x][0] += __shfl_xor_sync(kFullMask, P[x][0], m);
}

// bwd_main2_kernel's recompute of one segment: decays a and states before each token (hp) of segment seg from
// the state before it (h, which ends as the state after the segment). (Also used by bench/scan_compute_floor.cu.)
template <int NP, bool kSplit>
__device__ __forceinline__ void main2_recompute_segment(const float* s_delta, const float* s_u, const float* s_B,
                                                        int seg, const Who<NP>& w, int perm,
                                                        const float (&A2)[kNPT], float (&a)[kSeg][kNPT],
                                                        float (&hp)[kSeg][kNPT], float (&h)[kNPT]) {
  using G = Geo<NP>;
#pragma unroll
  for (int i = 0; i < kSeg; ++i) {
    const int t = seg * kSeg + i;
    const float dl = s_delta[t * G::TS + w.c];
    const float du = dl * s_u[t * G::TS + w.c];
    const float4 bv = state4_perm<NP, kSplit>(s_B, t, w.q, perm);
    const float bk[kNPT] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
    for (int k = 0; k < kNPT; ++k) {
      a[i][k] = fast_exp2(dl * A2[k]);
      hp[i][k] = h[k];
      h[k] = a[i][k] * h[k] + du * bk[k];
    }
  }
}

// bwd_main2_kernel's per-update gradient products for token i (a compile-time index after unrolling) of segment
// seg, walking the adjoint message m back over it: this lane's parts of the per-token sums over states (dl_part:
// dΔ's A-part ÷ ln 2, du_part, y_part), the dB (v[k]) and dC (v[kNPT + k]) values of its states, and dA.
// h is the state after the segment. (Also used by bench/scan_compute_floor.cu.)
template <int NP, bool kSplit>
__device__ __forceinline__ void main2_adjoint_token(const float* s_delta, const float* s_u, const float* s_dy,
                                                    const float* s_B, const float* s_C, int seg, int i,
                                                    const Who<NP>& w, int perm, const float (&A2)[kNPT],
                                                    const float (&a)[kSeg][kNPT], const float (&hp)[kSeg][kNPT],
                                                    const float (&h)[kNPT], float (&m)[kNPT], float (&dA_acc)[kNPT],
                                                    float& dl_part, float& du_part, float& y_part, float (&v)[8]) {
  using G = Geo<NP>;
  const int t = seg * kSeg + i;
  const int o = t * G::TS + w.c;
  const float dl = s_delta[o];
  const float u = s_u[o];
  const float dy = s_dy[o];
  const float dlu = dl * u;
  const float4 bv = state4_perm<NP, kSplit>(s_B, t, w.q, perm);
  const float4 cv = state4_perm<NP, kSplit>(s_C, t, w.q, perm);
  const float bk[kNPT] = {bv.x, bv.y, bv.z, bv.w};
  const float ck[kNPT] = {cv.x, cv.y, cv.z, cv.w};
  dl_part = 0.f;
  du_part = 0.f;
  y_part = 0.f;
#pragma unroll
  for (int k = 0; k < kNPT; ++k) {
    const float hk = i + 1 < kSeg ? hp[(i + 1) % kSeg][k] : h[k];  // state after token t
    const float lam = dy * ck[k] + m[k];
    const float ah = a[i][k] * hp[i][k];
    const float qk = lam * ah;
    dl_part += A2[k] * qk;
    du_part += lam * bk[k];
    y_part += ck[k] * hk;
    dA_acc[k] += qk * dl;
    v[k] = lam * dlu;
    v[kNPT + k] = dy * hk;
    m[k] = a[i][k] * lam;
  }
}

// The backward main kernel with fewer instructions per update than bwd_main_kernel (same algorithm, same
// results up to rounding): (1) h_t is
// taken from the recompute registers instead of being formed again; (2) the per-token epilogue (dΔ, du, dz,
// dbias, dD) is spread over the LPC lanes of a channel, one token of a W-token window each, after a
// reduce-scatter of the three per-token sums, instead of three all-reduces and work on lane q == 0 alone;
// (3) the dB/dC write-out's index arithmetic is per thread, hoisted out of the chunk loop.
// Its channel map (Who) is strided, so that the epilogue's accesses to the [token][channel] tiles (W tokens x the
// warp's CPW channels, banks t·TS + c with TS = CPB + 1) fall into distinct shared-memory banks: with consecutive
// channels they hit 4 (NP = 16) or 2 (NP = 32, 64) addresses per bank, 8 accesses per window; strided, NP = 16 is
// conflict-free (banks t + 4·cw + warp), 32 and 64 stay at 2. Measured (H200, B=2, D=96, L=262144, N=16,
// bench/profile_scan.py --kernels): 1.720 -> 1.659 ms in float32, 1.654 -> 1.598 ms in float16; Nsight Compute:
// shared-memory wavefronts 250 M -> 213 M.
template <typename T, int NP>
__global__ void __launch_bounds__(kThreads, 3) bwd_main2_kernel(Params p, bool atomic_bc) {
  using G = Geo<NP>;
  constexpr int W = epilogue_window<NP>();
  constexpr int kLast = kSegsPerChunk - 1;
  static_assert(kSegsPerChunk >= 2 && kSeg % W == 0, "segment layout");
  extern __shared__ float4 smem4[];
  float* s_delta = reinterpret_cast<float*>(smem4);
  float* s_u = s_delta + G::kTile;
  float* s_dy = s_u + G::kTile;     // dy in; du out (written by the token's epilogue lane after the window)
  float* s_dzf = s_dy + G::kTile;   // dout·dsilu(z) in; dz out
  float* s_sig = s_dzf + G::kTile;  // σ(δ + bias) in; dδ out
  float* s_B = s_sig + G::kTile;
  float* s_C = s_B + G::kBC;
  // State before segment seg = 1 .. kLast in slot seg - 1 (before segment 0 it is the chunk's carried state,
  // re-read from global).
  float* s_ckpt = s_C + G::kBC;
  float* s_red0 = s_ckpt + (kSegsPerChunk - 1) * kNPT * kThreads;  // two buffers: one barrier per segment
  const Who<NP> w(p.dim, /*strided=*/true);
  // Register k holds state q·kNPT + (k ^ perm) (reduce_scatter_swz). At 64 states the B/C tiles take the layout of
  // bc_col (kSplitBC), without which the 8-byte loads of state4_perm are 2-way bank conflicts: 9.77 -> 10.38 ms in
  // float32 and 7.29 -> 8.25 ms in float16 against the previous kernel on an H200; with it 9.82 -> 9.62 and 7.30 ->
  // 7.21 ms against the previous kernel's register order there.
  constexpr bool kSplitBC = NP == 64;
  const int perm = main2_perm<NP>(w);
  const int b = blockIdx.z;
  const int tid = threadIdx.x;
  float A2[kNPT];
  load_A2<NP>(p, w, A2, perm);
  const float Dd = (p.D != nullptr && w.active) ? p.D[w.d] : 0.f;
  float dA_acc[kNPT] = {0.f, 0.f, 0.f, 0.f};
  float dD_acc = 0.f, dbias_acc = 0.f;  // this lane's epilogue tokens only (summed over the lanes at the end)
  const int ch_begin = blockIdx.y * p.chunks_per_group;
  const int ch_end = min(ch_begin + p.chunks_per_group, p.nchunks);
  const bool epi_lane = w.q < W;
  const int epi_tok = w.q % W;
  // This thread's dB/dC outputs in the write-out after each segment: token red_i of the segment, rows red_rho0 +
  // j·kRowStep of the partial sums. A warp covers 8 consecutive tokens x 4 rows: its atomic adds touch four
  // 32-byte segments of dB/dC per instruction, where one token x 32 rows (the previous map) touched 32. The row
  // stride kMain2RedStride is odd, so both the per-token stores (32 rows of one column) and these loads (8 columns
  // x 4 rows) are free of bank conflicts. Measured (H200, as above): 1.663 -> 1.536 ms in float32, 1.600 -> 1.488 ms in
  // float16, and at N = 64 11.4 -> 9.6 / 11.9 -> 7.6 ms; Nsight Compute: the kernel's L1 wavefronts 342 M -> 293 M
  // (the L1/shared pipe, 80% busy before, limits it).
  constexpr int kWarps = kThreads / 32;
  constexpr int kRowStep = kThreads / kSeg;
  constexpr int kRedPer = 32 * G::R / kRowStep;
  static_assert(kThreads % kSeg == 0 && (32 * G::R) % kRowStep == 0, "write-out mapping");
  const int red_i = tid % kSeg, red_rho0 = tid / kSeg;
  // Output row j of this thread (dB or dC, state n; valid: n < dstate), hoisted out of the chunk loop for up to
  // two rows (d_state 16; more, for 64 states, spill in float32).
  auto red_row = [&](int j, bool& valid) -> float* {
    const int rho = red_rho0 + j * kRowStep;
    int type, n;
    main2_red_value<NP>(rho / 32, rho % 32, type, n);
    valid = n < p.dstate;
    return (type ? p.dC : p.dB) + ((size_t)b * p.dstate + (valid ? n : 0)) * p.seqlen;
  };
  constexpr bool kHoist = kRedPer <= 2;
  float* red_dst[kHoist ? kRedPer : 1];
  bool red_valid[kHoist ? kRedPer : 1];
  if constexpr (kHoist) {
#pragma unroll
    for (int j = 0; j < kRedPer; ++j) red_dst[j] = red_row(j, red_valid[j]);
  }
  // Adjoint message entering the group from the right; chunks are walked last to first, carrying it.
  float m[kNPT];
  load_state<NP>(p, w, p.group_carry, p.ngroups, b, blockIdx.y, m, perm);

  for (int ch = ch_end - 1; ch >= ch_begin; --ch) {
    const int t0 = ch * kChunk;
    __syncthreads();
    float h0[kNPT];  // the chunk's incoming state (phase 1 and segment 0), loaded with the staging loads
    load_state<NP>(p, w, p.chunk_carry, p.nchunks, b, ch, h0, perm);
    stage_main_chunk<T, NP, kSplitBC>(p, b, t0, s_delta, s_B);
    __syncthreads();

    float a[kSeg][kNPT], hp[kSeg][kNPT], h[kNPT];

    // Phase 1: walk forward from the chunk's incoming state (all but the last segment), checkpointing the
    // state before segments 1 .. kLast (slot seg - 1).
#pragma unroll
    for (int k = 0; k < kNPT; ++k) h[k] = h0[k];
    for (int seg = 0; seg < kLast; ++seg) {
#pragma unroll
      for (int i = 0; i < kSeg; ++i) walk_token<NP, kSplitBC>(s_delta, s_u, s_B, seg * kSeg + i, w, A2, h, perm);
#pragma unroll
      for (int k = 0; k < kNPT; ++k) s_ckpt[(seg * kNPT + k) * kThreads + tid] = h[k];
    }

    // Phase 2: segments last to first; recompute decays and states, then walk the adjoint backwards.
    for (int seg = kLast; seg >= 0; --seg) {
      float* s_red = s_red0 + (seg & 1) * bwd_main2_red_floats<NP>();
      if (seg > 0) {
#pragma unroll
        for (int k = 0; k < kNPT; ++k) h[k] = s_ckpt[((seg - 1) * kNPT + k) * kThreads + tid];
      } else {
#pragma unroll
        for (int k = 0; k < kNPT; ++k) h[k] = h0[k];
      }
      main2_recompute_segment<NP, kSplitBC>(s_delta, s_u, s_B, seg, w, perm, A2, a, hp, h);
      float P[3][W];  // this lane's parts of Σ_n for the window's tokens: dΔ (÷ ln 2, A-part), du, y
#pragma unroll
      for (int i = kSeg - 1; i >= 0; --i) {
        float dl_part, du_part, y_part, v[8];
        main2_adjoint_token<NP, kSplitBC>(s_delta, s_u, s_dy, s_B, s_C, seg, i, w, perm, A2, a, hp, h, m, dA_acc,
                                          dl_part, du_part, y_part, v);
        P[0][i % W] = dl_part;
        P[1][i % W] = du_part;
        P[2][i % W] = y_part;
        if (i % W == 0) {  // the window's lowest token: finish the window's tokens, one per lane
          reduce_scatter_tokens<NP>(P, w.q);
          __syncwarp();  // every lane of the channel has read s_dy of the window before it is overwritten
          if (epi_lane) {
            const int oe = (seg * kSeg + i + epi_tok) * G::TS + w.c;
            const float dle = s_delta[oe], ue = s_u[oe], dye = s_dy[oe];
            const float ddelta = (P[0][0] * kLn2 + P[1][0] * ue) * s_sig[oe];
            dbias_acc += ddelta;
            dD_acc += dye * ue;
            s_dy[oe] = P[1][0] * dle + Dd * dye;
            s_sig[oe] = ddelta;
            s_dzf[oe] = (P[2][0] + Dd * ue) * s_dzf[oe];
          }
        }
        float vs[G::R];
        reduce_scatter_swz<NP>(v, w.lane, vs);
#pragma unroll
        for (int r = 0; r < G::R; ++r) s_red[(r * 32 + w.lane) * kMain2RedStride + i * kWarps + w.warp] = vs[r];
      }
      __syncthreads();
      // Sum the warps' partial dB/dC of this segment and write them (once per channel tile).
      {
        const int tt = t0 + seg * kSeg + red_i;
        if (tt < p.seqlen) {
          const int pos = io_pos<kIOAny>(p, tt);
#pragma unroll
          for (int j = 0; j < kRedPer; ++j) {
            bool valid;
            float* dst;
            if constexpr (kHoist) {
              valid = red_valid[j];
              dst = red_dst[j];
            } else {
              dst = red_row(j, valid);
            }
            if (!valid) continue;
            const float* src = s_red + (red_rho0 + j * kRowStep) * kMain2RedStride + red_i * kWarps;
            float s = 0.f;
#pragma unroll
            for (int wp = 0; wp < kWarps; ++wp) s += src[wp];
            if (atomic_bc) atomicAdd(dst + pos, s); else dst[pos] = s;
          }
        }
      }
      // No second barrier: the next segment writes the other s_red buffer, and the one after that is
      // separated from this read by the next segment's barrier.
    }

    // Per-token outputs of this chunk (every lane's writes are behind the last segment's barrier).
    __syncthreads();
    store_tile<T, NP>(p, p.du, s_dy, b, t0);
    store_tile<T, NP>(p, p.ddelta, s_sig, b, t0);
    if (p.z != nullptr) store_tile<T, NP>(p, p.dz, s_dzf, b, t0);
  }

  // Per-block partial sums over its chunks (summed over blocks by the caller).
  dD_acc = sum_states<NP>(dD_acc);
  dbias_acc = sum_states<NP>(dbias_acc);
  const int g = blockIdx.y;
  if (w.active) {
#pragma unroll
    for (int k = 0; k < kNPT; ++k) {
      const int n = w.q * kNPT + (k ^ perm);
      if (n < p.dstate) p.dA_part[(((size_t)b * p.ngroups + g) * p.dstate + n) * p.dim + w.d] = dA_acc[k];
    }
    if (w.q == 0) {
      p.dD_part[((size_t)b * p.ngroups + g) * p.dim + w.d] = dD_acc;
      p.dbias_part[((size_t)b * p.ngroups + g) * p.dim + w.d] = dbias_acc;
    }
  }
}

// dA, dD and dbias: the backward main kernel's per-block partial sums added up over batch and groups (rows). Column
// j of the partial arrays: j < dstate·dim a dA_part column (n = j / dim, d = j % dim), then the dD_part and the
// dbias_part columns, each only when that gradient is asked for (reduce_cols). Two passes, both in a fixed order
// (no atomics: the result does not depend on scheduling). Pass 1: block (x, y) sums rows [y·kRedRows, (y +
// 1)·kRedRows) of 32 consecutive columns (coalesced), kRedSplit threads per column with four accumulators each,
// then the kRedSplit sums in shared memory; with more than one row block it writes them to a (row blocks, columns)
// scratch array, for which the group_local array is reused (dead once the carry has run; the launcher checks its
// size). Pass 2 adds the row blocks' sums the same way. At B=2, D=96, L=262144 (4096 rows, 28 MB of partial sums)
// on an H200: 0.014 ms for both passes, against 0.035 ms for the three ATen reductions and the transposing copy
// this replaces, and 0.022 ms for a first version in one pass over all rows (54 blocks: too few).
constexpr int kRedSplit = 8, kRedRows = 128;

// Columns summed: the dA_part columns, then the dD_part columns only when there is a D, then the dbias_part
// columns only when there is a delta_bias (the kernel writes their partial sums either way).
__host__ __device__ __forceinline__ int reduce_cols(const Params& p) {
  return p.dstate * p.dim + (p.dD != nullptr ? p.dim : 0) + (p.dbias != nullptr ? p.dim : 0);
}

// Column j's partial sums (first row) and the output element it is summed into.
__device__ __forceinline__ const float* reduce_src(const Params& p, int j, size_t& stride) {
  const int nd = p.dstate * p.dim;
  stride = (size_t)p.dim;
  if (j < nd) {
    stride = (size_t)nd;
    return p.dA_part + j;
  }
  j -= nd;
  if (p.dD != nullptr) {
    if (j < p.dim) return p.dD_part + j;
    j -= p.dim;
  }
  return p.dbias_part + j;
}
__device__ __forceinline__ void store_reduced(const Params& p, int j, float t) {
  const int nd = p.dstate * p.dim;
  if (j < nd) {
    p.dA[(size_t)(j % p.dim) * p.dstate + j / p.dim] = t;  // dA is (dim, dstate), like A
    return;
  }
  j -= nd;
  if (p.dD != nullptr) {
    if (j < p.dim) {
      p.dD[j] = t;
      return;
    }
    j -= p.dim;
  }
  p.dbias[j] = t;
}

// nblocks = 0: pass 1 (grid.y row blocks); nblocks > 0: pass 2 over that many row blocks' sums in the scratch.
__global__ void __launch_bounds__(32 * kRedSplit) reduce_parts_kernel(Params p, int nblocks) {
  __shared__ float part[kRedSplit][33];
  const int cols = reduce_cols(p);
  const int j = blockIdx.x * 32 + threadIdx.x;
  const float* src = nullptr;
  size_t stride = 0;
  int r0 = 0, r1 = 0;
  if (j < cols) {
    if (nblocks > 0) {
      src = p.group_local + j, stride = (size_t)cols, r1 = nblocks;
    } else {
      src = reduce_src(p, j, stride);
      r0 = blockIdx.y * kRedRows;
      r1 = min(p.batch * p.ngroups, r0 + kRedRows);
    }
  }
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  if (src != nullptr) {
    int r = r0 + threadIdx.y;
    for (; r + 3 * kRedSplit < r1; r += 4 * kRedSplit) {
      s0 += src[(size_t)r * stride];
      s1 += src[(size_t)(r + kRedSplit) * stride];
      s2 += src[(size_t)(r + 2 * kRedSplit) * stride];
      s3 += src[(size_t)(r + 3 * kRedSplit) * stride];
    }
    for (; r < r1; r += kRedSplit) s0 += src[(size_t)r * stride];
  }
  part[threadIdx.y][threadIdx.x] = (s0 + s1) + (s2 + s3);
  __syncthreads();
  if (threadIdx.y != 0 || src == nullptr) return;
  float t = 0.f;
#pragma unroll
  for (int y = 0; y < kRedSplit; ++y) t += part[y][threadIdx.x];
  if (nblocks == 0 && gridDim.y > 1) p.group_local[(size_t)blockIdx.y * cols + j] = t;
  else store_reduced(p, j, t);
}

inline cudaError_t launch_reduce_parts(const Params& p, cudaStream_t stream) {
  const int cols = reduce_cols(p), rows = p.batch * p.ngroups;
  const int nblocks = (rows + kRedRows - 1) / kRedRows;
  const unsigned xblocks = (unsigned)((cols + 31) / 32);
  // The scratch must fit in group_local: (batch·ngroups, dstate, dim) floats.
  if (nblocks > 1 && (long long)nblocks * cols > (long long)rows * p.dstate * p.dim) return cudaErrorInvalidValue;
  reduce_parts_kernel<<<dim3(xblocks, (unsigned)nblocks), dim3(32, kRedSplit), 0, stream>>>(p, 0);
  if (nblocks > 1) reduce_parts_kernel<<<xblocks, dim3(32, kRedSplit), 0, stream>>>(p, nblocks);
  return cudaGetLastError();
}

template <typename T, int NP>
cudaError_t backward_impl(const Params& p, cudaStream_t stream) {
  using G = Geo<NP>;
  const dim3 grid = main_grid(p, G::CPB);
  const size_t smem_local = (2 * G::kTile + G::kBC) * sizeof(float);
  const bool lane = NP == 16 && p.lane_kernels;  // the first walk in the lane layout
  cudaError_t err = cudaSuccess;
  if (!lane) {
    for (const void* f : {(const void*)bwd_local_kernel<T, NP, true>, (const void*)bwd_local_kernel<T, NP, false>}) {
      if ((err = cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_local)) != cudaSuccess)
        return err;
    }
  }
  const bool v2 = p.bwd_main_variant != 0;
  const void* main_fn = v2 ? (const void*)bwd_main2_kernel<T, NP> : (const void*)bwd_main_kernel<T, NP>;
  const size_t smem_main = (v2 ? bwd_main2_smem_floats<NP>() : bwd_main_smem_floats<NP>()) * sizeof(float);
  err = cudaFuncSetAttribute(main_fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_main);
  if (err != cudaSuccess) return err;
  // Ask for the largest shared-memory carveout so that as many blocks as fit can be resident.
  err = cudaFuncSetAttribute(main_fn, cudaFuncAttributePreferredSharedMemoryCarveout,
                             (int)cudaSharedmemCarveoutMaxShared);
  if (err != cudaSuccess) return err;
  if (lane) {
    if ((err = launch_bwd_lane_local<T>(p, stream)) != cudaSuccess) return err;
  } else if (p.prefetch) {
    bwd_local_kernel<T, NP, true><<<grid, kThreads, smem_local, stream>>>(p);
  } else {
    bwd_local_kernel<T, NP, false><<<grid, kThreads, smem_local, stream>>>(p);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if ((err = launch_carry(p, /*reverse=*/true, p.group_local, p.group_carry, stream)) != cudaSuccess) return err;
  if (v2) bwd_main2_kernel<T, NP><<<grid, kThreads, smem_main, stream>>>(p, grid.x > 1);
  else bwd_main_kernel<T, NP><<<grid, kThreads, smem_main, stream>>>(p, grid.x > 1);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  return launch_reduce_parts(p, stream);
}

template <typename T>
cudaError_t backward_dispatch_n(const Params& p, cudaStream_t stream) {
  switch (padded_dstate(p.dstate)) {
    case 16: return backward_impl<T, 16>(p, stream);
    case 32: return backward_impl<T, 32>(p, stream);
    case 64: return backward_impl<T, 64>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace detail

cudaError_t backward(const Params& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return detail::backward_dispatch_n<float>(p, stream);
    case DType::kFloat16: return detail::backward_dispatch_n<__half>(p, stream);
    case DType::kBFloat16: return detail::backward_dispatch_n<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace selective_scan
