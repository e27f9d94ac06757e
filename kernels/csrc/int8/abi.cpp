// The int8 kernels' C ABI (see build.py and abi.py): edge_int8_linear, edge_int8_linear_packed, edge_int8_conv2d (on weights
// packed by edge_int8_conv2d_pack), edge_int8_bmm and edge_int8_row_stats. Each checks its shapes, quantization and buffer sizes (check.h) before anything
// is read, picks the CPU path, and calls the kernel.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include <omp.h>

#include "int8.h"

namespace edge::int8 {
namespace {

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

bool use_avx2() { return !force_portable() && cpu_has_avx2(); }

Path choose_path(int32_t weight_bits) {
    if (!use_avx2()) return kPortable;
    return weight_bits == 7 ? kAvx2U8 : kAvx2S16;
}

int threads(int32_t num_threads) { return std::max<int32_t>(1, num_threads); }

long long ll(int64_t v) { return static_cast<long long>(v); }

// Checks that need no shape: weight_bits and the activation quantization (x_scale <= 0: dynamic).
int32_t check_quant(const char* op, int32_t weight_bits, double x_scale, int32_t x_zero_point, bool dynamic_ok) {
    if (weight_bits != 7 && weight_bits != 8) return refuse(kBadQuant, "%s: weight_bits must be 7 or 8, got %d", op, weight_bits);
    if (std::isnan(x_scale) || std::isinf(x_scale) || (!dynamic_ok && !(x_scale > 0.0)))
        return refuse(kBadQuant, "%s: x_scale must be finite%s, got %g", op, dynamic_ok ? "" : " and > 0", x_scale);
    if (x_scale > 0.0 && (x_zero_point < 0 || x_zero_point > 255))
        return refuse(kBadQuant, "%s: x_zero_point must be in [0, 255], got %d", op, x_zero_point);
    return kOk;
}

// A static per-tensor u8 activation quantization: scale finite and > 0, zero point in [0, 255].
int32_t check_activation(const char* op, const char* name, double scale, int32_t zero_point) {
    if (!std::isfinite(scale) || !(scale > 0.0))
        return refuse(kBadQuant, "%s: %s_scale must be finite and > 0, got %g", op, name, scale);
    if (zero_point < 0 || zero_point > 255)
        return refuse(kBadQuant, "%s: %s_zero_point must be in [0, 255], got %d", op, name, zero_point);
    return kOk;
}

// A buffer as the ABI passes it: a pointer and its size in bytes.
struct Buf {
    const void* p;
    int64_t bytes;
};

// Every buffer of an int8 op holds what its shapes need: the weight codes, one w_scale, w_sum and
// (optional) bias value per output channel, the float input and output.
int32_t check_buffers(const char* op, Buf w, int64_t w_elems, int64_t channels, Buf w_scale, Buf w_sum, Buf bias,
                      Buf x, int64_t x_elems, Buf out, int64_t out_elems) {
    if (int32_t c = need(op, "w", w.p, w.bytes, w_elems, 1)) return c;
    if (int32_t c = need(op, "w_scale", w_scale.p, w_scale.bytes, channels, sizeof(float))) return c;
    if (int32_t c = need(op, "w_sum", w_sum.p, w_sum.bytes, channels, sizeof(int32_t))) return c;
    if (bias.p)
        if (int32_t c = need(op, "bias", bias.p, bias.bytes, channels, sizeof(float))) return c;
    if (x_elems == 0) return kOk;  // an empty batch reads and writes nothing
    if (int32_t c = need(op, "x", x.p, x.bytes, x_elems, sizeof(float))) return c;
    return need(op, "out", out.p, out.bytes, out_elems, sizeof(float));
}

// How a linear's weight codes are stored: [N, K] rows, or panels (panels.packed_size).
enum class WeightLayout { kRows, kPanels, kPanels24 };

// What both linears check: M, K, N, the quantization, and every buffer against its size, the weight's
// from its layout (its element count in *w_elems where asked).
int32_t check_linear(const char* op, int64_t M, int64_t K, int64_t N, WeightLayout layout, int32_t weight_bits,
                     double x_scale, int32_t x_zero_point, Buf w, Buf w_scale, Buf w_sum, Buf bias, Buf x, Buf out,
                     int64_t* w_elems) {
    if (M < 0 || K <= 0 || K > kMaxK || N <= 0)
        return refuse(kBadShape, "%s: needs M >= 0, 0 < K <= %lld, N > 0; got M=%lld K=%lld N=%lld", op, ll(kMaxK),
                      ll(M), ll(K), ll(N));
    if (int32_t c = check_quant(op, weight_bits, x_scale, x_zero_point, true)) return c;
    const bool rows = layout == WeightLayout::kRows;
    const int64_t w_cols = rows ? K : layout == WeightLayout::kPanels ? round_up(K, 4) : round_up(K, 8) / 2;
    int64_t x_elems, w_count, out_elems;
    if ((!rows && N > std::numeric_limits<int64_t>::max() - 8) || !count(&x_elems, M, K) ||
        !count(&w_count, rows ? N : round_up(N, 8), w_cols) || !count(&out_elems, M, N))
        return refuse(kBadShape, "%s: M=%lld K=%lld N=%lld overflow", op, ll(M), ll(K), ll(N));
    if (w_elems) *w_elems = w_count;
    return check_buffers(op, w, w_count, N, w_scale, w_sum, bias, x, x_elems, out, out_elems);
}

// Checks the conv's geometry (cv's B … G) and fills in its output size, Cg, Og and K.
int32_t conv_geometry(const char* op, Conv& cv) {
    if (cv.B < 0 || cv.C <= 0 || cv.H <= 0 || cv.W <= 0 || cv.O <= 0 || cv.KH <= 0 || cv.KW <= 0)
        return refuse(kBadShape, "%s: needs B >= 0 and C, H, W, O, KH, KW > 0; got B=%lld C=%lld H=%lld W=%lld "
                      "O=%lld KH=%lld KW=%lld", op, ll(cv.B), ll(cv.C), ll(cv.H), ll(cv.W), ll(cv.O), ll(cv.KH),
                      ll(cv.KW));
    if (cv.sh <= 0 || cv.sw <= 0 || cv.ph < 0 || cv.pw < 0 || cv.dh <= 0 || cv.dw <= 0)
        return refuse(kBadShape, "%s: needs stride > 0, padding >= 0, dilation > 0; got stride (%lld, %lld) "
                      "padding (%lld, %lld) dilation (%lld, %lld)", op, ll(cv.sh), ll(cv.sw), ll(cv.ph), ll(cv.pw),
                      ll(cv.dh), ll(cv.dw));
    if (cv.G <= 0 || cv.C % cv.G != 0 || cv.O % cv.G != 0)
        return refuse(kBadShape, "%s: groups=%lld must divide C=%lld and O=%lld", op, ll(cv.G), ll(cv.C), ll(cv.O));
    constexpr int64_t kLarge = int64_t{1} << 40, kLargeKernel = int64_t{1} << 20;
    if (cv.H > kLarge || cv.W > kLarge || cv.ph > kLarge || cv.pw > kLarge || cv.KH > kLargeKernel ||
        cv.KW > kLargeKernel || cv.dh > kLargeKernel || cv.dw > kLargeKernel)
        return refuse(kBadShape, "%s: sizes too large", op);  // keeps the output-size arithmetic below in int64
    const int64_t eh = cv.H + 2 * cv.ph - cv.dh * (cv.KH - 1) - 1, ew = cv.W + 2 * cv.pw - cv.dw * (cv.KW - 1) - 1;
    if (eh < 0 || ew < 0)
        return refuse(kBadShape, "%s: the %lldx%lld kernel (dilation %lld, %lld) is larger than the padded %lldx%lld "
                      "input", op, ll(cv.KH), ll(cv.KW), ll(cv.dh), ll(cv.dw), ll(cv.H + 2 * cv.ph),
                      ll(cv.W + 2 * cv.pw));
    cv.OH = eh / cv.sh + 1;
    cv.OW = ew / cv.sw + 1;
    cv.Cg = cv.C / cv.G;
    cv.Og = cv.O / cv.G;
    cv.K = cv.Cg * cv.KH * cv.KW;
    if (cv.K > kMaxK) return refuse(kBadShape, "%s: C/groups*KH*KW = %lld exceeds %lld", op, ll(cv.K), ll(kMaxK));
    return kOk;
}

}  // namespace
}  // namespace edge::int8

using namespace edge;
using namespace edge::int8;

extern "C" int32_t edge_int8_linear(const float* x, int64_t x_bytes, int64_t M, int64_t K, const int8_t* w,
                                    int64_t w_bytes, int64_t N, const float* w_scale, int64_t w_scale_bytes,
                                    const int32_t* w_sum, int64_t w_sum_bytes, const float* bias, int64_t bias_bytes,
                                    double x_scale, int32_t x_zero_point, int32_t weight_bits, float* out,
                                    int64_t out_bytes, int32_t num_threads) {
    if (int32_t c = check_linear("edge_int8_linear", M, K, N, WeightLayout::kRows, weight_bits, x_scale, x_zero_point,
                                 {w, w_bytes}, {w_scale, w_scale_bytes}, {w_sum, w_sum_bytes}, {bias, bias_bytes},
                                 {x, x_bytes}, {out, out_bytes}, nullptr))
        return c;
    if (M == 0) return kOk;
    const LinearArgs args{x, M, K, N, w, w_scale, w_sum, bias, x_scale, x_zero_point, out};
    return linear(args, choose_path(weight_bits), threads(num_threads));
}

// Packed codes: round_up(N, 8) × round_up(K, 4) bytes dense; with `shuffle` (2:4) round_up(N, 8) ×
// round_up(K, 8) / 2 bytes, and as many shuffle bytes (ops.pack_int8_panels / pack_int8_panels_24).
extern "C" int32_t edge_int8_linear_packed(const float* x, int64_t x_bytes, int64_t M, int64_t K, const int8_t* w,
                                           int64_t w_bytes, const uint8_t* shuffle, int64_t shuffle_bytes, int64_t N,
                                           const float* w_scale, int64_t w_scale_bytes, const int32_t* w_sum,
                                           int64_t w_sum_bytes, const float* bias, int64_t bias_bytes, double x_scale,
                                           int32_t x_zero_point, float* out, int64_t out_bytes, int32_t num_threads) {
    constexpr const char* op = "edge_int8_linear_packed";
    const WeightLayout layout = shuffle ? WeightLayout::kPanels24 : WeightLayout::kPanels;
    int64_t w_elems = 0;
    if (int32_t c = check_linear(op, M, K, N, layout, 7, x_scale, x_zero_point, {w, w_bytes}, {w_scale, w_scale_bytes},
                                 {w_sum, w_sum_bytes}, {bias, bias_bytes}, {x, x_bytes}, {out, out_bytes}, &w_elems))
        return c;
    if (shuffle)
        if (int32_t c = need(op, "shuffle", shuffle, shuffle_bytes, w_elems, 1)) return c;
    if (M == 0) return kOk;
    const LinearArgs args{x, M, K, N, w, w_scale, w_sum, bias, x_scale, x_zero_point, out};
    return linear_packed(args, shuffle, use_avx2() ? kAvx2U8 : kPortable, threads(num_threads));
}

extern "C" int32_t edge_int8_conv2d(const float* x, int64_t x_bytes, int64_t B, int64_t C, int64_t H, int64_t W,
                                    const int8_t* w, int64_t w_bytes, int64_t O, int64_t KH, int64_t KW,
                                    const float* w_scale, int64_t w_scale_bytes, const int32_t* w_sum,
                                    int64_t w_sum_bytes, const float* bias, int64_t bias_bytes, int64_t stride_h,
                                    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                                    int64_t groups, double x_scale, int32_t x_zero_point, int32_t weight_bits,
                                    float* out, int64_t out_bytes, int32_t num_threads) {
    constexpr const char* op = "edge_int8_conv2d";
    Conv cv{B, C, H, W, O, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, 0, 0, 0, 0, 0};
    if (int32_t c = conv_geometry(op, cv)) return c;
    if (int32_t c = check_quant(op, weight_bits, x_scale, x_zero_point, false)) return c;
    int64_t x_elems, w_elems, out_elems;
    if (!count(&x_elems, B, C, H, W) || !count(&w_elems, O, cv.K) || !count(&out_elems, B, O, cv.OH, cv.OW))
        return refuse(kBadShape, "%s: sizes overflow", op);
    if (int32_t c = check_buffers(op, {w, w_bytes}, w_elems, O, {w_scale, w_scale_bytes}, {w_sum, w_sum_bytes},
                                  {bias, bias_bytes}, {x, x_bytes}, x_elems, {out, out_bytes}, out_elems))
        return c;
    if (B == 0) return kOk;
    const ConvArgs args{x, w, w_scale, w_sum, bias, x_scale, x_zero_point, out};
    return conv2d(cv, args, choose_path(weight_bits), threads(num_threads));
}

extern "C" int32_t edge_int8_bmm(const float* a, int64_t a_bytes, const float* b, int64_t b_bytes, int64_t batch,
                                 int64_t M, int64_t K, int64_t N, int32_t transpose_b, double a_scale,
                                 int32_t a_zero_point, double b_scale, int32_t b_zero_point, float* out,
                                 int64_t out_bytes, int32_t num_threads) {
    constexpr const char* op = "edge_int8_bmm";
    if (batch < 0 || M < 0 || K <= 0 || K > kMaxBmmK || N <= 0)
        return refuse(kBadShape, "%s: needs batch >= 0, M >= 0, 0 < K <= %lld, N > 0; got batch=%lld M=%lld K=%lld "
                      "N=%lld", op, ll(kMaxBmmK), ll(batch), ll(M), ll(K), ll(N));
    if (transpose_b != 0 && transpose_b != 1)
        return refuse(kBadShape, "%s: transpose_b must be 0 or 1, got %d", op, transpose_b);
    if (int32_t c = check_activation(op, "a", a_scale, a_zero_point)) return c;
    if (int32_t c = check_activation(op, "b", b_scale, b_zero_point)) return c;
    int64_t a_elems, b_elems, out_elems, padded;
    // `padded` bounds the packed buffers (K + 1 pairs' rows, N + 16 columns): their sizes fit int64 too
    if (!count(&a_elems, batch, M, K) || !count(&b_elems, batch, K, N) || !count(&out_elems, batch, M, N) ||
        !count(&padded, batch, K + 1, std::max(M, N + 16)))
        return refuse(kBadShape, "%s: batch=%lld M=%lld K=%lld N=%lld overflow", op, ll(batch), ll(M), ll(K), ll(N));
    if (a_elems == 0) return kOk;  // no rows: nothing to read or write
    if (int32_t c = need(op, "a", a, a_bytes, a_elems, sizeof(float))) return c;
    if (int32_t c = need(op, "b", b, b_bytes, b_elems, sizeof(float))) return c;
    if (int32_t c = need(op, "out", out, out_bytes, out_elems, sizeof(float))) return c;
    const BmmArgs args{a, b, batch, M, K, N, transpose_b == 1, a_scale, b_scale, a_zero_point, b_zero_point, out};
    return bmm(args, use_avx2() ? kAvx2S16 : kPortable, threads(num_threads));
}

// Packs conv weight codes w [O, Cg, KH, KW] into packed [O, KH, KW, Cg], the layout edge_int8_conv2d reads.
extern "C" int32_t edge_int8_conv2d_pack(const int8_t* w, int64_t w_bytes, int64_t O, int64_t Cg, int64_t KH,
                                         int64_t KW, int8_t* packed, int64_t packed_bytes, int32_t num_threads) {
    constexpr const char* op = "edge_int8_conv2d_pack";
    int64_t elems;
    if (O <= 0 || Cg <= 0 || KH <= 0 || KW <= 0 || !count(&elems, O, Cg, KH, KW))
        return refuse(kBadShape, "%s: needs O, Cg, KH, KW > 0; got O=%lld Cg=%lld KH=%lld KW=%lld", op, ll(O), ll(Cg),
                      ll(KH), ll(KW));
    if (int32_t c = need(op, "w", w, w_bytes, elems, 1)) return c;
    if (int32_t c = need(op, "packed", packed, packed_bytes, elems, 1)) return c;
    pack_conv_weight(w, O, Cg, KH, KW, packed, threads(num_threads));
    return kOk;
}

// Row sums of int8 weight codes w [N, K] into sums [N] and their range into range [2] (min, max): one
// pass over the weight for what the Python side checks once per weight (weight_sum matches the codes,
// weight_bits=7 codes lie within [-64, 64]) and for ops.int8_weight_sum.
extern "C" int32_t edge_int8_row_stats(const int8_t* w, int64_t w_bytes, int64_t N, int64_t K, int32_t* sums,
                                       int64_t sums_bytes, int32_t* range, int64_t range_bytes, int32_t num_threads) {
    constexpr const char* op = "edge_int8_row_stats";
    int64_t w_elems = 0;
    if (N < 0 || K < 0 || K > (int64_t{1} << 23) || !count(&w_elems, N, K))  // 128·2^23 = 2^30: sums fit int32
        return refuse(kBadShape, "%s: needs N >= 0, 0 <= K <= 2^23; got N=%lld K=%lld", op, ll(N), ll(K));
    if (int32_t c = need(op, "w", w, w_bytes, w_elems, 1)) return c;
    if (int32_t c = need(op, "sums", sums, sums_bytes, N, sizeof(int32_t))) return c;
    if (int32_t c = need(op, "range", range, range_bytes, 2, sizeof(int32_t))) return c;
    const bool avx2 = use_avx2();
    int32_t lo = 127, hi = -128;
    const int nt = w_elems >= (1 << 22) ? threads(num_threads) : 1;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : lo) reduction(max : hi) if (nt > 1)
    for (int64_t n = 0; n < N; ++n) {
        int32_t rlo, rhi;
        row_stats(w + n * K, K, sums + n, &rlo, &rhi, avx2);
        lo = std::min(lo, rlo);
        hi = std::max(hi, rhi);
    }
    range[0] = lo;
    range[1] = hi;
    return kOk;
}
