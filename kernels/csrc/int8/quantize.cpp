// Quantization: activation codes (static per-tensor and dynamic per-token) and the weights' row
// statistics, each with a portable loop and an AVX2 one.
//
// Static: q = clamp(nearbyint(x·inv) + zp, 0, 255), inv = (float)(1/x_scale): torch's
// quantize_per_tensor (float32 x·inv, round half to even, + zp, clamp). NaN reads as 0.
// Dynamic: s = max|x|/127 (1 for a zero row), q = clamp(nearbyint(x/s), −127, 127) + 128.
#include <algorithm>
#include <cmath>

#include "int8.h"

namespace edge::int8 {
namespace {

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

}  // namespace

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

template void quant_static<uint8_t>(const float*, int64_t, float, float, uint8_t*, bool);
template void quant_static<int16_t>(const float*, int64_t, float, float, int16_t*, bool);
template float quant_dynamic<uint8_t>(const float*, int64_t, uint8_t*, bool);
template float quant_dynamic<int16_t>(const float*, int64_t, int16_t*, bool);

// ---- weights' row statistics ------------------------------------------------------------------

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

void row_stats(const int8_t* row, int64_t K, int32_t* sum, int32_t* lo, int32_t* hi, bool avx2) {
#if EDGE_X86
    if (avx2) return row_stats_avx2(row, K, sum, lo, hi);
#endif
    (void)avx2;
    row_stats_portable(row, K, sum, lo, hi);
}

}  // namespace edge::int8
