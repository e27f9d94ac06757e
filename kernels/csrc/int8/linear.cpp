// edge_int8_linear's work on checked arguments: quantize the activation rows once, then the GEMM
// (gemm.cpp on [N, K] weights, panel.cpp on packed ones).
#include <algorithm>

#include <omp.h>

#include "gemm.h"

namespace edge::int8 {
namespace {

// The activation rows of one call, quantized once: codes [M, ldq] of type T (zero past K) and, with
// dynamic quantization, each row's scale and the codes' zero point 128.
struct QuantizedRows {
    Buffer codes, scales;
    int64_t ldq = 0;
    float* row_scale = nullptr;  // null: static, a.x_scale for every row
    int32_t zp = 0;

    // kOk, or kNoMemory.
    template <typename T>
    int32_t quantize(const LinearArgs& a, bool avx2, int nthreads) {
        const bool dynamic = !(a.x_scale > 0.0);
        ldq = round_up(a.K, kChunk);
        zp = dynamic ? 128 : a.x_zero_point;
        T* q = static_cast<T*>(codes.get(static_cast<size_t>(a.M * ldq) * sizeof(T)));
        if (dynamic) row_scale = static_cast<float*>(scales.get(static_cast<size_t>(a.M) * sizeof(float)));
        if (!q || (dynamic && !row_scale)) return refuse(kNoMemory, "int8 kernels: out of memory");
        const float inv = static_cast<float>(1.0 / a.x_scale), zpf = static_cast<float>(a.x_zero_point);
        const int qt = a.M * a.K >= 65536 ? nthreads : 1;
#pragma omp parallel for num_threads(qt) schedule(static) if (qt > 1)
        for (int64_t m = 0; m < a.M; ++m) {
            const float* xr = a.x + m * a.K;
            T* qr = q + m * ldq;
            if (row_scale) row_scale[m] = quant_dynamic(xr, a.K, qr, avx2);
            else quant_static(xr, a.K, inv, zpf, qr, avx2);
            std::fill(qr + a.K, qr + ldq, T(0));
        }
        return kOk;
    }
};

}  // namespace

int32_t linear(const LinearArgs& a, Path path, int nthreads) {
    const bool avx2 = path != kPortable, s16 = path == kAvx2S16;
    QuantizedRows rows;
    const int32_t c = s16 ? rows.quantize<int16_t>(a, avx2, nthreads) : rows.quantize<uint8_t>(a, avx2, nthreads);
    if (c != kOk) return c;

    Gemm g{};
    g.q = rows.codes.p; g.ldq = rows.ldq; g.w = a.w; g.M = a.M; g.N = a.N; g.K = a.K;
    g.row_scale = rows.row_scale; g.scale = static_cast<float>(a.x_scale); g.zp = rows.zp;
    g.wsum = a.w_sum; g.wscale = a.w_scale; g.bias = a.bias;
    g.out = a.out; g.ldo_m = a.N; g.ldo_n = 1; g.path = path;
    gemm_parallel(g, plan(g, nthreads));
    return kOk;
}

int32_t linear_packed(const LinearArgs& a, const uint8_t* shuffle, Path path, int nthreads) {
    QuantizedRows rows;
    if (const int32_t c = rows.quantize<uint8_t>(a, path != kPortable, nthreads); c != kOk) return c;

    Panels p{};
    p.q = static_cast<const uint8_t*>(rows.codes.p); p.ldq = rows.ldq; p.w = a.w; p.shuffle = shuffle;
    p.M = a.M; p.N = a.N; p.K = a.K; p.steps = ceil_div(a.K, shuffle ? 8 : 4);
    p.row_scale = rows.row_scale; p.scale = static_cast<float>(a.x_scale); p.zp = rows.zp;
    p.wsum = a.w_sum; p.wscale = a.w_scale; p.bias = a.bias; p.out = a.out; p.path = path;
    gemm_panels(p, nthreads);
    return kOk;
}

}  // namespace edge::int8
