// Lane-layout selective-scan walks for d_state <= 16: one thread per channel, holding all 16 states.
// Included by selective_scan_{fwd,bwd}.cu after selective_scan_kernels.cuh (CUDA headers and our own only).
//
// Why: in the state-split layout every token costs each thread two shared-memory reads of its channel's Δ and
// u, the softplus/silu work is done once per channel but read 4 times, and the output needs a 2-level shuffle
// reduction over the 4 lanes of a channel. Here a thread does the per-token channel work once for 16 states and
// sums y in registers; the walk is bound by the 16 exp2 per token (the MUFU unit, 48-70% busy) and by latency
// (2.7-3 resident warps per scheduler at 126-168 registers), not by issue.
//
// Layout. Block = 96 or 128 threads = as many consecutive channels (96 when the channel count is a multiple of
// 96 but not of 128, e.g. the model's d_inner 96 and 192, so that no warp idles; warps wholly past `dim` skip
// the walk but still stage B/C). Grid = (channel tiles, groups, batch); a block walks its group chunk by chunk.
//   - Per-channel rows (Δ, u, z, dout) are read by each thread directly from global memory in sub-chunks of
//     8 tokens (16-byte granules): float32 and unaligned rows into registers, the next sub-chunk issued before
//     the current one is walked; 16-bit vector rows through a cp.async ring in shared memory (LaneRing). Lanes
//     of a warp read 32 different rows, but each 32-byte sector is used in full (16-bit: by two sub-chunks, via
//     L1).
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

// Whether the walks stream a row type's sub-chunks through the cp.async ring (LaneRing): vector rows of 16-bit
// types. For them a sub-chunk is one 16-byte granule per row; measured (H200, bench/profile_scan.py --kernels)
// -10% in the output walk, -6% and -8% in the forward and backward first walks. float32 rows (two granules) gained
// nothing in the output walk and lost 6-11% in the first walks (more shared-memory traffic), so they keep the
// register path: the next sub-chunk loaded into registers while the current one is walked.
template <typename T, int IO>
constexpr bool lane_ring() { return IO != kIOAny && sizeof(T) == 2; }

// Decay exp2 of state n (a compile-time index after unrolling) in a walk that takes kPoly of its 16 states on the
// FMA pipes (poly_exp2, spread evenly: states step-1, 2·step-1, ...) and the rest on the MUFU unit.
template <int kPoly>
__device__ __forceinline__ float lane_exp2(float x, int n) {
  constexpr int step = kPoly > 0 ? kLaneN / kPoly : kLaneN + 1;
  if (kPoly > 0 && n % step == step - 1 && n / step < kPoly) return poly_exp2(x);
  return fast_exp2(x);
}

// One channel row's sub-chunk of kSub = 8 tokens in raw input precision: 16-byte granules, two for fp32, one
// for 16-bit types (whose 32-byte sector is then read by two consecutive sub-chunks; the second hits L1). Eight
// tokens keep the unrolled walk body small.
template <typename T, int IO>
struct LaneRow {
  static constexpr int kG = 16 / (int)sizeof(T);  // tokens per granule
  static constexpr int kSub = 8;                   // tokens per sub-chunk
  static constexpr int kNG = kSub / kG;            // granules per sub-chunk
  struct alignas(16) Gran { T e[kG]; };
  Gran g[kNG];

  // Logical tokens [t, t + kSub) of `row` (a (seqlen) row); zeros past the end or when !active.
  __device__ __forceinline__ void load(const Params& p, const T* row, int t, bool active) {
    if (io_vec<IO>(p)) {  // seqlen % 8 == 0: a granule is wholly inside or wholly outside the row
#pragma unroll
      for (int gi = 0; gi < kNG; ++gi) {
        const int tt = t + gi * kG;
        if (active && tt < p.seqlen) {
          g[gi] = *reinterpret_cast<const Gran*>(row + io_vec_pos<IO, kG>(p, tt));
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
          const T v = (active && tt < p.seqlen) ? row[io_pos<IO>(p, tt)] : Cvt<T>::to(0.f);
          if (io_rev<IO>(p)) g[gi].e[kG - 1 - j] = v; else g[gi].e[j] = v;
        }
    }
  }
  // Value of logical token t + i (i a compile-time index after unrolling).
  __device__ __forceinline__ float get(const Params& p, int i) const {
    const int gi = i / kG, j = i % kG;
    return Cvt<T>::f(io_rev<IO>(p) ? g[gi].e[kG - 1 - j] : g[gi].e[j]);
  }
};

// The three per-channel rows a walk reads together (Δ, u, z forward; Δ, dout, z backward); z may be absent.
template <typename T, int IO>
struct LaneRows3 {
  LaneRow<T, IO> a, b, c;
  __device__ __forceinline__ void load(const Params& p, const T* ra, const T* rb, const T* rc, int t, bool active) {
    a.load(p, ra, t, active);
    b.load(p, rb, t, active);
    if (rc != nullptr) c.load(p, rc, t, active);
  }
};

// Register path, vector rows: the forward walks take the sub-chunk loaded one step earlier (nxt) as the current one
// at the top of each step, before the next one is issued into nxt (the first one is loaded into nxt before the loop).
// Loading the first sub-chunk straight into cur and copying cur = nxt after the walk, as before, made ptxas put
// the wait for the first load on the loop's first read of cur, on a scoreboard that the loop's next-sub-chunk
// loads also set: every step waited for the loads it had just issued, so nothing was prefetched (nvdisasm control
// bits, float32 output walk; Nsight Compute, H200: 35% of its warp stall samples on that one instruction). The
// general version (kIOAny, scalar loads) keeps the old order: the new one costs it up to 96 bytes of spills.
// Measured (H200, bench/profile_scan.py --kernels): float32 output walk 0.445 -> 0.401-0.406 ms, first walk 0.278 ->
// 0.254-0.255 ms; 16-bit walks (cp.async ring, not this path) unchanged. Issuing the next chunk's B/C loads later in the
// chunk instead (they share that scoreboard, so the first wait after them waits for them too) measured no better:
// half way through the chunk 0.440 / 0.253 ms (the output walk then spills), after its first sub-chunk 0.398 /
// 0.257 ms and 2% slower 16-bit output walks (bench/gpu_define_sweep.sh). The backward first walk keeps the old order:
// ptxas already waited for its prefetch about 900 instructions after issue there, and the new order would add a wait
// for the next chunk's C loads at every chunk's first step (same scoreboard).
template <int IO>
constexpr bool lane_advance_first() { return IO != kIOAny; }

// cp.async (global -> shared, 16 bytes, zero-filled when !valid; no registers held while in flight).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Vector rows of 16-bit types (lane_ring): the rows' sub-chunks stream through a per-thread ring of kStages slots
// in shared memory, kStages - 1 sub-chunks ahead of the walk, by cp.async, instead of the next sub-chunk being
// held in registers (one ahead). With the register path the walks stall on global loads much of the time (Nsight
// Compute, H200, float32 output walk: 2.6 long-scoreboard stall cycles per issued instruction at 2.7 warps per
// scheduler; 0.4 with the ring, where the stalls move to shared-memory / MUFU results). Each thread copies and
// reads only its own slots (granule-major, threads fastest: 16-byte accesses without bank conflicts), so no
// barrier is needed, only cp.async.wait_group; a slot is refilled only after the copy into it was waited for
// (compute-sanitizer racecheck flags two copies into one slot in flight).
template <typename T, int IO, int kRows, int kStages>
struct LaneRing {
  using R = LaneRow<T, IO>;
  static constexpr int kPerStage = kRows * R::kNG;  // 16-byte granules per thread and stage
  uint4* base;                                      // this thread's granule 0 of stage 0 (granules strided by nt)
  int nt;
  __device__ __forceinline__ explicit LaneRing(void* smem)
      : base(static_cast<uint4*>(smem) + threadIdx.x), nt(blockDim.x) {}
  static size_t bytes(int nthreads) { return (size_t)kStages * kPerStage * nthreads * sizeof(uint4); }
  // Copies logical tokens [t, t + kSub) of the rows (nullptr: absent, skipped) into the slot of sub-chunk j
  // when j < nsub (the walk's sub-chunk count); always commits one group (possibly empty), so that group j is the
  // j-th committed.
  __device__ __forceinline__ void issue(const Params& p, const T* const* rows, int t, int j, int nsub,
                                        bool active) const {
    uint4* dst = base + (j % kStages) * kPerStage * nt;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (rows[r] == nullptr || j >= nsub) continue;
#pragma unroll
      for (int gi = 0; gi < R::kNG; ++gi) {
        const int tt = t + gi * R::kG;
        const bool valid = active && tt < p.seqlen;
        cp_async16(dst + (r * R::kNG + gi) * nt, rows[r] + (valid ? io_vec_pos<IO, R::kG>(p, tt) : 0), valid);
      }
    }
    cp_async_commit();
  }
  // Waits for sub-chunk j (kStages - 1 later ones may stay in flight) and reads it into row registers.
  __device__ __forceinline__ void read(int j, LaneRow<T, IO>* const* out) const {
    cp_async_wait<kStages - 1>();
    const uint4* src = base + (j % kStages) * kPerStage * nt;
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int gi = 0; gi < R::kNG; ++gi) *reinterpret_cast<uint4*>(&out[r]->g[gi]) = src[(r * R::kNG + gi) * nt];
  }
};

// B and C tiles of one chunk: 16 state rows x kChunk tokens read as 16-byte vectors by a block of >= 96
// threads (held in registers, raw, so the loads of the next chunk are in flight while the current one is
// walked), then written as a [token][state] tile. Without aligned rows (!vec_io) the scalar path loads and
// stores in one go at store() time.
template <typename T, int IO>
struct LaneBC {
  static constexpr int kV = 16 / (int)sizeof(T);   // tokens per vector
  static constexpr int kVPR = kChunk / kV;         // vectors per state row
  static constexpr int kVecs = kLaneN * kVPR;      // vectors per tile
  static constexpr int kPer = (kVecs + 95) / 96;   // vectors per thread (blockDim >= 96)
  Words<T, kV> r[kPer];  // as loaded: not touched before store(), so the loads stay in flight during the walk
  __device__ __forceinline__ void load(const Params& p, const void* src, int b, int t0) {
    if (!io_vec<IO>(p)) return;
    const T* base = static_cast<const T*>(src) + (size_t)b * p.dstate * p.seqlen;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int vi = threadIdx.x + k * blockDim.x;
      const int n = vi / kVPR, tt = t0 + (vi % kVPR) * kV;
      if (vi < kVecs && n < p.dstate && tt < p.seqlen) r[k].load(base + (size_t)n * p.seqlen + io_vec_pos<IO, kV>(p, tt));
      else r[k].zero();
    }
  }
  __device__ __forceinline__ void store(const Params& p, const void* src, int b, int t0, float* tile) const {
    if (io_vec<IO>(p)) {
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int vi = threadIdx.x + k * blockDim.x;
        if (vi >= kVecs) continue;
        const int n = vi / kVPR, t = (vi % kVPR) * kV;
#pragma unroll
        for (int i = 0; i < kV; ++i) tile[(t + (io_rev<IO>(p) ? kV - 1 - i : i)) * kLaneBS + n] = r[k].at(i);
      }
    } else {
      const T* base = static_cast<const T*>(src) + (size_t)b * p.dstate * p.seqlen;
      for (int e = threadIdx.x; e < kLaneN * kChunk; e += blockDim.x) {
        const int n = e / kChunk, t = e % kChunk, tt = t0 + t;
        tile[t * kLaneBS + n] = (n < p.dstate && tt < p.seqlen) ? Cvt<T>::ld(base + (size_t)n * p.seqlen + io_pos<IO>(p, tt)) : 0.f;
      }
    }
  }
};

// Writes logical tokens [t, t + kSub) of a row from v (valid tokens only).
template <typename T, int IO>
__device__ __forceinline__ void lane_store(const Params& p, T* row, int t, const float (&v)[LaneRow<T, IO>::kSub]) {
  using R = LaneRow<T, IO>;
  if (io_vec<IO>(p)) {
#pragma unroll
    for (int gi = 0; gi < R::kNG; ++gi) {
      const int tt = t + gi * R::kG;
      if (IO == kIOAny && tt >= p.seqlen) continue;  // (vector rows: the caller walks no sub-chunk past the end)
      typename R::Gran o;
#pragma unroll
      for (int j = 0; j < R::kG; ++j) {
        const float x = v[gi * R::kG + j];
        if (io_rev<IO>(p)) o.e[R::kG - 1 - j] = Cvt<T>::to(x); else o.e[j] = Cvt<T>::to(x);
      }
      *reinterpret_cast<typename R::Gran*>(row + io_vec_pos<IO, R::kG>(p, tt)) = o;
    }
  } else {
#pragma unroll
    for (int i = 0; i < R::kSub; ++i) {
      const int tt = t + i;
      if (tt < p.seqlen) row[io_pos<IO>(p, tt)] = Cvt<T>::to(v[i]);
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

// Δ of the sub-chunk's kSub tokens (softplus(δ + bias) or δ + bias), computed before the walk over them: with the
// softplus choice inside the token loop every token ended a basic block at its branch, and ptxas could not
// overlap one token's work with the next's.
template <typename T, int IO>
__device__ __forceinline__ void lane_deltas(const Params& p, const LaneRow<T, IO>& cd, float bias,
                                            float (&dl)[LaneRow<T, IO>::kSub]) {
  if (p.delta_softplus) {
#pragma unroll
    for (int i = 0; i < LaneRow<T, IO>::kSub; ++i) dl[i] = softplus_f(cd.get(p, i) + bias);
  } else {
#pragma unroll
    for (int i = 0; i < LaneRow<T, IO>::kSub; ++i) dl[i] = cd.get(p, i) + bias;
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
template <bool kOut>
constexpr int fwd_lane_rows() { return kOut ? 3 : 2; }  // Δ, u (and z)
template <bool kOut>
constexpr int fwd_lane_stages() { return kOut ? 3 : 4; }  // ring slots (the output walk's 3 keep 4 blocks of 96
                                                          // threads per SM within shared memory)
template <typename T, bool kOut, int IO>
using FwdRing = LaneRing<T, IO, fwd_lane_rows<kOut>(), fwd_lane_stages<kOut>()>;

// Resident blocks asked of the compiler (register cap): the output walk 3 (168 registers; 4 for the 16-bit ring
// version fits 128 without spills but measured 2.5% slower), the first walk 4, or 5 with the 16-bit ring (94
// registers, 7 resident 96-thread blocks instead of 5: -6%; H200, bench/profile_scan.py --kernels).
template <typename T, bool kOut, int IO>
constexpr int fwd_lane_min_blocks() { return kOut ? 3 : (lane_ring<T, IO>() ? 5 : 4); }

template <typename T, bool kOut, int IO, int kPoly>
__global__ void __launch_bounds__(kThreads, fwd_lane_min_blocks<T, kOut, IO>()) fwd_lane_kernel(Params p) {
  using R = LaneRow<T, IO>;
  constexpr int kSubs = kChunk / R::kSub;
  constexpr bool kRing = lane_ring<T, IO>();
  extern __shared__ float4 smem4[];
  float* s_B = reinterpret_cast<float*>(smem4);  // 2 buffers
  float* s_C = s_B + 2 * kLaneTile;              // 2 buffers (kOut only)
  const FwdRing<T, kOut, IO> ring(s_B + (kOut ? 4 : 2) * kLaneTile);  // (vector rows only)
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

  LaneBC<T, IO> rB, rC;
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

  // Δ, u, z of the sub-chunk being walked (cur) and, register path, of the next one (nxt): see lane_advance_first.
  LaneRows3<T, IO> cur, nxt;
  const R &cd = cur.a, &cu = cur.b, &cz = cur.c;
  // Ring path: sub-chunk j of the group (tokens tok0 + 8j ...) is copied kStages - 1 sub-chunks ahead.
  const int tok0 = w.ch_begin * kChunk, nsub = (w.ch_end - w.ch_begin) * kSubs;
  const T* ring_rows[3] = {delta_row, u_row, zr};
  LaneRow<T, IO>* ring_out[3] = {&cur.a, &cur.b, &cur.c};
  if (kRing) {
    if (w.warp_active) {
#pragma unroll
      for (int j = 0; j < fwd_lane_stages<kOut>() - 1; ++j)
        ring.issue(p, ring_rows, tok0 + j * R::kSub, j, nsub, w.active);
    }
  } else if (lane_advance_first<IO>()) {
    nxt.load(p, delta_row, u_row, zr, tok0, w.active);
  } else {
    cur.load(p, delta_row, u_row, zr, tok0, w.active);
  }
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
        const int j = (ch - w.ch_begin) * kSubs + s;  // sub-chunk of the group
        if (kRing) {
          const int jn = j + fwd_lane_stages<kOut>() - 1;
          ring.issue(p, ring_rows, tok0 + jn * R::kSub, jn, nsub, w.active);
        } else {
          if (lane_advance_first<IO>()) cur = nxt;
          if (s + 1 < kSubs || more_chunks) nxt.load(p, delta_row, u_row, zr, t + R::kSub, w.active);
        }
        // Vector rows: this and every later sub-chunk are past the end (uniform over the block); nothing is
        // issued after this, and the copies in flight are waited for after the loop.
        if (IO != kIOAny && t >= p.seqlen) break;
        if (kRing) ring.read(j, ring_out);
        float o[R::kSub], dls[R::kSub];
        lane_deltas<T, IO>(p, cd, bias, dls);
#pragma unroll
        for (int i = 0; i < R::kSub; ++i) {
          const int r = s * R::kSub + i;
          float dl = dls[i];
          if (IO == kIOAny && t + i >= p.seqlen) dl = 0.f;  // past the end (zero-filled inputs): no decay, no input
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
              h[n] = lane_exp2<kPoly>(dl * A2[n], n) * h[n] + du * bv[n];
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
            for (int n = 0; n < kLaneN; ++n) h[n] = lane_exp2<kPoly>(dl * A2[n], n) * h[n] + du * bv[n];
            dsum += dl;
          }
        }
        if (kOut && w.active) lane_store<T, IO>(p, out_row, t, o);
        if (!kRing && !lane_advance_first<IO>()) cur = nxt;
      }
    }
    if (more_chunks) stage_store(ch + 1, buf ^ 1);
    __syncthreads();
  }
  if (kRing) cp_async_wait<0>();  // (copies past the end may still be in flight after the break)
  if (!kOut) {
    lane_store_group(p, w, p.group_local, h);
    if (w.active) p.group_dsum[group_dsum_idx(p, w.b, w.grp, w.d)] = dsum;
  }
}

// Reverse walk of the adjoint over one group from a zero message: group_local = message leaving the group's
// first token. m_t = a_t (dy_t C_t + m_{t+1}), dy = dout · silu(z) (or dout).
template <typename T, int IO>
using BwdLocalRing = LaneRing<T, IO, 3, 3>;  // Δ, dout, z; 3 slots (6 blocks of 96 threads fit per SM)

template <typename T, int IO, int kPoly>
__global__ void __launch_bounds__(kThreads, 4) bwd_lane_local_kernel(Params p) {  // (5 measured no faster)
  using R = LaneRow<T, IO>;
  constexpr int kSubs = kChunk / R::kSub;
  constexpr bool kRing = lane_ring<T, IO>();
  constexpr int kStages = 3;
  extern __shared__ float4 smem4[];
  float* s_C = reinterpret_cast<float*>(smem4);  // 2 buffers
  const BwdLocalRing<T, IO> ring(s_C + 2 * kLaneTile);  // (vector rows only)
  zero_bc_share(p);
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

  LaneBC<T, IO> rC;
  rC.load(p, p.Cm, w.b, (w.ch_end - 1) * kChunk);
  rC.store(p, p.Cm, w.b, (w.ch_end - 1) * kChunk, s_C);
  __syncthreads();

  LaneRows3<T, IO> cur;  // Δ, dout, z of the sub-chunk being walked
  const R &cd = cur.a, &cg = cur.b, &cz = cur.c;
  // Ring path: sub-chunk j of the group counted from its end (tokens tok_last - 8j ...), kStages - 1 ahead.
  const int tok_last = w.ch_end * kChunk - R::kSub, nsub = (w.ch_end - w.ch_begin) * kSubs;
  const T* ring_rows[3] = {delta_row, dout_row, zr};
  LaneRow<T, IO>* ring_out[3] = {&cur.a, &cur.b, &cur.c};
  if (kRing) {
    if (w.warp_active) {
#pragma unroll
      for (int j = 0; j < kStages - 1; ++j) ring.issue(p, ring_rows, tok_last - j * R::kSub, j, nsub, w.active);
    }
  } else {
    cur.load(p, delta_row, dout_row, zr, tok_last, w.active);
  }
  for (int ch = w.ch_end - 1; ch >= w.ch_begin; --ch) {
    const int buf = (w.ch_end - 1 - ch) & 1;
    const bool more_chunks = ch - 1 >= w.ch_begin;
    if (more_chunks) rC.load(p, p.Cm, w.b, (ch - 1) * kChunk);
    if (w.warp_active) {
      const float* tC = s_C + buf * kLaneTile;
#pragma unroll 1
      for (int s = kSubs - 1; s >= 0; --s) {
        const int t = ch * kChunk + s * R::kSub;
        LaneRows3<T, IO> nxt;
        if (kRing) {
          const int j = (w.ch_end - 1 - ch) * kSubs + (kSubs - 1 - s), jn = j + kStages - 1;
          ring.issue(p, ring_rows, tok_last - jn * R::kSub, jn, nsub, w.active);
          // Waited for and read even when skipped below: its slot is refilled kStages sub-chunks later, and two
          // copies into one slot must not be in flight together.
          ring.read(j, ring_out);
        } else if (s > 0 || more_chunks) {
          nxt.load(p, delta_row, dout_row, zr, t - R::kSub, w.active);
        }
        // Vector rows: a sub-chunk past the end leaves the message unchanged (no decay, zero dout); skip it.
        if (IO != kIOAny && t >= p.seqlen) {
          if (!kRing) cur = nxt;
          continue;
        }
        float dls[R::kSub];
        lane_deltas<T, IO>(p, cd, bias, dls);
#pragma unroll
        for (int i = R::kSub - 1; i >= 0; --i) {
          const int r = s * R::kSub + i;
          float dl = dls[i];
          if (IO == kIOAny && t + i >= p.seqlen) dl = 0.f;  // past the end (zero-filled inputs): no decay, no input
          float dy = cg.get(p, i);
          if (has_z) {
            const float z = cz.get(p, i);
            dy *= z * sigmoid_f(z);
          }
          float cv[kLaneN];
          lane_states(tC, r, cv);
#pragma unroll
          for (int n = 0; n < kLaneN; ++n) m[n] = lane_exp2<kPoly>(dl * A2[n], n) * (dy * cv[n] + m[n]);
        }
        if (!kRing) cur = nxt;
      }
    }
    if (more_chunks) rC.store(p, p.Cm, w.b, (ch - 1) * kChunk, s_C + (buf ^ 1) * kLaneTile);
    __syncthreads();
  }
  if (kRing) cp_async_wait<0>();
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

template <typename T, int IO, int kPolyLocal, int kPolyOut>
cudaError_t forward_lane_io(const Params& p, cudaStream_t stream) {
  const int nt = lane_threads(p);
  const dim3 grid = lane_grid(p, nt);
  constexpr bool ring = lane_ring<T, IO>();
  const size_t smem_local = 2 * kLaneTile * sizeof(float) + (ring ? FwdRing<T, false, IO>::bytes(nt) : 0);
  const size_t smem_out = 4 * kLaneTile * sizeof(float) + (ring ? FwdRing<T, true, IO>::bytes(nt) : 0);
  cudaError_t err;
  const void* k_local = (const void*)fwd_lane_kernel<T, false, IO, kPolyLocal>;
  const void* k_out = (const void*)fwd_lane_kernel<T, true, IO, kPolyOut>;
  const auto attr = cudaFuncAttributeMaxDynamicSharedMemorySize;
  if ((err = cudaFuncSetAttribute(k_local, attr, (int)smem_local)) != cudaSuccess ||
      (err = cudaFuncSetAttribute(k_out, attr, (int)smem_out)) != cudaSuccess)
    return err;
  fwd_lane_kernel<T, false, IO, kPolyLocal><<<grid, nt, smem_local, stream>>>(p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if ((err = launch_carry(p, /*reverse=*/false, p.group_local, p.group_carry, stream)) != cudaSuccess) return err;
  fwd_lane_kernel<T, true, IO, kPolyOut><<<grid, nt, smem_out, stream>>>(p);
  return cudaGetLastError();
}

// States per walk on poly_exp2 (bench/profile_scan.py --kernels, H200, B=2 D=96 L=262144 N=16, 0 to 4 tried):
// two in the backward first walk (-4% float32, -5% float16) and in the 16-bit output walk (-5%); none in the
// forward first walk or the float32 output walk (no faster or up to 4% slower).
template <typename T>
constexpr int kPolyFwdLocal = 0;
template <typename T>
constexpr int kPolyFwdOut = sizeof(T) == 2 ? 2 : 0;
template <typename T>
constexpr int kPolyBwdLocal = 2;

template <typename T>
cudaError_t forward_lane(const Params& p, cudaStream_t stream) {
  switch (lane_io(p)) {
    case kIOVec: return forward_lane_io<T, kIOVec, kPolyFwdLocal<T>, kPolyFwdOut<T>>(p, stream);
    case kIOVecRev: return forward_lane_io<T, kIOVecRev, kPolyFwdLocal<T>, kPolyFwdOut<T>>(p, stream);
    default: return forward_lane_io<T, kIOAny, kPolyFwdLocal<T>, kPolyFwdOut<T>>(p, stream);
  }
}

template <typename T, int IO, int kPoly>
cudaError_t launch_bwd_lane_local_io(const Params& p, cudaStream_t stream) {
  const int nt = lane_threads(p);
  const size_t smem = 2 * kLaneTile * sizeof(float) + (lane_ring<T, IO>() ? BwdLocalRing<T, IO>::bytes(nt) : 0);
  const void* k = (const void*)bwd_lane_local_kernel<T, IO, kPoly>;
  const cudaError_t err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  bwd_lane_local_kernel<T, IO, kPoly><<<lane_grid(p, nt), nt, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd_lane_local(const Params& p, cudaStream_t stream) {
  switch (lane_io(p)) {
    case kIOVec: return launch_bwd_lane_local_io<T, kIOVec, kPolyBwdLocal<T>>(p, stream);
    case kIOVecRev: return launch_bwd_lane_local_io<T, kIOVecRev, kPolyBwdLocal<T>>(p, stream);
    default: return launch_bwd_lane_local_io<T, kIOAny, kPolyBwdLocal<T>>(p, stream);
  }
}

}  // namespace detail
}  // namespace selective_scan
