// edge_int8_linear's work on checked arguments: quantize the activation rows once, then the GEMM
// (gemm.cpp on [N, K] weights, panel.cpp on packed ones).
#include <algorithm>

#include <omp.h>

#include "gemm.h"

namespace edge::int8 {
namespace {

// The activation codes [M, ldq] (zero past K), and with dynamic quantization each row's scale.
template <typename T>
void quantize_rows(const LinearArgs& a, int64_t ldq, bool avx2, int nthreads, T* q, float* row_scale) {
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
}

}  // namespace

int32_t linear(const LinearArgs& a, Path path, int nthreads) {
    const bool dynamic = !(a.x_scale > 0.0), avx2 = path != kPortable, s16 = path == kAvx2S16;
    const int64_t ldq = round_up(a.K, kChunk);
    Buffer qbuf, sbuf;
    void* q = qbuf.get(static_cast<size_t>(a.M * ldq) * (s16 ? sizeof(int16_t) : sizeof(uint8_t)));
    float* row_scale = dynamic ? static_cast<float*>(sbuf.get(static_cast<size_t>(a.M) * sizeof(float))) : nullptr;
    if (!q || (dynamic && !row_scale)) return refuse(kNoMemory, "int8 kernels: out of memory");
    if (s16) quantize_rows(a, ldq, avx2, nthreads, static_cast<int16_t*>(q), row_scale);
    else quantize_rows(a, ldq, avx2, nthreads, static_cast<uint8_t*>(q), row_scale);

    Gemm g{};
    g.q = q; g.ldq = ldq; g.w = a.w; g.M = a.M; g.N = a.N; g.K = a.K;
    g.row_scale = row_scale; g.scale = static_cast<float>(a.x_scale);
    g.zp = dynamic ? 128 : a.x_zero_point;
    g.wsum = a.w_sum; g.wscale = a.w_scale; g.bias = a.bias;
    g.out = a.out; g.ldo_m = a.N; g.ldo_n = 1; g.path = path;
    gemm_parallel(g, plan(g, nthreads));
    return kOk;
}

int32_t linear_packed(const LinearArgs& a, const uint8_t* shuffle, Path path, int nthreads) {
    const bool dynamic = !(a.x_scale > 0.0);
    const int64_t ldq = round_up(a.K, kChunk);
    Buffer qbuf, sbuf;
    auto* q = static_cast<uint8_t*>(qbuf.get(static_cast<size_t>(a.M * ldq)));
    float* row_scale = dynamic ? static_cast<float*>(sbuf.get(static_cast<size_t>(a.M) * sizeof(float))) : nullptr;
    if (!q || (dynamic && !row_scale)) return refuse(kNoMemory, "int8 kernels: out of memory");
    quantize_rows(a, ldq, path != kPortable, nthreads, q, row_scale);

    Panels p{};
    p.q = q; p.ldq = ldq; p.w = a.w; p.shuffle = shuffle;
    p.M = a.M; p.N = a.N; p.K = a.K; p.steps = ceil_div(a.K, shuffle ? 8 : 4);
    p.row_scale = row_scale; p.scale = static_cast<float>(a.x_scale); p.zp = dynamic ? 128 : a.x_zero_point;
    p.wsum = a.w_sum; p.wscale = a.w_scale; p.bias = a.bias; p.out = a.out; p.path = path;
    gemm_panels(p, nthreads);
    return kOk;
}

}  // namespace edge::int8
