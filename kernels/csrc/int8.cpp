// int8 GEMM and conv2d for the `reference` target: edge_int8_linear, edge_int8_conv2d (C ABI, see build.py).
//
// Activations are quantized once per call (static per-tensor u8 with a zero point, or dynamic per-token
// symmetric stored as u8 with zero point 128); weights are the plain row-major int8 codes [N, K] the
// lowering prepared, with their row sums (the zero-point correction). Accumulation is exact int32:
//   out[m,n] = (float)(Σ_k q[m,k]·w[n,k] − zp·w_sum[n]) · s_m · w_scale[n] + bias[n].
//
// The GEMM is a dot-product formulation that suits [N, K] rows: a tile of MR activation rows × NR weight
// rows keeps MR·NR int32 vector accumulators over 32-byte chunks along K and reduces them horizontally at
// the end (4×3 tiles, in inline asm so that all 12 accumulators stay in registers; 1×8 for a single row).
// Tasks are blocks of weight rows sized for L2 (and blocks of activation rows when there are few), run
// with OpenMP; M = 1 parallelises over N. Paths, chosen at run time (EDGE_KERNELS_PORTABLE=1 forces the
// portable one):
//   - AVX2, weight_bits 7 (|w| ≤ 64): vpmaddubsw (u8·s8 pairs into int16, exact since 255·64·2 < 2^15)
//     then vpmaddwd with ones into int32.
//   - AVX2, weight_bits 8: activations stored as int16, weights widened to int16, vpmaddwd (exact int32).
//   - portable C++: plain int32 loops, for CPUs without AVX2 and for tests.
// (An AVX-512 VNNI / AVX-VNNI (vpdpbusd) or AMX path would plug in beside the AVX2 microkernels.)
// Conv2d quantizes the NCHW input once, transposes the codes to channels-last (so im2col copies runs of
// contiguous channels; padding = the zero point's code), permutes the weights to (kh, kw, c) order and runs
// the same GEMM per (image, group), writing NCHW. Convs with one input channel per group (depthwise) run
// a direct loop over a zero-point-padded plane instead.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <omp.h>

#include "check.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EDGE_X86 1
#else
#define EDGE_X86 0
#endif

#if EDGE_X86
// AVX2 without FMA on purpose: nothing here needs FMA, and without it the compiler cannot contract the
// dequant's multiply and add (GCC's C++ default is -ffp-contract=fast), which must round like torch.
#define EDGE_AVX2 __attribute__((target("avx2")))
#endif

// The dequant epilogue must round like torch's float32 (mul, mul, add): no FMA contraction, which
// GCC would otherwise do in C++ (-ffp-contract=fast) wherever FMA is available.
#if defined(__GNUC__) && !defined(__clang__)
#define EDGE_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define EDGE_NO_CONTRACT
#endif

namespace {

using edge::kBadQuant;
using edge::kBadShape;
using edge::kNoMemory;
using edge::kOk;
using edge::refuse;

enum Path { kPortable = 0, kAvx2U8 = 1, kAvx2S16 = 2 };

constexpr int64_t kChunk = 32;  // K is padded to a multiple of this in the activation buffers
// Longest reduction whose int32 sums cannot overflow: K·255·128 < 2^31.
constexpr int64_t kMaxK = 65793;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool force_portable() {
    const char* e = std::getenv("EDGE_KERNELS_PORTABLE");
    return e && *e && std::strcmp(e, "0") != 0;
}

bool cpu_has_avx2() {
#if EDGE_X86
    static const bool ok = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") != 0;
    }();
    return ok;
#else
    return false;
#endif
}

Path choose_path(int32_t weight_bits) {
    if (force_portable() || !cpu_has_avx2()) return kPortable;
    return weight_bits == 7 ? kAvx2U8 : kAvx2S16;
}

// 64-byte aligned scratch owned by one call (or one thread of it).
struct Buffer {
    void* p = nullptr;
    ~Buffer() { std::free(p); }
    void* get(size_t bytes) {
        std::free(p);
        p = std::aligned_alloc(64, static_cast<size_t>(round_up(static_cast<int64_t>(bytes) + 64, 64)));
        return p;
    }
};

// ---- activation quantization ------------------------------------------------------------------
// Static: q = clamp(nearbyint(x·inv) + zp, 0, 255), inv = (float)(1/x_scale): torch's
// quantize_per_tensor (float32 x·inv, round half to even, + zp, clamp). NaN reads as 0.
// Dynamic: s = max|x|/127 (1 for a zero row), q = clamp(nearbyint(x/s), −127, 127) + 128.
// T is uint8_t (u8 codes) or int16_t (the same codes widened, for the 8-bit AVX2 path).

template <typename T>
void quant_static_portable(const float* x, int64_t n, float inv, float zpf, T* q) {
    for (int64_t i = 0; i < n; ++i) {
        float v = std::nearbyint(x[i] * inv) + zpf;
        v = v > 0.f ? v : 0.f;
        v = v < 255.f ? v : 255.f;
        q[i] = static_cast<T>(static_cast<int32_t>(v));
    }
}

float row_absmax_portable(const float* x, int64_t n) {
    float m = 0.f;
    for (int64_t i = 0; i < n; ++i) {
        float a = std::fabs(x[i]);
        m = a > m ? a : m;
    }
    return m;
}

inline float dynamic_scale(float amax) { return amax > 0.f ? amax / 127.f : 1.f; }

template <typename T>
void quant_dynamic_portable(const float* x, int64_t n, float s, T* q) {
    for (int64_t i = 0; i < n; ++i) {
        float v = std::nearbyint(x[i] / s);
        v = v > -127.f ? v : -127.f;
        v = v < 127.f ? v : 127.f;
        q[i] = static_cast<T>(static_cast<int32_t>(v) + 128);
    }
}

#if EDGE_X86
EDGE_AVX2 inline __m256i quant8_static(const float* x, __m256 inv, __m256 zpf) {
    const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(255.f);
    __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_add_ps(v, zpf);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);  // max(NaN, 0) = 0
    return _mm256_cvttps_epi32(v);
}

EDGE_AVX2 inline __m256i quant8_dynamic(const float* x, __m256 s) {
    const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f), off = _mm256_set1_ps(128.f);
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_add_ps(_mm256_min_ps(_mm256_max_ps(v, lo), hi), off);
    return _mm256_cvttps_epi32(v);
}

// 32 int32 codes in [0, 255] → 32 bytes / 32 int16.
EDGE_AVX2 inline void store32(uint8_t* q, __m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);
    __m256i v = _mm256_packus_epi16(ab, cd);
    v = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), v);
}
EDGE_AVX2 inline void store32(int16_t* q, __m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
    __m256i cd = _mm256_permute4x64_epi64(_mm256_packs_epi32(c, d), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), ab);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16), cd);
}

template <typename T>
EDGE_AVX2 void quant_static_avx2(const float* x, int64_t n, float inv_s, float zp_s, T* q) {
    const __m256 inv = _mm256_set1_ps(inv_s), zpf = _mm256_set1_ps(zp_s);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        store32(q + i, quant8_static(x + i, inv, zpf), quant8_static(x + i + 8, inv, zpf),
                quant8_static(x + i + 16, inv, zpf), quant8_static(x + i + 24, inv, zpf));
    quant_static_portable(x + i, n - i, inv_s, zp_s, q + i);
}

EDGE_AVX2 float row_absmax_avx2(const float* x, int64_t n) {
    const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + i), mask));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    float r = row_absmax_portable(x + i, n - i);
    for (float v : lanes) r = v > r ? v : r;
    return r;
}

template <typename T>
EDGE_AVX2 void quant_dynamic_avx2(const float* x, int64_t n, float s_s, T* q) {
    const __m256 s = _mm256_set1_ps(s_s);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        store32(q + i, quant8_dynamic(x + i, s), quant8_dynamic(x + i + 8, s), quant8_dynamic(x + i + 16, s),
                quant8_dynamic(x + i + 24, s));
    quant_dynamic_portable(x + i, n - i, s_s, q + i);
}
#endif

template <typename T>
void quant_static(const float* x, int64_t n, float inv, float zpf, T* q, bool avx2) {
#if EDGE_X86
    if (avx2) return quant_static_avx2(x, n, inv, zpf, q);
#endif
    (void)avx2;
    quant_static_portable(x, n, inv, zpf, q);
}

template <typename T>
float quant_dynamic(const float* x, int64_t n, T* q, bool avx2) {
#if EDGE_X86
    if (avx2) {
        float s = dynamic_scale(row_absmax_avx2(x, n));
        quant_dynamic_avx2(x, n, s, q);
        return s;
    }
#endif
    (void)avx2;
    float s = dynamic_scale(row_absmax_portable(x, n));
    quant_dynamic_portable(x, n, s, q);
    return s;
}

// ---- GEMM -------------------------------------------------------------------------------------

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
template <int MR, int NR>
EDGE_AVX2 __attribute__((always_inline)) inline void step_u8(__m256i (&acc)[MR][NR], const uint8_t* q, int64_t ldq,
                                                             int64_t k, const int8_t* const* wp, int64_t wk,
                                                             __m256i ones) {
    for (int i = 0; i < MR; ++i) {
        const __m256i qi = _mm256_load_si256(reinterpret_cast<const __m256i*>(q + i * ldq + k));
        for (int j = 0; j < NR; ++j) {
            __m256i p = _mm256_maddubs_epi16(qi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[j] + wk)));
            acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(p, ones));
        }
    }
}

template <int MR, int NR>
EDGE_AVX2 __attribute__((always_inline)) inline void step_s16(__m256i (&acc)[MR][NR], const int16_t* q, int64_t ldq,
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

// Generic MR×NR tiles (intrinsics): row tails, column tails and the single-row (GEMV) tile.
// 7-bit weights: u8 activations × s8 weights via vpmaddubsw + vpmaddwd(ones).
template <int MR, int NR>
EDGE_AVX2 void tile_u8(const Gemm& g, int64_t m0, int64_t n0, const int8_t* next = nullptr) {
    const uint8_t* q = static_cast<const uint8_t*>(g.q) + m0 * g.ldq;
    const int64_t ldq = g.ldq, K = g.K;
    const int8_t* w[NR];
    for (int j = 0; j < NR; ++j) w[j] = g.w + (n0 + j) * K;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
    const int64_t kfull = K & ~(kChunk - 1);
    int64_t k = 0;
    for (; k < kfull; k += kChunk) {
        if (next && (k & 32) == 0) prefetch_rows<NR>(next, K, k);
        step_u8<MR, NR>(acc, q, ldq, k, w, k, ones);
    }
    if (k < K) {
        alignas(32) int8_t tail[NR][kChunk];
        const int8_t* tp[NR];
        tail_rows<NR>(w, k, K, tail, tp);
        step_u8<MR, NR>(acc, q, ldq, k, tp, 0, ones);
    }
    finish_tile<MR, NR>(g, m0, n0, acc);
}

// 8-bit weights: int16 activations × weights widened to int16, vpmaddwd (exact for any int8).
template <int MR, int NR>
EDGE_AVX2 void tile_s16(const Gemm& g, int64_t m0, int64_t n0, const int8_t* next = nullptr) {
    const int16_t* q = static_cast<const int16_t*>(g.q) + m0 * g.ldq;
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
        step_s16<MR, NR>(acc, q, ldq, k, w, k);
    }
    if (k < K) {
        alignas(32) int8_t tail[NR][kChunk];
        const int8_t* tp[NR];
        tail_rows<NR>(w, k, K, tail, tp);
        step_s16<MR, NR>(acc, q, ldq, k, tp, 0);
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
// stay in L1 while the weights stream past; blocking K measured no faster), then a 4×1 or 4×2 tile.
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
    if (n_hi - n == 2) (S16 ? tile_s16<4, 2> : tile_u8<4, 2>)(g, m0, n, nullptr);
    if (n_hi - n == 1) (S16 ? tile_s16<4, 1> : tile_u8<4, 1>)(g, m0, n, nullptr);
}

using TileFn = void (*)(const Gemm&, int64_t, int64_t, const int8_t*);

#define EDGE_TILE_ROW(fn, mr) {fn<mr, 1>, fn<mr, 2>, fn<mr, 3>, fn<mr, 4>}
#define EDGE_TILE_TABLE(fn) {EDGE_TILE_ROW(fn, 1), EDGE_TILE_ROW(fn, 2), EDGE_TILE_ROW(fn, 3)}
const TileFn kTilesU8[3][4] = EDGE_TILE_TABLE(tile_u8);   // [mr − 1][nr − 1], mr ≤ 3
const TileFn kTilesS16[3][4] = EDGE_TILE_TABLE(tile_s16);
constexpr int kNRRow = 8;  // weight rows per tile for a single activation row (a GEMV)

// Rows m0..m0+mr−1 (mr ≤ 3) against weight rows [n_lo, n_hi).
template <bool S16>
EDGE_AVX2 void strip_small(const Gemm& g, int64_t m0, int mr, int64_t n_lo, int64_t n_hi) {
    int64_t n = n_lo;
    if (mr == 1)
        for (; n + kNRRow <= n_hi; n += kNRRow)
            (S16 ? tile_s16<1, kNRRow> : tile_u8<1, kNRRow>)(g, m0, n,
                                                             n + 2 * kNRRow <= n_hi ? g.w + (n + kNRRow) * g.K : nullptr);
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

// Splits the output into tasks (N blocks whose weights stay in L2, M blocks when N alone gives too
// few) and returns how many threads are worth using.
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

// ---- conv helpers -----------------------------------------------------------------------------

struct Conv {
    int64_t B, C, H, W, O, KH, KW, sh, sw, ph, pw, dh, dw, G, OH, OW, Cg, Og, K;
};

template <typename T>
inline void copy_codes(T* dst, const uint8_t* src, int64_t n) {
    if (sizeof(T) == 1 && n > 16) std::memcpy(dst, src, static_cast<size_t>(n));
    else for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);  // few channels: no call
}

// Rows [r0, r1) of the im2col matrix of one image and group, from channels-last codes `img` [H, W, C]
// (the group's channels start at c0) into A [OH·OW, ld], K ordered (kh, kw, c) like the permuted weights:
// A[oh·OW + ow, (kh·KW + kw)·Cg + c] = img[oh·sh − ph + kh·dh, ow·sw − pw + kw·dw, c0 + c], zp outside.
template <typename T>
void im2col_rows(const Conv& cv, const uint8_t* img, int64_t c0, T zp, T* A, int64_t ld, int64_t r0, int64_t r1) {
    const int64_t Cg = cv.Cg, C = cv.C;
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t oh = r / cv.OW, ow = r % cv.OW;
        T* row = A + r * ld;
        int64_t k = 0;
        for (int64_t kh = 0; kh < cv.KH; ++kh) {
            const int64_t ih = oh * cv.sh - cv.ph + kh * cv.dh;
            if (ih < 0 || ih >= cv.H) {
                std::fill(row + k, row + k + cv.KW * Cg, zp);
                k += cv.KW * Cg;
                continue;
            }
            const uint8_t* line = img + ih * cv.W * C + c0;
            const int64_t iw0 = ow * cv.sw - cv.pw;
            for (int64_t kw = 0; kw < cv.KW; ++kw, k += Cg) {
                const int64_t iw = iw0 + kw * cv.dw;
                if (iw >= 0 && iw < cv.W) copy_codes(row + k, line + iw * C, Cg);
                else std::fill(row + k, row + k + Cg, zp);
            }
        }
        std::fill(row + k, row + ld, T(0));
    }
}

#if EDGE_X86
// acc[i] += w · src[i] for n codes: u8·s8 products fit int16 exactly (|255·128| < 2^15).
EDGE_AVX2 void dw_accumulate_avx2(int32_t* acc, const uint8_t* src, int32_t w, int64_t n) {
    const __m256i wv = _mm256_set1_epi16(static_cast<int16_t>(w));
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i p = _mm256_mullo_epi16(
            _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))), wv);
        __m256i* a = reinterpret_cast<__m256i*>(acc + i);
        _mm256_storeu_si256(a, _mm256_add_epi32(_mm256_loadu_si256(a), _mm256_cvtepi16_epi32(_mm256_castsi256_si128(p))));
        _mm256_storeu_si256(a + 1, _mm256_add_epi32(_mm256_loadu_si256(a + 1),
                                                    _mm256_cvtepi16_epi32(_mm256_extracti128_si256(p, 1))));
    }
    if (i + 8 <= n) {
        const __m256i p = _mm256_mullo_epi32(
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i))), _mm256_set1_epi32(w));
        __m256i* a = reinterpret_cast<__m256i*>(acc + i);
        _mm256_storeu_si256(a, _mm256_add_epi32(_mm256_loadu_si256(a), p));
        i += 8;
    }
    for (; i < n; ++i) acc[i] += w * static_cast<int32_t>(src[i]);
}

// out[i] = dequant(acc[i]) for one output channel (same op order as `dequant`, no FMA in this target).
EDGE_AVX2 void dw_dequant_avx2(float* out, const int32_t* acc, int64_t n, int32_t zp, int32_t wsum, float xs, float ws,
                               const float* bias) {
    const __m256i corr = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(zp) * static_cast<uint32_t>(wsum)));
    const __m256 vxs = _mm256_set1_ps(xs), vws = _mm256_set1_ps(ws), vb = _mm256_set1_ps(bias ? *bias : 0.f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + i)), corr));
        v = _mm256_mul_ps(_mm256_mul_ps(v, vxs), vws);
        if (bias) v = _mm256_add_ps(v, vb);
        _mm256_storeu_ps(out + i, v);
    }
    for (; i < n; ++i) out[i] = dequant(acc[i], zp, wsum, xs, ws, bias);
}
#endif

// One output channel of a conv with one input channel per group: direct loop over a zp-padded plane.
EDGE_NO_CONTRACT void depthwise_channel(const Conv& cv, const uint8_t* plane, const int8_t* w, int32_t zp,
                                        uint8_t* padded, int32_t* accrow, float xs, int32_t wsum, float ws,
                                        const float* bias, float* out, bool avx2) {
    const int64_t Hp = cv.H + 2 * cv.ph, Wp = cv.W + 2 * cv.pw;
    std::memset(padded, zp, static_cast<size_t>(Hp * Wp));
    for (int64_t h = 0; h < cv.H; ++h)
        std::memcpy(padded + (h + cv.ph) * Wp + cv.pw, plane + h * cv.W, static_cast<size_t>(cv.W));
    for (int64_t oh = 0; oh < cv.OH; ++oh) {
        std::fill(accrow, accrow + cv.OW, 0);
        for (int64_t kh = 0; kh < cv.KH; ++kh) {
            const uint8_t* line = padded + (oh * cv.sh + kh * cv.dh) * Wp;
            for (int64_t kw = 0; kw < cv.KW; ++kw) {
                const int32_t wv = w[kh * cv.KW + kw];
                const uint8_t* src = line + kw * cv.dw;
#if EDGE_X86
                if (avx2 && cv.sw == 1) {
                    dw_accumulate_avx2(accrow, src, wv, cv.OW);
                    continue;
                }
#endif
                if (cv.sw == 1) {
                    for (int64_t ow = 0; ow < cv.OW; ++ow) accrow[ow] += wv * static_cast<int32_t>(src[ow]);
                } else {
                    for (int64_t ow = 0; ow < cv.OW; ++ow) accrow[ow] += wv * static_cast<int32_t>(src[ow * cv.sw]);
                }
            }
        }
        float* orow = out + oh * cv.OW;
#if EDGE_X86
        if (avx2) {
            dw_dequant_avx2(orow, accrow, cv.OW, zp, wsum, xs, ws, bias);
            continue;
        }
#endif
        for (int64_t ow = 0; ow < cv.OW; ++ow) orow[ow] = dequant(accrow[ow], zp, wsum, xs, ws, bias);
    }
}

// Checks that need no shape: weight_bits and the activation quantization (x_scale <= 0: dynamic).
int32_t check_quant(const char* op, int32_t weight_bits, double x_scale, int32_t x_zero_point, bool dynamic_ok) {
    if (weight_bits != 7 && weight_bits != 8) return refuse(kBadQuant, "%s: weight_bits must be 7 or 8, got %d", op, weight_bits);
    if (std::isnan(x_scale) || std::isinf(x_scale) || (!dynamic_ok && !(x_scale > 0.0)))
        return refuse(kBadQuant, "%s: x_scale must be finite%s, got %g", op, dynamic_ok ? "" : " and > 0", x_scale);
    if (x_scale > 0.0 && (x_zero_point < 0 || x_zero_point > 255))
        return refuse(kBadQuant, "%s: x_zero_point must be in [0, 255], got %d", op, x_zero_point);
    return kOk;
}

// Every per-output-channel buffer (w_scale, w_sum, optional bias) holds `channels` values.
int32_t check_channels(const char* op, int64_t channels, const float* w_scale, int64_t w_scale_bytes,
                       const int32_t* w_sum, int64_t w_sum_bytes, const float* bias, int64_t bias_bytes) {
    if (int32_t c = edge::need(op, "w_scale", w_scale, w_scale_bytes, channels, sizeof(float))) return c;
    if (int32_t c = edge::need(op, "w_sum", w_sum, w_sum_bytes, channels, sizeof(int32_t))) return c;
    if (bias) return edge::need(op, "bias", bias, bias_bytes, channels, sizeof(float));
    return kOk;
}

}  // namespace

// ---- C ABI ------------------------------------------------------------------------------------

extern "C" int32_t edge_int8_linear(const float* x, int64_t x_bytes, int64_t M, int64_t K, const int8_t* w,
                                    int64_t w_bytes, int64_t N, const float* w_scale, int64_t w_scale_bytes,
                                    const int32_t* w_sum, int64_t w_sum_bytes, const float* bias, int64_t bias_bytes,
                                    double x_scale, int32_t x_zero_point, int32_t weight_bits, float* out,
                                    int64_t out_bytes, int32_t num_threads) {
    constexpr const char* op = "edge_int8_linear";
    if (M < 0 || K <= 0 || K > kMaxK || N <= 0)
        return refuse(kBadShape, "%s: needs M >= 0, 0 < K <= %lld, N > 0; got M=%lld K=%lld N=%lld", op,
                      static_cast<long long>(kMaxK), static_cast<long long>(M), static_cast<long long>(K),
                      static_cast<long long>(N));
    if (int32_t c = check_quant(op, weight_bits, x_scale, x_zero_point, true)) return c;
    const bool dynamic = !(x_scale > 0.0);
    int64_t x_elems, w_elems, out_elems;
    if (!edge::count(&x_elems, M, K) || !edge::count(&w_elems, N, K) || !edge::count(&out_elems, M, N))
        return refuse(kBadShape, "%s: M=%lld K=%lld N=%lld overflow", op, static_cast<long long>(M),
                      static_cast<long long>(K), static_cast<long long>(N));
    if (int32_t c = edge::need(op, "w", w, w_bytes, w_elems, 1)) return c;
    if (int32_t c = check_channels(op, N, w_scale, w_scale_bytes, w_sum, w_sum_bytes, bias, bias_bytes)) return c;
    if (M == 0) return kOk;
    if (int32_t c = edge::need(op, "x", x, x_bytes, x_elems, sizeof(float))) return c;
    if (int32_t c = edge::need(op, "out", out, out_bytes, out_elems, sizeof(float))) return c;

    const Path path = choose_path(weight_bits);
    const bool avx2 = path != kPortable;
    const int nthreads = std::max<int32_t>(1, num_threads);
    const int64_t ldq = round_up(K, kChunk);
    const size_t elem = path == kAvx2S16 ? sizeof(int16_t) : sizeof(uint8_t);

    Buffer qbuf, sbuf;
    void* q = qbuf.get(static_cast<size_t>(M * ldq) * elem);
    float* row_scale = dynamic ? static_cast<float*>(sbuf.get(static_cast<size_t>(M) * sizeof(float))) : nullptr;
    if (!q || (dynamic && !row_scale)) return refuse(kNoMemory, "int8 kernels: out of memory");

    const float inv = static_cast<float>(1.0 / x_scale), zpf = static_cast<float>(x_zero_point);
    const int qt = M * K >= 65536 ? nthreads : 1;
#pragma omp parallel for num_threads(qt) schedule(static) if (qt > 1)
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        if (path == kAvx2S16) {
            int16_t* qr = static_cast<int16_t*>(q) + m * ldq;
            if (dynamic) row_scale[m] = quant_dynamic(xr, K, qr, avx2);
            else quant_static(xr, K, inv, zpf, qr, avx2);
            std::memset(qr + K, 0, static_cast<size_t>(ldq - K) * sizeof(int16_t));
        } else {
            uint8_t* qr = static_cast<uint8_t*>(q) + m * ldq;
            if (dynamic) row_scale[m] = quant_dynamic(xr, K, qr, avx2);
            else quant_static(xr, K, inv, zpf, qr, avx2);
            std::memset(qr + K, 0, static_cast<size_t>(ldq - K));
        }
    }

    Gemm g{};
    g.q = q; g.ldq = ldq; g.w = w; g.M = M; g.N = N; g.K = K;
    g.row_scale = row_scale; g.scale = static_cast<float>(x_scale);
    g.zp = dynamic ? 128 : x_zero_point;
    g.wsum = w_sum; g.wscale = w_scale; g.bias = bias;
    g.out = out; g.ldo_m = N; g.ldo_n = 1; g.path = path;
    gemm_parallel(g, plan(g, nthreads));
    return kOk;
}

namespace {

constexpr int64_t kTransposeBlock = 64;

// dst[p, c] = src[c, p] for pixels [p0, p1): [C, HW] codes to channels-last [HW, C].
void transpose_codes(const uint8_t* src, uint8_t* dst, int64_t C, int64_t HW, int64_t p0, int64_t p1) {
    int64_t c0 = 0;
#if EDGE_X86
    // 8 channels × 16 pixels at a time with SSE2 (baseline x86-64) byte unpacks.
    for (; c0 + 8 <= C; c0 += 8) {
        int64_t p = p0;
        for (; p + 16 <= p1; p += 16) {
            __m128i r[8];
            for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (c0 + i) * HW + p));
            __m128i a[8], b[8];
            for (int i = 0; i < 4; ++i) {
                a[2 * i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);      // pixels 0–7, channels 2i, 2i+1
                a[2 * i + 1] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);  // pixels 8–15
            }
            for (int h = 0; h < 2; ++h) {  // h: pixel half
                b[4 * h + 0] = _mm_unpacklo_epi16(a[h], a[2 + h]);      // channels 0–3, pixels 8h+0..3
                b[4 * h + 1] = _mm_unpackhi_epi16(a[h], a[2 + h]);      // channels 0–3, pixels 8h+4..7
                b[4 * h + 2] = _mm_unpacklo_epi16(a[4 + h], a[6 + h]);  // channels 4–7, pixels 8h+0..3
                b[4 * h + 3] = _mm_unpackhi_epi16(a[4 + h], a[6 + h]);  // channels 4–7, pixels 8h+4..7
            }
            for (int h = 0; h < 2; ++h)
                for (int q = 0; q < 2; ++q) {
                    const __m128i lo = _mm_unpacklo_epi32(b[4 * h + q], b[4 * h + 2 + q]);  // 2 pixels × 8 channels
                    const __m128i hi = _mm_unpackhi_epi32(b[4 * h + q], b[4 * h + 2 + q]);
                    const int64_t px = p + 8 * h + 4 * q;
                    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + px * C + c0), lo);
                    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (px + 1) * C + c0), _mm_unpackhi_epi64(lo, lo));
                    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (px + 2) * C + c0), hi);
                    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (px + 3) * C + c0), _mm_unpackhi_epi64(hi, hi));
                }
        }
        for (; p < p1; ++p)
            for (int64_t c = c0; c < c0 + 8; ++c) dst[p * C + c] = src[c * HW + p];
    }
#endif
    for (int64_t p = p0; p < p1; ++p)
        for (int64_t c = c0; c < C; ++c) dst[p * C + c] = src[c * HW + p];
}

// The GEMM path: per (image, group), im2col from channels-last codes `xt` [B, H, W, C] with weights
// `wt` permuted to [O, KH, KW, Cg], then the GEMM with the output written transposed (NCHW).
template <typename T>
int32_t conv_gemm(const Conv& cv, const uint8_t* xt, const int8_t* wt, const Gemm& base, float* out, int nthreads) {
    const int64_t M = cv.OH * cv.OW, ldq = round_up(cv.K, kChunk);
    // 1×1, stride 1, no padding, one group, K a multiple of 32: the channels-last codes are the matrix.
    const bool direct = sizeof(T) == 1 && cv.KH == 1 && cv.KW == 1 && cv.sh == 1 && cv.sw == 1 && cv.ph == 0 &&
                        cv.pw == 0 && cv.G == 1 && cv.C % kChunk == 0;
    const size_t bytes = direct ? 0 : static_cast<size_t>(M * ldq) * sizeof(T);
    const T zp = static_cast<T>(base.zp);
    const int64_t jobs = cv.B * cv.G;
    auto image = [&](int64_t job) { return xt + (job / cv.G) * cv.H * cv.W * cv.C; };
    auto job_gemm = [&](int64_t job, const T* A) {
        const int64_t b = job / cv.G, gi = job % cv.G;
        Gemm g = base;
        g.q = direct ? static_cast<const void*>(image(job)) : A;
        g.ldq = ldq; g.M = M; g.N = cv.Og; g.K = cv.K;
        g.w = wt + gi * cv.Og * cv.K;
        g.wsum = base.wsum + gi * cv.Og;
        g.wscale = base.wscale + gi * cv.Og;
        g.bias = base.bias ? base.bias + gi * cv.Og : nullptr;
        g.out = out + (b * cv.O + gi * cv.Og) * M;
        g.ldo_m = 1; g.ldo_n = M;
        return g;
    };

    if (nthreads > 1 && jobs >= 2 * nthreads) {
        // Many (image, group) jobs: one per thread at a time, each with its own im2col buffer.
        bool failed = false;
#pragma omp parallel num_threads(nthreads)
        {
            Buffer buf;
            T* A = direct ? nullptr : static_cast<T*>(buf.get(bytes));
            if (!direct && !A) {
#pragma omp atomic write
                failed = true;
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t job = 0; job < jobs; ++job) {
                if (!direct && !A) continue;
                if (!direct) im2col_rows<T>(cv, image(job), (job % cv.G) * cv.Cg, zp, A, ldq, 0, M);
                Gemm g = job_gemm(job, A);
                plan(g, 1);
                gemm_serial(g);
            }
        }
        return failed ? refuse(kNoMemory, "int8 kernels: out of memory") : kOk;
    }
    Buffer buf;
    T* A = direct ? nullptr : static_cast<T*>(buf.get(bytes));
    if (!direct && !A) return refuse(kNoMemory, "int8 kernels: out of memory");
    for (int64_t job = 0; job < jobs; ++job) {
        if (!direct) {
            const uint8_t* img = image(job);
            const int64_t c0 = (job % cv.G) * cv.Cg;
            const int it = M * cv.K >= 65536 ? nthreads : 1;
#pragma omp parallel for num_threads(it) schedule(static) if (it > 1)
            for (int64_t r0 = 0; r0 < M; r0 += 64) im2col_rows<T>(cv, img, c0, zp, A, ldq, r0, std::min(M, r0 + 64));
        }
        Gemm g = job_gemm(job, A);
        gemm_parallel(g, plan(g, nthreads));
    }
    return kOk;
}

}  // namespace

extern "C" int32_t edge_int8_conv2d(const float* x, int64_t x_bytes, int64_t B, int64_t C, int64_t H, int64_t W,
                                    const int8_t* w, int64_t w_bytes, int64_t O, int64_t KH, int64_t KW,
                                    const float* w_scale, int64_t w_scale_bytes, const int32_t* w_sum,
                                    int64_t w_sum_bytes, const float* bias, int64_t bias_bytes, int64_t stride_h,
                                    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                                    int64_t groups, double x_scale, int32_t x_zero_point, int32_t weight_bits,
                                    float* out, int64_t out_bytes, int32_t num_threads) {
    constexpr const char* op = "edge_int8_conv2d";
    auto ll = [](int64_t v) { return static_cast<long long>(v); };
    if (B < 0 || C <= 0 || H <= 0 || W <= 0 || O <= 0 || KH <= 0 || KW <= 0)
        return refuse(kBadShape, "%s: needs B >= 0 and C, H, W, O, KH, KW > 0; got B=%lld C=%lld H=%lld W=%lld "
                      "O=%lld KH=%lld KW=%lld", op, ll(B), ll(C), ll(H), ll(W), ll(O), ll(KH), ll(KW));
    if (stride_h <= 0 || stride_w <= 0 || pad_h < 0 || pad_w < 0 || dil_h <= 0 || dil_w <= 0)
        return refuse(kBadShape, "%s: needs stride > 0, padding >= 0, dilation > 0; got stride (%lld, %lld) "
                      "padding (%lld, %lld) dilation (%lld, %lld)", op, ll(stride_h), ll(stride_w), ll(pad_h),
                      ll(pad_w), ll(dil_h), ll(dil_w));
    if (groups <= 0 || C % groups != 0 || O % groups != 0)
        return refuse(kBadShape, "%s: groups=%lld must divide C=%lld and O=%lld", op, ll(groups), ll(C), ll(O));
    if (H > (int64_t{1} << 40) || W > (int64_t{1} << 40) || pad_h > (int64_t{1} << 40) || pad_w > (int64_t{1} << 40) ||
        KH > (int64_t{1} << 20) || KW > (int64_t{1} << 20) || dil_h > (int64_t{1} << 20) || dil_w > (int64_t{1} << 20))
        return refuse(kBadShape, "%s: sizes too large", op);  // keeps the output-size arithmetic below in int64
    Conv cv{B, C, H, W, O, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, 0, 0, C / groups,
            O / groups, 0};
    const int64_t eh = H + 2 * pad_h - dil_h * (KH - 1) - 1, ew = W + 2 * pad_w - dil_w * (KW - 1) - 1;
    if (eh < 0 || ew < 0) return refuse(kBadShape, "%s: the %lldx%lld kernel (dilation %lld, %lld) is larger than the "
                                        "padded %lldx%lld input", op, ll(KH), ll(KW), ll(dil_h), ll(dil_w),
                                        ll(H + 2 * pad_h), ll(W + 2 * pad_w));
    cv.OH = eh / stride_h + 1;
    cv.OW = ew / stride_w + 1;
    cv.K = cv.Cg * KH * KW;
    if (cv.K > kMaxK) return refuse(kBadShape, "%s: C/groups*KH*KW = %lld exceeds %lld", op, ll(cv.K), ll(kMaxK));
    if (int32_t c = check_quant(op, weight_bits, x_scale, x_zero_point, false)) return c;
    int64_t x_elems, w_elems, out_elems;
    if (!edge::count(&x_elems, B, C, H, W) || !edge::count(&w_elems, O, cv.K) || !edge::count(&out_elems, B, O, cv.OH, cv.OW))
        return refuse(kBadShape, "%s: sizes overflow", op);
    if (int32_t c = edge::need(op, "w", w, w_bytes, w_elems, 1)) return c;
    if (int32_t c = check_channels(op, O, w_scale, w_scale_bytes, w_sum, w_sum_bytes, bias, bias_bytes)) return c;
    if (B == 0) return kOk;
    if (int32_t c = edge::need(op, "x", x, x_bytes, x_elems, sizeof(float))) return c;
    if (int32_t c = edge::need(op, "out", out, out_bytes, out_elems, sizeof(float))) return c;

    const Path path = choose_path(weight_bits);
    const bool avx2 = path != kPortable;
    const int nthreads = std::max<int32_t>(1, num_threads);

    // Quantize the whole input once (u8 codes, NCHW).
    const int64_t total = B * C * H * W;
    Buffer qbuf;
    uint8_t* xq = static_cast<uint8_t*>(qbuf.get(static_cast<size_t>(total)));
    if (!xq) return refuse(kNoMemory, "int8 kernels: out of memory");
    const float inv = static_cast<float>(1.0 / x_scale), zpf = static_cast<float>(x_zero_point);
    {
        const int64_t piece = 1 << 16;
        const int64_t pieces = ceil_div(total, piece);
        const int qt = pieces > 1 ? nthreads : 1;
#pragma omp parallel for num_threads(qt) schedule(static) if (qt > 1)
        for (int64_t p = 0; p < pieces; ++p) {
            const int64_t lo = p * piece, n = std::min(piece, total - lo);
            quant_static(x + lo, n, inv, zpf, xq + lo, avx2);
        }
    }

    Gemm base{};
    base.row_scale = nullptr; base.scale = static_cast<float>(x_scale); base.zp = x_zero_point;
    base.wsum = w_sum; base.wscale = w_scale; base.bias = bias; base.path = path;

    if (cv.Cg == 1) {
        // One input channel per group (depthwise and its channel multipliers): direct loop.
        const int64_t planes = B * O, plane_out = cv.OH * cv.OW;
        const size_t pad_bytes = static_cast<size_t>((H + 2 * pad_h) * (W + 2 * pad_w));
        const int dt = planes * plane_out * KH * KW >= 65536 ? nthreads : 1;
        bool failed = false;
#pragma omp parallel num_threads(dt) if (dt > 1)
        {
            std::vector<uint8_t> padded;
            std::vector<int32_t> accrow;
            try {
                padded.resize(pad_bytes);
                accrow.resize(static_cast<size_t>(cv.OW));
            } catch (...) {
#pragma omp atomic write
                failed = true;
            }
#pragma omp for schedule(static)
            for (int64_t p = 0; p < planes; ++p) {
                if (padded.size() != pad_bytes) continue;
                const int64_t b = p / O, o = p % O, c = o / cv.Og;
                depthwise_channel(cv, xq + (b * C + c) * H * W, w + o * KH * KW, x_zero_point, padded.data(),
                                  accrow.data(), base.scale, w_sum[o], w_scale[o],
                                  bias ? bias + o : nullptr, out + p * plane_out, avx2);
            }
        }
        return failed ? refuse(kNoMemory, "int8 kernels: out of memory") : kOk;
    }
    // Channels-last codes (im2col then copies runs of Cg contiguous codes) and weights permuted to match.
    Buffer tbuf, wbuf;
    uint8_t* xt = static_cast<uint8_t*>(tbuf.get(static_cast<size_t>(total)));
    int8_t* wt = static_cast<int8_t*>(wbuf.get(static_cast<size_t>(O * cv.K)));
    if (!xt || !wt) return refuse(kNoMemory, "int8 kernels: out of memory");
    const int64_t HW = H * W;
    const int64_t tiles = B * ceil_div(HW, kTransposeBlock);
    const int tt = total >= 65536 ? nthreads : 1;
#pragma omp parallel for num_threads(tt) schedule(static) if (tt > 1)
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t b = t / ceil_div(HW, kTransposeBlock), p0 = (t % ceil_div(HW, kTransposeBlock)) * kTransposeBlock;
        transpose_codes(xq + b * C * HW, xt + b * HW * C, C, HW, p0, std::min(HW, p0 + kTransposeBlock));
    }
    for (int64_t o = 0; o < O; ++o)
        for (int64_t c = 0; c < cv.Cg; ++c)
            for (int64_t k = 0; k < KH * KW; ++k) wt[o * cv.K + k * cv.Cg + c] = w[(o * cv.Cg + c) * KH * KW + k];
    if (path == kAvx2S16) return conv_gemm<int16_t>(cv, xt, wt, base, out, nthreads);
    return conv_gemm<uint8_t>(cv, xt, wt, base, out, nthreads);
}

namespace {

// Σ row[k] and the row's min and max code, portable (the compiler vectorizes it with the baseline SSE2).
void row_stats_portable(const int8_t* row, int64_t K, int32_t* sum, int32_t* lo, int32_t* hi) {
    int32_t s = 0, rlo = 127, rhi = -128;
    for (int64_t k = 0; k < K; ++k) {
        const int32_t v = row[k];
        s += v;
        rlo = std::min(rlo, v);
        rhi = std::max(rhi, v);
    }
    *sum = s, *lo = rlo, *hi = rhi;
}

#if EDGE_X86
// The same, 32 codes at a time: vpsadbw sums the codes shifted to u8 (v ^ 0x80 = v + 128), vpminsb/vpmaxsb.
EDGE_AVX2 void row_stats_avx2(const int8_t* row, int64_t K, int32_t* sum, int32_t* lo, int32_t* hi) {
    const __m256i zero = _mm256_setzero_si256(), flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256i vmin = _mm256_set1_epi8(127), vmax = _mm256_set1_epi8(-128), acc = zero;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
        vmin = _mm256_min_epi8(vmin, v);
        vmax = _mm256_max_epi8(vmax, v);
        acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_xor_si256(v, flip), zero));
    }
    alignas(32) int64_t sums[4];
    alignas(32) int8_t mins[32], maxs[32];
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums), acc);
    _mm256_store_si256(reinterpret_cast<__m256i*>(mins), vmin);
    _mm256_store_si256(reinterpret_cast<__m256i*>(maxs), vmax);
    int32_t s, rlo, rhi;
    row_stats_portable(row + k, K - k, &s, &rlo, &rhi);
    s += static_cast<int32_t>(sums[0] + sums[1] + sums[2] + sums[3] - 128 * k);
    for (int i = 0; i < 32; ++i) rlo = std::min<int32_t>(rlo, mins[i]), rhi = std::max<int32_t>(rhi, maxs[i]);
    *sum = s, *lo = rlo, *hi = rhi;
}
#endif

}  // namespace

// Row sums of int8 weight codes w [N, K] into sums [N] and their range into range [2] (min, max): one
// pass over the weight for what the Python side checks once per weight (weight_sum matches the codes,
// weight_bits=7 codes lie within [-64, 64]) and for ops.int8_weight_sum.
extern "C" int32_t edge_int8_row_stats(const int8_t* w, int64_t w_bytes, int64_t N, int64_t K, int32_t* sums,
                                       int64_t sums_bytes, int32_t* range, int64_t range_bytes, int32_t num_threads) {
    constexpr const char* op = "edge_int8_row_stats";
    int64_t w_elems;
    if (N < 0 || K < 0 || K > (int64_t{1} << 23) || !edge::count(&w_elems, N, K))  // 128·2^23 = 2^30: sums fit int32
        return refuse(kBadShape, "%s: needs N >= 0, 0 <= K <= 2^23; got N=%lld K=%lld", op, static_cast<long long>(N),
                      static_cast<long long>(K));
    if (int32_t c = edge::need(op, "w", w, w_bytes, w_elems, 1)) return c;
    if (int32_t c = edge::need(op, "sums", sums, sums_bytes, N, sizeof(int32_t))) return c;
    if (int32_t c = edge::need(op, "range", range, range_bytes, 2, sizeof(int32_t))) return c;
    const bool avx2 = !force_portable() && cpu_has_avx2();
    int32_t lo = 127, hi = -128;
    const int nt = w_elems >= (1 << 22) ? std::max<int32_t>(1, num_threads) : 1;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : lo) reduction(max : hi) if (nt > 1)
    for (int64_t n = 0; n < N; ++n) {
        int32_t rlo, rhi;
#if EDGE_X86
        if (avx2) row_stats_avx2(w + n * K, K, sums + n, &rlo, &rhi);
        else row_stats_portable(w + n * K, K, sums + n, &rlo, &rhi);
#else
        row_stats_portable(w + n * K, K, sums + n, &rlo, &rhi);
#endif
        lo = std::min(lo, rlo);
        hi = std::max(hi, rhi);
    }
    range[0] = lo;
    range[1] = hi;
    return kOk;
}
