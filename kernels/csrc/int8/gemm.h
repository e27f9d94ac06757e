// The int8 GEMM's interface: out = dequant(q · wᵀ), q the activation codes [M, K], w the weight
// codes [N, K], as tasks over OpenMP threads (gemm.cpp).
//
// A dot-product formulation that suits [N, K] rows: a tile of MR activation rows × NR weight rows keeps
// MR·NR int32 vector accumulators over 32-byte chunks along K and reduces them horizontally at the end
// (4×3 tiles, in inline asm so that all 12 accumulators stay in registers; 1×8 for a single row). Tasks
// are blocks of weight rows sized for L2 (and blocks of activation rows when there are few); M = 1
// parallelises over N.
#pragma once

#include "int8.h"

namespace edge::int8 {

struct Gemm {
    const void* q;           // activation codes [M, ldq] (uint8_t, or int16_t for kAvx2S16), zero past K
    int64_t ldq;             // a multiple of kChunk
    const int8_t* w;         // [N, K]
    int64_t M, N, K;
    const float* row_scale;  // [M] per-row activation scale, or null: `scale` for every row
    float scale;
    int32_t zp;
    const int32_t* wsum;
    const float* wscale;
    const float* bias;       // or null
    float* out;              // out[m * ldo_m + n * ldo_n]
    int64_t ldo_m, ldo_n;
    Path path;
    // task grid: N in blocks of nb rows, M in blocks of mb rows; task t = (t / m_blocks, t % m_blocks)
    int64_t nb, mb, n_blocks, m_blocks;
};

// (float)(acc − zp·wsum) · rs · ws (+ bias), rounded op by op like torch's float32 ops.
// acc − zp·wsum = Σ(q − zp)·w, which fits int32 (K ≤ kMaxK): int32 wrap-around arithmetic is exact.
EDGE_NO_CONTRACT inline float dequant(int32_t acc, int32_t zp, int32_t wsum, float rs, float ws, const float* bias) {
    const int32_t d = static_cast<int32_t>(static_cast<uint32_t>(acc) - static_cast<uint32_t>(zp) * static_cast<uint32_t>(wsum));
    float v = static_cast<float>(d);
    v = v * rs;
    v = v * ws;
    if (bias) v = v + *bias;
    return v;
}

// Splits the output into tasks (N blocks whose weights stay in L2, M blocks when N alone gives too
// few) and returns how many threads are worth using.
int plan(Gemm& g, int nthreads);

// Runs every task of a planned GEMM on `nt` threads / on the calling thread.
void gemm_parallel(const Gemm& g, int nt);
void gemm_serial(const Gemm& g);

}  // namespace edge::int8
