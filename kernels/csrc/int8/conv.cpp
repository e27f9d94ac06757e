// edge_int8_conv2d's work on checked arguments.
//
// The NCHW input is quantized once and its codes transposed to channels-last, so im2col copies runs of
// contiguous channels (padding = the zero point's code) in the (kh, kw, c) order of the packed weights
// (pack_conv_weight, run once when the graph is lowered); then the GEMM (gemm.h) runs per (image,
// group), writing NCHW. Convs with one input channel per group (depthwise) run a direct loop over a
// zero-point-padded plane instead.
#include <algorithm>
#include <cstring>
#include <vector>

#include <omp.h>

#include "gemm.h"

namespace edge::int8 {
namespace {

template <typename T>
inline void copy_codes(T* dst, const uint8_t* src, int64_t n) {
    if (sizeof(T) == 1 && n > 16) std::memcpy(dst, src, static_cast<size_t>(n));
    else for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);  // few channels: no call
}

// Rows [r0, r1) of the im2col matrix of one image and group, from channels-last codes `img` [H, W, C]
// (the group's channels start at c0) into A [OH·OW, ld], K ordered (kh, kw, c) like the packed weights:
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

// The GEMM path: per (image, group), im2col from channels-last codes `xt` [B, H, W, C] with the packed
// weights `wt` [O, KH, KW, Cg], then the GEMM with the output written transposed (NCHW).
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

// The input's u8 codes, NCHW, in pieces over the threads.
void quantize_input(const Conv& cv, const ConvArgs& a, bool avx2, int nthreads, uint8_t* xq) {
    const int64_t total = cv.B * cv.C * cv.H * cv.W, piece = 1 << 16, pieces = ceil_div(total, piece);
    const float inv = static_cast<float>(1.0 / a.x_scale), zpf = static_cast<float>(a.x_zero_point);
    const int qt = pieces > 1 ? nthreads : 1;
#pragma omp parallel for num_threads(qt) schedule(static) if (qt > 1)
    for (int64_t p = 0; p < pieces; ++p) {
        const int64_t lo = p * piece;
        quant_static(a.x + lo, std::min(piece, total - lo), inv, zpf, xq + lo, avx2);
    }
}

// One input channel per group (depthwise and its channel multipliers): a direct loop per output plane.
int32_t depthwise(const Conv& cv, const ConvArgs& a, const uint8_t* xq, bool avx2, int nthreads) {
    const int64_t planes = cv.B * cv.O, plane_out = cv.OH * cv.OW, taps = cv.KH * cv.KW;
    const size_t pad_bytes = static_cast<size_t>((cv.H + 2 * cv.ph) * (cv.W + 2 * cv.pw));
    const int dt = planes * plane_out * taps >= 65536 ? nthreads : 1;
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
            const int64_t b = p / cv.O, o = p % cv.O, c = o / cv.Og;
            depthwise_channel(cv, xq + (b * cv.C + c) * cv.H * cv.W, a.w + o * taps, a.x_zero_point, padded.data(),
                              accrow.data(), static_cast<float>(a.x_scale), a.w_sum[o], a.w_scale[o],
                              a.bias ? a.bias + o : nullptr, a.out + p * plane_out, avx2);
        }
    }
    return failed ? refuse(kNoMemory, "int8 kernels: out of memory") : kOk;
}

// Codes [B, C, H·W] to channels-last [B, H·W, C], in blocks of pixels over the threads.
void to_channels_last(const Conv& cv, const uint8_t* xq, uint8_t* xt, int nthreads) {
    const int64_t HW = cv.H * cv.W, blocks = ceil_div(HW, kTransposeBlock);
    const int tt = cv.B * cv.C * HW >= 65536 ? nthreads : 1;
#pragma omp parallel for num_threads(tt) schedule(static) if (tt > 1)
    for (int64_t t = 0; t < cv.B * blocks; ++t) {
        const int64_t b = t / blocks, p0 = (t % blocks) * kTransposeBlock;
        transpose_codes(xq + b * cv.C * HW, xt + b * HW * cv.C, cv.C, HW, p0, std::min(HW, p0 + kTransposeBlock));
    }
}

}  // namespace

int32_t conv2d(const Conv& cv, const ConvArgs& a, Path path, int nthreads) {
    const bool avx2 = path != kPortable;
    const size_t total = static_cast<size_t>(cv.B * cv.C * cv.H * cv.W);
    Buffer qbuf;
    uint8_t* xq = static_cast<uint8_t*>(qbuf.get(total));
    if (!xq) return refuse(kNoMemory, "int8 kernels: out of memory");
    quantize_input(cv, a, avx2, nthreads, xq);
    if (cv.Cg == 1) return depthwise(cv, a, xq, avx2, nthreads);

    Buffer tbuf;
    uint8_t* xt = static_cast<uint8_t*>(tbuf.get(total));
    if (!xt) return refuse(kNoMemory, "int8 kernels: out of memory");
    to_channels_last(cv, xq, xt, nthreads);
    Gemm base{};
    base.row_scale = nullptr; base.scale = static_cast<float>(a.x_scale); base.zp = a.x_zero_point;
    base.wsum = a.w_sum; base.wscale = a.w_scale; base.bias = a.bias; base.path = path;
    if (path == kAvx2S16) return conv_gemm<int16_t>(cv, xt, a.w, base, a.out, nthreads);
    return conv_gemm<uint8_t>(cv, xt, a.w, base, a.out, nthreads);
}

void pack_conv_weight(const int8_t* w, int64_t O, int64_t Cg, int64_t KH, int64_t KW, int8_t* packed, int nthreads) {
    const int64_t taps = KH * KW, K = Cg * taps;
    const int pt = O * K >= 65536 ? nthreads : 1;
#pragma omp parallel for num_threads(pt) schedule(static) if (pt > 1)
    for (int64_t o = 0; o < O; ++o)
        for (int64_t c = 0; c < Cg; ++c)
            for (int64_t k = 0; k < taps; ++k) packed[o * K + k * Cg + c] = w[o * K + c * taps + k];
}

}  // namespace edge::int8
