// The int8 linear on weights packed in panels (edge_int8_linear_packed), dense or 2:4 sparse.
//
// Layout (ops.pack_int8_panels / pack_int8_panels_24 make it once, when the graph is lowered): the
// output channels in panels of kPanel (the last one narrower, rounded up to 8 with zero channels);
// inside a panel, for each step along K, each channel's kStepCodes codes side by side:
//   dense:  step = 4 values of K, codes w[n, 4s .. 4s+3];
//   sparse: step = 8 values of K (two groups of 4, two weights kept in each), codes the 4 kept weights
//           and, in `shuffle` at the same offsets, the position (0..7) of each one's activation in the step.
// So one 32-byte load holds 8 channels × 4 codes, and the micro-kernel broadcasts 4 (dense) or 8
// (sparse) activation codes of a row to all lanes — vpshufb then picks each channel's 4 in the sparse
// case — and vpmaddubsw + vpmaddwd(ones) add 8 channels' 4-term dot products into 8 int32 lanes. The
// accumulators are the output vectors themselves: no horizontal sums, and the dequant epilogue runs 8
// channels at a time. The sparse kernel does the same work per step as the dense one but a step covers
// 8 values of K instead of 4: half the multiplies.
//
// Tasks: (panel, block of rows) pairs over OpenMP threads; a panel (kPanel × K codes) stays in L1/L2
// while the rows of its block stream past.
#include <algorithm>
#include <cstring>

#include <omp.h>

#include "gemm.h"

namespace edge::int8 {
namespace {

constexpr int kMRows = 4;  // activation rows per micro-tile

int64_t step_values(const Panels& p) { return p.shuffle ? 8 : 4; }

// Panel `pi`'s first code and its width in channels (a multiple of 8).
const int8_t* panel_codes(const Panels& p, int64_t pi, int64_t* width) {
    const int64_t n0 = pi * kPanel;
    *width = std::min<int64_t>(kPanel, round_up(p.N - n0, 8));
    return p.w + n0 * p.steps * kStepCodes;
}

// (float)(acc − zp·wsum) · s_m · w_scale (+ bias), the same float ops in the same order as dequant().
EDGE_NO_CONTRACT void store_portable(const Panels& p, int64_t m, int64_t n, int32_t acc) {
    const float rs = p.row_scale ? p.row_scale[m] : p.scale;
    p.out[m * p.N + n] = dequant(acc, p.zp, p.wsum[n], rs, p.wscale[n], p.bias ? p.bias + n : nullptr);
}

void panel_portable(const Panels& p, int64_t pi, int64_t m_lo, int64_t m_hi) {
    int64_t width;
    const int8_t* w = panel_codes(p, pi, &width);
    const uint8_t* sh = p.shuffle ? p.shuffle + (w - p.w) : nullptr;
    const int64_t n0 = pi * kPanel, sv = step_values(p);
    for (int64_t m = m_lo; m < m_hi; ++m) {
        const uint8_t* q = p.q + m * p.ldq;
        for (int64_t c = 0; c < width && n0 + c < p.N; ++c) {
            int32_t acc = 0;
            for (int64_t s = 0; s < p.steps; ++s)
                for (int t = 0; t < kStepCodes; ++t) {
                    const int64_t at = (s * width + c) * kStepCodes + t;
                    // & 7 keeps the read inside the step whatever the byte (as vpshufb does for 0..15)
                    acc += static_cast<int32_t>(q[s * sv + (sh ? sh[at] & 7 : t)]) * static_cast<int32_t>(w[at]);
                }
            store_portable(p, m, n0 + c, acc);
        }
    }
}

#if EDGE_X86
// MR rows × NV vectors of 8 channels over every step: the panel's codes at w (stride `width` channels
// per step), activation rows at q + i·ldq.
template <int MR, int NV, bool Sparse>
EDGE_AVX2 inline void tile(const Panels& p, const uint8_t* q, const int8_t* w, const uint8_t* sh, int64_t width,
                           __m256i (&acc)[MR][NV]) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t stride = width * kStepCodes;
    for (int64_t s = 0; s < p.steps; ++s, w += stride, sh += Sparse ? stride : 0) {
        for (int i = 0; i < MR; ++i) {
            const uint8_t* qs = q + i * p.ldq + s * (Sparse ? 8 : 4);
            __m256i a;
            if (Sparse) {
                int64_t v;
                std::memcpy(&v, qs, 8);
                a = _mm256_set1_epi64x(v);
            } else {
                int32_t v;
                std::memcpy(&v, qs, 4);
                a = _mm256_set1_epi32(v);
            }
            for (int j = 0; j < NV; ++j) {
                __m256i x = a;
                if (Sparse) x = _mm256_shuffle_epi8(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sh + 32 * j)));
                const __m256i prod = _mm256_maddubs_epi16(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * j)));
                acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(prod, ones));
            }
        }
    }
}

// Dequantizes and stores acc (rows m0.., channels n0..): 8 channels a vector; masked loads and stores
// (slow on AMD) only for the vector that crosses N.
template <int MR, int NV>
EDGE_AVX2 void store_tile(const Panels& p, int64_t m0, int64_t n0, const __m256i (&acc)[MR][NV]) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int j = 0; j < NV; ++j) {
        const int64_t n = n0 + 8 * j;
        if (n >= p.N) break;
        const bool full = n + 8 <= p.N;
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(8, p.N - n))), lane);
        const __m256i wsum = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.wsum + n))
                                  : _mm256_maskload_epi32(p.wsum + n, mask);
        const __m256i corr = _mm256_mullo_epi32(wsum, _mm256_set1_epi32(p.zp));
        const __m256 ws = full ? _mm256_loadu_ps(p.wscale + n) : _mm256_maskload_ps(p.wscale + n, mask);
        __m256 bias = _mm256_setzero_ps();
        if (p.bias) bias = full ? _mm256_loadu_ps(p.bias + n) : _mm256_maskload_ps(p.bias + n, mask);
        for (int i = 0; i < MR; ++i) {
            const float rs = p.row_scale ? p.row_scale[m0 + i] : p.scale;
            __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][j], corr));
            v = _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(rs)), ws);
            if (p.bias) v = _mm256_add_ps(v, bias);
            float* o = p.out + (m0 + i) * p.N + n;
            if (full) _mm256_storeu_ps(o, v);
            else _mm256_maskstore_ps(o, mask, v);
        }
    }
}

// The main 4×3 tile in inline asm: with intrinsics GCC keeps the three weight vectors in registers and
// spills accumulators. Here the 12 accumulators and the ones vector take 13 registers, ymm13–15 are
// scratch, and weights (and shuffles) are memory operands.
#define EDGE_PANEL_ROW(qaddr, bcast, a0, a1, a2)                              \
    bcast " " qaddr ", %%ymm13\n\t"                                          \
    EDGE_PANEL_COL("0", "%%ymm14", a0) EDGE_PANEL_COL("32", "%%ymm15", a1) EDGE_PANEL_COL("64", "%%ymm14", a2)
#define EDGE_DENSE_COL(off, t, acc)                                           \
    "vpmaddubsw " off "(%[w]), %%ymm13, " t "\n\t"                          \
    "vpmaddwd %t[ones], " t ", " t "\n\t"                                   \
    "vpaddd " t ", %t[" acc "], %t[" acc "]\n\t"
#define EDGE_SPARSE_COL(off, t, acc)                                          \
    "vpshufb " off "(%[sh]), %%ymm13, " t "\n\t"                            \
    "vpmaddubsw " off "(%[w]), " t ", " t "\n\t"                            \
    "vpmaddwd %t[ones], " t ", " t "\n\t"                                   \
    "vpaddd " t ", %t[" acc "], %t[" acc "]\n\t"
#define EDGE_PANEL_TILE(bcast)                                                                      \
    EDGE_PANEL_ROW("(%[q])", bcast, "c00", "c01", "c02") EDGE_PANEL_ROW("(%[q],%[ld],1)", bcast, "c10", "c11", "c12") \
    EDGE_PANEL_ROW("(%[q],%[ld],2)", bcast, "c20", "c21", "c22") EDGE_PANEL_ROW("(%[q3])", bcast, "c30", "c31", "c32")
#define EDGE_PANEL_ACC                                                                                    \
    [c00] "+x"(c00), [c01] "+x"(c01), [c02] "+x"(c02), [c10] "+x"(c10), [c11] "+x"(c11), [c12] "+x"(c12), \
        [c20] "+x"(c20), [c21] "+x"(c21), [c22] "+x"(c22), [c30] "+x"(c30), [c31] "+x"(c31), [c32] "+x"(c32)

template <bool Sparse>
EDGE_AVX2 inline void tile4x3(const Panels& p, const uint8_t* q, const int8_t* w, const uint8_t* sh,
                              __m256i (&acc)[4][3]) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t ld = p.ldq, stride = kPanel * kStepCodes, qstep = Sparse ? 8 : 4;
    // named locals, not an array: GCC keeps an array in memory across the asm statements
    __m256i c00 = acc[0][0], c01 = acc[0][1], c02 = acc[0][2], c10 = acc[1][0], c11 = acc[1][1], c12 = acc[1][2],
            c20 = acc[2][0], c21 = acc[2][1], c22 = acc[2][2], c30 = acc[3][0], c31 = acc[3][1], c32 = acc[3][2];
    for (int64_t s = 0; s < p.steps; ++s, q += qstep, w += stride, sh += Sparse ? stride : 0) {
        const uint8_t* q3 = q + 3 * ld;
        if (Sparse) {
#define EDGE_PANEL_COL EDGE_SPARSE_COL
            asm(EDGE_PANEL_TILE("vpbroadcastq")
                : EDGE_PANEL_ACC
                : [ones] "x"(ones), [q] "r"(q), [ld] "r"(ld), [q3] "r"(q3), [w] "r"(w), [sh] "r"(sh)
                : "xmm13", "xmm14", "xmm15", "memory");
#undef EDGE_PANEL_COL
        } else {
#define EDGE_PANEL_COL EDGE_DENSE_COL
            asm(EDGE_PANEL_TILE("vpbroadcastd")
                : EDGE_PANEL_ACC
                : [ones] "x"(ones), [q] "r"(q), [ld] "r"(ld), [q3] "r"(q3), [w] "r"(w)
                : "xmm13", "xmm14", "xmm15", "memory");
#undef EDGE_PANEL_COL
        }
    }
    acc[0][0] = c00, acc[0][1] = c01, acc[0][2] = c02, acc[1][0] = c10, acc[1][1] = c11, acc[1][2] = c12;
    acc[2][0] = c20, acc[2][1] = c21, acc[2][2] = c22, acc[3][0] = c30, acc[3][1] = c31, acc[3][2] = c32;
}

template <int MR, int NV, bool Sparse>
EDGE_AVX2 void run_tile(const Panels& p, int64_t m0, int64_t pi) {
    int64_t width;
    const int8_t* w = panel_codes(p, pi, &width);
    const uint8_t* sh = Sparse ? p.shuffle + (w - p.w) : nullptr;
    __m256i acc[MR][NV];
    for (auto& row : acc)
        for (auto& v : row) v = _mm256_setzero_si256();
    if constexpr (MR == 4 && NV == 3) tile4x3<Sparse>(p, p.q + m0 * p.ldq, w, sh, acc);
    else tile<MR, NV, Sparse>(p, p.q + m0 * p.ldq, w, sh, width, acc);
    store_tile<MR, NV>(p, m0, pi * kPanel, acc);
}

using TileFn = void (*)(const Panels&, int64_t, int64_t);

template <bool Sparse>
struct Tiles {
    static constexpr TileFn table[kMRows][3] = {
        {run_tile<1, 1, Sparse>, run_tile<1, 2, Sparse>, run_tile<1, 3, Sparse>},
        {run_tile<2, 1, Sparse>, run_tile<2, 2, Sparse>, run_tile<2, 3, Sparse>},
        {run_tile<3, 1, Sparse>, run_tile<3, 2, Sparse>, run_tile<3, 3, Sparse>},
        {run_tile<4, 1, Sparse>, run_tile<4, 2, Sparse>, run_tile<4, 3, Sparse>}};
};

void panel_avx2(const Panels& p, int64_t pi, int64_t m_lo, int64_t m_hi) {
    int64_t width;
    panel_codes(p, pi, &width);
    const TileFn* row = nullptr;
    for (int64_t m = m_lo; m < m_hi; m += kMRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kMRows, m_hi - m));
        row = p.shuffle ? Tiles<true>::table[mr - 1] : Tiles<false>::table[mr - 1];
        row[width / 8 - 1](p, m, pi);
    }
}
#endif

}  // namespace

void gemm_panels(const Panels& p, int nthreads) {
    const int64_t panels = ceil_div(p.N, kPanel);
    const double macs = static_cast<double>(p.M) * p.N * p.K;
    const int nt = macs < 262144.0 ? 1 : std::max(1, nthreads);
    // Enough tasks for the dynamic schedule to even out a descheduled thread: split rows when panels are few.
    const int64_t m_split = std::max<int64_t>(1, ceil_div(8 * nt, panels));
    const int64_t mb = round_up(std::max<int64_t>(1, ceil_div(p.M, m_split)), kMRows);
    const int64_t m_blocks = ceil_div(p.M, mb), tasks = panels * m_blocks;
    const bool avx2 = p.path != kPortable;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (nt > 1)
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t pi = t / m_blocks, m_lo = (t % m_blocks) * mb, m_hi = std::min(p.M, m_lo + mb);
#if EDGE_X86
        if (avx2) {
            panel_avx2(p, pi, m_lo, m_hi);
            continue;
        }
#endif
        (void)avx2;
        panel_portable(p, pi, m_lo, m_hi);
    }
}

}  // namespace edge::int8
