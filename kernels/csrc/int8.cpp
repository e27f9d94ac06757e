// int8 GEMM and conv2d for the `reference` target: edge_int8_linear, edge_int8_conv2d (C ABI, see build.py).
//
// Activations are quantized once per call (static per-tensor u8 with a zero point, or dynamic per-token
// symmetric stored as u8 with zero point 128); weights are the plain row-major int8 codes [N, K] the
// lowering prepared, with their row sums (the zero-point correction). Accumulation is exact int32:
//   out[m,n] = (float)(Σ_k q[m,k]·w[n,k] − zp·w_sum[n]) · s_m · w_scale[n] + bias[n].
//
// The GEMM is a dot-product formulation that suits [N, K] rows: a tile of MR activation rows × NR weight
// rows keeps MR·NR int32 vector accumulators over 32-byte chunks along K and reduces them horizontally at
// the end. Paths, chosen at run time (EDGE_KERNELS_PORTABLE=1 forces the portable one):
//   - AVX2, weight_bits 7 (|w| ≤ 64): vpmaddubsw (u8·s8 pairs into int16, exact since 255·64·2 < 2^15)
//     then vpmaddwd with ones into int32.
//   - AVX2, weight_bits 8: activations stored as int16, weights widened to int16, vpmaddwd (exact int32).
//   - portable C++: plain int32 loops, for CPUs without AVX2 and for tests.
// (An AVX-512 VNNI / AVX-VNNI (vpdpbusd) or AMX path would plug in beside the AVX2 microkernels.)
// Conv2d quantizes the NCHW input once and runs im2col (padding = the zero point's code) + the same GEMM
// per (image, group); convs with one input channel per group (depthwise) run a direct loop instead.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <omp.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EDGE_X86 1
#else
#define EDGE_X86 0
#endif

#if EDGE_X86
#define EDGE_AVX2 __attribute__((target("avx2,fma")))
#endif

// The dequant epilogue must round like torch's float32 (mul, mul, add): no FMA contraction, which
// GCC would otherwise do in C++ (-ffp-contract=fast) wherever FMA is available.
#if defined(__GNUC__) && !defined(__clang__)
#define EDGE_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define EDGE_NO_CONTRACT
#endif

namespace {

enum Code : int32_t { kOk = 0, kBadPointer = 1, kBadShape = 2, kBadQuant = 3, kNoMemory = 4 };

enum Path { kPortable = 0, kAvx2U8 = 1, kAvx2S16 = 2 };

constexpr int64_t kChunk = 32;  // K is padded to a multiple of this in the activation buffers

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
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
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
    const void* q;          // activation codes [M, ldq] (uint8_t, or int16_t for kAvx2S16), zero past K
    int64_t ldq;            // a multiple of kChunk
    const int8_t* w;        // [N, K]
    int64_t M, N, K;
    const float* row_scale;  // [M] per-row activation scale, or null: `scale` for every row
    float scale;
    int32_t zp;
    const int32_t* wsum;
    const float* wscale;
    const float* bias;      // or null
    float* out;             // out[m * ldo_m + n * ldo_n]
    int64_t ldo_m, ldo_n;
    Path path;
    // task grid: N in blocks of nb rows, M in blocks of mb rows; task t = (t / m_blocks, t % m_blocks)
    int64_t nb, mb, n_blocks, m_blocks;
};

// (float)(acc − zp·wsum) · rs · ws (+ bias), rounded step by step like torch's float32 ops.
EDGE_NO_CONTRACT inline float dequant(int32_t acc, int32_t zp, int32_t wsum, float rs, float ws, const float* bias) {
    // Σ(q − zp)·w fits int32; the int64 difference avoids overflow in the intermediate.
    float v = static_cast<float>(static_cast<int64_t>(acc) - static_cast<int64_t>(zp) * wsum);
    v = v * rs;
    v = v * ws;
    if (bias) v = v + *bias;
    return v;
}

EDGE_NO_CONTRACT __attribute__((noinline))
void epilogue(const Gemm& g, int64_t m0, int64_t n0, int mr, int nr, const int32_t* acc) {
    for (int i = 0; i < mr; ++i) {
        const int64_t m = m0 + i;
        const float rs = g.row_scale ? g.row_scale[m] : g.scale;
        float* o = g.out + m * g.ldo_m;
        for (int j = 0; j < nr; ++j) {
            const int64_t n = n0 + j;
            o[n * g.ldo_n] = dequant(acc[i * nr + j], g.zp, g.wsum[n], rs, g.wscale[n], g.bias ? g.bias + n : nullptr);
        }
    }
}

// Portable: one row of q against nr rows of w, int32 (GCC vectorizes the inner loop with SSE2).
void tile_portable(const Gemm& g, int64_t m0, int64_t n0, int mr, int nr) {
    int32_t acc[16];
    const uint8_t* q = static_cast<const uint8_t*>(g.q);
    for (int i = 0; i < mr; ++i) {
        const uint8_t* qr = q + (m0 + i) * g.ldq;
        for (int j = 0; j < nr; ++j) {
            const int8_t* wr = g.w + (n0 + j) * g.K;
            int32_t s = 0;
            for (int64_t k = 0; k < g.K; ++k) s += static_cast<int32_t>(qr[k]) * static_cast<int32_t>(wr[k]);
            acc[i * nr + j] = s;
        }
    }
    epilogue(g, m0, n0, mr, nr, acc);
}

#if EDGE_X86
// [Σa, Σb, Σc, Σd] of four vectors of 8 int32.
EDGE_AVX2 inline __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

template <int MR, int NR>
EDGE_AVX2 inline void reduce_tile(__m256i (&acc)[MR][NR], int32_t* out) {
    const __m256i z = _mm256_setzero_si256();
    for (int i = 0; i < MR; ++i) {
        alignas(16) int32_t s[4];
        _mm_store_si128(reinterpret_cast<__m128i*>(s), hsum4(acc[i][0], NR > 1 ? acc[i][1 % NR] : z,
                                                             NR > 2 ? acc[i][2 % NR] : z, NR > 3 ? acc[i][3 % NR] : z));
        for (int j = 0; j < NR; ++j) out[i * NR + j] = s[j];
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

// 7-bit weights: u8 activations × s8 weights via vpmaddubsw + vpmaddwd(ones).
template <int MR, int NR>
EDGE_AVX2 void tile_u8(const Gemm& g, int64_t m0, int64_t n0) {
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
    for (; k < kfull; k += kChunk) step_u8<MR, NR>(acc, q, ldq, k, w, k, ones);
    if (k < K) {  // tail: weights copied into zeroed chunks (activations are zero-padded to ldq)
        alignas(32) int8_t tail[NR][kChunk];
        const int8_t* tp[NR];
        for (int j = 0; j < NR; ++j) {
            std::memset(tail[j], 0, kChunk);
            std::memcpy(tail[j], w[j] + k, static_cast<size_t>(K - k));
            tp[j] = tail[j];
        }
        step_u8<MR, NR>(acc, q, ldq, k, tp, 0, ones);
    }
    int32_t out[MR * NR];
    reduce_tile<MR, NR>(acc, out);
    epilogue(g, m0, n0, MR, NR, out);
}

// 8-bit weights: int16 activations × weights widened to int16, vpmaddwd (exact for any int8).
template <int MR, int NR>
EDGE_AVX2 void tile_s16(const Gemm& g, int64_t m0, int64_t n0) {
    const int16_t* q = static_cast<const int16_t*>(g.q) + m0 * g.ldq;
    const int64_t ldq = g.ldq, K = g.K;
    const int8_t* w[NR];
    for (int j = 0; j < NR; ++j) w[j] = g.w + (n0 + j) * K;
    __m256i acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
    const int64_t kfull = K & ~(kChunk - 1);
    int64_t k = 0;
    for (; k < kfull; k += kChunk) step_s16<MR, NR>(acc, q, ldq, k, w, k);
    if (k < K) {
        alignas(32) int8_t tail[NR][kChunk];
        const int8_t* tp[NR];
        for (int j = 0; j < NR; ++j) {
            std::memset(tail[j], 0, kChunk);
            std::memcpy(tail[j], w[j] + k, static_cast<size_t>(K - k));
            tp[j] = tail[j];
        }
        step_s16<MR, NR>(acc, q, ldq, k, tp, 0);
    }
    int32_t out[MR * NR];
    reduce_tile<MR, NR>(acc, out);
    epilogue(g, m0, n0, MR, NR, out);
}

using TileFn = void (*)(const Gemm&, int64_t, int64_t);

#define EDGE_TILE_ROW(fn, mr) {fn<mr, 1>, fn<mr, 2>, fn<mr, 3>, fn<mr, 4>}
#define EDGE_TILE_TABLE(fn) \
    {EDGE_TILE_ROW(fn, 1), EDGE_TILE_ROW(fn, 2), EDGE_TILE_ROW(fn, 3), EDGE_TILE_ROW(fn, 4)}
const TileFn kTilesU8[4][4] = EDGE_TILE_TABLE(tile_u8);
const TileFn kTilesS16[4][4] = EDGE_TILE_TABLE(tile_s16);
#endif

// Activation rows per tile, and weight rows per tile for a full (MR-row) tile and for fewer rows.
constexpr int kMR = 4, kNRFull = 3, kNRPart = 4;

void run_task(const Gemm& g, int64_t t) {
    const int64_t nbi = t / g.m_blocks, mbi = t % g.m_blocks;
    const int64_t n_lo = nbi * g.nb, n_hi = std::min(g.N, n_lo + g.nb);
    const int64_t m_lo = mbi * g.mb, m_hi = std::min(g.M, m_lo + g.mb);
    for (int64_t m = m_lo; m < m_hi; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, m_hi - m));
        const int nr_step = mr == kMR ? kNRFull : kNRPart;
        for (int64_t n = n_lo; n < n_hi; n += nr_step) {
            const int nr = static_cast<int>(std::min<int64_t>(nr_step, n_hi - n));
#if EDGE_X86
            if (g.path == kAvx2U8) { kTilesU8[mr - 1][nr - 1](g, m, n); continue; }
            if (g.path == kAvx2S16) { kTilesS16[mr - 1][nr - 1](g, m, n); continue; }
#endif
            tile_portable(g, m, n, mr, nr);
        }
    }
}

// Splits the output into tasks (N blocks whose weights stay in L2, M blocks when N alone gives too
// few) and returns how many threads are worth using.
int plan(Gemm& g, int nthreads) {
    const int64_t unit = 12;  // multiple of both weight-tile widths
    int64_t nb = std::max<int64_t>(unit, (256 * 1024 / std::max<int64_t>(g.K, 1)) / unit * unit);
    nb = std::min(nb, round_up(g.N, unit));
    g.nb = nb;
    g.n_blocks = ceil_div(g.N, nb);
    const double macs = static_cast<double>(g.M) * g.N * g.K;
    int nt = macs < 262144.0 ? 1 : std::max(1, nthreads);
    const int64_t want = nt > 1 ? 4 * nt : 1;
    const int64_t m_split = std::max<int64_t>(1, ceil_div(want, g.n_blocks));
    g.mb = round_up(std::max<int64_t>(1, ceil_div(g.M, m_split)), kMR);
    g.m_blocks = ceil_div(g.M, g.mb);
    const int64_t tasks = g.n_blocks * g.m_blocks;
    return static_cast<int>(std::min<int64_t>(nt, tasks));
}

void gemm_parallel(const Gemm& g, int nt) {
    const int64_t tasks = g.n_blocks * g.m_blocks;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
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

// Rows [r0, r1) of the im2col matrix of image plane group `src` ([Cg, H, W] codes) into A [OH·OW, ld]:
// A[oh·OW + ow, (c·KH + kh)·KW + kw] = src[c, oh·sh − ph + kh·dh, ow·sw − pw + kw·dw], zp outside.
template <typename T>
void im2col_rows(const Conv& cv, const uint8_t* src, T zp, T* A, int64_t ld, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t oh = r / cv.OW, ow = r % cv.OW;
        T* row = A + r * ld;
        int64_t k = 0;
        for (int64_t c = 0; c < cv.Cg; ++c) {
            const uint8_t* plane = src + c * cv.H * cv.W;
            for (int64_t kh = 0; kh < cv.KH; ++kh) {
                const int64_t ih = oh * cv.sh - cv.ph + kh * cv.dh;
                if (ih < 0 || ih >= cv.H) {
                    for (int64_t kw = 0; kw < cv.KW; ++kw) row[k++] = zp;
                    continue;
                }
                const uint8_t* line = plane + ih * cv.W;
                const int64_t iw0 = ow * cv.sw - cv.pw;
                for (int64_t kw = 0; kw < cv.KW; ++kw) {
                    const int64_t iw = iw0 + kw * cv.dw;
                    row[k++] = (iw >= 0 && iw < cv.W) ? static_cast<T>(line[iw]) : zp;
                }
            }
        }
        for (; k < ld; ++k) row[k] = 0;
    }
}

// One output channel of a conv with one input channel per group: direct loop over a zp-padded plane.
void depthwise_channel(const Conv& cv, const uint8_t* plane, const int8_t* w, int32_t zp, uint8_t* padded,
                       int32_t* accrow, float xs, int32_t wsum, float ws, const float* bias, float* out) {
    const int64_t Hp = cv.H + 2 * cv.ph, Wp = cv.W + 2 * cv.pw;
    std::memset(padded, zp, static_cast<size_t>(Hp * Wp));
    for (int64_t h = 0; h < cv.H; ++h)
        std::memcpy(padded + (h + cv.ph) * Wp + cv.pw, plane + h * cv.W, static_cast<size_t>(cv.W));
    for (int64_t oh = 0; oh < cv.OH; ++oh) {
        for (int64_t ow = 0; ow < cv.OW; ++ow) accrow[ow] = 0;
        for (int64_t kh = 0; kh < cv.KH; ++kh) {
            const uint8_t* line = padded + (oh * cv.sh + kh * cv.dh) * Wp;
            for (int64_t kw = 0; kw < cv.KW; ++kw) {
                const int32_t wv = w[kh * cv.KW + kw];
                const uint8_t* src = line + kw * cv.dw;
                if (cv.sw == 1) {
                    for (int64_t ow = 0; ow < cv.OW; ++ow) accrow[ow] += wv * static_cast<int32_t>(src[ow]);
                } else {
                    for (int64_t ow = 0; ow < cv.OW; ++ow) accrow[ow] += wv * static_cast<int32_t>(src[ow * cv.sw]);
                }
            }
        }
        float* orow = out + oh * cv.OW;
        for (int64_t ow = 0; ow < cv.OW; ++ow) orow[ow] = dequant(accrow[ow], zp, wsum, xs, ws, bias);
    }
}

}  // namespace

// ---- C ABI ------------------------------------------------------------------------------------

extern "C" int32_t edge_int8_linear(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t N,
                                    const float* w_scale, const int32_t* w_sum, const float* bias, double x_scale,
                                    int32_t x_zero_point, int32_t weight_bits, float* out, int32_t num_threads) {
    if (M < 0 || K <= 0 || N <= 0) return kBadShape;
    if (weight_bits != 7 && weight_bits != 8) return kBadQuant;
    if (std::isnan(x_scale) || std::isinf(x_scale)) return kBadQuant;
    const bool dynamic = !(x_scale > 0.0);
    if (!dynamic && (x_zero_point < 0 || x_zero_point > 255)) return kBadQuant;
    if (M == 0) return kOk;
    if (!x || !w || !w_scale || !w_sum || !out) return kBadPointer;

    const Path path = choose_path(weight_bits);
    const bool avx2 = path != kPortable;
    const int nthreads = std::max<int32_t>(1, num_threads);
    const int64_t ldq = round_up(K, kChunk);
    const size_t elem = path == kAvx2S16 ? sizeof(int16_t) : sizeof(uint8_t);

    Buffer qbuf, sbuf;
    void* q = qbuf.get(static_cast<size_t>(M * ldq) * elem);
    float* row_scale = dynamic ? static_cast<float*>(sbuf.get(static_cast<size_t>(M) * sizeof(float))) : nullptr;
    if (!q || (dynamic && !row_scale)) return kNoMemory;

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

template <typename T>
int32_t conv_gemm(const Conv& cv, const uint8_t* xq, const int8_t* w, const Gemm& base, float* out, int nthreads) {
    const int64_t M = cv.OH * cv.OW, ldq = round_up(cv.K, kChunk);
    const size_t bytes = static_cast<size_t>(M * ldq) * sizeof(T);
    const T zp = static_cast<T>(base.zp);
    const int64_t jobs = cv.B * cv.G;
    auto job_gemm = [&](int64_t job, T* A) {
        const int64_t b = job / cv.G, gi = job % cv.G;
        Gemm g = base;
        g.q = A; g.ldq = ldq; g.M = M; g.N = cv.Og; g.K = cv.K;
        g.w = w + gi * cv.Og * cv.K;
        g.wsum = base.wsum + gi * cv.Og;
        g.wscale = base.wscale + gi * cv.Og;
        g.bias = base.bias ? base.bias + gi * cv.Og : nullptr;
        g.out = out + (b * cv.O + gi * cv.Og) * M;
        g.ldo_m = 1; g.ldo_n = M;
        return g;
    };
    auto src_of = [&](int64_t job) { return xq + ((job / cv.G) * cv.C + (job % cv.G) * cv.Cg) * cv.H * cv.W; };

    if (nthreads > 1 && jobs >= 2 * nthreads) {
        // Many (image, group) jobs: one per thread at a time, each with its own im2col buffer.
        bool failed = false;
#pragma omp parallel num_threads(nthreads)
        {
            Buffer buf;
            T* A = static_cast<T*>(buf.get(bytes));
            if (!A) {
#pragma omp atomic write
                failed = true;
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t job = 0; job < jobs; ++job) {
                if (!A) continue;
                im2col_rows<T>(cv, src_of(job), zp, A, ldq, 0, M);
                Gemm g = job_gemm(job, A);
                plan(g, 1);
                gemm_serial(g);
            }
        }
        return failed ? kNoMemory : kOk;
    }
    Buffer buf;
    T* A = static_cast<T*>(buf.get(bytes));
    if (!A) return kNoMemory;
    for (int64_t job = 0; job < jobs; ++job) {
        const uint8_t* src = src_of(job);
        const int it = M * cv.K >= 65536 ? nthreads : 1;
#pragma omp parallel for num_threads(it) schedule(static) if (it > 1)
        for (int64_t r0 = 0; r0 < M; r0 += 64) im2col_rows<T>(cv, src, zp, A, ldq, r0, std::min(M, r0 + 64));
        Gemm g = job_gemm(job, A);
        gemm_parallel(g, plan(g, nthreads));
    }
    return kOk;
}

}  // namespace

extern "C" int32_t edge_int8_conv2d(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, const int8_t* w,
                                    int64_t O, int64_t KH, int64_t KW, const float* w_scale, const int32_t* w_sum,
                                    const float* bias, int64_t stride_h, int64_t stride_w, int64_t pad_h,
                                    int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t groups, double x_scale,
                                    int32_t x_zero_point, int32_t weight_bits, float* out, int32_t num_threads) {
    if (B < 0 || C <= 0 || H <= 0 || W <= 0 || O <= 0 || KH <= 0 || KW <= 0) return kBadShape;
    if (stride_h <= 0 || stride_w <= 0 || pad_h < 0 || pad_w < 0 || dil_h <= 0 || dil_w <= 0) return kBadShape;
    if (groups <= 0 || C % groups != 0 || O % groups != 0) return kBadShape;
    Conv cv{B, C, H, W, O, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, 0, 0, C / groups,
            O / groups, 0};
    const int64_t eh = H + 2 * pad_h - dil_h * (KH - 1) - 1, ew = W + 2 * pad_w - dil_w * (KW - 1) - 1;
    if (eh < 0 || ew < 0) return kBadShape;
    cv.OH = eh / stride_h + 1;
    cv.OW = ew / stride_w + 1;
    cv.K = cv.Cg * KH * KW;
    if (weight_bits != 7 && weight_bits != 8) return kBadQuant;
    if (!(x_scale > 0.0) || std::isinf(x_scale)) return kBadQuant;
    if (x_zero_point < 0 || x_zero_point > 255) return kBadQuant;
    if (B == 0) return kOk;
    if (!x || !w || !w_scale || !w_sum || !out) return kBadPointer;

    const Path path = choose_path(weight_bits);
    const bool avx2 = path != kPortable;
    const int nthreads = std::max<int32_t>(1, num_threads);

    // Quantize the whole input once (u8 codes, NCHW).
    const int64_t total = B * C * H * W;
    Buffer qbuf;
    uint8_t* xq = static_cast<uint8_t*>(qbuf.get(static_cast<size_t>(total)));
    if (!xq) return kNoMemory;
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
                                  bias ? bias + o : nullptr, out + p * plane_out);
            }
        }
        return failed ? kNoMemory : kOk;
    }
    if (path == kAvx2S16) return conv_gemm<int16_t>(cv, xq, w, base, out, nthreads);
    return conv_gemm<uint8_t>(cv, xq, w, base, out, nthreads);
}
