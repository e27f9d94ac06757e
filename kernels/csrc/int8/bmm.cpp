// edge_int8_bmm's work on checked arguments: out[b] = sa·sb · (qa[b] − za)·(qb[b] − zb), a batched
// matmul of two activations, both quantized here (static per-tensor u8, as edge_int8_linear's x).
//
// Two activations give u8·u8 products, which vpmaddubsw's saturating 16-bit pairs cannot hold; the
// codes are stored centered (q − zp ∈ [−255, 255]) as int16 and multiplied with vpmaddwd, whose int32
// pair sums are exact. Centering while packing is the zero-point correction: nothing is left to
// subtract afterwards.
//
// Layouts (per batch item): A rows [M, Kp], Kp = K rounded up to even, zero-padded; B in K pairs
// [Kp/2, Np, 2] (an int32 word per pair), Np = N rounded up to kNR, zero-padded (from B [K, N], or
// Bᵀ [N, K] for Q·Kᵀ without a transpose copy). The micro-kernel broadcasts one (a[m,k], a[m,k+1]) pair against 8 columns' pairs,
// so each int32 lane is one output: no horizontal sums, which would dominate at attention's short K.
// Threads take whole batch items where there are enough (batch·heads usually is), else blocks of rows.
#include <algorithm>
#include <cstring>

#include <omp.h>

#include "int8.h"

namespace edge::int8 {
namespace {

constexpr int64_t kMR = 4;   // output rows per tile
constexpr int64_t kNR = 16;  // output columns per tile: two vectors of 8 int32

// The packed operands: item bi's at a + bi·a_item and b + bi·b_item (strides of 0: one item's buffers,
// private to a thread, reused for every item it runs).
struct Packed {
    int16_t* a;              // [M, Kp] per item
    int16_t* b;              // [Kp/2, Np, 2] per item
    int64_t Kp, Np, a_item, b_item;

    int16_t* a_of(int64_t bi) const { return a + bi * a_item; }
    int16_t* b_of(int64_t bi) const { return b + bi * b_item; }
};

void quant_centered_portable(const float* x, int64_t n, float inv, int32_t zp, int16_t* q) {
    quant_static(x, n, inv, static_cast<float>(zp), q, false);
    for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int16_t>(q[i] - zp);
}

#if EDGE_X86
// clamp(round(x·inv), −zp, 255 − zp): quant_static's clamp(round(x·inv) + zp, 0, 255) − zp in one
// pass (the sum is exact wherever the clamp does not saturate; NaN reads as code 0 here too).
EDGE_AVX2 inline __m256i centered8(const float* x, __m256 inv, __m256 lo, __m256 hi) {
    const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));  // max(NaN, lo) = lo
}

EDGE_AVX2 void quant_centered_avx2(const float* x, int64_t n, float inv, int32_t zp, int16_t* q) {
    const __m256 vinv = _mm256_set1_ps(inv), lo = _mm256_set1_ps(static_cast<float>(-zp)),
                 hi = _mm256_set1_ps(static_cast<float>(255 - zp));
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i pairs = _mm256_packs_epi32(centered8(x + i, vinv, lo, hi), centered8(x + i + 8, vinv, lo, hi));
        const __m256i v = _mm256_permute4x64_epi64(pairs, 0xD8);  // packs interleaves the 128-bit lanes
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), v);
    }
    quant_centered_portable(x + i, n - i, inv, zp, q + i);
}
#endif

// q − zp of static u8 codes (torch's quantize_per_tensor), as int16.
void quant_centered(const float* x, int64_t n, float inv, int32_t zp, int16_t* q, bool avx2) {
#if EDGE_X86
    if (avx2) return quant_centered_avx2(x, n, inv, zp, q);
#endif
    quant_centered_portable(x, n, inv, zp, q);
}

void pack_a(const BmmArgs& g, const Packed& p, int64_t bi, bool avx2) {
    const float inv = static_cast<float>(1.0 / g.a_scale);
    for (int64_t m = 0; m < g.M; ++m) {
        int16_t* row = p.a_of(bi) + m * p.Kp;
        quant_centered(g.a + (bi * g.M + m) * g.K, g.K, inv, g.a_zero_point, row, avx2);
        std::fill(row + g.K, row + p.Kp, int16_t(0));
    }
}

// One int32 word of the pair layout: a's code in the low half, b's in the high (little-endian int16 pairs).
inline uint32_t pair(int16_t lo, int16_t hi) {
    return static_cast<uint16_t>(lo) | static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16;
}

// B's codes into K pairs, as int32 words [Kp/2, Np]; `rows` is scratch for two quantized source rows
// (2·max(Kp, N) values).
void pack_b(const BmmArgs& g, const Packed& p, int64_t bi, bool avx2, int16_t* rows) {
    const float inv = static_cast<float>(1.0 / g.b_scale);
    uint32_t* dst = reinterpret_cast<uint32_t*>(p.b_of(bi));
    const int64_t pairs = p.Kp / 2;
    const float* src = g.b + bi * g.K * g.N;
    if (g.transpose_b) {  // src is [N, K]: row n's consecutive pairs go down column n
        for (int64_t n = 0; n < g.N; ++n) {
            quant_centered(src + n * g.K, g.K, inv, g.b_zero_point, rows, avx2);
            rows[p.Kp - 1] = g.K < p.Kp ? int16_t(0) : rows[p.Kp - 1];
            for (int64_t k = 0; k < pairs; ++k) dst[k * p.Np + n] = pair(rows[2 * k], rows[2 * k + 1]);
        }
    } else {  // src is [K, N]: rows k and k + 1 interleave into one row of pairs
        int16_t *even = rows, *odd = rows + g.N;
        for (int64_t k = 0; k < pairs; ++k) {
            quant_centered(src + 2 * k * g.N, g.N, inv, g.b_zero_point, even, avx2);
            if (2 * k + 1 < g.K) quant_centered(src + (2 * k + 1) * g.N, g.N, inv, g.b_zero_point, odd, avx2);
            else std::fill(odd, odd + g.N, int16_t(0));
            uint32_t* d = dst + k * p.Np;
            for (int64_t n = 0; n < g.N; ++n) d[n] = pair(even[n], odd[n]);
        }
    }
    for (int64_t k = 0; k < pairs; ++k) std::fill(dst + k * p.Np + g.N, dst + (k + 1) * p.Np, 0u);
}

// The exact sum times the combined scale: (float)acc · (float)(sa·sb).
inline float dequant(int32_t acc, float scale) { return static_cast<float>(acc) * scale; }

void tile_portable(const BmmArgs& g, const Packed& p, int64_t bi, int64_t m0, int mr, int64_t n0, float scale) {
    const int16_t* bp = p.b_of(bi);
    const int64_t n_hi = std::min(g.N, n0 + kNR);
    for (int i = 0; i < mr; ++i) {
        const int16_t* ar = p.a_of(bi) + (m0 + i) * p.Kp;
        float* o = g.out + (bi * g.M + m0 + i) * g.N;
        for (int64_t n = n0; n < n_hi; ++n) {
            int32_t s = 0;
            for (int64_t k = 0; k < p.Kp; k += 2) {
                const int16_t* bk = bp + ((k >> 1) * p.Np + n) * 2;
                s += int32_t{ar[k]} * bk[0] + int32_t{ar[k + 1]} * bk[1];
            }
            o[n] = dequant(s, scale);
        }
    }
}

#if EDGE_X86
// Stores 8 outputs of one row (the first `r` of them when the row ends inside the vector).
EDGE_AVX2 inline void store8(float* o, __m256i acc, __m256 scale, int64_t r) {
    const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), scale);
    if (r >= 8) return _mm256_storeu_ps(o, v);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(r)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_maskstore_ps(o, mask, v);
}

// One K pair of a 4×16 tile in inline asm: with intrinsics GCC copies every accumulator between
// registers on each step (its adds land in the multiply's register), a third more instructions.
// ymm12–15 are scratch; the 8 accumulators take other registers.
#define EDGE_BMM_ROW(aaddr, c0, c1)                 \
    "vpbroadcastd " aaddr ", %%ymm14\n\t"          \
    "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"       \
    "vpaddd %%ymm15, %t[" c0 "], %t[" c0 "]\n\t"   \
    "vpmaddwd %%ymm13, %%ymm14, %%ymm14\n\t"       \
    "vpaddd %%ymm14, %t[" c1 "], %t[" c1 "]\n\t"

EDGE_AVX2 inline void tile4_steps(const int16_t* a, int64_t Kp, const int16_t* bp, int64_t b_step, __m256i (&acc)[4][2]) {
    __m256i c00 = acc[0][0], c01 = acc[0][1], c10 = acc[1][0], c11 = acc[1][1], c20 = acc[2][0], c21 = acc[2][1],
            c30 = acc[3][0], c31 = acc[3][1];
    const int64_t ld = Kp * static_cast<int64_t>(sizeof(int16_t));
    for (int64_t k = 0; k < Kp; k += 2, bp += b_step) {
        const int16_t* a0 = a + k;
        const int16_t* a3 = a0 + 3 * Kp;
        asm("vmovdqu (%[b]), %%ymm12\n\t"
            "vmovdqu 32(%[b]), %%ymm13\n\t"
            EDGE_BMM_ROW("(%[a0])", "c00", "c01")
            EDGE_BMM_ROW("(%[a0],%[ld],1)", "c10", "c11")
            EDGE_BMM_ROW("(%[a0],%[ld],2)", "c20", "c21")
            EDGE_BMM_ROW("(%[a3])", "c30", "c31")
            : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20),
              [c21] "+x"(c21), [c30] "+x"(c30), [c31] "+x"(c31)
            : [b] "r"(bp), [a0] "r"(a0), [ld] "r"(ld), [a3] "r"(a3)
            : "xmm12", "xmm13", "xmm14", "xmm15", "memory");
    }
    acc[0][0] = c00, acc[0][1] = c01, acc[1][0] = c10, acc[1][1] = c11;
    acc[2][0] = c20, acc[2][1] = c21, acc[3][0] = c30, acc[3][1] = c31;
}

template <int MR>
EDGE_AVX2 void tile_avx2(const BmmArgs& g, const Packed& p, int64_t bi, int64_t m0, int64_t n0, float scale) {
    const int16_t* bp = p.b_of(bi) + n0 * 2;
    const int16_t* a = p.a_of(bi) + m0 * p.Kp;
    __m256i acc[MR][2];
    for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    if constexpr (MR == 4) {
        tile4_steps(a, p.Kp, bp, p.Np * 2, acc);
    } else {
        for (int64_t k = 0; k < p.Kp; k += 2, bp += p.Np * 2) {
            const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp));
            const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + 16));
            for (int i = 0; i < MR; ++i) {
                int32_t pair;
                std::memcpy(&pair, a + i * p.Kp + k, sizeof(pair));
                const __m256i av = _mm256_set1_epi32(pair);
                acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(av, b0));
                acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(av, b1));
            }
        }
    }
    const __m256 s = _mm256_set1_ps(scale);
    const int64_t left = g.N - n0;
    for (int i = 0; i < MR; ++i) {
        float* o = g.out + (bi * g.M + m0 + i) * g.N + n0;
        store8(o, acc[i][0], s, left);
        if (left > 8) store8(o + 8, acc[i][1], s, left - 8);
    }
}

EDGE_AVX2 void rows_avx2(const BmmArgs& g, const Packed& p, int64_t bi, int64_t m0, int mr, int64_t n0,
                         float scale) {
    switch (mr) {
        case 4: return tile_avx2<4>(g, p, bi, m0, n0, scale);
        case 3: return tile_avx2<3>(g, p, bi, m0, n0, scale);
        case 2: return tile_avx2<2>(g, p, bi, m0, n0, scale);
        default: return tile_avx2<1>(g, p, bi, m0, n0, scale);
    }
}
#endif

// Rows [m_lo, m_hi) of batch item bi, all columns.
void run_task(const BmmArgs& g, const Packed& p, int64_t bi, int64_t m_lo, int64_t m_hi, Path path, float scale) {
    for (int64_t m = m_lo; m < m_hi; m += kMR) {
        const int mr = static_cast<int>(std::min(kMR, m_hi - m));
        for (int64_t n = 0; n < g.N; n += kNR) {
#if EDGE_X86
            if (path != kPortable) {
                rows_avx2(g, p, bi, m, mr, n, scale);
                continue;
            }
#endif
            tile_portable(g, p, bi, m, mr, n, scale);
        }
    }
}

// Packs the whole batch, then runs batch items × blocks of rows: for batches too small to give every
// thread whole items.
int32_t bmm_row_blocks(const BmmArgs& g, Packed p, Path path, int nt, float scale) {
    Buffer abuf, bbuf;
    p.a_item = g.M * p.Kp, p.b_item = p.Kp * p.Np;
    p.a = static_cast<int16_t*>(abuf.get(static_cast<size_t>(g.batch * p.a_item) * sizeof(int16_t)));
    p.b = static_cast<int16_t*>(bbuf.get(static_cast<size_t>(g.batch * p.b_item) * sizeof(int16_t)));
    if (!p.a || !p.b) return refuse(kNoMemory, "int8 kernels: out of memory");
    const int64_t want = nt > 1 ? 8 * nt : 1;
    const int64_t m_split = std::clamp<int64_t>(ceil_div(want, g.batch), 1, ceil_div(g.M, kMR));
    const int64_t mb = round_up(ceil_div(g.M, m_split), kMR), m_blocks = ceil_div(g.M, mb);
    bool ok = true;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        Buffer rbuf;
        int16_t* rows = static_cast<int16_t*>(rbuf.get(static_cast<size_t>(2 * std::max(p.Kp, g.N)) * sizeof(int16_t)));
        if (!rows) {
#pragma omp atomic write
            ok = false;
        }
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < g.batch; ++bi) {
            if (!rows) continue;
            pack_a(g, p, bi, path != kPortable);
            pack_b(g, p, bi, path != kPortable, rows);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < g.batch * m_blocks; ++t) {
            const int64_t bi = t / m_blocks, m_lo = t % m_blocks * mb;
            if (ok) run_task(g, p, bi, m_lo, std::min(g.M, m_lo + mb), path, scale);
        }
    }
    return ok ? kOk : refuse(kNoMemory, "int8 kernels: out of memory");
}

// One task per batch item, packed into the thread's own buffers and multiplied while they are in
// cache, with no barrier between packing and multiplying.
int32_t bmm_items(const BmmArgs& g, const Packed& shape, Path path, int nt, float scale) {
    bool ok = true;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        Buffer abuf, bbuf, rbuf;
        Packed p = shape;
        p.a = static_cast<int16_t*>(abuf.get(static_cast<size_t>(g.M * p.Kp) * sizeof(int16_t)));
        p.b = static_cast<int16_t*>(bbuf.get(static_cast<size_t>(p.Kp * p.Np) * sizeof(int16_t)));
        int16_t* rows = static_cast<int16_t*>(rbuf.get(static_cast<size_t>(2 * std::max(p.Kp, g.N)) * sizeof(int16_t)));
        const bool mine = p.a && p.b && rows;
        if (!mine) {
#pragma omp atomic write
            ok = false;
        }
        // dynamic: on a shared machine a descheduled thread's items are taken over by the others
#pragma omp for schedule(dynamic, 1)
        for (int64_t bi = 0; bi < g.batch; ++bi) {
            if (!mine) continue;
            pack_a(g, p, bi, path != kPortable);
            pack_b(g, p, bi, path != kPortable, rows);
            run_task(g, p, bi, 0, g.M, path, scale);
        }
    }
    return ok ? kOk : refuse(kNoMemory, "int8 kernels: out of memory");
}

}  // namespace

int32_t bmm(const BmmArgs& g, Path path, int nthreads) {
    const Packed shape{nullptr, nullptr, round_up(g.K, 2), round_up(g.N, kNR), 0, 0};
    const double macs = static_cast<double>(g.batch) * g.M * g.N * g.K;
    const int nt = macs < 262144.0 ? 1 : std::max(1, nthreads);
    const float scale = static_cast<float>(g.a_scale * g.b_scale);
    if (g.batch >= 4 * nt) return bmm_items(g, shape, path, nt, scale);
    return bmm_row_blocks(g, shape, path, nt, scale);
}

}  // namespace edge::int8
