// int8 GEMM and conv2d for the `reference` target: what the int8 translation units share.
//
// Activations are quantized once per call (static per-tensor u8 with a zero point, or dynamic per-token
// symmetric stored as u8 with zero point 128); weights are row-major int8 codes [N, K] the lowering
// prepared once (a conv's packed channels-last), with their row sums (the zero-point correction). Accumulation is exact int32:
//   out[m,n] = (float)(Σ_k q[m,k]·w[n,k] − zp·w_sum[n]) · s_m · w_scale[n] + bias[n].
//
// The files, by concern:
//   quantize.cpp  activation codes (static and dynamic) and the weights' row statistics;
//   gemm.h/.cpp   the GEMM: tasks over OpenMP threads and the AVX2 / portable micro-kernels;
//   linear.cpp    edge_int8_linear's work: quantize the rows, run the GEMM;
//   conv.cpp      edge_int8_conv2d's work: im2col + GEMM, or a direct loop for depthwise convs; the
//                 weight packing (edge_int8_conv2d_pack);
//   bmm.cpp       edge_int8_bmm's work: a batched matmul of two activations, both quantized per call;
//   abi.cpp       the C ABI: argument checks, the CPU path, the calls above.
// Paths, chosen at run time from CPUID (EDGE_KERNELS_PORTABLE=1 forces the portable one):
//   - AVX2, weight_bits 7 (|w| ≤ 64): vpmaddubsw (u8·s8 pairs into int16, exact since 255·64·2 < 2^15)
//     then vpmaddwd with ones into int32.
//   - AVX2, weight_bits 8: activations stored as int16, weights widened to int16, vpmaddwd (exact int32).
//   - portable C++: plain int32 loops, for CPUs without AVX2 and for tests.
// (An AVX-512 VNNI / AVX-VNNI (vpdpbusd) or AMX path would plug in beside the AVX2 micro-kernels.)
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "../check.h"

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

namespace edge::int8 {

enum Path { kPortable = 0, kAvx2U8 = 1, kAvx2S16 = 2 };

constexpr int64_t kChunk = 32;  // K is padded to a multiple of this in the activation buffers
// Longest reduction whose int32 sums cannot overflow: K·255·128 < 2^31.
constexpr int64_t kMaxK = 65793;
// The same for two centered u8 activations (|q − zp| ≤ 255): K·255·255 < 2^31.
constexpr int64_t kMaxBmmK = 33025;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 64-byte aligned scratch owned by one call (or one thread of it).
struct Buffer {
    void* p = nullptr;
    Buffer() = default;
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    ~Buffer() { std::free(p); }
    void* get(size_t bytes) {
        std::free(p);
        p = std::aligned_alloc(64, static_cast<size_t>(round_up(static_cast<int64_t>(bytes) + 64, 64)));
        return p;
    }
};

// ---- quantize.cpp ------------------------------------------------------------------------------
// T is uint8_t (u8 codes) or int16_t (the same codes widened, for the 8-bit AVX2 path).

// q = clamp(nearbyint(x·inv) + zp, 0, 255) for n values.
template <typename T>
void quant_static(const float* x, int64_t n, float inv, float zpf, T* q, bool avx2);

// Symmetric per-row codes + 128 for n values; returns the row's scale.
template <typename T>
float quant_dynamic(const float* x, int64_t n, T* q, bool avx2);

// Σ row[k] and the row's min and max code.
void row_stats(const int8_t* row, int64_t K, int32_t* sum, int32_t* lo, int32_t* hi, bool avx2);

// ---- linear.cpp --------------------------------------------------------------------------------

struct LinearArgs {
    const float* x;          // [M, K]
    int64_t M, K, N;
    const int8_t* w;         // [N, K]
    const float* w_scale;    // [N]
    const int32_t* w_sum;    // [N]
    const float* bias;       // [N] or null
    double x_scale;          // > 0: static per-tensor with x_zero_point; else dynamic per-token
    int32_t x_zero_point;
    float* out;              // [M, N]
};

// Runs a checked linear; kOk, or kNoMemory.
int32_t linear(const LinearArgs& a, Path path, int nthreads);

// ---- panel.cpp: the linear on panel-packed 7-bit weights (dense or 2:4) --------------------------

constexpr int64_t kPanel = 24;     // output channels per panel: 3 vectors of 8
constexpr int64_t kStepCodes = 4;  // codes per channel per step

struct Panels {
    const uint8_t* q;          // activation codes [M, ldq], zero past K; ldq >= K rounded up to 8
    int64_t ldq;
    const int8_t* w;           // packed codes (|w| <= 64), steps × kStepCodes per channel
    const uint8_t* shuffle;    // 2:4: each code's activation position in its step (0..7); null: dense
    int64_t M, N, K, steps;    // steps = ceil(K / 4) dense, ceil(K / 8) sparse
    const float* row_scale;    // [M] per-row activation scale, or null: `scale` for every row
    float scale;
    int32_t zp;
    const int32_t* wsum;       // [N] sum of each channel's codes
    const float* wscale;       // [N]
    const float* bias;         // [N] or null
    float* out;                // [M, N]
    Path path;                 // kPortable or kAvx2U8
};

// Runs the panel GEMM of checked arguments on up to `nthreads` threads.
void gemm_panels(const Panels& p, int nthreads);

// Quantizes x's rows (as linear() does) and runs the panel GEMM; kOk, or kNoMemory.
int32_t linear_packed(const LinearArgs& a, const uint8_t* shuffle, Path path, int nthreads);

// ---- conv.cpp ----------------------------------------------------------------------------------

struct Conv {
    int64_t B, C, H, W, O, KH, KW, sh, sw, ph, pw, dh, dw, G, OH, OW, Cg, Og, K;
};

struct ConvArgs {
    const float* x;          // [B, C, H, W]
    const int8_t* w;         // packed: [O, KH, KW, C/groups] (pack_conv_weight)
    const float* w_scale;    // [O]
    const int32_t* w_sum;    // [O]
    const float* bias;       // [O] or null
    double x_scale;          // > 0, with x_zero_point
    int32_t x_zero_point;
    float* out;              // [B, O, OH, OW]
};

// Runs a checked conv; kOk, or kNoMemory.
int32_t conv2d(const Conv& cv, const ConvArgs& a, Path path, int nthreads);

// Weight codes [O, Cg, KH, KW] (torch's layout) to the packed [O, KH, KW, Cg], the (kh, kw, c) order of
// im2col's rows: done once per weight, when the graph is lowered.
void pack_conv_weight(const int8_t* w, int64_t O, int64_t Cg, int64_t KH, int64_t KW, int8_t* packed, int nthreads);

// ---- bmm.cpp -----------------------------------------------------------------------------------

struct BmmArgs {
    const float* a;          // [batch, M, K]
    const float* b;          // [batch, K, N], or [batch, N, K] with transpose_b
    int64_t batch, M, K, N;
    bool transpose_b;
    double a_scale, b_scale; // > 0: static per-tensor u8, with the zero points
    int32_t a_zero_point, b_zero_point;
    float* out;              // [batch, M, N]
};

// Runs a checked batched matmul; kOk, or kNoMemory.
int32_t bmm(const BmmArgs& a, Path path, int nthreads);

}  // namespace edge::int8
