// The int8 GEMM (gemm.h): the portable tile, the AVX2 micro-kernels (intrinsics, and inline asm for
// the main 4×3 tile) and the task grid over OpenMP threads.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include <omp.h>

#include "gemm.h"

namespace edge::int8 {
namespace {

// Portable: int32 dot products (GCC vectorizes the inner loop with the baseline SSE2).
EDGE_NO_CONTRACT void tile_portable(const Gemm& g, int64_t m0, int64_t n0, int mr, int nr) {
    const uint8_t* q = static_cast<const uint8_t*>(g.q);
    for (int i = 0; i < mr; ++i) {
        const int64_t m = m0 + i;
        const uint8_t* qr = q + m * g.ldq;
        const float rs = g.row_scale ? g.row_scale[m] : g.scale;
        for (int j = 0; j < nr; ++j) {
            const int64_t n = n0 + j;
            const int8_t* wr = g.w + n * g.K;
            int32_t s = 0;
            for (int64_t k = 0; k < g.K; ++k) s += static_cast<int32_t>(qr[k]) * static_cast<int32_t>(wr[k]);
            g.out[m * g.ldo_m + n * g.ldo_n] = dequant(s, g.zp, g.wsum[n], rs, g.wscale[n], g.bias ? g.bias + n : nullptr);
        }
    }
}

#if EDGE_X86
// [Σa, Σb, Σc, Σd] of four vectors of 8 int32.
EDGE_AVX2 inline __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

// Dequantizes and stores an MR×nr block (nr ≤ 4): acc[i] holds row m0 + i, lane j column n0 + j.
// (The target has no FMA, so the compiler cannot fuse the multiply and the bias add.)
template <int MR>
EDGE_AVX2 inline void store_block(const Gemm& g, int64_t m0, int64_t n0, int nr, const __m128i (&acc)[MR]) {
    const __m128i mask = _mm_cmpgt_epi32(_mm_set1_epi32(nr), _mm_setr_epi32(0, 1, 2, 3));
    const bool full = nr == 4;
    const __m128i wsum = full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(g.wsum + n0))
                              : _mm_maskload_epi32(g.wsum + n0, mask);
    const __m128 ws = full ? _mm_loadu_ps(g.wscale + n0) : _mm_maskload_ps(g.wscale + n0, mask);
    __m128 bias = _mm_setzero_ps();
    if (g.bias) bias = full ? _mm_loadu_ps(g.bias + n0) : _mm_maskload_ps(g.bias + n0, mask);
    const __m128i corr = _mm_mullo_epi32(wsum, _mm_set1_epi32(g.zp));
    __m128 v[MR];
    for (int i = 0; i < MR; ++i) {
        const float rs = g.row_scale ? g.row_scale[m0 + i] : g.scale;
        v[i] = _mm_cvtepi32_ps(_mm_sub_epi32(acc[i], corr));
        v[i] = _mm_mul_ps(_mm_mul_ps(v[i], _mm_set1_ps(rs)), ws);
        if (g.bias) v[i] = _mm_add_ps(v[i], bias);
    }
    if (g.ldo_n == 1) {  // row-major [M, N] (linear)
        for (int i = 0; i < MR; ++i) {
            float* o = g.out + (m0 + i) * g.ldo_m + n0;
            if (full) _mm_storeu_ps(o, v[i]);
            else _mm_maskstore_ps(o, mask, v[i]);
        }
    } else if (MR == 4 && g.ldo_m == 1) {  // [N, M] (conv's [O, OH·OW]): store columns
        __m128 c0 = v[0], c1 = v[1 % MR], c2 = v[2 % MR], c3 = v[3 % MR];
        _MM_TRANSPOSE4_PS(c0, c1, c2, c3);
        const __m128 cols[4] = {c0, c1, c2, c3};
        for (int j = 0; j < nr; ++j) _mm_storeu_ps(g.out + (n0 + j) * g.ldo_n + m0, cols[j]);
    } else {
        for (int i = 0; i < MR; ++i) {
            alignas(16) float s[4];
            _mm_store_ps(s, v[i]);
            for (int j = 0; j < nr; ++j) g.out[(m0 + i) * g.ldo_m + (n0 + j) * g.ldo_n] = s[j];
        }
    }
}

// One 32-wide chunk along K of an MR×NR tile: activations at q + i·ldq + k, weights at wp[j] + wk.
// u8 activations (7-bit weights): vpmaddubsw then vpmaddwd with ones.
template <int MR, int NR>
EDGE_AVX2 __attribute__((always_inline)) inline void step(__m256i (&acc)[MR][NR], const uint8_t* q, int64_t ldq,
                                                          int64_t k, const int8_t* const* wp, int64_t wk) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int i = 0; i < MR; ++i) {
        const __m256i qi = _mm256_load_si256(reinterpret_cast<const __m256i*>(q + i * ldq + k));
        for (int j = 0; j < NR; ++j) {
            __m256i p = _mm256_maddubs_epi16(qi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[j] + wk)));
            acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(p, ones));
        }
    }
}

// int16 activations (8-bit weights): weights widened to int16, vpmaddwd (exact for any int8).
template <int MR, int NR>
EDGE_AVX2 __attribute__((always_inline)) inline void step(__m256i (&acc)[MR][NR], const int16_t* q, int64_t ldq,
                                                          int64_t k, const int8_t* const* wp, int64_t wk) {
    for (int j = 0; j < NR; ++j) {
        const __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp[j] + wk)));
        const __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp[j] + wk + 16)));
        for (int i = 0; i < MR; ++i) {
            const int16_t* qi = q + i * ldq + k;
            __m256i a = _mm256_madd_epi16(lo, _mm256_load_si256(reinterpret_cast<const __m256i*>(qi)));
            __m256i b = _mm256_madd_epi16(hi, _mm256_load_si256(reinterpret_cast<const __m256i*>(qi + 16)));
            acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_add_epi32(a, b));
        }
    }
}

// The last, partial chunk along K: weights copied into zeroed 32-byte rows (activations are zero-padded).
template <int NR>
EDGE_AVX2 inline void tail_rows(const int8_t* const* w, int64_t k, int64_t K, int8_t (&tail)[NR][kChunk],
                                const int8_t** tp) {
    for (int j = 0; j < NR; ++j) {
        std::memset(tail[j], 0, kChunk);
        std::memcpy(tail[j], w[j] + k, static_cast<size_t>(K - k));
        tp[j] = tail[j];
    }
}

template <int MR, int NR>
EDGE_AVX2 inline void finish_tile(const Gemm& g, int64_t m0, int64_t n0, __m256i (&acc)[MR][NR]) {
    const __m256i z = _mm256_setzero_si256();
    for (int j0 = 0; j0 < NR; j0 += 4) {
        __m128i rows[MR];
        for (int i = 0; i < MR; ++i)
            rows[i] = hsum4(acc[i][j0], j0 + 1 < NR ? acc[i][(j0 + 1) % NR] : z,
                            j0 + 2 < NR ? acc[i][(j0 + 2) % NR] : z, j0 + 3 < NR ? acc[i][(j0 + 3) % NR] : z);
        store_block<MR>(g, m0, n0 + j0, NR - j0 < 4 ? NR - j0 : 4, rows);
    }
}

// Prefetch the 64-byte line at offset k of NR weight rows (the next tile's, while this one computes).
template <int NR>
EDGE_AVX2 __attribute__((always_inline)) inline void prefetch_rows(const int8_t* rows, int64_t K, int64_t k) {
    for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(rows + j * K + k), _MM_HINT_T0);
}

// Generic MR×NR tiles (intrinsics): row tails, column tails and the single-row (GEMV) tile, over
// activation codes of type Code (uint8_t for 7-bit weights, int16_t for 8-bit).
template <typename Code, int MR, int NR>
EDGE_AVX2 void tile(const Gemm& g, int64_t m0, int64_t n0, const int8_t* next = nullptr) {
    const Code* q = static_cast<const Code*>(g.q) + m0 * g.ldq;
    const int64_t ldq = g.ldq, K = g.K;
    const int8_t* w[NR];
    for (int j = 0; j < NR; ++j) w[j] = g.w + (n0 + j) * K;
    __m256i acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
    const int64_t kfull = K & ~(kChunk - 1);
    int64_t k = 0;
    for (; k < kfull; k += kChunk) {
        if (next && (k & 32) == 0) prefetch_rows<NR>(next, K, k);
        step<MR, NR>(acc, q, ldq, k, w, k);
    }
    if (k < K) {
        alignas(32) int8_t tail[NR][kChunk];
        const int8_t* tp[NR];
        tail_rows<NR>(w, k, K, tail, tp);
        step<MR, NR>(acc, q, ldq, k, tp, 0);
    }
    finish_tile<MR, NR>(g, m0, n0, acc);
}

// The main 4×3 tiles in inline asm: with intrinsics GCC hoists every row's loads and spills some of
// the 12 accumulators, putting store-to-load latency on the accumulation chains. Here ymm13–15 are
// scratch and the 12 accumulators (and the ones vector) take the other 13 registers.
#define EDGE_U8_ROW(qaddr, a0, a1, a2)                       \
    "vmovdqa " qaddr ", %%ymm13\n\t"                        \
    "vpmaddubsw (%[w0]), %%ymm13, %%ymm14\n\t"              \
    "vpmaddwd %t[ones], %%ymm14, %%ymm14\n\t"               \
    "vpaddd %%ymm14, %t[" a0 "], %t[" a0 "]\n\t"            \
    "vpmaddubsw (%[w0],%[ws],1), %%ymm13, %%ymm15\n\t"      \
    "vpmaddwd %t[ones], %%ymm15, %%ymm15\n\t"               \
    "vpaddd %%ymm15, %t[" a1 "], %t[" a1 "]\n\t"            \
    "vpmaddubsw (%[w0],%[ws],2), %%ymm13, %%ymm14\n\t"      \
    "vpmaddwd %t[ones], %%ymm14, %%ymm14\n\t"               \
    "vpaddd %%ymm14, %t[" a2 "], %t[" a2 "]\n\t"

// int16 activations: per weight row, widen 32 codes (ymm13/14), multiply into each row's accumulator.
#define EDGE_S16_COL(waddr, a0, a1, a2, a3)                  \
    "vpmovsxbw " waddr ", %%ymm13\n\t"                      \
    "vpmovsxbw 16" waddr ", %%ymm14\n\t"                    \
    "vpmaddwd (%[q]), %%ymm13, %%ymm15\n\t"                 \
    "vpaddd %%ymm15, %t[" a0 "], %t[" a0 "]\n\t"            \
    "vpmaddwd 32(%[q]), %%ymm14, %%ymm15\n\t"               \
    "vpaddd %%ymm15, %t[" a0 "], %t[" a0 "]\n\t"            \
    "vpmaddwd (%[q],%[ld],1), %%ymm13, %%ymm15\n\t"         \
    "vpaddd %%ymm15, %t[" a1 "], %t[" a1 "]\n\t"            \
    "vpmaddwd 32(%[q],%[ld],1), %%ymm14, %%ymm15\n\t"       \
    "vpaddd %%ymm15, %t[" a1 "], %t[" a1 "]\n\t"            \
    "vpmaddwd (%[q],%[ld],2), %%ymm13, %%ymm15\n\t"         \
    "vpaddd %%ymm15, %t[" a2 "], %t[" a2 "]\n\t"            \
    "vpmaddwd 32(%[q],%[ld],2), %%ymm14, %%ymm15\n\t"       \
    "vpaddd %%ymm15, %t[" a2 "], %t[" a2 "]\n\t"            \
    "vpmaddwd (%[q3]), %%ymm13, %%ymm15\n\t"                \
    "vpaddd %%ymm15, %t[" a3 "], %t[" a3 "]\n\t"            \
    "vpmaddwd 32(%[q3]), %%ymm14, %%ymm15\n\t"              \
    "vpaddd %%ymm15, %t[" a3 "], %t[" a3 "]\n\t"

#define EDGE_ACC_OPERANDS                                                                                    \
    [c00] "+x"(c00), [c01] "+x"(c01), [c02] "+x"(c02), [c10] "+x"(c10), [c11] "+x"(c11), [c12] "+x"(c12), \
        [c20] "+x"(c20), [c21] "+x"(c21), [c22] "+x"(c22), [c30] "+x"(c30), [c31] "+x"(c31), [c32] "+x"(c32)

// One 4×3 tile over K range [k0, k1) (k1 = K or a multiple of kChunk), accumulating into c[12]
// (row-major: c[3·i + j]). With `prefetch`, also pulls the next tile's weights (next_w) into L1.
template <bool S16>
EDGE_AVX2 __attribute__((always_inline)) inline void kernel4x3(const Gemm& g, int64_t m0, const int8_t* w,
                                                               int64_t k0, int64_t k1, __m256i (&c)[12],
                                                               const int8_t* next_w) {
    const int64_t ldq = g.ldq, K = g.K, kfull = K & ~(kChunk - 1);
    __m256i c00 = c[0], c01 = c[1], c02 = c[2], c10 = c[3], c11 = c[4], c12 = c[5], c20 = c[6], c21 = c[7],
            c22 = c[8], c30 = c[9], c31 = c[10], c32 = c[11];
    alignas(32) int8_t tail[3][kChunk];
    for (int64_t k = k0; k < k1; k += kChunk) {
        const int8_t* w0 = w + k;  // weight rows w0, w0 + ws, w0 + 2·ws
        int64_t ws = K;
        if (k == kfull) {
            const int8_t* rows[3] = {w, w + K, w + 2 * K};
            const int8_t* tp[3];
            tail_rows<3>(rows, k, K, tail, tp);
            w0 = tail[0], ws = kChunk;
        }
        if (next_w && (k & 32) == 0) {  // one prefetch per 64-byte line of each of the next 3 rows
            const char* nx = reinterpret_cast<const char*>(next_w + k);
            _mm_prefetch(nx, _MM_HINT_T0);
            _mm_prefetch(nx + K, _MM_HINT_T0);
            _mm_prefetch(nx + 2 * K, _MM_HINT_T0);
        }
        if (!S16) {
            const uint8_t* qk = static_cast<const uint8_t*>(g.q) + m0 * ldq + k;
            const uint8_t* q3 = qk + 3 * ldq;
            const __m256i ones = _mm256_set1_epi16(1);
            asm(EDGE_U8_ROW("(%[q])", "c00", "c01", "c02")
                EDGE_U8_ROW("(%[q],%[ld],1)", "c10", "c11", "c12")
                EDGE_U8_ROW("(%[q],%[ld],2)", "c20", "c21", "c22")
                EDGE_U8_ROW("(%[q3])", "c30", "c31", "c32")
                : EDGE_ACC_OPERANDS
                : [ones] "x"(ones), [q] "r"(qk), [ld] "r"(ldq), [q3] "r"(q3), [w0] "r"(w0), [ws] "r"(ws)
                : "xmm13", "xmm14", "xmm15", "memory");
        } else {
            const int16_t* qk = static_cast<const int16_t*>(g.q) + m0 * ldq + k;
            const int16_t* q3 = qk + 3 * ldq;
            const int64_t ld_bytes = ldq * 2;
            asm(EDGE_S16_COL("(%[w0])", "c00", "c10", "c20", "c30")
                EDGE_S16_COL("(%[w0],%[ws],1)", "c01", "c11", "c21", "c31")
                EDGE_S16_COL("(%[w0],%[ws],2)", "c02", "c12", "c22", "c32")
                : EDGE_ACC_OPERANDS
                : [q] "r"(qk), [ld] "r"(ld_bytes), [q3] "r"(q3), [w0] "r"(w0), [ws] "r"(ws)
                : "xmm13", "xmm14", "xmm15", "memory");
        }
    }
    c[0] = c00, c[1] = c01, c[2] = c02, c[3] = c10, c[4] = c11, c[5] = c12;
    c[6] = c20, c[7] = c21, c[8] = c22, c[9] = c30, c[10] = c31, c[11] = c32;
}

template <bool S16>
EDGE_AVX2 inline void finish4x3(const Gemm& g, int64_t m0, int64_t n, const __m256i (&c)[12]) {
    const __m256i z = _mm256_setzero_si256();
    const __m128i rows[4] = {hsum4(c[0], c[1], c[2], z), hsum4(c[3], c[4], c[5], z), hsum4(c[6], c[7], c[8], z),
                             hsum4(c[9], c[10], c[11], z)};
    store_block<4>(g, m0, n, 3, rows);
}

// Rows m0..m0+3 against weight rows [n_lo, n_hi): 4×3 tiles over the whole K (the 4 activation rows
// stay in L1 while the weights stream past, so K needs no blocking), then a 4×1 or 4×2 tile.
// `prefetch`: the weights are not in cache yet (the task's first strip), so prefetch them a tile ahead.
template <bool S16>
EDGE_AVX2 void strip4(const Gemm& g, int64_t m0, int64_t n_lo, int64_t n_hi, bool prefetch) {
    const int64_t K = g.K;
    int64_t n = n_lo;
    for (; n + 3 <= n_hi; n += 3) {
        __m256i c[12];
        for (auto& v : c) v = _mm256_setzero_si256();
        kernel4x3<S16>(g, m0, g.w + n * K, 0, K, c, prefetch && n + 6 <= n_hi ? g.w + (n + 3) * K : nullptr);
        finish4x3<S16>(g, m0, n, c);
    }
    using Code = std::conditional_t<S16, int16_t, uint8_t>;
    if (n_hi - n == 2) tile<Code, 4, 2>(g, m0, n, nullptr);
    if (n_hi - n == 1) tile<Code, 4, 1>(g, m0, n, nullptr);
}

using TileFn = void (*)(const Gemm&, int64_t, int64_t, const int8_t*);

#define EDGE_TILE_ROW(T, mr) {tile<T, mr, 1>, tile<T, mr, 2>, tile<T, mr, 3>, tile<T, mr, 4>}
#define EDGE_TILE_TABLE(T) {EDGE_TILE_ROW(T, 1), EDGE_TILE_ROW(T, 2), EDGE_TILE_ROW(T, 3)}
const TileFn kTilesU8[3][4] = EDGE_TILE_TABLE(uint8_t);   // [mr − 1][nr − 1], mr ≤ 3
const TileFn kTilesS16[3][4] = EDGE_TILE_TABLE(int16_t);
constexpr int kNRRow = 8;  // weight rows per tile for a single activation row (a GEMV)

// Rows m0..m0+mr−1 (mr ≤ 3) against weight rows [n_lo, n_hi).
template <bool S16>
EDGE_AVX2 void strip_small(const Gemm& g, int64_t m0, int mr, int64_t n_lo, int64_t n_hi) {
    using Code = std::conditional_t<S16, int16_t, uint8_t>;
    int64_t n = n_lo;
    if (mr == 1)
        for (; n + kNRRow <= n_hi; n += kNRRow)
            tile<Code, 1, kNRRow>(g, m0, n, n + 2 * kNRRow <= n_hi ? g.w + (n + kNRRow) * g.K : nullptr);
    for (; n < n_hi; n += 4) {
        const int nr = static_cast<int>(std::min<int64_t>(4, n_hi - n));
        (S16 ? kTilesS16 : kTilesU8)[mr - 1][nr - 1](g, m0, n, nullptr);
    }
}
#endif

constexpr int kMR = 4;  // activation rows per tile

void run_task(const Gemm& g, int64_t t) {
    const int64_t nbi = t / g.m_blocks, mbi = t % g.m_blocks;
    const int64_t n_lo = nbi * g.nb, n_hi = std::min(g.N, n_lo + g.nb);
    const int64_t m_lo = mbi * g.mb, m_hi = std::min(g.M, m_lo + g.mb);
    for (int64_t m = m_lo; m < m_hi; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, m_hi - m));
#if EDGE_X86
        if (g.path != kPortable) {
            const bool s16 = g.path == kAvx2S16;
            if (mr == kMR) (s16 ? strip4<true> : strip4<false>)(g, m, n_lo, n_hi, m == m_lo);
            else (s16 ? strip_small<true> : strip_small<false>)(g, m, mr, n_lo, n_hi);
            continue;
        }
#endif
        for (int64_t n = n_lo; n < n_hi; n += 4) tile_portable(g, m, n, mr, static_cast<int>(std::min<int64_t>(4, n_hi - n)));
    }
}

}  // namespace

int plan(Gemm& g, int nthreads) {
    const int64_t unit = 24;  // a multiple of the tiles' widths (3, 4, 8)
    int64_t nb = std::max<int64_t>(unit, (256 * 1024 / std::max<int64_t>(g.K, 1)) / unit * unit);
    nb = std::min(nb, round_up(g.N, unit));
    g.nb = nb;
    g.n_blocks = ceil_div(g.N, nb);
    const double macs = static_cast<double>(g.M) * g.N * g.K;
    int nt = macs < 262144.0 ? 1 : std::max(1, nthreads);
    const int64_t want = nt > 1 ? 8 * nt : 1;
    const int64_t m_split = std::max<int64_t>(1, ceil_div(want, g.n_blocks));
    g.mb = round_up(std::max<int64_t>(1, ceil_div(g.M, m_split)), kMR);
    g.m_blocks = ceil_div(g.M, g.mb);
    const int64_t tasks = g.n_blocks * g.m_blocks;
    return static_cast<int>(std::min<int64_t>(nt, tasks));
}

void gemm_parallel(const Gemm& g, int nt) {
    const int64_t tasks = g.n_blocks * g.m_blocks;
    // dynamic: on a shared machine a descheduled thread's blocks are taken over by the others
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
    for (int64_t t = 0; t < tasks; ++t) run_task(g, t);
}

void gemm_serial(const Gemm& g) {
    const int64_t tasks = g.n_blocks * g.m_blocks;
    for (int64_t t = 0; t < tasks; ++t) run_task(g, t);
}

}  // namespace edge::int8
