// Selective-scan CUDA kernels (chunk-parallel). CUDA headers and our own only.
//
// Math (per batch b, channel d, state n, token t):
//   Δ_t = softplus(δ_t + bias_d) (or δ_t + bias_d),  a_t = exp(Δ_t A[d,n]),  h_t = a_t h_{t-1} + Δ_t B_t[n] u_t,
//   y_t = Σ_n C_t[n] h_t[n] + D_d u_t,  out_t = y_t · silu(z_t) (or y_t).
//
// Parallel structure. The sequence is cut into chunks of kChunk tokens (the unit of shared-memory staging and
// of the saved states) and groups of chunks_per_group chunks. One block walks one group of one channel tile
// serially, carrying the state from chunk to chunk; only group boundaries go through the carry kernels.
// Two thread layouts:
//   lane layout (d_state <= 16, selective_scan_lane.cuh): one thread per channel holding all 16 states, so the
//     per-token work (Δ, softplus, Δu, gating) is shared by 16 states and the output needs no shuffles;
//     per-channel rows are read by each thread in 16-byte vectors, 8 tokens ahead; B and C staged per chunk
//     in shared memory.
//   state-split layout (this file, NP = 16/32/64): a channel's states are spread over NP/4 neighbouring lanes,
//     kNPT = 4 states per thread; per-token inputs staged into [token][channel] shared-memory tiles.
//   forward:  (1) walk each group from a zero state -> group end state and Σ Δ        [fwd_local / fwd_lane<local>]
//             (2) carry across groups (segments of kSegChunks groups, then groups)     [carry_* kernels]
//             (3) walk each group from its true incoming state -> outputs, and the state
//                 entering every chunk (chunk_carry, saved for backward)               [fwd_out / fwd_lane<out>]
//   backward: (1) reverse walk of the adjoint over each group from zero -> message   [bwd_local / bwd_lane_local]
//                 (its blocks also zero dB/dC when (3) adds into them atomically)
//             (2) carry the message right-to-left across groups                      [carry_* kernels]
//             (3) chunks of a group last to first, carrying the message: forward walk from chunk_carry storing
//                 a state checkpoint every kSeg tokens, then segment by segment (last first): recompute the
//                 kSeg states and decays into registers and walk the adjoint backwards -> every gradient
//                 (dA, dD, dbias as per-block partial sums)                             [bwd_main(2)_kernel]
//             (4) dA, dD, dbias summed over the blocks in a fixed order                 [reduce_parts_kernel]
// In the state-split kernels per-token inputs are staged into shared-memory tiles [token][channel] with
// coalesced loads (softplus, sigmoid and silu evaluated once per token there), B and C into [token][state]
// tiles shared by all channels of the block. dB/dC (sums over channels) are reduced across lanes with a
// reduce-scatter butterfly and across warps in shared memory, so each (n, t) is written once per channel tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "selective_scan.h"

namespace selective_scan {
namespace detail {

constexpr int kThreads = 128;
// Minimum resident blocks per SM asked of the compiler for the walk kernels without cross-chunk prefetch.
// This caps their registers (5 -> 96, 6 -> 80 per thread; uncapped, the staging loads hold 150-180 and leave
// 2-3 blocks per SM). H200, B=2, D=96, L=262144, N=16, bench/bench_kernels.py: with 16-bit inputs the caps
// (and the single-instruction exp2) took the forward 1.51 -> 1.33 ms and forward+backward 5.80 -> 4.89 ms;
// fp32 went 1.32 -> 1.46 ms forward, 5.36 -> 5.45 ms forward+backward. Other caps for fp32 were slower
// still (bench/profile_scan.py --kernels: fwd_out 0.95 ms at 4 blocks, 1.17 ms at 3; the model runs the
// scan on 16-bit inputs under autocast). Register allocation is not monotonic in the cap: `nvcc -Xptxas -v`
// shows no spills at these values except 20 bytes in the fp32 fwd_out.
constexpr int kFwdLocalMinBlocks = 6;
constexpr int kFwdOutMinBlocks = 5;    // 4 for NP = 64 (5 spills ~150 bytes)
constexpr int kBwdLocalMinBlocks = 5;  // 6 spills a few bytes for 16-bit inputs
constexpr int kNPT = 4;   // states per thread
constexpr int kSeg = 8;   // tokens per backward recompute segment
constexpr int kSegsPerChunk = kChunk / kSeg;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float f(float v) { return v; }
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float ld(const float* p) { return *p; }
  static __device__ __forceinline__ void st(float* p, float v) { *p = v; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half to(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float ld(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void st(__half* p, float v) { *p = __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 to(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void st(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

// N consecutive elements stored as one 4-, 8- or 16-byte access (the caller guarantees alignment; loads keep
// the loaded words: Words below).
template <typename T, int N>
struct Vec {
  static constexpr int kBytes = N * (int)sizeof(T);
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "vector width");
  struct alignas(kBytes) Raw { T e[N]; };
  static __device__ __forceinline__ void store(T* p, const float (&in)[N]) {
    Raw r;
#pragma unroll
    for (int i = 0; i < N; ++i) r.e[i] = Cvt<T>::to(in[i]);
    *reinterpret_cast<Raw*>(p) = r;
  }
};

// N consecutive elements kept as the 32-bit words they were loaded in (4, 8 or 16 bytes): 16-bit elements are
// taken out of their word only when read (at()), so a register holding a loaded word is not touched before then
// (unpacking the halves right after each load made ptxas wait for every load in turn).
__device__ __forceinline__ float bits16_to_float(unsigned short b, __half*) { return __half2float(__ushort_as_half(b)); }
__device__ __forceinline__ float bits16_to_float(unsigned short b, __nv_bfloat16*) {
  return __uint_as_float((uint32_t)b << 16);
}
template <typename T, int N>
struct Words {
  static constexpr int kBytes = N * (int)sizeof(T);
  static constexpr int kW = kBytes / 4;
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "vector width");
  struct alignas(kBytes) Raw { uint32_t w[kW]; };
  Raw r;
  __device__ __forceinline__ void load(const T* p) { r = *reinterpret_cast<const Raw*>(p); }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kW; ++i) r.w[i] = 0u;  // (all-zero bits are 0.0 in the three types)
  }
  // Element i (a compile-time index after unrolling).
  __device__ __forceinline__ float at(int i) const {
    if constexpr (sizeof(T) == 4) {
      return __uint_as_float(r.w[i]);
    } else {
      const uint32_t w = r.w[i / 2];
      return bits16_to_float((unsigned short)((i % 2) ? (w >> 16) : (w & 0xffffu)), (T*)nullptr);
    }
  }
  // Sets element i from a value in input precision (the scalar path).
  __device__ __forceinline__ void set(int i, T v) {
    if constexpr (sizeof(T) == 4) {
      r.w[i] = __float_as_uint(v);
    } else {
      const uint32_t bits = *reinterpret_cast<const unsigned short*>(&v);
      uint32_t& w = r.w[i / 2];
      w = (i % 2) ? ((w & 0xffffu) | (bits << 16)) : ((w & 0xffff0000u) | bits);
    }
  }
};

// 2^x with one MUFU.EX2 (flush-to-zero: decays below 2^-126 become 0, which the recurrences tolerate).
// Plain exp2f adds range-fixing instructions around it; the walks are instruction-issue bound.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 2^x on the FMA pipes instead of the special-function unit: x clamped to [-126, 126] (so the result is a
// normal float; MUFU's flush to zero / overflow happen only beyond), x = k + f with k = round(x) taken from the
// mantissa of x + 1.5·2^23 and f in [-0.5, 0.5], 2^f a degree-5 polynomial (relative error 7.5e-8 as fitted,
// 2.3e-7 in float32 arithmetic, about MUFU.EX2's 2 ulp), and 2^k added into the exponent bits. 11 instructions
// instead of one MUFU.EX2: the lane walks use it for a few of their 16 states, where the 16 MUFU.EX2 per token
// (16 per cycle per SM) keep that unit the busier one and the FMA pipes (128 per cycle) have room (the walks are
// also latency-bound, so only 2 of 16 states measured faster). x = NaN gives 2^-126.
__device__ __forceinline__ float poly_exp2(float x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23
  x = fminf(fmaxf(x, -126.f), 126.f);
  const float t = __fadd_rn(x, kRound);
  const float f = __fsub_rn(x, __fsub_rn(t, kRound));
  float q = 1.327641773968935e-3f;
  q = fmaf(q, f, 9.675540961325169e-3f);
  q = fmaf(q, f, 5.550713464617729e-2f);
  q = fmaf(q, f, 0.24022120237350464f);
  q = fmaf(q, f, 0.6931469440460205f);
  q = fmaf(q, f, 1.0000001192092896f);
  return __int_as_float(__float_as_int(q) + (__float_as_int(t) << 23));
}

// Row access, fixed at compile time where it can be (the lane kernels; the state-split kernels use kIOAny).
// kIOAny decides per access at run time (p.vec_io, p.reverse); kIOVec / kIOVecRev are compiled for vector rows
// (p.vec_io: 16-byte-aligned rows, seqlen % 8 == 0) walked first-to-last / last-to-first. With vector rows an
// 8-token sub-chunk is wholly inside or wholly outside the sequence, so the walks skip the sub-chunks past the
// end instead of masking every token. (The run-time checks cost ~40 of ~125-180 instructions per token in the
// lane walks: nvdisasm of the sm_90 build.) Reverse: logical token t is memory position seqlen-1-t (the reverse
// direction of the tri-orientated block, without a flipped copy of the inputs).
constexpr int kIOAny = 0, kIOVec = 1, kIOVecRev = 2;
template <int IO>
__device__ __forceinline__ bool io_vec(const Params& p) { return IO == kIOAny ? p.vec_io : true; }
template <int IO>
__device__ __forceinline__ bool io_rev(const Params& p) { return IO == kIOAny ? p.reverse : IO == kIOVecRev; }
template <int IO>
__device__ __forceinline__ int io_pos(const Params& p, int t) { return io_rev<IO>(p) ? p.seqlen - 1 - t : t; }
// Memory start of the kV-token vector holding logical tokens [t, t + kV) (reversed inside the vector).
template <int IO, int kV>
__device__ __forceinline__ int io_vec_pos(const Params& p, int t) { return io_rev<IO>(p) ? p.seqlen - t - kV : t; }
// The kIO* value for the launch parameters.
inline int lane_io(const Params& p) { return !p.vec_io ? kIOAny : (p.reverse ? kIOVecRev : kIOVec); }

template <int N>
__device__ __forceinline__ void reverse_vec(float (&v)[N]) {
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float t = v[i];
    v[i] = v[N - 1 - i];
    v[N - 1 - i] = t;
  }
}

// softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|) in [0, 1], with log1p(e) = e·Q(e) and Q a degree-8
// polynomial fitted to log1p(e)/e on [0, 1] (relative error 3e-8; 2.3e-7 in float32 arithmetic, the
// accuracy of log1pf(__expf(x)) it replaces). One MUFU.EX2 and nine FMAs, no branch: log1pf's range
// reduction cost ~25 instructions per token in every walk. Large x give e = 0 (x itself); NaN stays NaN.
__device__ __forceinline__ float softplus_from_e(float x, float e) {
  float q = 0.005232624243944883f;
  q = fmaf(q, e, -0.029504956677556038f);
  q = fmaf(q, e, 0.07822549343109131f);
  q = fmaf(q, e, -0.1366320699453354f);
  q = fmaf(q, e, 0.1910598874092102f);
  q = fmaf(q, e, -0.2484297752380371f);
  q = fmaf(q, e, 0.3331909477710724f);
  q = fmaf(q, e, -0.4999949336051941f);
  q = fmaf(q, e, 0.9999999403953552f);
  return fmaxf(x, 0.f) + e * q;
}
__device__ __forceinline__ float softplus_f(float x) { return softplus_from_e(x, fast_exp2(-fabsf(x) * kLog2e)); }
// softplus(x), and σ(x) into sig from the same e: σ(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) below (one
// MUFU.EX2 fewer than softplus_f and sigmoid_f; σ is the derivative of softplus, needed by the backward).
__device__ __forceinline__ float softplus_sigmoid_f(float x, float& sig) {
  const float e = fast_exp2(-fabsf(x) * kLog2e);
  sig = __fdividef(x >= 0.f ? 1.f : e, 1.f + e);
  return softplus_from_e(x, e);
}
// 1 / (1 + exp(-x)) with the approximate reciprocal (2 ulp; 0 for x < -87, where the exact value is < 1e-38).
__device__ __forceinline__ float sigmoid_f(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }

template <int NP>
struct Geo {
  static_assert(NP % kNPT == 0 && NP <= 64, "unsupported state count");
  static constexpr int LPC = NP / kNPT;        // lanes per channel
  static constexpr int CPW = 32 / LPC;         // channels per warp
  static constexpr int CPB = kThreads / LPC;   // channels per block
  static constexpr int TS = CPB + 1;           // padded row stride of a [token][channel] tile
  static constexpr int kTile = kChunk * TS;    // floats in one [token][channel] tile
  static constexpr int BS = NP + 4;            // row stride of a [token][state] tile
  static constexpr int kBC = kChunk * BS;      // floats in one [token][state] tile
  static constexpr int LEVELS = (CPW >= 8) ? 3 : (CPW == 4 ? 2 : 1);  // butterfly levels over channels
  static constexpr int R = 8 >> LEVELS;        // values per lane after the reduce-scatter
};

// Which channel / states this thread owns: lane = cw·LPC + q (channel cw of the warp, states q·kNPT ...). The
// warp's channels in the block tile are warp·CPW + cw (consecutive), or with `strided` cw·(kThreads / 32) + warp.
template <int NP>
struct Who {
  int lane, warp, cw, q, c, d;
  bool active;
  __device__ __forceinline__ explicit Who(int dim, bool strided = false) {
    lane = threadIdx.x & 31;
    warp = threadIdx.x >> 5;
    cw = lane / Geo<NP>::LPC;
    q = lane % Geo<NP>::LPC;
    c = strided ? cw * (kThreads / 32) + warp : warp * Geo<NP>::CPW + cw;
    d = blockIdx.x * Geo<NP>::CPB + c;
    active = d < dim;
  }
};

// Staging. A block's chunk tile is CPB channels x kChunk tokens (kPer elements per thread). Two element->thread
// mappings, both with consecutive threads on consecutive tokens of a row (coalesced):
//   scalar: element j of thread tid is token tid % kChunk of channel tid / kChunk + j * kCStep;
//   vector (p.vec_io): the row is read in vectors of kV tokens; vector slot k of thread tid is vector
//           vi = tid + k * kThreads, a warp's 32 consecutive vi covering kVW = 8 consecutive vectors (128 bytes)
//           of each of 32 / kVW consecutive channels (vec_c, vec_v). With the previous map (channel vi / kVPR:
//           a warp on 2 channels x 16 vectors for float32) the tile stores and store_tile's loads hit 2 addresses
//           per bank; now float32's fall into distinct banks (TS odd). 16-bit rows (kVPR = 8) map as before.
// All loads of a tile are issued before any is used; optionally (kPrefetch) one chunk ahead, so they are in
// flight while the previous chunk is walked. Values are then converted into shared-memory tiles [t][c].
template <typename T, int NP>
struct TileMap {
  static constexpr int kCStep = kThreads / kChunk;              // channels covered per scalar step
  static constexpr int kPer = Geo<NP>::CPB * kChunk / kThreads;  // elements per thread
  static constexpr int kV0 = 16 / (int)sizeof(T);
  static constexpr int kV = kV0 < kPer ? kV0 : kPer;             // tokens per vector
  static constexpr int kVPR = kChunk / kV;                       // vectors per row
  static constexpr int kVecs = kPer / kV;                        // vectors per thread
  static_assert(kPer % kV == 0, "tile mapping");
  static constexpr int kVW = 8;             // vectors of a channel row per warp
  static constexpr int kHW = kVPR / kVW;    // warps per row
  static_assert(kVPR % kVW == 0, "tile mapping");
  // channel-in-tile and vector-in-row of vector vi
  static __device__ __forceinline__ int vec_c(int vi) { return (vi / 32 / kHW) * (32 / kVW) + (vi % 32) / kVW; }
  static __device__ __forceinline__ int vec_v(int vi) { return (vi / 32 % kHW) * kVW + vi % kVW; }
  // channel-in-tile and token-in-chunk of element j (j = k * kV + i in the vector mapping)
  static __device__ __forceinline__ int c(bool vec, int j) {
    return vec ? vec_c(threadIdx.x + (j / kV) * kThreads) : threadIdx.x / kChunk + j * kCStep;
  }
  static __device__ __forceinline__ int t(bool vec, int j) {
    return vec ? vec_v(threadIdx.x + (j / kV) * kThreads) * kV + j % kV : threadIdx.x % kChunk;
  }
  static __device__ __forceinline__ int d(bool vec, int j) { return blockIdx.x * Geo<NP>::CPB + c(vec, j); }
};

// Row offset of z for a contiguous row offset `row` of batch b (z may have a larger batch stride).
__device__ __forceinline__ size_t z_row(const Params& p, int b, size_t row) {
  return row + (size_t)b * (size_t)(p.z_batch_stride - (long long)p.dim * p.seqlen);
}

// Raw values of one (batch, dim, seqlen) tensor for one chunk tile, held in registers in input precision and
// in load order. Nothing reads a loaded register before commit time (get() converts, and undoes the reversal
// of vector-loaded tokens when p.reverse), so all loads of a chunk are in flight together: reversing (and
// converting) right after each load made ptxas reuse the registers of one load for the next and serialize
// them, one global latency each (Nsight Compute source counters, bwd_main2, H200: 27% of the kernel's warp
// stall samples on those loads).
template <typename T, int NP>
struct RowRegs {
  using M = TileMap<T, NP>;
  Words<T, M::kV> r[M::kVecs];  // vector path: vector k = elements k * kV ... (scalar path: element j is
                                // element j % kV of r[j / kV])
  __device__ __forceinline__ void load(const Params& p, const void* src, int b, int t0, long long batch_stride) {
    const T* base = static_cast<const T*>(src) + (size_t)b * batch_stride;
    if (p.vec_io) {
#pragma unroll
      for (int k = 0; k < M::kVecs; ++k) {
        const int j = k * M::kV;
        const int d = M::d(true, j), tt = t0 + M::t(true, j);
        if (d < p.dim && tt < p.seqlen) {  // seqlen % kV == 0: a vector is all in or all out
          r[k].load(base + (size_t)d * p.seqlen + io_vec_pos<kIOAny, M::kV>(p, tt));
        } else {
          r[k].zero();
        }
      }
    } else {
      const int tt = t0 + M::t(false, 0);
      const bool tvalid = tt < p.seqlen;
      const T* ptr = base + (size_t)M::d(false, 0) * p.seqlen + (tvalid ? io_pos<kIOAny>(p, tt) : 0);
      const size_t step = (size_t)M::kCStep * p.seqlen;
#pragma unroll
      for (int j = 0; j < M::kPer; ++j) {
        r[j / M::kV].set(j % M::kV, (tvalid && M::d(false, j) < p.dim) ? *ptr : Cvt<T>::to(0.f));
        ptr += step;
      }
    }
  }
  // Value of element j (token M::t(vec, j) of channel M::c(vec, j)).
  __device__ __forceinline__ float get(const Params& p, int j) const {
    const int k = j / M::kV, i = j % M::kV;
    if (M::kV == 1) return r[k].at(0);
    return (p.vec_io && p.reverse) ? r[k].at(M::kV - 1 - i) : r[k].at(i);
  }
  // Writes f(value of element j, valid, d) into tile[t][c].
  template <typename F>
  __device__ __forceinline__ void commit(const Params& p, int t0, float* tile, F&& f) const {
    const bool vec = p.vec_io;
#pragma unroll
    for (int j = 0; j < M::kPer; ++j) {
      const int c = M::c(vec, j), t = M::t(vec, j), d = blockIdx.x * Geo<NP>::CPB + c;
      tile[t * Geo<NP>::TS + c] = f(get(p, j), d < p.dim && t0 + t < p.seqlen, d);
    }
  }
};

// Stores tile[t][c] into a contiguous (batch, dim, seqlen) tensor.
template <typename T, int NP>
__device__ __forceinline__ void store_tile(const Params& p, void* dst, const float* tile, int b, int t0) {
  using M = TileMap<T, NP>;
  T* base = static_cast<T*>(dst) + (size_t)b * p.dim * p.seqlen;
  if (p.vec_io) {
#pragma unroll
    for (int k = 0; k < M::kVecs; ++k) {
      const int j = k * M::kV;
      const int c = M::c(true, j), t = M::t(true, j), d = blockIdx.x * Geo<NP>::CPB + c;
      if (d >= p.dim || t0 + t >= p.seqlen) continue;
      float tmp[M::kV];
#pragma unroll
      for (int i = 0; i < M::kV; ++i) tmp[i] = tile[(t + i) * Geo<NP>::TS + c];
      if (p.reverse) reverse_vec(tmp);
      Vec<T, M::kV>::store(base + (size_t)d * p.seqlen + io_vec_pos<kIOAny, M::kV>(p, t0 + t), tmp);
    }
  } else {
    const int tt = t0 + M::t(false, 0);
    if (tt >= p.seqlen) return;
    T* ptr = base + (size_t)M::d(false, 0) * p.seqlen + io_pos<kIOAny>(p, tt);
    const size_t step = (size_t)M::kCStep * p.seqlen;
#pragma unroll
    for (int j = 0; j < M::kPer; ++j) {
      if (M::d(false, j) < p.dim) Cvt<T>::st(ptr, tile[M::t(false, 0) * Geo<NP>::TS + M::c(false, j)]);
      ptr += step;
    }
  }
}

// Column of state n in a [token][state] tile: n, or with kSplit n + 2 for n >= 32 (states 32-63 moved by two
// columns, within the row's padding), the layout bwd_main2_kernel uses at 64 states: there the 16 lanes of a
// channel read 8 bytes each at q·kNPT (+ 2), and without the shift lanes q and q + 8 of a half-warp hit the same
// banks (2-way conflicts: 8 wavefronts per B or C row read instead of 4).
template <bool kSplit>
__device__ __forceinline__ int bc_col(int n) { return (kSplit && n >= 32) ? n + 2 : n; }

// Raw values of a (batch, 1, dstate, seqlen) tensor for one chunk, held in registers (in input precision, in
// load order: see RowRegs); stored into a [token][state] tile with row stride BS = NP + 4 (keeps float4
// alignment, limits store bank conflicts). Vector path: vector vi is state row vi % NP, vector vi / NP of the row,
// so that a warp stores into one or two tokens' rows of the tile: distinct banks in float32 (2 addresses per bank
// for 16-bit inputs, whose kV = 8 tokens per vector put a row's vectors 8·BS floats apart). With state row
// vi / kVPR (a warp on 2 rows x 16 vectors in float32, 4 x 8 for 16-bit) the stores hit 8 addresses per bank.
// Both map changes measured together (H200, bench/profile_scan.py --kernels, backward main kernel): N = 16 float32
// 1.548 -> 1.550 ms, float16 1.488 -> 1.455 ms; N = 32 3.15 -> 3.07 / 3.03 -> 2.91 ms; N = 64 9.80 -> 9.77 /
// 7.58 -> 7.29 ms; Nsight Compute (N = 16, float32): shared-store bank conflicts 19.5 M -> 0.5 M. The same change in
// the lane walks' B/C staging (LaneBC) measured no different and was not kept.
template <typename T, int NP>
struct BCRegs {
  static constexpr int kNStep = kThreads / kChunk;
  static constexpr int kPer = NP * kChunk / kThreads;
  static constexpr int kV0 = 16 / (int)sizeof(T);
  static constexpr int kV = kV0 < kPer ? kV0 : kPer;
  static constexpr int kVPR = kChunk / kV;
  static constexpr int kVecs = kPer / kV;
  static __device__ __forceinline__ int vec_n(int vi) { return vi % NP; }
  static __device__ __forceinline__ int vec_v(int vi) { return vi / NP; }
  Words<T, kV> r[kVecs];  // (scalar path: element j is element j % kV of r[j / kV])
  __device__ __forceinline__ void load(const Params& p, const void* src, int b, int t0) {
    const T* base = static_cast<const T*>(src) + (size_t)b * p.dstate * p.seqlen;
    if (p.vec_io) {
#pragma unroll
      for (int k = 0; k < kVecs; ++k) {
        const int vi = threadIdx.x + k * kThreads;
        const int n = vec_n(vi), tt = t0 + vec_v(vi) * kV;
        if (n < p.dstate && tt < p.seqlen) r[k].load(base + (size_t)n * p.seqlen + io_vec_pos<kIOAny, kV>(p, tt));
        else r[k].zero();
      }
    } else {
      const int t = threadIdx.x % kChunk, tt = t0 + t;
      const int n0 = threadIdx.x / kChunk;
      const bool tvalid = tt < p.seqlen;
      const T* ptr = base + (size_t)n0 * p.seqlen + (tvalid ? io_pos<kIOAny>(p, tt) : 0);
      const size_t step = (size_t)kNStep * p.seqlen;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        r[j / kV].set(j % kV, (tvalid && n0 + j * kNStep < p.dstate) ? *ptr : Cvt<T>::to(0.f));
        ptr += step;
      }
    }
  }
  // kSplit: the tile layout of bc_col (bwd_main2_kernel at 64 states).
  template <bool kSplit = false>
  __device__ __forceinline__ void store(const Params& p, float* tile) const {
    static_assert(!kSplit || NP == 64, "the bc_col layout is for 64 states");
    if (p.vec_io) {
#pragma unroll
      for (int k = 0; k < kVecs; ++k) {
        const int vi = threadIdx.x + k * kThreads;
        const int n = bc_col<kSplit>(vec_n(vi)), t = vec_v(vi) * kV;
#pragma unroll
        for (int i = 0; i < kV; ++i)
          tile[(t + i) * Geo<NP>::BS + n] = p.reverse ? r[k].at(kV - 1 - i) : r[k].at(i);
      }
    } else {
      const int t = threadIdx.x % kChunk, n0 = threadIdx.x / kChunk;
#pragma unroll
      for (int j = 0; j < kPer; ++j) tile[t * Geo<NP>::BS + bc_col<kSplit>(n0 + j * kNStep)] = r[j / kV].at(j % kV);
    }
  }
};

__device__ __forceinline__ float delta_in(const Params& p, float raw, int d) {
  const float x = raw + (p.delta_bias ? p.delta_bias[d] : 0.f);
  return p.delta_softplus ? softplus_f(x) : x;
}

// Register k of a thread holds state q·kNPT + (k ^ perm): perm = 0 everywhere but in bwd_main2_kernel, whose lanes
// of odd channel-in-warp hold their two state pairs swapped (perm = 2; see reduce_scatter_swz).
template <int NP>
__device__ __forceinline__ void load_A2(const Params& p, const Who<NP>& w, float (&A2)[kNPT], int perm = 0) {
#pragma unroll
  for (int k = 0; k < kNPT; ++k) {
    const int n = w.q * kNPT + (k ^ perm);
    A2[k] = (w.active && n < p.dstate) ? p.A[(size_t)w.d * p.dstate + n] * kLog2e : 0.f;
  }
}

// The 4 states of thread q at token t from a [token][state] tile.
template <int NP>
__device__ __forceinline__ float4 state4(const float* tile, int t, int q) {
  return *reinterpret_cast<const float4*>(tile + t * Geo<NP>::BS + q * kNPT);
}
// The same in register order k ^ perm (perm = 0 or 2): two 8-byte loads, the pair at q·kNPT + perm first (kSplit:
// from a tile in the layout of bc_col).
template <int NP, bool kSplit = false>
__device__ __forceinline__ float4 state4_perm(const float* tile, int t, int q, int perm) {
  static_assert(!kSplit || NP == 64, "the bc_col layout is for 64 states");
  const float* row = tile + t * Geo<NP>::BS + bc_col<kSplit>(q * kNPT);
  const float2 lo = *reinterpret_cast<const float2*>(row + perm);
  const float2 hi = *reinterpret_cast<const float2*>(row + (perm ^ 2));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}

// One token of the state-split forward recurrence for this thread's kNPT states: h = exp2(Δ·A2)·h + Δ·u·B_t,
// Δ and u from [token][channel] tiles, B from a [token][state] tile (registers in state order k ^ perm when perm
// >= 0). Returns Δ.
template <int NP, bool kSplit = false>
__device__ __forceinline__ float walk_token(const float* s_delta, const float* s_u, const float* s_B, int t,
                                           const Who<NP>& w, const float (&A2)[kNPT], float (&h)[kNPT],
                                           int perm = -1) {
  const float dl = s_delta[t * Geo<NP>::TS + w.c];
  const float du = dl * s_u[t * Geo<NP>::TS + w.c];
  const float4 bv = perm < 0 ? state4<NP>(s_B, t, w.q) : state4_perm<NP, kSplit>(s_B, t, w.q, perm);
  h[0] = fast_exp2(dl * A2[0]) * h[0] + du * bv.x;
  h[1] = fast_exp2(dl * A2[1]) * h[1] + du * bv.y;
  h[2] = fast_exp2(dl * A2[2]) * h[2] + du * bv.z;
  h[3] = fast_exp2(dl * A2[3]) * h[3] + du * bv.w;
  return dl;
}

// Zero-fills this block's share of dB and dC when p.zero_bc (the backward main kernel adds into them with atomics
// when there are several channel tiles). Called by the backward's first walk, whose walk the stores overlap:
// one fill kernel fewer (0.016 ms at B=2, D=96, L=262144 on an H200, where the first walk measured 0.306 ->
// 0.302 ms in float32 and 0.303 -> 0.309 ms in float16 with them). 1-D blocks; dB and dC are fresh allocations
// (16-byte aligned), written in float4 with the scalar tail by block 0.
__device__ __forceinline__ void zero_bc_share(const Params& p) {
  if (!p.zero_bc) return;
  const size_t n = (size_t)p.batch * p.dstate * p.seqlen, n4 = n / 4;
  const size_t nblk = (size_t)gridDim.x * gridDim.y * gridDim.z;
  const size_t blk = blockIdx.x + (size_t)gridDim.x * (blockIdx.y + (size_t)gridDim.y * blockIdx.z);
  const size_t per = (n4 + nblk - 1) / nblk, lo = blk * per, hi = lo + per < n4 ? lo + per : n4;
  const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
  for (size_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    reinterpret_cast<float4*>(p.dB)[i] = zero;
    reinterpret_cast<float4*>(p.dC)[i] = zero;
  }
  if (blk == 0) {
    for (size_t i = n4 * 4 + threadIdx.x; i < n; i += blockDim.x) p.dB[i] = p.dC[i] = 0.f;
  }
}

// Per-chunk (rows = nchunks) and per-group (rows = ngroups) state arrays, both (batch, rows, dstate, dim).
__device__ __forceinline__ size_t state_idx(const Params& p, int rows, int b, int r, int n, int d) {
  return (((size_t)b * rows + r) * p.dstate + n) * p.dim + d;
}
__device__ __forceinline__ size_t chunk_idx(const Params& p, int b, int ch, int n, int d) {
  return state_idx(p, p.nchunks, b, ch, n, d);
}
__device__ __forceinline__ size_t group_idx(const Params& p, int b, int g, int n, int d) {
  return state_idx(p, p.ngroups, b, g, n, d);
}
__device__ __forceinline__ size_t group_dsum_idx(const Params& p, int b, int g, int d) {
  return ((size_t)b * p.ngroups + g) * p.dim + d;
}

// This thread's kNPT states of row r of a state array with `rows` rows (p.nchunks or p.ngroups), in register order
// k ^ perm (see load_A2).
template <int NP>
__device__ __forceinline__ void load_state(const Params& p, const Who<NP>& w, const float* arr, int rows, int b,
                                           int r, float (&h)[kNPT], int perm = 0) {
#pragma unroll
  for (int k = 0; k < kNPT; ++k) {
    const int n = w.q * kNPT + (k ^ perm);
    h[k] = (w.active && n < p.dstate) ? arr[state_idx(p, rows, b, r, n, w.d)] : 0.f;
  }
}

template <int NP>
__device__ __forceinline__ void store_state(const Params& p, const Who<NP>& w, float* arr, int rows, int b, int r,
                                            const float (&h)[kNPT]) {
#pragma unroll
  for (int k = 0; k < kNPT; ++k) {
    const int n = w.q * kNPT + k;
    if (w.active && n < p.dstate) arr[state_idx(p, rows, b, r, n, w.d)] = h[k];
  }
}

// Sum over the LPC lanes that share a channel (all of them get the sum).
template <int NP>
__device__ __forceinline__ float sum_states(float v) {
#pragma unroll
  for (int off = 1; off < Geo<NP>::LPC; off <<= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// Carry across groups. local/dsum come from a local-walk kernel; for every group g, carry[g] is what enters
// the group: forward  carry[0] = 0, carry[g+1] = exp(A·dsum[g])·carry[g] + local[g];
//            reverse  carry[G-1] = 0, carry[g-1] = exp(A·dsum[g])·carry[g] + local[g].
// One thread per (b, segment, n, d) (d fastest: coalesced). Segments of kSegChunks groups.
// ---------------------------------------------------------------------------------------------------------
struct CarryIdx {
  int b, s, n, d;
  __device__ __forceinline__ CarryIdx(const Params& p, long long idx) {
    d = (int)(idx % p.dim);
    long long r = idx / p.dim;
    n = (int)(r % p.dstate);
    r /= p.dstate;
    s = (int)(r % p.nseg);
    b = (int)(r / p.nseg);
  }
};

__device__ __forceinline__ size_t seg_idx(const Params& p, int b, int s, int n, int d) {
  return (((size_t)b * p.nseg + s) * (p.dstate + 1) + n) * p.dim + d;
}

template <bool kReverse>
__global__ void carry_segments_kernel(Params p, const float* local) {
  const long long total = (long long)p.batch * p.nseg * p.dstate * p.dim;
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const CarryIdx w(p, idx);
  const float A2 = p.A[(size_t)w.d * p.dstate + w.n] * kLog2e;
  const int lo = w.s * kSegChunks, hi = min(lo + kSegChunks, p.ngroups);
  float H = 0.f, S = 0.f;
  for (int i = 0; i < hi - lo; ++i) {
    const int g = kReverse ? hi - 1 - i : lo + i;
    const float ds = p.group_dsum[group_dsum_idx(p, w.b, g, w.d)];
    H = fast_exp2(A2 * ds) * H + local[group_idx(p, w.b, g, w.n, w.d)];
    S += ds;
  }
  p.seg_agg[seg_idx(p, w.b, w.s, w.n, w.d)] = H;
  if (w.n == 0) p.seg_agg[seg_idx(p, w.b, w.s, p.dstate, w.d)] = S;
}

template <bool kReverse>
__global__ void carry_apply_kernel(Params p, const float* local, float* carry) {
  const long long total = (long long)p.batch * p.nseg * p.dstate * p.dim;
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const CarryIdx w(p, idx);
  const float A2 = p.A[(size_t)w.d * p.dstate + w.n] * kLog2e;
  float H = 0.f;
  const int nprev = kReverse ? p.nseg - 1 - w.s : w.s;
  for (int i = 0; i < nprev; ++i) {
    const int s2 = kReverse ? p.nseg - 1 - i : i;
    H = fast_exp2(A2 * p.seg_agg[seg_idx(p, w.b, s2, p.dstate, w.d)]) * H + p.seg_agg[seg_idx(p, w.b, s2, w.n, w.d)];
  }
  const int lo = w.s * kSegChunks, hi = min(lo + kSegChunks, p.ngroups);
  for (int i = 0; i < hi - lo; ++i) {
    const int g = kReverse ? hi - 1 - i : lo + i;
    carry[group_idx(p, w.b, g, w.n, w.d)] = H;
    const float ds = p.group_dsum[group_dsum_idx(p, w.b, g, w.d)];
    H = fast_exp2(A2 * ds) * H + local[group_idx(p, w.b, g, w.n, w.d)];
  }
  if (!kReverse && p.last_state != nullptr && w.s == p.nseg - 1)
    p.last_state[((size_t)w.b * p.dim + w.d) * p.dstate + w.n] = H;
}

inline cudaError_t launch_carry(const Params& p, bool reverse, const float* local, float* carry,
                                cudaStream_t stream) {
  const long long total = (long long)p.batch * p.nseg * p.dstate * p.dim;
  const int threads = 256;
  const unsigned blocks = (unsigned)((total + threads - 1) / threads);
  if (reverse) {
    carry_segments_kernel<true><<<blocks, threads, 0, stream>>>(p, local);
    carry_apply_kernel<true><<<blocks, threads, 0, stream>>>(p, local, carry);
  } else {
    carry_segments_kernel<false><<<blocks, threads, 0, stream>>>(p, local);
    carry_apply_kernel<false><<<blocks, threads, 0, stream>>>(p, local, carry);
  }
  return cudaGetLastError();
}

inline dim3 main_grid(const Params& p, int cpb) {
  return dim3((unsigned)((p.dim + cpb - 1) / cpb), (unsigned)p.ngroups, (unsigned)p.batch);
}

}  // namespace detail
}  // namespace selective_scan
