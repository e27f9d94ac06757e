// edge_sparse24_linear_f32: out[M,N] = x[M,K] · Wᵀ + bias for a 2:4-sparse W [N,K] stored compressed
// (ops.pack_sparse24): values f32 [N, K/2] (the two kept values of each group of 4 along K, in
// ascending position order) and indices u8 [N, ceil(K/8)] (per group the nibble i0 | i1 << 2,
// group 2j in the low nibble of byte j). Only the kept weights are multiplied: half the FLOPs and
// a bit over half the bytes of the dense weight.
//
// AVX2 design (chosen at run time from CPUID; EDGE_KERNELS_PORTABLE=1 forces the scalar path):
//  * M >= kWideMinRows, weight-stationary: x is transposed into xt, M split into blocks of up to
//    32 rows (4 ymm), each stored [K][BS] with BS = 8·ceil(rows/8) and zero padding. A kept weight
//    w at position k of row n then contributes out_t[n, block] += w · xt[k, block]: one broadcast
//    of w and BS/8 FMAs whose xt operand is a plain contiguous load at an offset the index nibble
//    selects — no gathers, no shuffles. R output rows × BS/8 vectors (8 or 9 accumulators) stay in
//    registers over a K-block sized so that xt[K-block, block] sits in L1; the per-thread output
//    tile out_t[n-chunk, M] and the weight slice of the n-chunk × K-block sit in L2, so weights
//    come from DRAM once and from L2 for the other M-blocks. Threads split N into chunks (and
//    M-blocks too when N has fewer chunks than threads); no reduction across threads. Per kept
//    weight the loop issues 1 + BS/8 loads for BS/8 FMAs, so with 2 vector loads a cycle (Zen 3)
//    it is load-bound at ~80% of FMA peak for 32-row blocks (~67% for 16); the weights of the
//    rows two groups ahead are prefetched so that DRAM streaming overlaps the FMAs.
//  * small M: per output (m, n) a dot product over the kept values, 8 at a time: the 16 x values of
//    4 groups are 2 ymm loads, vpermps with an index vector looked up from the index byte picks
//    the kept ones, one FMA with 8 contiguous values.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>

#include <omp.h>

#include "check.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EDGE_SPARSE24_X86 1
#endif

namespace {

constexpr int64_t kWideMinRows = 3;       // M at or above which the weight-stationary kernel runs
constexpr int64_t kChunkRows = 256;       // output rows per thread work item (L2-resident tile)
constexpr int64_t kL1XtBytes = 16384;     // target size of one xt K-block × M-block
constexpr int64_t kPrefetchGroups = 2;    // software prefetch distance of the weights, in row groups
constexpr int64_t kDotPrefetchBytes = 2048;  // the same for the dot kernel, along a row's values

bool portable_forced() {
  const char* env = std::getenv("EDGE_KERNELS_PORTABLE");
  return env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0;
}

int resolve_threads(int32_t num_threads) {
  return num_threads > 0 ? num_threads : omp_get_max_threads();
}

float* alloc_floats(int64_t count) {
  size_t bytes = (static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(float) + 63) / 64 * 64;
  return static_cast<float*>(std::aligned_alloc(64, bytes));
}

// ---- portable scalar path ---------------------------------------------------------------------

void linear_portable(const float* x, int64_t M, int64_t K, const float* values, const uint8_t* indices,
                     int64_t N, const float* bias, float* out, int threads) {
  const int64_t G = K / 4, half = K / 2, ib = (G + 1) / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* v = values + n * half;
    const uint8_t* id = indices + n * ib;
    const float b = bias ? bias[n] : 0.0f;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float s0 = 0.0f, s1 = 0.0f;
      for (int64_t g = 0; g < G; ++g) {
        const unsigned nib = (id[g >> 1] >> ((g & 1) * 4)) & 15u;
        s0 += v[2 * g] * xr[4 * g + (nib & 3u)];
        s1 += v[2 * g + 1] * xr[4 * g + (nib >> 2)];
      }
      out[m * N + n] = (s0 + s1) + b;
    }
  }
}

#ifdef EDGE_SPARSE24_X86

// For an index byte (two groups, 8 positions): the kept positions 0..7 as 4 int32 lanes.
struct PermTable {
  alignas(64) int32_t pos[256][4];
  constexpr PermTable() : pos() {
    for (int b = 0; b < 256; ++b) {
      pos[b][0] = b & 3;
      pos[b][1] = (b >> 2) & 3;
      pos[b][2] = 4 + ((b >> 4) & 3);
      pos[b][3] = 4 + ((b >> 6) & 3);
    }
  }
};
constexpr PermTable kPerm{};

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The kept x values of 4 groups (16 positions from xr) in the order of their 8 weights.
__attribute__((target("avx2,fma"))) inline __m256 pick8(const float* xr, __m256i pa, __m256i pb) {
  const __m256 ga = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr), pa);
  const __m256 gb = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr + 8), pb);
  return _mm256_blend_ps(ga, gb, 0xF0);
}

__attribute__((target("avx2,fma"))) inline __m256i perm_of(uint8_t byte) {
  return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kPerm.pos[byte])));
}

// Small M: dot products of MB rows of x with rows [n0, n1) of W, sharing the index decode.
template <int MB>
__attribute__((target("avx2,fma"))) void dot_rows_avx2(const float* x, int64_t K, const float* values,
                                                       const uint8_t* indices, int64_t n0, int64_t n1,
                                                       const float* bias, float* out, int64_t N) {
  const int64_t G = K / 4, half = K / 2, ib = (G + 1) / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const float* v = values + n * half;
    const uint8_t* id = indices + n * ib;
    __m256 acc0[MB], acc1[MB];
    for (int i = 0; i < MB; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {  // 8 groups: 32 positions, 16 weights, 4 index bytes
      const uint8_t* idb = id + (g >> 1);
      // The row streams from DRAM: ask for its values kDotPrefetchBytes ahead (and its indices).
      _mm_prefetch(reinterpret_cast<const char*>(v + 2 * g) + kDotPrefetchBytes, _MM_HINT_T0);
      if ((g & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(idb) + kDotPrefetchBytes / 16, _MM_HINT_T0);
      const __m256i p0 = perm_of(idb[0]), p1 = perm_of(idb[1]), p2 = perm_of(idb[2]), p3 = perm_of(idb[3]);
      const __m256 w0 = _mm256_loadu_ps(v + 2 * g), w1 = _mm256_loadu_ps(v + 2 * g + 8);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) {
        const float* xr = x + i * K + 4 * g;
        acc0[i] = _mm256_fmadd_ps(w0, pick8(xr, p0, p1), acc0[i]);
        acc1[i] = _mm256_fmadd_ps(w1, pick8(xr + 16, p2, p3), acc1[i]);
      }
    }
    if (g + 4 <= G) {
      const uint8_t* idb = id + (g >> 1);
      const __m256i p0 = perm_of(idb[0]), p1 = perm_of(idb[1]);
      const __m256 w0 = _mm256_loadu_ps(v + 2 * g);
#pragma GCC unroll 4
      for (int i = 0; i < MB; ++i) acc0[i] = _mm256_fmadd_ps(w0, pick8(x + i * K + 4 * g, p0, p1), acc0[i]);
      g += 4;
    }
    const float b = bias ? bias[n] : 0.0f;
    for (int i = 0; i < MB; ++i) {
      float s = hsum(_mm256_add_ps(acc0[i], acc1[i]));
      const float* xr = x + i * K;
      for (int64_t t = g; t < G; ++t) {
        const unsigned nib = (id[t >> 1] >> ((t & 1) * 4)) & 15u;
        s += v[2 * t] * xr[4 * t + (nib & 3u)] + v[2 * t + 1] * xr[4 * t + (nib >> 2)];
      }
      out[i * N + n] = s + b;
    }
  }
}

__attribute__((target("avx2,fma"))) void dot_avx2(const float* x, int64_t M, int64_t K, const float* values,
                                                  const uint8_t* indices, int64_t n0, int64_t n1,
                                                  const float* bias, float* out, int64_t N) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) dot_rows_avx2<4>(x + m * K, K, values, indices, n0, n1, bias, out + m * N, N);
  switch (M - m) {
    case 3: dot_rows_avx2<3>(x + m * K, K, values, indices, n0, n1, bias, out + m * N, N); break;
    case 2: dot_rows_avx2<2>(x + m * K, K, values, indices, n0, n1, bias, out + m * N, N); break;
    case 1: dot_rows_avx2<1>(x + m * K, K, values, indices, n0, n1, bias, out + m * N, N); break;
    default: break;
  }
}

// ---- weight-stationary kernel -----------------------------------------------------------------

// acc[r][v] += Σ over the kept weights of R rows in one K-block: xt points at the block's first
// position (rows of BS = 8·NV floats), v/id at the rows' first value/index byte of the block.
template <int NV, int R>
__attribute__((target("avx2,fma"))) inline void wide_rows(const float* __restrict xt, const float* __restrict v,
                                                          int64_t vs, const uint8_t* __restrict id, int64_t is,
                                                          int64_t nbytes, bool odd, float* __restrict tile) {
  constexpr int BS = NV * 8;
  __m256 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) acc[r][q] = _mm256_load_ps(tile + r * BS + q * 8);
  for (int64_t j = 0; j < nbytes; ++j) {
    const float* xb = xt + j * 8 * BS;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const unsigned b = id[r * is + j];
      const float* vr = v + r * vs + 4 * j;
      const float* p0 = xb + (b & 3u) * BS;
      const float* p1 = xb + ((b >> 2) & 3u) * BS;
      const float* p2 = xb + (4 + ((b >> 4) & 3u)) * BS;
      const float* p3 = xb + (4 + (b >> 6)) * BS;
      const __m256 w0 = _mm256_broadcast_ss(vr), w1 = _mm256_broadcast_ss(vr + 1);
      const __m256 w2 = _mm256_broadcast_ss(vr + 2), w3 = _mm256_broadcast_ss(vr + 3);
#pragma GCC unroll 4
      for (int q = 0; q < NV; ++q) {
        acc[r][q] = _mm256_fmadd_ps(w0, _mm256_load_ps(p0 + q * 8), acc[r][q]);
        acc[r][q] = _mm256_fmadd_ps(w1, _mm256_load_ps(p1 + q * 8), acc[r][q]);
        acc[r][q] = _mm256_fmadd_ps(w2, _mm256_load_ps(p2 + q * 8), acc[r][q]);
        acc[r][q] = _mm256_fmadd_ps(w3, _mm256_load_ps(p3 + q * 8), acc[r][q]);
      }
    }
  }
  if (odd) {  // the block's last group alone: the low nibble of its byte
    const float* xb = xt + nbytes * 8 * BS;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const unsigned b = id[r * is + nbytes];
      const float* vr = v + r * vs + 4 * nbytes;
      const float* p0 = xb + (b & 3u) * BS;
      const float* p1 = xb + ((b >> 2) & 3u) * BS;
      const __m256 w0 = _mm256_broadcast_ss(vr), w1 = _mm256_broadcast_ss(vr + 1);
#pragma GCC unroll 4
      for (int q = 0; q < NV; ++q) {
        acc[r][q] = _mm256_fmadd_ps(w0, _mm256_load_ps(p0 + q * 8), acc[r][q]);
        acc[r][q] = _mm256_fmadd_ps(w1, _mm256_load_ps(p1 + q * 8), acc[r][q]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) _mm256_store_ps(tile + r * BS + q * 8, acc[r][q]);
}

struct WideArgs {
  const float* xt;  // [blocks][K][BS_b], block b at xt + b * K * 32
  const float* values;
  const uint8_t* indices;
  int64_t K, half, ib;
};

// Rows [n0, n1) of one M-block (NV vectors wide) over positions [k0, k1) into tile [n1-n0][BS].
template <int NV>
__attribute__((target("avx2,fma"))) void wide_block(const WideArgs& a, const float* xtb, int64_t n0, int64_t n1,
                                                    int64_t k0, int64_t k1, float* tile, bool prefetch) {
  constexpr int BS = NV * 8;
  constexpr int R = NV == 4 ? 2 : NV == 3 ? 3 : NV == 2 ? 4 : 8;
  const int64_t groups = (k1 - k0) / 4, nbytes = groups / 2;
  const bool odd = groups & 1;
  const float* xk = xtb + k0 * BS;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    if (prefetch) {  // the weights of the rows kPrefetchGroups row groups ahead, this K-block: DRAM → cache
      const int64_t pend = std::min<int64_t>(n1, n + (kPrefetchGroups + 1) * R);
      for (int64_t p = n + kPrefetchGroups * R; p < pend; ++p) {
        const char* pv = reinterpret_cast<const char*>(a.values + p * a.half + k0 / 2);
        for (int64_t off = 0; off < (k1 - k0) * 2; off += 64) _mm_prefetch(pv + off, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(a.indices + p * a.ib + k0 / 8), _MM_HINT_T0);
      }
    }
    wide_rows<NV, R>(xk, a.values + n * a.half + k0 / 2, a.half, a.indices + n * a.ib + k0 / 8, a.ib, nbytes, odd,
                     tile + (n - n0) * BS);
  }
  for (; n < n1; ++n)
    wide_rows<NV, 1>(xk, a.values + n * a.half + k0 / 2, a.half, a.indices + n * a.ib + k0 / 8, a.ib, nbytes, odd,
                     tile + (n - n0) * BS);
}

__attribute__((target("avx2,fma"))) void wide_dispatch(int nv, const WideArgs& a, const float* xtb, int64_t n0,
                                                       int64_t n1, int64_t k0, int64_t k1, float* tile, bool prefetch) {
  switch (nv) {
    case 4: wide_block<4>(a, xtb, n0, n1, k0, k1, tile, prefetch); break;
    case 3: wide_block<3>(a, xtb, n0, n1, k0, k1, tile, prefetch); break;
    case 2: wide_block<2>(a, xtb, n0, n1, k0, k1, tile, prefetch); break;
    default: wide_block<1>(a, xtb, n0, n1, k0, k1, tile, prefetch); break;
  }
}

// xt block b = rows [32b, 32b + BS) of x, transposed to [K][BS], zero-padded past M; positions [k0, k1).
void transpose_block(const float* x, int64_t M, int64_t K, int64_t m0, int64_t bs, int64_t k0, int64_t k1,
                     float* xtb) {
  for (int64_t i = 0; i < bs; ++i) {
    const int64_t m = m0 + i;
    if (m < M) {
      const float* xr = x + m * K;
      for (int64_t k = k0; k < k1; ++k) xtb[k * bs + i] = xr[k];
    } else {
      for (int64_t k = k0; k < k1; ++k) xtb[k * bs + i] = 0.0f;
    }
  }
}

// false when a buffer could not be allocated
bool linear_wide(const float* x, int64_t M, int64_t K, const float* values, const uint8_t* indices, int64_t N,
                 const float* bias, float* out, int threads) {
  const int64_t vecs = (M + 7) / 8;
  const int64_t nmb = (vecs + 3) / 4;                      // M-blocks of up to 4 vectors (32 rows)
  auto block_nv = [&](int64_t b) { return static_cast<int>(std::min<int64_t>(4, vecs - 4 * b)); };
  const int64_t max_bs = 8 * block_nv(0);
  // K-block: xt[K-block, M-block] ~ kL1XtBytes, a multiple of 8 positions.
  int64_t kb = std::max<int64_t>(8, kL1XtBytes / (max_bs * 4) / 8 * 8);

  // n-chunks: at most kChunkRows rows, at least as many chunks as threads when N allows it.
  int64_t chunk = std::min<int64_t>(kChunkRows, (N + threads - 1) / threads);
  chunk = std::max<int64_t>(8, (chunk + 7) / 8 * 8);
  const int64_t nchunks = (N + chunk - 1) / chunk;
  // When there are fewer chunks than threads, the M-blocks are split across threads too.
  const int64_t mgroups = nchunks >= threads ? 1 : std::min<int64_t>(nmb, (threads + nchunks - 1) / nchunks);
  const int64_t per_group = (nmb + mgroups - 1) / mgroups;
  const int64_t items = nchunks * mgroups;

  float* xt = alloc_floats(nmb * K * 32);
  if (xt == nullptr) return false;
  bool failed = false;
  const WideArgs args{xt, values, indices, K, K / 2, (K / 4 + 1) / 2};

  // Transpose x, in parallel over (M-block, K-chunk of 256).
  const int64_t kchunks = (K + 255) / 256;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < nmb * kchunks; ++t) {
      const int64_t b = t / kchunks, k0 = (t % kchunks) * 256, k1 = std::min<int64_t>(K, k0 + 256);
      transpose_block(x, M, K, 32 * b, 8 * block_nv(b), k0, k1, xt + b * K * 32);
    }
    // implicit barrier
    float* tile = alloc_floats(chunk * 32 * per_group);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      if (tile == nullptr) {
#pragma omp atomic write
        failed = true;
        continue;
      }
      const int64_t c = it / mgroups, grp = it % mgroups;
      const int64_t n0 = c * chunk, n1 = std::min<int64_t>(N, n0 + chunk), rows = n1 - n0;
      const int64_t b0 = grp * per_group, b1 = std::min<int64_t>(nmb, b0 + per_group);
      if (b0 >= b1) continue;
      std::memset(tile, 0, sizeof(float) * chunk * 32 * per_group);
      for (int64_t k0 = 0; k0 < K; k0 += kb) {
        const int64_t k1 = std::min<int64_t>(K, k0 + kb);
        for (int64_t b = b0; b < b1; ++b) {
          const int nv = block_nv(b);
          wide_dispatch(nv, args, xt + b * K * 32, n0, n1, k0, k1, tile + (b - b0) * chunk * 32, b == b0);
        }
      }
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t bs = 8 * block_nv(b);
        const float* tb = tile + (b - b0) * chunk * 32;
        const int64_t mend = std::min<int64_t>(M, 32 * b + bs);
        for (int64_t m = 32 * b; m < mend; ++m) {
          const int64_t i = m - 32 * b;
          float* orow = out + m * N + n0;
          if (bias)
            for (int64_t r = 0; r < rows; ++r) orow[r] = tb[r * bs + i] + bias[n0 + r];
          else
            for (int64_t r = 0; r < rows; ++r) orow[r] = tb[r * bs + i];
        }
      }
    }
    std::free(tile);
  }
  std::free(xt);
  return !failed;
}

void linear_dot(const float* x, int64_t M, int64_t K, const float* values, const uint8_t* indices, int64_t N,
                const float* bias, float* out, int threads) {
  const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(64, (N + threads - 1) / threads));
  const int64_t nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t c = 0; c < nchunks; ++c)
    dot_avx2(x, M, K, values, indices, c * chunk, std::min<int64_t>(N, (c + 1) * chunk), bias, out, N);
}

bool have_avx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}

#endif  // EDGE_SPARSE24_X86

}  // namespace

extern "C" int32_t edge_sparse24_linear_f32(const float* x, int64_t x_bytes, int64_t M, int64_t K,
                                            const float* values, int64_t values_bytes, const uint8_t* indices,
                                            int64_t indices_bytes, int64_t N, const float* bias, int64_t bias_bytes,
                                            float* out, int64_t out_bytes, int32_t num_threads) {
  using edge::refuse;
  constexpr const char* op = "edge_sparse24_linear_f32";
  auto ll = [](int64_t v) { return static_cast<long long>(v); };
  if (M < 0 || K < 0 || N < 0)
    return refuse(edge::kBadShape, "%s: negative size M=%lld K=%lld N=%lld", op, ll(M), ll(K), ll(N));
  if (K % 4 != 0) return refuse(edge::kBadShape, "%s: K=%lld is not a multiple of 4", op, ll(K));
  // values [N, K/2] f32, indices [N, ceil(K/8)] u8 (one nibble per group of 4), x [M, K], out [M, N].
  int64_t x_elems, v_elems, i_elems, out_elems;
  if (!edge::count(&x_elems, M, K) || !edge::count(&v_elems, N, K / 2) || !edge::count(&i_elems, N, (K / 4 + 1) / 2) ||
      !edge::count(&out_elems, M, N))
    return refuse(edge::kBadShape, "%s: M=%lld K=%lld N=%lld overflow", op, ll(M), ll(K), ll(N));
  if (int32_t c = edge::need(op, "values", values, values_bytes, v_elems, sizeof(float))) return c;
  if (int32_t c = edge::need(op, "indices", indices, indices_bytes, i_elems, 1)) return c;
  if (bias != nullptr) {
    if (int32_t c = edge::need(op, "bias", bias, bias_bytes, N, sizeof(float))) return c;
  }
  if (int32_t c = edge::need(op, "x", x, x_bytes, x_elems, sizeof(float))) return c;
  if (int32_t c = edge::need(op, "out", out, out_bytes, out_elems, sizeof(float))) return c;
  if (M == 0 || N == 0) return 0;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) out[m * N + n] = bias ? bias[n] : 0.0f;
    return 0;
  }
  const int threads = resolve_threads(num_threads);
#ifdef EDGE_SPARSE24_X86
  if (!portable_forced() && have_avx2()) {
    if (M >= kWideMinRows) {
      if (!linear_wide(x, M, K, values, indices, N, bias, out, threads))
        return refuse(edge::kNoMemory, "%s: out of memory", op);
    } else {
      linear_dot(x, M, K, values, indices, N, bias, out, threads);
    }
    return 0;
  }
#endif
  linear_portable(x, M, K, values, indices, N, bias, out, threads);
  return 0;
}
