// Int8 dense layers for XLA:CPU, called through the XLA FFI.
//
// Weight-only: y[m, n] = sum_k x[m, k] * dequant(w)[k, n], float32
// accumulation; the int8 weight is converted to float32 in registers (up to 64
// rows of packed tiles, up to 4 otherwise) or one L2-sized block at a time
// (more rows), so no float copy of the weight ever reaches memory. XLA:CPU
// cannot fuse the int8 convert into its dot, which is why this file exists.
// Int4 weight-only (further down): packed nibbles, per-group scales.
// W8A8 (further down): int8 x int8 -> int32 with AVX-512 VNNI, or AVX2.
// W4A8 (further down): int8 activations x int4 codes on integer dot products.
// Packed int4 (further down): sq.pack's 64-column int4 tiles, for weight-only and W4A8.
//
// Weight layout: column tiles [N / T, K, T] (T = N for the canonical [K, N]).
// Scales: per column [1, N] (applied to the accumulator), or per K-block
// [ceil(K / B), N] (applied to the converted weights).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

// GCC 12's AVX-512 intrinsics seed their results with _mm512_undefined_*() and
// trip -W(maybe-)uninitialized wherever they are inlined (GCC bug 105593, a false
// positive); the build stays warning-clean for everything else.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

// GCC scalarizes generic int8 -> float vector conversions, so the common
// targets get their sign-extend + convert instructions spelled out.
inline f32x16 load_i8(const int8_t* p) {
#if defined(__AVX512F__)
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
#elif defined(__AVX2__)
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
  f32x16 out;
  std::memcpy(&out, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof(lo), &hi, sizeof(hi));
  return out;
#else
  i8x16 v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(__builtin_convertvector(v, i32x16), f32x16);
#endif
}
inline f32x16 load_f32(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_f32(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }
inline f32x16 splat(float s) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_set1_ps(s);
#else
  return f32x16{} + s;
#endif
}
// Keeps a weight vector in a register: otherwise GCC folds its load into every
// row's FMA, and the loads (one 512-bit load per cycle) become the bottleneck.
inline void pin(f32x16& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

constexpr int kLanes = 16;

// The few-rows kernels (int4; int8 on AVX2) work on the machine's own vector
// width: GCC does not keep 64-byte generic vectors in registers on AVX2, and
// there every spilled accumulator costs a load and a store per weight.
#if defined(__AVX512F__)
typedef __m512 Vf;
constexpr int kVL = 16;
inline Vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vf v) { _mm512_storeu_ps(p, v); }
inline Vf vset(float s) { return _mm512_set1_ps(s); }
inline Vf vzero() { return _mm512_setzero_ps(); }
inline Vf vfma(Vf a, Vf b, Vf c) { return _mm512_fmadd_ps(a, b, c); }
inline Vf vmul(Vf a, Vf b) { return _mm512_mul_ps(a, b); }
inline Vf vsub(Vf a, Vf b) { return _mm512_sub_ps(a, b); }
inline Vf vadd(Vf a, Vf b) { return _mm512_add_ps(a, b); }
inline void vnibbles(const uint8_t* p, Vf* lo, Vf* hi) {
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  *lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF)));
  *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
inline Vf vload_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 Vf;
constexpr int kVL = 8;
inline Vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vf v) { _mm256_storeu_ps(p, v); }
inline Vf vset(float s) { return _mm256_set1_ps(s); }
inline Vf vzero() { return _mm256_setzero_ps(); }
inline Vf vfma(Vf a, Vf b, Vf c) { return _mm256_fmadd_ps(a, b, c); }
inline Vf vmul(Vf a, Vf b) { return _mm256_mul_ps(a, b); }
inline Vf vsub(Vf a, Vf b) { return _mm256_sub_ps(a, b); }
inline Vf vadd(Vf a, Vf b) { return _mm256_add_ps(a, b); }
inline void vnibbles(const uint8_t* p, Vf* lo, Vf* hi) {
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  *lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
  *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}
inline Vf vload_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#else
typedef f32x16 Vf;
constexpr int kVL = kLanes;
inline Vf vload(const float* p) { return load_f32(p); }
inline void vstore(float* p, Vf v) { store_f32(p, v); }
inline Vf vset(float s) { return splat(s); }
inline Vf vzero() { return f32x16{}; }
inline Vf vfma(Vf a, Vf b, Vf c) { return a * b + c; }
inline Vf vmul(Vf a, Vf b) { return a * b; }
inline Vf vsub(Vf a, Vf b) { return a - b; }
inline Vf vadd(Vf a, Vf b) { return a + b; }
// 16 bytes (16 columns x 2 k) -> codes of k = 2r and 2r + 1 as floats.
inline void vnibbles(const uint8_t* p, Vf* lo, Vf* hi) {
  typedef uint8_t u8x16 __attribute__((vector_size(16)));
  u8x16 v;
  std::memcpy(&v, p, sizeof(v));
  *lo = __builtin_convertvector(__builtin_convertvector(v & 0xF, i32x16), f32x16);
  *hi = __builtin_convertvector(__builtin_convertvector(v >> 4, i32x16), f32x16);
}
inline Vf vload_i8(const int8_t* p) { return load_i8(p); }
#endif

constexpr int kPanel = 64;     // columns per register panel: one int8 cache line per row
constexpr int kRows = 6;       // rows per register block when many rows share a panel
constexpr int kSmallRows = 4;  // up to this many rows, weights convert in registers
// The largest K for which int32 accumulation of (x + 128) * w is exact:
// K * 255 * 127 < 2^31.
constexpr int64_t kW8A8MaxK = 65536;
constexpr int kDirectRows = 5;  // rows per register block on packed tiles (measured 4-6)
constexpr int64_t kChunkCols = 256;  // columns per work item (read as whole row segments)
constexpr int64_t kSmallK = 32;      // K rows per staged int8 block (128 KB)
constexpr int64_t kLargeK = 256;     // K rows per converted float block (256 KB)

struct Weights {
  const int8_t* data;
  int64_t k, n, tile;  // tiles [n / tile, k, tile]
  const float* scale;  // [1, n] or [nblocks, n]
  int64_t block;       // 0: per-column scale
  const int8_t* at(int64_t row, int64_t col) const {
    return data + (col / tile) * k * tile + row * tile + col % tile;
  }
};

template <int M, int NV, bool kBlocked>
void int8_panel_impl(const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k0,
                     int64_t kc, const Weights& wt, int64_t col, float* y, int64_t ldy,
                     bool first, bool last) {
  f32x16 acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = first ? f32x16{} : load_f32(y + m * ldy + v * kLanes);
  f32x16 s[NV];
  for (int v = 0; v < NV; ++v) s[v] = splat(1.0f);
  for (int64_t k = 0; k < kc; ++k, w += ldw) {
    if (kBlocked && (k == 0 || (k0 + k) % wt.block == 0)) {
      const float* srow = wt.scale + ((k0 + k) / wt.block) * wt.n + col;
      for (int v = 0; v < NV; ++v) s[v] = load_f32(srow + v * kLanes);
    }
    f32x16 wv[NV];
    for (int v = 0; v < NV; ++v) {
      wv[v] = load_i8(w + v * kLanes);
      if (kBlocked) wv[v] *= s[v];
      pin(wv[v]);
    }
    for (int m = 0; m < M; ++m) {
      f32x16 xb = splat(x[m * ldx + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] += xb * wv[v];
    }
  }
  for (int v = 0; v < NV; ++v) {
    f32x16 sc = (last && !kBlocked) ? load_f32(wt.scale + col + v * kLanes) : splat(1.0f);
    for (int m = 0; m < M; ++m) store_f32(y + m * ldy + v * kLanes, acc[m][v] * sc);
  }
}

// acc[m][v] = (first ? 0 : y) + sum over kc rows of x[m, k] * w[k, v-th 16 columns];
// per-block scales multiply the converted weights, per-column scales the
// finished sums (when `last`).
template <int M, int NV>
void int8_panel(const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k0,
                int64_t kc, const Weights& wt, int64_t col, float* y, int64_t ldy, bool first,
                bool last) {
  if (wt.block) {
    int8_panel_impl<M, NV, true>(x, ldx, w, ldw, k0, kc, wt, col, y, ldy, first, last);
  } else {
    int8_panel_impl<M, NV, false>(x, ldx, w, ldw, k0, kc, wt, col, y, ldy, first, last);
  }
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// float_panel on 8-lane registers, NVF * 8 columns at a time (see int8_panel_ymm).
template <int M, int NVF>
void float_panel_ymm(const float* x, int64_t ldx, const float* bp, int64_t kc, float* y,
                     int64_t ldy, bool first, const float* scale) {
  Vf acc[M][NVF];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NVF; ++v) acc[m][v] = first ? vzero() : vload(y + m * ldy + v * kVL);
  for (int64_t k = 0; k < kc; ++k, bp += kPanel) {
    Vf wv[NVF];
    for (int v = 0; v < NVF; ++v) wv[v] = vload(bp + v * kVL);
    for (int m = 0; m < M; ++m) {
      const Vf xb = vset(x[m * ldx + k]);
      for (int v = 0; v < NVF; ++v) acc[m][v] = vfma(xb, wv[v], acc[m][v]);
    }
  }
  for (int v = 0; v < NVF; ++v) {
    const Vf sc = scale ? vload(scale + v * kVL) : vset(1.0f);
    for (int m = 0; m < M; ++m) vstore(y + m * ldy + v * kVL, vmul(acc[m][v], sc));
  }
}
#endif

// The same against a converted float block bp[kc][kPanel] (first NV * 16 used).
template <int M, int NV>
void float_panel(const float* x, int64_t ldx, const float* bp, int64_t kc, float* y,
                 int64_t ldy, bool first, const float* scale) {
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  constexpr int kStrip = M <= 2 ? 4 : 2;
  for (int v0 = 0; v0 < NV * (kLanes / kVL); v0 += kStrip) {
    const int64_t off = int64_t(v0) * kVL;
    const float* sc = scale ? scale + off : nullptr;
    if (NV * (kLanes / kVL) - v0 >= kStrip) {
      float_panel_ymm<M, kStrip>(x, ldx, bp + off, kc, y + off, ldy, first, sc);
    } else {
      float_panel_ymm<M, 2>(x, ldx, bp + off, kc, y + off, ldy, first, sc);
    }
  }
  return;
#endif
  constexpr int64_t ldb = kPanel;  // blocks keep the full panel stride
  f32x16 acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = first ? f32x16{} : load_f32(y + m * ldy + v * kLanes);
  for (int64_t k = 0; k < kc; ++k, bp += ldb) {
    f32x16 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load_f32(bp + v * kLanes), pin(wv[v]);
    for (int m = 0; m < M; ++m) {
      f32x16 xb = splat(x[m * ldx + k]);
      for (int v = 0; v < NV; ++v) acc[m][v] += xb * wv[v];
    }
  }
  for (int v = 0; v < NV; ++v) {
    f32x16 s = scale ? load_f32(scale + v * kLanes) : splat(1.0f);
    for (int m = 0; m < M; ++m) store_f32(y + m * ldy + v * kLanes, acc[m][v] * s);
  }
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// int8_panel_impl on 8-lane registers: M rows x NVF * 8 columns, all of
// whose accumulators and converted weights fit the 16 ymm registers.
template <int M, int NVF, bool kBlocked>
void int8_panel_ymm(const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k0,
                    int64_t kc, const Weights& wt, int64_t col, float* y, int64_t ldy,
                    bool first, bool last) {
  Vf acc[M][NVF];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NVF; ++v) acc[m][v] = first ? vzero() : vload(y + m * ldy + v * kVL);
  Vf s[NVF];
  for (int v = 0; v < NVF; ++v) s[v] = vset(1.0f);
  for (int64_t k = 0; k < kc; ++k, w += ldw) {
    if (kBlocked && (k == 0 || (k0 + k) % wt.block == 0)) {
      const float* srow = wt.scale + ((k0 + k) / wt.block) * wt.n + col;
      for (int v = 0; v < NVF; ++v) s[v] = vload(srow + v * kVL);
    }
    Vf wv[NVF];
    for (int v = 0; v < NVF; ++v) {
      wv[v] = vload_i8(w + v * kVL);
      if (kBlocked) wv[v] = vmul(wv[v], s[v]);
    }
    for (int m = 0; m < M; ++m) {
      const Vf xb = vset(x[m * ldx + k]);
      for (int v = 0; v < NVF; ++v) acc[m][v] = vfma(xb, wv[v], acc[m][v]);
    }
  }
  for (int v = 0; v < NVF; ++v) {
    const Vf sc = (last && !kBlocked) ? vload(wt.scale + col + v * kVL) : vset(1.0f);
    for (int m = 0; m < M; ++m) vstore(y + m * ldy + v * kVL, vmul(acc[m][v], sc));
  }
}

template <int M, int NVF>
void int8_panel_ymm_b(const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k0,
                      int64_t kc, const Weights& wt, int64_t col, float* y, int64_t ldy,
                      bool first, bool last) {
  if (wt.block) {
    int8_panel_ymm<M, NVF, true>(x, ldx, w, ldw, k0, kc, wt, col, y, ldy, first, last);
  } else {
    int8_panel_ymm<M, NVF, false>(x, ldx, w, ldw, k0, kc, wt, col, y, ldy, first, last);
  }
}

// A panel of nv * 16 columns as strips of kStrip ymm vectors, K in chunks that
// stay in L1 while every strip reads them (partial sums wait in y, unscaled).
constexpr int64_t kStripK = 128;
template <int M>
void int8_panel_avx2(int nv, const float* x, int64_t ldx, const int8_t* w, int64_t ldw,
                     int64_t k0, int64_t kc, const Weights& wt, int64_t col, float* y,
                     int64_t ldy, bool first, bool last) {
  constexpr int kStrip = M <= 2 ? 4 : 2;  // M * kStrip + kStrip registers <= 15
  const int nvf = nv * (kLanes / kVL);
  for (int64_t kb = 0; kb < kc; kb += kStripK) {
    const int64_t kcc = std::min(kStripK, kc - kb);
    const bool f = first && kb == 0, l = last && kb + kcc == kc;
    for (int v0 = 0; v0 < nvf; v0 += kStrip) {
      const int64_t off = int64_t(v0) * kVL;
      const int8_t* wp = w + kb * ldw + off;
      if (nvf - v0 >= kStrip) {
        int8_panel_ymm_b<M, kStrip>(x + kb, ldx, wp, ldw, k0 + kb, kcc, wt, col + off, y + off,
                                    ldy, f, l);
      } else {  // kStrip == 4 and 2 vectors left
        int8_panel_ymm_b<M, 2>(x + kb, ldx, wp, ldw, k0 + kb, kcc, wt, col + off, y + off, ldy,
                               f, l);
      }
    }
  }
}
#endif

template <int M>
void int8_panel_n(int nv, const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t k0,
                  int64_t kc, const Weights& wt, int64_t col, float* y, int64_t ldy, bool first,
                  bool last) {
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  int8_panel_avx2<M>(nv, x, ldx, w, ldw, k0, kc, wt, col, y, ldy, first, last);
  return;
#endif
  switch (nv) {
    case 4: int8_panel<M, 4>(x, ldx, w, ldw, k0, kc, wt, col, y, ldy, first, last); break;
    case 3: int8_panel<M, 3>(x, ldx, w, ldw, k0, kc, wt, col, y, ldy, first, last); break;
    case 2: int8_panel<M, 2>(x, ldx, w, ldw, k0, kc, wt, col, y, ldy, first, last); break;
    case 1: int8_panel<M, 1>(x, ldx, w, ldw, k0, kc, wt, col, y, ldy, first, last); break;
  }
}

template <int NV>
void float_rows(const float* x, int64_t ldx, int64_t m_rows, const float* bp, int64_t kc,
                float* y, int64_t ldy, bool first, const float* scale) {
  int64_t m = 0;
  for (; m + kRows <= m_rows; m += kRows)
    float_panel<kRows, NV>(x + m * ldx, ldx, bp, kc, y + m * ldy, ldy, first, scale);
  x += m * ldx, y += m * ldy;
  switch (m_rows - m) {
    case 1: float_panel<1, NV>(x, ldx, bp, kc, y, ldy, first, scale); break;
    case 2: float_panel<2, NV>(x, ldx, bp, kc, y, ldy, first, scale); break;
    case 3: float_panel<3, NV>(x, ldx, bp, kc, y, ldy, first, scale); break;
    case 4: float_panel<4, NV>(x, ldx, bp, kc, y, ldy, first, scale); break;
    case 5: float_panel<5, NV>(x, ldx, bp, kc, y, ldy, first, scale); break;
    default: break;
  }
}

// Rows of a wide tile lie a page or more apart, and hardware prefetchers stop
// at page boundaries: ask for the row kAhead rows down (harmless past the end).
// At least kAhead rows and 16 KB ahead, which covers DRAM latency.
constexpr int64_t kAhead = 8;
inline int64_t ahead_bytes(int64_t row_stride) {
  return std::max<int64_t>(kAhead, 16384 / row_stride) * row_stride;
}
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(p + c, 0, 1);
}

// Few rows from a tile no wider than a panel (the packed layout): each panel
// is one contiguous stream, read in place. Columns [c0, c1) of one tile.
void few_rows_direct(const float* x, int64_t m_rows, const Weights& wt, int64_t c0, int64_t c1,
                     float* y) {
  const int64_t ldx = wt.k, ldy = wt.n;
  for (int64_t c = c0; c < c1; c += kPanel) {
    const int nv = std::min<int64_t>(kPanel, c1 - c) / kLanes;
    const int8_t* w = wt.at(0, c);
    for (int64_t m = 0; m < m_rows; m += kDirectRows) {
      const float* xr = x + m * ldx;
      float* yr = y + m * ldy + c;
      static_assert(kDirectRows == 5, "one case per row count up to kDirectRows");
      switch (std::min<int64_t>(kDirectRows, m_rows - m)) {
        case 1: int8_panel_n<1>(nv, xr, ldx, w, wt.tile, 0, wt.k, wt, c, yr, ldy, true, true); break;
        case 2: int8_panel_n<2>(nv, xr, ldx, w, wt.tile, 0, wt.k, wt, c, yr, ldy, true, true); break;
        case 3: int8_panel_n<3>(nv, xr, ldx, w, wt.tile, 0, wt.k, wt, c, yr, ldy, true, true); break;
        case 4: int8_panel_n<4>(nv, xr, ldx, w, wt.tile, 0, wt.k, wt, c, yr, ldy, true, true); break;
        case 5: int8_panel_n<5>(nv, xr, ldx, w, wt.tile, 0, wt.k, wt, c, yr, ldy, true, true); break;
      }
    }
  }
}

constexpr int64_t kStageCols = 4096;  // one page of int8 per staged row
// Staged panels are padded by a cache line: a power-of-two panel stride would
// put a row's 64 stores into the same two L1 sets.
constexpr int64_t kStagePanel = kSmallK * kPanel + 64;

// Few rows from wide tiles (the canonical layout): rows [k0, k1) of every
// tile, read as whole rows (up to a page each: a panel at a time would cross
// a page every row, where prefetchers stop), staged panel-major, and summed
// into part[m_rows, n] without scales.
void few_rows_staged(const float* x, int64_t m_rows, const Weights& wt, int64_t k0, int64_t k1,
                     float* part) {
  const int64_t ldx = wt.k, ldy = wt.n;
  thread_local std::vector<int8_t> stage;
  stage.resize((kStageCols / kPanel) * kStagePanel);
  for (int64_t kb = k0; kb < k1; kb += kSmallK) {
    const int64_t kc = std::min(kSmallK, k1 - kb);
    for (int64_t c0 = 0, c1; c0 < wt.n; c0 = c1) {
      c1 = std::min({c0 + kStageCols, (c0 / wt.tile + 1) * wt.tile, wt.n});
      const int64_t width = c1 - c0;
      const int8_t* src = wt.at(kb, c0);
      const int64_t ahead = ahead_bytes(wt.tile);
      for (int64_t k = 0; k < kc; ++k, src += wt.tile) {
        prefetch_row(src + ahead, width);
        int8_t* dst = stage.data() + k * kPanel;
        int64_t c = 0;
        for (; c + kPanel <= width; c += kPanel, dst += kStagePanel)
          std::memcpy(dst, src + c, kPanel);  // fixed size: one vector move
        for (int64_t j = 0; c + j < width; j += kLanes) std::memcpy(dst + j, src + c + j, kLanes);
      }
      for (int64_t c = c0; c < c1; c += kPanel) {
        const int nv = std::min<int64_t>(kPanel, c1 - c) / kLanes;
        const int8_t* w = stage.data() + ((c - c0) / kPanel) * kStagePanel;
        const bool first = kb == k0;
        for (int64_t m = 0; m < m_rows; m += kSmallRows) {
          const float* xr = x + m * ldx + kb;
          float* yr = part + m * ldy + c;
          switch (std::min<int64_t>(kSmallRows, m_rows - m)) {
            case 1: int8_panel_n<1>(nv, xr, ldx, w, kPanel, kb, kc, wt, c, yr, ldy, first, false); break;
            case 2: int8_panel_n<2>(nv, xr, ldx, w, kPanel, kb, kc, wt, c, yr, ldy, first, false); break;
            case 3: int8_panel_n<3>(nv, xr, ldx, w, kPanel, kb, kc, wt, c, yr, ldy, first, false); break;
            case 4: int8_panel_n<4>(nv, xr, ldx, w, kPanel, kb, kc, wt, c, yr, ldy, first, false); break;
          }
        }
      }
    }
  }
}

// Many rows, columns [c0, c1) of one tile: kLargeK rows at a time are
// converted (and block-scaled) into panel-major float blocks that every
// register block of rows then reuses from L2.
void many_rows(const float* x, int64_t m_rows, const Weights& wt, int64_t c0, int64_t c1,
               float* y) {
  const int64_t ldx = wt.k, ldy = wt.n;
  constexpr int64_t kBlockPanel = kLargeK * kPanel + 16;  // padded, as kStagePanel
  thread_local std::vector<float> bp;
  bp.resize((kChunkCols / kPanel) * kBlockPanel);
  for (int64_t k0 = 0; k0 < wt.k; k0 += kLargeK) {
    const int64_t kc = std::min(kLargeK, wt.k - k0);
    const bool first = k0 == 0, last = k0 + kc == wt.k;
    const int8_t* src = wt.at(k0, c0);
    const int64_t ahead = ahead_bytes(wt.tile);
    for (int64_t k = 0; k < kc; ++k, src += wt.tile) {
      prefetch_row(src + ahead, c1 - c0);
      const float* s = wt.block ? wt.scale + ((k0 + k) / wt.block) * wt.n + c0 : nullptr;
      for (int64_t c = 0; c < c1 - c0; c += kLanes) {
        f32x16 v = load_i8(src + c);
        if (s) v *= load_f32(s + c);
        store_f32(bp.data() + (c / kPanel) * kBlockPanel + k * kPanel + c % kPanel, v);
      }
    }
    for (int64_t c = c0; c < c1; c += kPanel) {
      const float* panel = bp.data() + ((c - c0) / kPanel) * kBlockPanel;
      const float* scale = (last && wt.block == 0) ? wt.scale + c : nullptr;
      const float* xr = x + k0;
      float* yr = y + c;
      switch (std::min<int64_t>(kPanel, c1 - c) / kLanes) {
        case 4: float_rows<4>(xr, ldx, m_rows, panel, kc, yr, ldy, first, scale); break;
        case 3: float_rows<3>(xr, ldx, m_rows, panel, kc, yr, ldy, first, scale); break;
        case 2: float_rows<2>(xr, ldx, m_rows, panel, kc, yr, ldy, first, scale); break;
        case 1: float_rows<1>(xr, ldx, m_rows, panel, kc, yr, ldy, first, scale); break;
      }
    }
  }
}

// Runs fn(i) for i in [0, n) on the caller and up to pool threads - 1 helpers.
// The caller takes items too, so a busy (or absent) pool cannot deadlock it.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  const F* fnp = &fn;
  auto work = [state, n, fnp] {
    // A helper that starts late finds no items left and never touches *fnp,
    // whose frame may be gone by then.
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*fnp)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Decodes the weight operand and checks it against the activations' [M, K]:
// shared by both handlers.
ffi::Error decode_weights(ffi::AnyBuffer w, const ffi::Buffer<ffi::F32>& scale, int64_t k,
                          int64_t block, Weights* wt) {
  auto wd = w.dimensions();
  if (w.element_type() != ffi::S8) return ffi::Error::InvalidArgument("w must be int8");
  wt->data = reinterpret_cast<const int8_t*>(w.untyped_data());
  if (wd.size() == 2) {
    wt->k = wd[0], wt->n = wd[1], wt->tile = wd[1];
  } else if (wd.size() == 3) {
    wt->k = wd[1], wt->tile = wd[2], wt->n = wd[0] * wd[2];
  } else {
    return ffi::Error::InvalidArgument("w must be [K, N] or [N/T, K, T]");
  }
  if (k != wt->k) return ffi::Error::InvalidArgument("x and w disagree on K");
  if (wt->n % kLanes || wt->tile % kLanes)
    return ffi::Error::InvalidArgument("N and the tile must be multiples of 16");
  if (block < 0) return ffi::Error::InvalidArgument("block must be >= 0");
  const int64_t scale_rows = block ? std::max<int64_t>((wt->k + block - 1) / block, 1) : 1;
  if (scale.element_count() != size_t(scale_rows * wt->n))
    return ffi::Error::InvalidArgument("scale must be [1, N] or [ceil(K / block), N]");
  wt->scale = scale.typed_data();
  wt->block = block;
  return ffi::Error::Success();
}

ffi::Error WeightOnlyDense(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
                           ffi::ResultBuffer<ffi::F32> y, int64_t block) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be [M, K]");
  Weights wt;
  if (ffi::Error err = decode_weights(w, scale, xd[1], block, &wt); err.failure()) return err;
  const int64_t m_rows = xd[0];
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  if (m_rows == 0 || wt.n == 0) return ffi::Error::Success();
  if (wt.k == 0) {
    std::fill(yp, yp + m_rows * wt.n, 0.0f);
    return ffi::Error::Success();
  }
  if (m_rows <= kSmallRows && wt.tile > kPanel) {
    // Split K: each part sums its rows over all columns; then reduce and scale.
    const int64_t blocks = (wt.k + kSmallK - 1) / kSmallK;
    const int64_t parts = std::max<int64_t>(1, std::min(blocks, 2 * pool.num_threads()));
    const int64_t per = (blocks + parts - 1) / parts * kSmallK;
    std::vector<float> partial(parts * m_rows * wt.n);
    parallel_for(pool, parts, [&](int64_t p) {
      const int64_t k0 = std::min(wt.k, p * per), k1 = std::min(wt.k, k0 + per);
      float* out = partial.data() + p * m_rows * wt.n;
      if (k0 == k1) {
        std::fill(out, out + m_rows * wt.n, 0.0f);
      } else {
        few_rows_staged(xp, m_rows, wt, k0, k1, out);
      }
    });
    const int64_t mn = m_rows * wt.n;
    for (int64_t i = 0; i < mn; ++i) {
      float acc = partial[i];
      for (int64_t p = 1; p < parts; ++p) acc += partial[p * mn + i];
      yp[i] = wt.block ? acc : acc * wt.scale[i % wt.n];
    }
    return ffi::Error::Success();
  }
  // Work items are column chunks that never straddle a tile.
  const int64_t chunks_per_tile = (wt.tile + kChunkCols - 1) / kChunkCols;
  const int64_t items = (wt.n / wt.tile) * chunks_per_tile;
  parallel_for(pool, items, [&](int64_t i) {
    const int64_t t = i / chunks_per_tile, j = i % chunks_per_tile;
    const int64_t c0 = t * wt.tile + j * kChunkCols;
    const int64_t c1 = std::min(c0 + kChunkCols, (t + 1) * wt.tile);
    if (m_rows <= kSmallRows || (m_rows <= 64 && wt.tile <= kPanel)) {
      few_rows_direct(xp, m_rows, wt, c0, c1, yp);
    } else {
      many_rows(xp, m_rows, wt, c0, c1, yp);
    }
  });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------
// Int4 weight-only: packed nibbles [ceil(K / 2), N] (row r holds k = 2r in the
// low nibble, 2r + 1 in the high one), per-group scales [ceil(K / B), N] and
// codes c with w = (c - z) * s (z = 8 for the symmetric scheme, else a
// per-group int8 zero point). Per group:
//   y += s * (sum_k x[k] c[k] - z * sum_k x[k]),
// so the codes convert straight to float and the zero point costs one
// multiply per group, not per weight.
// ---------------------------------------------------------------------------

struct Int4Weights {
  const uint8_t* data;  // [ceil(k / 2), n]
  int64_t k, n, block;
  const float* scale;   // [ceil(k / block), n]
  const int8_t* zero;   // same shape, or nullptr for z = 8
  int64_t groups() const { return (k + block - 1) / block; }
};


// M rows x NV * kVL columns of one group: codes convert in registers, the
// group's sums stay in registers, and y gets s * (sum - z * sum(x)) once.
// `w` points at the group's first byte row for column `col`, rows `ldw` apart.
template <int M, int NV>
void int4_group(const float* x, int64_t ldx, const float* xsum, int64_t groups,
                const Int4Weights& wt, int64_t g, const uint8_t* w, int64_t ldw, int64_t col,
                float* y, int64_t ldy) {
  const int64_t k0 = g * wt.block, k1 = std::min(wt.k, k0 + wt.block);
  Vf acc[M][NV];
  for (int m = 0; m < M; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = vzero();
  int64_t k = k0;
  for (; k + 1 < k1; k += 2, w += ldw) {
    Vf x0[M], x1[M];
    for (int m = 0; m < M; ++m) x0[m] = vset(x[m * ldx + k]), x1[m] = vset(x[m * ldx + k + 1]);
    // One vector of columns at a time: converted codes live only until their
    // FMAs, so the accumulators keep their registers.
    for (int v = 0; v < NV; ++v) {
      Vf lo, hi;
      vnibbles(w + v * kVL, &lo, &hi);
      for (int m = 0; m < M; ++m) acc[m][v] = vfma(x1[m], hi, vfma(x0[m], lo, acc[m][v]));
    }
  }
  if (k < k1) {  // odd K: the last row's low nibble only
    for (int v = 0; v < NV; ++v) {
      Vf lo, hi;
      vnibbles(w + v * kVL, &lo, &hi);
      for (int m = 0; m < M; ++m) acc[m][v] = vfma(vset(x[m * ldx + k]), lo, acc[m][v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const int64_t c = col + v * kVL;
    const Vf s = vload(wt.scale + g * wt.n + c);
    const Vf z = wt.zero ? vload_i8(wt.zero + g * wt.n + c) : vset(8.0f);
    for (int m = 0; m < M; ++m) {
      float* out = y + m * ldy + v * kVL;
      const Vf part = vmul(s, vsub(acc[m][v], vmul(z, vset(xsum[m * groups + g]))));
      vstore(out, g == 0 ? part : vadd(vload(out), part));
    }
  }
}

// Rows [0, m_rows) x columns [c0, c0 + width), width a
// multiple of 16 and at most kInt4Cols. Group by group, the group's byte rows
// are read as whole row segments (one TLB entry for many cache lines: a
// 64-byte panel at a time would cross a page every row, where prefetchers
// stop) and staged panel-major, then every panel and row block reads them
// from L1/L2.
constexpr int64_t kInt4Cols = 1024;
void int4_few_rows(const float* x, int64_t m_rows, const float* xsum, const Int4Weights& wt,
                   int64_t c0, int64_t width, float* y) {
  const int64_t groups = wt.groups(), ldx = wt.k, ldy = wt.n;
  const int64_t rows_per_group = wt.block / 2;
  const int64_t stage_panel = rows_per_group * kPanel + 64;  // padded: see kStagePanel
  thread_local std::vector<uint8_t> stage;
  stage.resize((kInt4Cols / kPanel) * stage_panel + kPanel);
  const int64_t ahead = ahead_bytes(wt.n);
  constexpr int kWide = kPanel / kVL;  // vectors per 64 columns, one row at a time
  constexpr int kNarrow = kWide / 2;   // per 32 columns, two rows at a time
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = g * rows_per_group;
    const int64_t r1 = std::min((wt.k + 1) / 2, r0 + rows_per_group);
    const uint8_t* src = wt.data + r0 * wt.n + c0;
    for (int64_t r = r0; r < r1; ++r, src += wt.n) {
      prefetch_row(src + ahead, width);
      uint8_t* dst = stage.data() + (r - r0) * kPanel;
      int64_t c = 0;
      for (; c + kPanel <= width; c += kPanel, dst += stage_panel) std::memcpy(dst, src + c, kPanel);
      for (int64_t j = 0; c + j < width; j += kLanes) std::memcpy(dst + j, src + c + j, kLanes);
    }
    for (int64_t m = 0; m < m_rows;) {
      const bool one = m_rows - m == 1;
      const float* xr = x + m * ldx;
      const float* sr = xsum + m * groups;
      float* yr = y + m * ldy + c0;
      for (int64_t c = 0; c < width;) {
        const uint8_t* w = stage.data() + (c / kPanel) * stage_panel + c % kPanel;
        if (one && c + kPanel <= width) {
          int4_group<1, kWide>(xr, ldx, sr, groups, wt, g, w, kPanel, c0 + c, yr + c, ldy);
          c += kPanel;
        } else if (!one && c % kPanel + kPanel / 2 <= kPanel && c + kPanel / 2 <= width) {
          int4_group<2, kNarrow>(xr, ldx, sr, groups, wt, g, w, kPanel, c0 + c, yr + c, ldy);
          c += kPanel / 2;
        } else if (one) {
          int4_group<1, kLanes / kVL>(xr, ldx, sr, groups, wt, g, w, kPanel, c0 + c, yr + c, ldy);
          c += kLanes;
        } else {
          int4_group<2, kLanes / kVL>(xr, ldx, sr, groups, wt, g, w, kPanel, c0 + c, yr + c, ldy);
          c += kLanes;
        }
      }
      m += one ? 1 : 2;
    }
  }
}

// Each row's sum over each group of K (rows ldx floats apart): what the zero points
// multiply.
std::vector<float> group_sums(const float* x, int64_t ldx, int64_t m_rows, int64_t k,
                              int64_t block, int64_t groups) {
  std::vector<float> out(m_rows * groups);
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float acc = 0;
      for (int64_t j = g * block; j < std::min(k, (g + 1) * block); ++j) acc += x[m * ldx + j];
      out[m * groups + g] = acc;
    }
  return out;
}

ffi::Error Int4DenseImpl(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x,
                         const ffi::AnyBuffer& w, const ffi::Buffer<ffi::F32>& scale,
                         const int8_t* zero, size_t zero_count, float* yp, int64_t block) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be [M, K]");
  if (w.element_type() != ffi::U8 || wd.size() != 2)
    return ffi::Error::InvalidArgument("w must be uint8 [ceil(K / 2), N]");
  Int4Weights wt{reinterpret_cast<const uint8_t*>(w.untyped_data()), xd[1], wd[1], block,
                 scale.typed_data(), zero};
  if (wd[0] != (wt.k + 1) / 2) return ffi::Error::InvalidArgument("x and w disagree on K");
  if (wt.n % kLanes) return ffi::Error::InvalidArgument("N must be a multiple of 16");
  if (block < 2 || block % 2) return ffi::Error::InvalidArgument("block must be even");
  const int64_t groups = std::max<int64_t>(wt.groups(), 1);
  if (scale.element_count() != size_t(groups * wt.n) ||
      (zero && zero_count != size_t(groups * wt.n)))
    return ffi::Error::InvalidArgument("scale and zero must be [ceil(K / block), N]");
  const int64_t m_rows = xd[0];
  const float* xp = x.typed_data();
  if (m_rows == 0 || wt.n == 0) return ffi::Error::Success();
  if (wt.k == 0) {
    std::fill(yp, yp + m_rows * wt.n, 0.0f);
    return ffi::Error::Success();
  }
  // Rows go two at a time through every staged group: the codes are
  // converted once per two rows, so this suits the few rows of decoding; the
  // caller sends many rows elsewhere (ops.py, INT4_MAX_ROWS).
  const std::vector<float> xsum = group_sums(xp, wt.k, m_rows, wt.k, block, groups);
  // Column chunks as wide as kInt4Cols while every thread still gets two.
  const int64_t per = (wt.n + 2 * pool.num_threads() - 1) / (2 * pool.num_threads());
  const int64_t cols = std::clamp<int64_t>((per + kPanel - 1) / kPanel * kPanel, kPanel, kInt4Cols);
  const int64_t items = (wt.n + cols - 1) / cols;
  parallel_for(pool, items, [&](int64_t i) {
    const int64_t c = i * cols;
    int4_few_rows(xp, m_rows, xsum.data(), wt, c, std::min<int64_t>(cols, wt.n - c), yp);
  });
  return ffi::Error::Success();
}

ffi::Error Int4Dense(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                     ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t block) {
  return Int4DenseImpl(pool, x, w, scale, nullptr, 0, y->typed_data(), block);
}

ffi::Error Int4ZeroDense(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                         ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer zero,
                         ffi::ResultBuffer<ffi::F32> y, int64_t block) {
  if (zero.element_type() != ffi::S8) return ffi::Error::InvalidArgument("zero must be int8");
  return Int4DenseImpl(pool, x, w, scale, reinterpret_cast<const int8_t*>(zero.untyped_data()),
                       zero.element_count(), y->typed_data(), block);
}


// ---------------------------------------------------------------------------
// W8A8: int8 activations x int8 weights -> int32: AVX-512 VNNI (vpdpbusd), or
// AVX2 (vpmaddubsw + vpmaddwd). Both give the same int32 sums, and the same
// float steps after them (y = fl(fl(float(sum) * s) * xs)), so the same bits.
// ---------------------------------------------------------------------------
#if defined(__AVX2__)
#define SQ_HAVE_W8A8 1

// vpdpbusd multiplies unsigned by signed bytes, so activations are offset by
// 128 (xq ^ 0x80 == xq + 128) and 128 * colsum(w) is subtracted at the end:
// exact in int32 while K * 255 * 127 < 2^31 (K <= 65536, checked by the caller).
constexpr int64_t kW8Cols = 128;  // columns per work item; packed block K * 128 bytes

// Where pack_quads puts the quads of columns [c, c + 16) (c a multiple of 16) at
// k (a multiple of 4): 64 bytes, in panels (see below) or in AMX tiles
// [c / 16][kp / 4][16 columns][4 k], each 16 quads one contiguous 1 KB tile.
inline int8_t* quads_at(int8_t* out, bool tiles, int64_t c, int64_t k, int64_t kp) {
  if (tiles) return out + (c / kLanes) * kp * kLanes + k * kLanes;
  return out + (c / kPanel) * kp * kPanel + k * kPanel + (c % kPanel) * 4;
}

// Packs w[:, c0:c1] (c1 - c0 <= kW8Cols, a multiple of 16) as
// [panel][K/4][64 columns][4 k] bytes (zero-padded in K), and, where `colsum` is
// given (the VNNI path's offset activations need them), column sums.
void pack_quads(const Weights& wt, int64_t c0, int64_t c1, int64_t kp, int8_t* out,
                int32_t* colsum, bool tiles = false) {
  const int64_t width = c1 - c0;
  const int64_t ahead = ahead_bytes(wt.tile);
  i32x16 sums[kW8Cols / kLanes] = {};
  // Four rows at a time, each read as one contiguous segment of the chunk.
  for (int64_t k = 0; k < kp; k += 4) {
    const int8_t* rows[4];
    for (int j = 0; j < 4; ++j) {
      rows[j] = k + j < wt.k ? wt.at(k + j, c0) : nullptr;
      if (rows[j]) prefetch_row(rows[j] + ahead, width);
    }
    int64_t c = 0;
#if defined(__AVX512BW__)
    // Whole panels on 512 bits: the same transpose in each 128-bit lane, then a
    // 4 x 4 transpose of the lanes puts each 16-column group's quads together.
    for (; c + kPanel <= width; c += kPanel) {
      __m512i r[4];
      for (int j = 0; j < 4; ++j)
        r[j] = rows[j] ? _mm512_loadu_si512(rows[j] + c) : _mm512_setzero_si512();
      const __m512i t0 = _mm512_unpacklo_epi8(r[0], r[1]), t1 = _mm512_unpackhi_epi8(r[0], r[1]);
      const __m512i t2 = _mm512_unpacklo_epi8(r[2], r[3]), t3 = _mm512_unpackhi_epi8(r[2], r[3]);
      // u0..u3: in lane L, columns 16 L + {0-3, 4-7, 8-11, 12-15}, 4 k each.
      const __m512i u0 = _mm512_unpacklo_epi16(t0, t2), u1 = _mm512_unpackhi_epi16(t0, t2);
      const __m512i u2 = _mm512_unpacklo_epi16(t1, t3), u3 = _mm512_unpackhi_epi16(t1, t3);
      const __m512i v0 = _mm512_shuffle_i64x2(u0, u1, 0x44), v1 = _mm512_shuffle_i64x2(u2, u3, 0x44);
      const __m512i v2 = _mm512_shuffle_i64x2(u0, u1, 0xEE), v3 = _mm512_shuffle_i64x2(u2, u3, 0xEE);
      const __m512i q[4] = {_mm512_shuffle_i64x2(v0, v1, 0x88), _mm512_shuffle_i64x2(v0, v1, 0xDD),
                            _mm512_shuffle_i64x2(v2, v3, 0x88), _mm512_shuffle_i64x2(v2, v3, 0xDD)};
      for (int j = 0; j < 4; ++j)
        _mm512_storeu_si512(quads_at(out, tiles, c + kLanes * j, k, kp), q[j]);
#if defined(__AVX512VNNI__)
      if (colsum)
        for (int j = 0; j < 4; ++j)
          sums[c / kLanes + j] = (i32x16)_mm512_dpbusd_epi32((__m512i)sums[c / kLanes + j],
                                                              _mm512_set1_epi8(1), q[j]);
#endif
    }
#endif
    for (; c < width; c += kLanes) {
      __m128i r[4];
      for (int j = 0; j < 4; ++j)
        r[j] = rows[j] ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[j] + c))
                       : _mm_setzero_si128();
      // A 4 x 16 byte transpose: each column's four k values become adjacent.
      __m128i t0 = _mm_unpacklo_epi8(r[0], r[1]), t1 = _mm_unpackhi_epi8(r[0], r[1]);
      __m128i t2 = _mm_unpacklo_epi8(r[2], r[3]), t3 = _mm_unpackhi_epi8(r[2], r[3]);
      const __m128i u[4] = {_mm_unpacklo_epi16(t0, t2), _mm_unpackhi_epi16(t0, t2),
                            _mm_unpacklo_epi16(t1, t3), _mm_unpackhi_epi16(t1, t3)};
      int8_t* dst = quads_at(out, tiles, c, k, kp);
      for (int j = 0; j < 4; ++j) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * j), u[j]);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      if (colsum) {
        const __m512i v = _mm512_loadu_si512(dst);
        sums[c / kLanes] =
            (i32x16)_mm512_dpbusd_epi32((__m512i)sums[c / kLanes], _mm512_set1_epi8(1), v);
      }
#endif
    }
  }
  if (colsum)
    for (int64_t c = 0; c < width; c += kLanes) std::memcpy(colsum + c, &sums[c / kLanes], 64);
}

// The AVX2 path: vpmaddubsw multiplies unsigned by signed bytes and adds pairs
// in int16, so it gets |w| (as unsigned: |-128| = 128) against x with w's sign
// (vpsignb; |x| <= 127, so the flip cannot overflow): a pair is at most
// 2 * 128 * 127 = 32512 in magnitude, within int16, and the sums are exact.
// Rows [0, M) x 16 columns of a packed panel (bp: that group's first quad).
template <int M>
void madd_cols16(const int8_t* xq, int64_t ldx, const int8_t* bp, int64_t kp, const float* xs,
                 const float* ws, float* y, int64_t ldy) {
  __m256i acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < kp; k += 4, bp += kPanel * 4) {
    __m256i b[2], mag[2];
    for (int v = 0; v < 2; ++v) {
      b[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + 32 * v));
      mag[v] = _mm256_abs_epi8(b[v]);
    }
    for (int m = 0; m < M; ++m) {
      int32_t a4;
      std::memcpy(&a4, xq + m * ldx + k, 4);
      const __m256i a = _mm256_set1_epi32(a4);
      for (int v = 0; v < 2; ++v) {
        const __m256i pairs = _mm256_maddubs_epi16(mag[v], _mm256_sign_epi8(a, b[v]));
        acc[m][v] = _mm256_add_epi32(acc[m][v], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int v = 0; v < 2; ++v) {
    const __m256 s = _mm256_loadu_ps(ws + 8 * v);
    for (int m = 0; m < M; ++m) {
      const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[m][v]), s);
      _mm256_storeu_ps(y + m * ldy + 8 * v, _mm256_mul_ps(f, _mm256_set1_ps(xs[m])));
    }
  }
}

constexpr int kMaddRows = 4;  // rows per register block: 8 ymm of sums
void madd_rows(const int8_t* xq, int64_t ldx, int64_t m_rows, const int8_t* bp, int64_t kp,
               int groups16, const float* xs, const float* ws, float* y, int64_t ldy) {
  for (int g = 0; g < groups16; ++g)
    for (int64_t m = 0; m < m_rows; m += kMaddRows) {
      const int8_t* xr = xq + m * ldx;
      const int8_t* b = bp + 64 * g;
      float* yr = y + m * ldy + 16 * g;
      switch (std::min<int64_t>(kMaddRows, m_rows - m)) {
        case 4: madd_cols16<4>(xr, ldx, b, kp, xs + m, ws + 16 * g, yr, ldy); break;
        case 3: madd_cols16<3>(xr, ldx, b, kp, xs + m, ws + 16 * g, yr, ldy); break;
        case 2: madd_cols16<2>(xr, ldx, b, kp, xs + m, ws + 16 * g, yr, ldy); break;
        default: madd_cols16<1>(xr, ldx, b, kp, xs + m, ws + 16 * g, yr, ldy); break;
      }
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define SQ_HAVE_W8A8_VNNI 1

template <int M, int NV>
void vnni_panel(const uint8_t* xu, int64_t ldx, const int8_t* bp, int64_t kp,
                const int32_t* colsum, const float* xs, const float* ws, float* y, int64_t ldy) {
  // GCC vector types, not __m512i arrays: those it keeps in memory.
  i32x16 acc[M][NV] = {};
  for (int64_t k = 0; k < kp; k += 4, bp += kPanel * 4) {
    i32x16 b[NV];
    for (int v = 0; v < NV; ++v) {
      std::memcpy(&b[v], bp + v * 64, 64);
      asm("" : "+v"(b[v]));
    }
    for (int m = 0; m < M; ++m) {
      int32_t a4;
      std::memcpy(&a4, xu + m * ldx + k, 4);
      const __m512i a = _mm512_set1_epi32(a4);
      for (int v = 0; v < NV; ++v)
        acc[m][v] = (i32x16)_mm512_dpbusd_epi32((__m512i)acc[m][v], a, (__m512i)b[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    i32x16 cs;
    std::memcpy(&cs, colsum + v * kLanes, 64);
    const f32x16 s = load_f32(ws + v * kLanes);
    for (int m = 0; m < M; ++m) {
      f32x16 f = __builtin_convertvector(acc[m][v] - cs * 128, f32x16);
      store_f32(y + m * ldy + v * kLanes, f * s * splat(xs[m]));
    }
  }
}

template <int NV>
void vnni_rows(const uint8_t* xu, int64_t ldx, int64_t m_rows, const int8_t* bp, int64_t kp,
               const int32_t* colsum, const float* xs, const float* ws, float* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + kRows <= m_rows; m += kRows)
    vnni_panel<kRows, NV>(xu + m * ldx, ldx, bp, kp, colsum, xs + m, ws, y + m * ldy, ldy);
  xu += m * ldx, xs += m, y += m * ldy;
  switch (m_rows - m) {
    case 1: vnni_panel<1, NV>(xu, ldx, bp, kp, colsum, xs, ws, y, ldy); break;
    case 2: vnni_panel<2, NV>(xu, ldx, bp, kp, colsum, xs, ws, y, ldy); break;
    case 3: vnni_panel<3, NV>(xu, ldx, bp, kp, colsum, xs, ws, y, ldy); break;
    case 4: vnni_panel<4, NV>(xu, ldx, bp, kp, colsum, xs, ws, y, ldy); break;
    case 5: vnni_panel<5, NV>(xu, ldx, bp, kp, colsum, xs, ws, y, ldy); break;
    default: break;
  }
}

#endif  // SQ_HAVE_W8A8_VNNI

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__linux__)
#define SQ_HAVE_W8A8_AMX 1

// AMX tiles (tdpbssd: int8 x int8 -> int32, 16 x 16 sums of 64 products per
// instruction). The int32 sums are the VNNI path's (signed x signed, no offset
// to correct) and the float steps after them the same, so the same bits.
// Linux hands the 8 KB of tile state only to a process that asks for it, once.
bool amx_usable() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kAmxTile = 1024;     // bytes per int8 tile: 16 rows of 64
constexpr int64_t kAmxRows = 32;       // rows per block: two 16-row activation tiles
constexpr int64_t kAmxLd = kW8Cols * 4;  // bytes per row of a chunk's int32 sums

// Tiles 0-3 sum rows [16 r, 16 r + 16) x columns [16 c, 16 c + 16) as tile 2 c + r;
// 4-5 hold activations, 6-7 weights. MR row tiles x NC column tiles over `steps`
// tile steps of 64 k into c (ldc bytes a row). a and b are the first tiles, each
// followed by its next step's tile; the second row (column) tile is a_next
// (b_next) bytes on. Every tile is one contiguous 1 KB block. Weights are signed
// (int8) or unsigned (int4 codes). (Passes over K with the sums reloaded between
// them, so that a column pair's weights stay in L1, were slower on our AMX Xeon:
// the sums' traffic cost more than L1 saved.)
template <int MR, int NC, bool kSignedW>
void amx_block(const int8_t* a, int64_t a_next, const int8_t* b, int64_t b_next, int64_t steps,
               int32_t* c, int64_t ldc) {
  _tile_zero(0);
  if (MR == 2) _tile_zero(1);
  if (NC == 2) _tile_zero(2);
  if (MR == 2 && NC == 2) _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s, a += kAmxTile, b += kAmxTile) {
    _tile_loadd(4, a, 64);
    _tile_loadd(6, b, 64);
    if (MR == 2) _tile_loadd(5, a + a_next, 64);
    if (kSignedW) {
      _tile_dpbssd(0, 4, 6);
      if (MR == 2) _tile_dpbssd(1, 5, 6);
    } else {
      _tile_dpbsud(0, 4, 6);
      if (MR == 2) _tile_dpbsud(1, 5, 6);
    }
    if (NC == 2) {
      _tile_loadd(7, b + b_next, 64);
      if (kSignedW) {
        _tile_dpbssd(2, 4, 7);
        if (MR == 2) _tile_dpbssd(3, 5, 7);
      } else {
        _tile_dpbsud(2, 4, 7);
        if (MR == 2) _tile_dpbsud(3, 5, 7);
      }
    }
  }
  int32_t* c1 = c + 16 * (ldc / 4);
  _tile_stored(0, c, ldc);
  if (MR == 2) _tile_stored(1, c1, ldc);
  if (NC == 2) _tile_stored(2, c + 16, ldc);
  if (MR == 2 && NC == 2) _tile_stored(3, c1 + 16, ldc);
}

// Rows [0, rows) (rows <= 32, padded to whole tiles) x one or two 16-column tiles.
template <bool kSignedW>
void amx_pair(const int8_t* a, int64_t a_next, const int8_t* b, int64_t b_next, int64_t steps,
              int64_t rows, bool two, int32_t* c, int64_t ldc) {
  if (rows > 16) {
    if (two) amx_block<2, 2, kSignedW>(a, a_next, b, b_next, steps, c, ldc);
    else amx_block<2, 1, kSignedW>(a, a_next, b, b_next, steps, c, ldc);
  } else {
    if (two) amx_block<1, 2, kSignedW>(a, a_next, b, b_next, steps, c, ldc);
    else amx_block<1, 1, kSignedW>(a, a_next, b, b_next, steps, c, ldc);
  }
}

// The activations as AMX tiles [mp / 16][kt / 64][16 rows][64 k], zeros past
// [m_rows, k) (mp: m_rows rounded up to 16; kt: k rounded up to a tile step or more).
void amx_activations(const int8_t* xp, int64_t m_rows, int64_t k, int64_t kt,
                     std::vector<uint8_t>* out) {
  out->assign((m_rows + 15) / 16 * 16 * kt, 0);
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t j = 0; j < k; j += 64)  // row m % 16 of tile (m / 16, j / 64)
      std::memcpy(out->data() + (m / 16) * kt * 16 + j * 16 + (m % 16) * 64, xp + m * k + j,
                  std::min<int64_t>(64, k - j));
}

// y[:m_rows, 0 : width] for one chunk (width a multiple of 16). xt: the
// activations as tiles [mp / 16][kp / 64][16 rows][64 k] (rows past m_rows
// zeros); bt: the chunk's weights as pack_quads' AMX tiles; c: the chunk's int32
// sums [mp][kW8Cols].
void amx_chunk(const int8_t* xt, int64_t m_rows, int64_t mp, const int8_t* bt, int64_t kp,
               int64_t width, int32_t* c, const float* xs, const float* ws, float* y,
               int64_t ldy) {
  const int groups = int(width / kLanes);
  const int64_t next = kp * kLanes;  // bytes from one row (column) block's tiles to the next
  const int64_t steps = kp / 64;
  for (int g = 0; g < groups; g += 2) {
    const bool two = g + 1 < groups;
    const int8_t* b = bt + g * next;
    for (int64_t m = 0; m < mp; m += kAmxRows) {
      const int8_t* a = xt + (m / 16) * next;
      amx_pair<true>(a, next, b, next, steps, mp - m, two, c + m * kW8Cols + 16 * g, kAmxLd);
    }
  }
  for (int g = 0; g < groups; ++g) {
    const f32x16 s = load_f32(ws + 16 * g);
    for (int64_t r = 0; r < m_rows; ++r) {
      i32x16 acc;
      std::memcpy(&acc, c + r * kW8Cols + 16 * g, 64);
      const f32x16 f = __builtin_convertvector(acc, f32x16);
      store_f32(y + r * ldy + 16 * g, f * s * splat(xs[r]));
    }
  }
}
#endif  // SQ_HAVE_W8A8_AMX

// isa: 0 the best this build has without AMX (VNNI where built), 2 the AVX2
// path, 3 AMX tiles (tests compare them bit for bit).
ffi::Error W8A8Dense(ffi::ThreadPool pool, ffi::AnyBuffer xq, ffi::Buffer<ffi::F32> xs,
                     ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
                     ffi::ResultBuffer<ffi::F32> y, int64_t isa) {
  auto xd = xq.dimensions();
  if (xd.size() != 2 || xq.element_type() != ffi::S8)
    return ffi::Error::InvalidArgument("xq must be int8 [M, K]");
  Weights wt;
  if (ffi::Error err = decode_weights(w, scale, xd[1], 0, &wt); err.failure()) return err;
  if (xs.element_count() != size_t(xd[0])) return ffi::Error::InvalidArgument("xs must be [M, 1]");
  const int64_t m_rows = xd[0];
  if (wt.k > kW8A8MaxK) return ffi::Error::InvalidArgument("K > 65536 could overflow int32");
  bool amx = false;
  if (isa == 3) {
#if defined(SQ_HAVE_W8A8_AMX)
    amx = amx_usable();
#endif
    if (!amx) return ffi::Error::InvalidArgument("AMX tiles are not available here");
  }
  float* yp = y->typed_data();
  if (m_rows == 0 || wt.n == 0) return ffi::Error::Success();
  // K padded with zeros (the padded weights are zero too) to a multiple of 4,
  // or of a tile step for AMX, whose rows are padded to a whole tile.
  const int64_t kp = amx ? (wt.k + 63) / 64 * 64 : (wt.k + 3) / 4 * 4;
  const int64_t mp = amx ? (m_rows + 15) / 16 * 16 : m_rows;
  // Activations once: offset to unsigned for VNNI, as they are for AVX2 and
  // AMX; for AMX as tiles [mp / 16][kp / 64][16 rows][64 k].
  bool vnni = false;
#if defined(SQ_HAVE_W8A8_VNNI)
  vnni = isa != 2 && !amx;
#endif
  std::vector<uint8_t> xu(amx ? 0 : mp * kp, 0);
  const int8_t* xp = reinterpret_cast<const int8_t*>(xq.untyped_data());
  const uint8_t flip = vnni ? 0x80 : 0;
#if defined(SQ_HAVE_W8A8_AMX)
  if (amx) amx_activations(xp, m_rows, wt.k, kp, &xu);
#endif
  if (!amx)
    for (int64_t m = 0; m < m_rows; ++m)
      for (int64_t k = 0; k < wt.k; ++k) xu[m * kp + k] = uint8_t(xp[m * wt.k + k]) ^ flip;
  const float* xsp = xs.typed_data();
  const int64_t chunks_per_tile = (wt.tile + kW8Cols - 1) / kW8Cols;
  const int64_t items = (wt.n / wt.tile) * chunks_per_tile;
  parallel_for(pool, items, [&](int64_t i) {
    const int64_t t = i / chunks_per_tile, j = i % chunks_per_tile;
    const int64_t c0 = t * wt.tile + j * kW8Cols;
    const int64_t c1 = std::min(c0 + kW8Cols, (t + 1) * wt.tile);
    thread_local std::vector<int8_t> packed;
    thread_local std::vector<int32_t> colsum;
    packed.resize(kp * kW8Cols);
    colsum.resize(kW8Cols);
    pack_quads(wt, c0, c1, kp, packed.data(), vnni ? colsum.data() : nullptr, amx);
#if defined(SQ_HAVE_W8A8_AMX)
    if (amx) {
      // Tile configuration is per thread, and released so that the thread
      // pool's other work does not carry 8 KB of tile state.
      TileConfig cfg;
      for (int r = 0; r < 8; ++r) cfg.colsb[r] = 64, cfg.rows[r] = 16;
      _tile_loadconfig(&cfg);
      thread_local std::vector<int32_t> sums;
      sums.resize(mp * kW8Cols);
      amx_chunk(reinterpret_cast<const int8_t*>(xu.data()), m_rows, mp, packed.data(), kp,
                c1 - c0, sums.data(), xsp, wt.scale + c0, yp + c0, wt.n);
      _tile_release();
      return;
    }
#endif
    for (int64_t c = c0; c < c1; c += kPanel) {
      const int8_t* bp = packed.data() + ((c - c0) / kPanel) * kp * kPanel;
      const int groups16 = int(std::min<int64_t>(kPanel, c1 - c) / kLanes);
      if (!vnni) {
        madd_rows(reinterpret_cast<const int8_t*>(xu.data()), kp, m_rows, bp, kp, groups16, xsp,
                  wt.scale + c, yp + c, wt.n);
        continue;
      }
#if defined(SQ_HAVE_W8A8_VNNI)
      const int32_t* cs = colsum.data() + (c - c0);
      switch (groups16) {
        case 4: vnni_rows<4>(xu.data(), kp, m_rows, bp, kp, cs, xsp, wt.scale + c, yp + c, wt.n); break;
        case 3: vnni_rows<3>(xu.data(), kp, m_rows, bp, kp, cs, xsp, wt.scale + c, yp + c, wt.n); break;
        case 2: vnni_rows<2>(xu.data(), kp, m_rows, bp, kp, cs, xsp, wt.scale + c, yp + c, wt.n); break;
        case 1: vnni_rows<1>(xu.data(), kp, m_rows, bp, kp, cs, xsp, wt.scale + c, yp + c, wt.n); break;
      }
#endif
    }
  });
  return ffi::Error::Success();
}
#endif  // AVX2


// ---------------------------------------------------------------------------
// W4A8: int8 activations x int4 weights (the packed nibbles [ceil(K / 2), N],
// per-group scales and zero points, as the int4 weight-only kernel reads them)
// on integer dot products: AVX-512 VNNI (vpdpbusd), else vpmaddubsw +
// vpmaddwd (AVX-512BW, AVX2). Per group g, column n and row m:
//   acc = sum_k c[k, n] * xq[m, k]        (codes c in [0, 15], exact int32)
//   y[m, n] += fl(s[g, n] * float(acc - z[g, n] * sum_k xq[m, k]))
// then y[m, n] *= xs[m]: the multiply and the add are kept apart (no FMA), so
// every ISA gives the same bits, which a float32 numpy loop reproduces.
// vpmaddubsw is exact here: a code is at most 15 and |xq| at most 127, so a
// pair of products sums to at most 3810 in int16.
// ---------------------------------------------------------------------------
#if defined(__AVX2__)
#define SQ_HAVE_W4A8 1

// One byte row (2 k) of kCols columns per load; four k per dot product lane.
struct Avx2Dot {
  using I = __m256i;
  static constexpr int kCols = 32;
  static I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static I zero() { return _mm256_setzero_si256(); }
  static I lo(I a) { return _mm256_and_si256(a, _mm256_set1_epi8(0x0F)); }
  static I hi(I a) { return _mm256_and_si256(_mm256_srli_epi16(a, 4), _mm256_set1_epi8(0x0F)); }
  static I unpacklo8(I a, I b) { return _mm256_unpacklo_epi8(a, b); }
  static I unpackhi8(I a, I b) { return _mm256_unpackhi_epi8(a, b); }
  static I unpacklo16(I a, I b) { return _mm256_unpacklo_epi16(a, b); }
  static I unpackhi16(I a, I b) { return _mm256_unpackhi_epi16(a, b); }
  static I splat4(int32_t q) { return _mm256_set1_epi32(q); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I dot(I acc, I w, I x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
  }
  // u[j] holds, per 128-bit lane L, columns 16 L + 4 j .. + 3; out[v] columns 8 v .. + 7.
  static void to_columns(const I u[4], I out[4]) {
    for (int v = 0; v < 4; ++v) {
      const int j0 = (2 * v) % 4, lane = v / 2;  // columns 8 v = 16 lane + 4 j0
      const I a = u[j0], b = u[j0 + 1];
      // lane `lane` of a (columns 16 lane + 4 j0 ..) then of b (.. + 4 more)
      out[v] = lane == 0 ? _mm256_permute2x128_si256(a, b, 0x20)
                         : _mm256_permute2x128_si256(a, b, 0x31);
    }
  }
  // out += fl(s * float(sums - z * xsum)) for 8 columns (z: 8 when null).
  static void epilogue(I sums, const float* s, const int8_t* z, int32_t xsum, float* out) {
    const I zi = z ? _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z)))
                   : _mm256_set1_epi32(8);
    const I d = _mm256_sub_epi32(sums, _mm256_mullo_epi32(zi, _mm256_set1_epi32(xsum)));
    __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(s));
    asm("" : "+x"(part));  // no FMA with the add: the same bits on every ISA
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), part));
  }
};

#if defined(__AVX512BW__)
struct Avx512MaddDot {
  using I = __m512i;
  static constexpr int kCols = 64;
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static I zero() { return _mm512_setzero_si512(); }
  static I lo(I a) { return _mm512_and_si512(a, _mm512_set1_epi8(0x0F)); }
  static I hi(I a) { return _mm512_and_si512(_mm512_srli_epi16(a, 4), _mm512_set1_epi8(0x0F)); }
  static I unpacklo8(I a, I b) { return _mm512_unpacklo_epi8(a, b); }
  static I unpackhi8(I a, I b) { return _mm512_unpackhi_epi8(a, b); }
  static I unpacklo16(I a, I b) { return _mm512_unpacklo_epi16(a, b); }
  static I unpackhi16(I a, I b) { return _mm512_unpackhi_epi16(a, b); }
  static I splat4(int32_t q) { return _mm512_set1_epi32(q); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I dot(I acc, I w, I x) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
  }
  // u[j] holds, per 128-bit lane L, columns 16 L + 4 j .. + 3: a 4 x 4 transpose of
  // 128-bit blocks gives out[v] = columns 16 v .. + 15.
  static void to_columns(const I u[4], I out[4]) {
    const I t0 = _mm512_shuffle_i32x4(u[0], u[1], 0x44), t1 = _mm512_shuffle_i32x4(u[0], u[1], 0xEE);
    const I t2 = _mm512_shuffle_i32x4(u[2], u[3], 0x44), t3 = _mm512_shuffle_i32x4(u[2], u[3], 0xEE);
    out[0] = _mm512_shuffle_i32x4(t0, t2, 0x88), out[1] = _mm512_shuffle_i32x4(t0, t2, 0xDD);
    out[2] = _mm512_shuffle_i32x4(t1, t3, 0x88), out[3] = _mm512_shuffle_i32x4(t1, t3, 0xDD);
  }
  static void epilogue(I sums, const float* s, const int8_t* z, int32_t xsum, float* out) {
    const I zi = z ? _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z)))
                   : _mm512_set1_epi32(8);
    const I d = _mm512_sub_epi32(sums, _mm512_mullo_epi32(zi, _mm512_set1_epi32(xsum)));
    __m512 part = _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(s));
    asm("" : "+v"(part));  // no FMA with the add: the same bits on every ISA
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), part));
  }
};
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
struct Avx512VnniDot : Avx512MaddDot {
  static I dot(I acc, I w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }
};
#endif

constexpr int kW4A8Rows = 4;  // rows per register block
// Columns per work item: a group's staged rows (64 x 4096 bytes at group 128) stay
// in L2, and each row segment is a whole page of the source (measured: 1024 -> 4096
// kept whole pages per row segment; no faster than 1024 on our 2-core AVX-512 EPYC).
constexpr int64_t kW4A8Cols = 4096;
constexpr int64_t kW4A8MaxRows = 256;  // rows per pass over the weights (4 MB of sums)

// Rows [0, M) x one chunk of D::kCols columns (global column `col`) x group g:
// the group's byte rows are staged at `w`, D::kCols bytes apart (rows past K are
// zeros); out (ldy floats a row, column order) gets the group's term.
template <class D, int M>
void w4a8_group(const uint8_t* xq, int64_t ldx, const int32_t* xsum, int64_t groups,
                const Int4Weights& wt, int64_t g, const uint8_t* w, int64_t col, float* out,
                int64_t ldy) {
  using I = typename D::I;
  constexpr int kPer = sizeof(I) / 4;  // int32 lanes (columns) per vector
  const int64_t k0 = g * wt.block, k1 = std::min(wt.k, k0 + wt.block);
  // One row alone has only 4 accumulator chains, too few to hide vpdpbusd's
  // latency: it gets a second set for every other quad, added at the end.
  constexpr int S = M == 1 ? 2 : 1;
  I acc[M * S][4];
  for (int m = 0; m < M * S; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = D::zero();
  int64_t quad = 0;
  for (int64_t k = k0; k < k1; k += 4, w += 2 * D::kCols, ++quad) {
    const I a = D::load(w), b = D::load(w + D::kCols);
    const I r0 = D::lo(a), r1 = D::hi(a), r2 = D::lo(b), r3 = D::hi(b);
    // A 4 x (bytes) transpose within 128-bit lanes: each column's 4 k adjacent.
    const I t0 = D::unpacklo8(r0, r1), t1 = D::unpackhi8(r0, r1);
    const I t2 = D::unpacklo8(r2, r3), t3 = D::unpackhi8(r2, r3);
    const I u[4] = {D::unpacklo16(t0, t2), D::unpackhi16(t0, t2), D::unpacklo16(t1, t3),
                    D::unpackhi16(t1, t3)};
    const int set = S == 1 ? 0 : int(quad & 1);
    for (int m = 0; m < M; ++m) {
      int32_t q;
      std::memcpy(&q, xq + m * ldx + k, 4);
      const I x = D::splat4(q);
      for (int j = 0; j < 4; ++j) acc[m * S + set][j] = D::dot(acc[m * S + set][j], u[j], x);
    }
  }
  if (S == 2)
    for (int j = 0; j < 4; ++j) acc[0][j] = D::add(acc[0][j], acc[S - 1][j]);
  for (int m = 0; m < M; ++m) {
    I c[4];
    D::to_columns(acc[m * S], c);
    for (int v = 0; v < 4; ++v) {
      const int64_t n0 = col + v * kPer;
      D::epilogue(c[v], wt.scale + g * wt.n + n0, wt.zero ? wt.zero + g * wt.n + n0 : nullptr,
                  xsum[m * groups + g], out + m * ldy + v * kPer);
    }
  }
}

// Columns [c0, c0 + width) (whole chunks, width <= kInt4Cols), every row and group.
// Group by group, the group's byte rows are read as whole row segments (as the int4
// weight-only kernel does: prefetchers and the TLB keep up) and staged chunk-major,
// then every row block reads them from L1/L2.
template <class D>
void w4a8_columns(const uint8_t* xq, int64_t ldx, int64_t m_rows, const int32_t* xsum,
                  int64_t groups, const Int4Weights& wt, int64_t c0, int64_t width,
                  const float* xs, float* y) {
  const int64_t rows = (wt.k + 1) / 2;
  const int64_t group_rows = (wt.block / 2 + 1) / 2 * 2;  // whole quads
  const int64_t stage_chunk = group_rows * D::kCols;
  thread_local std::vector<uint8_t> stage;
  thread_local std::vector<float> yacc;
  stage.resize((width / D::kCols) * stage_chunk);
  yacc.assign(m_rows * width, 0.0f);
  const int64_t ahead = ahead_bytes(wt.n);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t r0 = g * wt.block / 2;
    const uint8_t* src = wt.data + r0 * wt.n + c0;
    for (int64_t r = 0; r < group_rows; ++r, src += wt.n) {
      uint8_t* dst = stage.data() + r * D::kCols;
      if (r0 + r >= rows) {  // past K: zero codes (their activations are zero too)
        for (int64_t c = 0; c < width; c += D::kCols, dst += stage_chunk)
          std::memset(dst, 0, D::kCols);
        continue;
      }
      prefetch_row(src + ahead, width);
      for (int64_t c = 0; c < width; c += D::kCols, dst += stage_chunk)
        std::memcpy(dst, src + c, D::kCols);
    }
    for (int64_t m = 0; m < m_rows; m += kW4A8Rows) {
      const int block = int(std::min<int64_t>(kW4A8Rows, m_rows - m));
      const uint8_t* xr = xq + m * ldx;
      const int32_t* sr = xsum + m * groups;
      float* yr = yacc.data() + m * width;
      for (int64_t c = 0; c < width; c += D::kCols) {
        const uint8_t* w = stage.data() + (c / D::kCols) * stage_chunk;
        switch (block) {
          case 4: w4a8_group<D, 4>(xr, ldx, sr, groups, wt, g, w, c0 + c, yr + c, width); break;
          case 3: w4a8_group<D, 3>(xr, ldx, sr, groups, wt, g, w, c0 + c, yr + c, width); break;
          case 2: w4a8_group<D, 2>(xr, ldx, sr, groups, wt, g, w, c0 + c, yr + c, width); break;
          default: w4a8_group<D, 1>(xr, ldx, sr, groups, wt, g, w, c0 + c, yr + c, width); break;
        }
      }
    }
  }
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t c = 0; c < width; ++c) y[m * wt.n + c0 + c] = yacc[m * width + c] * xs[m];
}

// isa: 0 the best this build has, 1 vpmaddubsw on 512 bits, 2 vpmaddubsw on 256 bits
// (tests compare them bit for bit).
template <class D>
ffi::Error w4a8_run(ffi::ThreadPool& pool, const std::vector<uint8_t>& xpad, int64_t kp,
                    int64_t m_rows, const std::vector<int32_t>& xsum, int64_t groups,
                    const Int4Weights& wt, const float* xs, float* yp) {
  if (wt.n % D::kCols) return ffi::Error::InvalidArgument("N must be a multiple of the chunk");
  // Column ranges as wide as kInt4Cols while every thread still gets two.
  const int64_t per = (wt.n + 2 * pool.num_threads() - 1) / (2 * pool.num_threads());
  const int64_t cols =
      std::clamp<int64_t>((per + D::kCols - 1) / D::kCols * D::kCols, D::kCols, kW4A8Cols);
  const int64_t items = (wt.n + cols - 1) / cols;
  parallel_for(pool, items, [&](int64_t i) {
    const int64_t c = i * cols;
    // Rows in blocks, so a thread's float sums stay within kW4A8MaxRows x cols.
    for (int64_t m = 0; m < m_rows; m += kW4A8MaxRows)
      w4a8_columns<D>(xpad.data() + m * kp, kp, std::min(kW4A8MaxRows, m_rows - m),
                      xsum.data() + m * groups, groups, wt, c, std::min<int64_t>(cols, wt.n - c),
                      xs + m, yp + m * wt.n);
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Packed int4 (sq.pack on int4 kernels): 64-column tiles [N / 64, Kp / 2, 64],
// Kp = K rounded up to 8 (codes past K are zeros). In a tile, every 8 k take 256
// bytes: 4 lines of 16 columns, byte 4 i + j of line q holding column 16 q + i
// at k = 8 k8 + j (low nibble) and at k = 8 k8 + 4 + j (high nibble). So a
// line's low nibbles are, per 32-bit lane, one column's 4 consecutive k: what
// vpdpbusd and vpmaddubsw multiply, with no transpose; and for floats a
// lane-wise shift by 8 j (+ 4) brings each code to the low 4 bits. Each tile is
// one contiguous stream.
// ---------------------------------------------------------------------------
constexpr int64_t kP4Cols = 64;   // columns per tile
constexpr int64_t kP4Step = 256;  // bytes per 8 k of a tile
constexpr int kP4Rows = 5;        // rows per register block (weight-only)

struct PackedInt4 {
  const uint8_t* data;  // [n / 64, kp / 2, 64]
  int64_t k, kp, n, block;
  const float* scale;   // [ceil(k / block), n]
  const int8_t* zero;   // the same shape
  int64_t groups() const { return (k + block - 1) / block; }
  const uint8_t* tile(int64_t t) const { return data + t * (kp / 2) * kP4Cols; }
};

// Checks a packed int4 operand against activations [M, K]: shared by both handlers.
ffi::Error decode_packed_int4(const ffi::AnyBuffer& w, const ffi::Buffer<ffi::F32>& scale,
                              const ffi::AnyBuffer& zero, int64_t k, int64_t block,
                              PackedInt4* wt) {
  auto wd = w.dimensions();
  if (w.element_type() != ffi::U8 || wd.size() != 3 || wd[2] != kP4Cols)
    return ffi::Error::InvalidArgument("packed int4 w must be uint8 [N / 64, Kp / 2, 64]");
  if (zero.element_type() != ffi::S8) return ffi::Error::InvalidArgument("zero must be int8");
  const int64_t kp = (k + 7) / 8 * 8;
  if (wd[1] * 2 != kp) return ffi::Error::InvalidArgument("x and w disagree on K");
  if (block < 8 || block % 8) return ffi::Error::InvalidArgument("block must be a multiple of 8");
  *wt = PackedInt4{reinterpret_cast<const uint8_t*>(w.untyped_data()), k, kp, wd[0] * kP4Cols,
                   block, scale.typed_data(),
                   reinterpret_cast<const int8_t*>(zero.untyped_data())};
  const int64_t groups = std::max<int64_t>(wt->groups(), 1);
  if (scale.element_count() != size_t(groups * wt->n) ||
      zero.element_count() != size_t(groups * wt->n))
    return ffi::Error::InvalidArgument("scale and zero must be [ceil(K / block), N]");
  return ffi::Error::Success();
}

// Tiles [t0, t1) to one work item each time, as many items as keep every thread
// busy twice over.
template <typename F>
void over_tiles(ffi::ThreadPool& pool, int64_t tiles, F fn) {
  const int64_t per = std::max<int64_t>(1, tiles / (2 * pool.num_threads()));
  parallel_for(pool, (tiles + per - 1) / per, [&](int64_t i) {
    for (int64_t t = i * per; t < std::min(tiles, (i + 1) * per); ++t) fn(t);
  });
}

// W4A8 on packed tiles: rows [0, M) of tile t, every group; y (the rows' first
// column, ldy floats a row) gets the group terms added in order, as w4a8_group
// does, so the bits equal the canonical kernel's.
template <class D, int M>
void w4a8_packed_rows(const uint8_t* xq, int64_t ldx, const int32_t* xsum, int64_t groups,
                      const PackedInt4& wt, int64_t t, float* y, int64_t ldy) {
  using I = typename D::I;
  constexpr int kPer = sizeof(I) / 4;                // columns per vector
  constexpr int kSlots = kP4Step / sizeof(I);  // vectors per 8 k: 4 (512 bits) or 8 (256)
  constexpr int kPass = sizeof(I) == 64 ? 4 : 2;  // sums in registers: 32 zmm, 16 ymm
  // One row alone: low and high nibbles go to separate sums (more chains in flight).
  constexpr int S = M == 1 ? 2 : 1;
  const uint8_t* base = wt.tile(t);
  const int64_t col = t * kP4Cols;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * wt.block, k1 = std::min(wt.kp, k0 + wt.block);
    for (int p = 0; p < kSlots; p += kPass) {
      I acc[M * S][kPass];
      for (int m = 0; m < M * S; ++m)
        for (int v = 0; v < kPass; ++v) acc[m][v] = D::zero();
      for (int64_t k = k0; k < k1; k += 8) {
        const uint8_t* line = base + (k / 8) * kP4Step + p * int64_t(sizeof(I));
        I xa[M], xb[M];
        for (int m = 0; m < M; ++m) {
          int32_t a, b;
          std::memcpy(&a, xq + m * ldx + k, 4);
          std::memcpy(&b, xq + m * ldx + k + 4, 4);
          xa[m] = D::splat4(a), xb[m] = D::splat4(b);
        }
        for (int v = 0; v < kPass; ++v) {
          const I w = D::load(line + v * sizeof(I));
          const I lo = D::lo(w), hi = D::hi(w);
          for (int m = 0; m < M; ++m) {
            acc[m * S][v] = D::dot(acc[m * S][v], lo, xa[m]);
            acc[m * S + S - 1][v] = D::dot(acc[m * S + S - 1][v], hi, xb[m]);
          }
        }
      }
      for (int m = 0; m < M; ++m)
        for (int v = 0; v < kPass; ++v) {
          const I sums = S == 2 ? D::add(acc[m * S][v], acc[m * S + 1][v]) : acc[m * S][v];
          const int64_t c = col + (p + v) * kPer;
          D::epilogue(sums, wt.scale + g * wt.n + c, wt.zero + g * wt.n + c,
                      xsum[m * groups + g], y + m * ldy + c);
        }
    }
  }
}

template <class D>
void w4a8_packed_run(ffi::ThreadPool& pool, const uint8_t* xpad, int64_t ldx, int64_t m_rows,
                     const int32_t* xsum, int64_t groups, const PackedInt4& wt, const float* xs,
                     float* yp) {
  over_tiles(pool, wt.n / kP4Cols, [&](int64_t t) {
    const int64_t col = t * kP4Cols;
    for (int64_t m = 0; m < m_rows; ++m) std::fill_n(yp + m * wt.n + col, kP4Cols, 0.0f);
    for (int64_t m = 0; m < m_rows; m += kW4A8Rows) {
      const uint8_t* xr = xpad + m * ldx;
      const int32_t* sr = xsum + m * groups;
      float* yr = yp + m * wt.n;
      switch (std::min<int64_t>(kW4A8Rows, m_rows - m)) {
        case 4: w4a8_packed_rows<D, 4>(xr, ldx, sr, groups, wt, t, yr, wt.n); break;
        case 3: w4a8_packed_rows<D, 3>(xr, ldx, sr, groups, wt, t, yr, wt.n); break;
        case 2: w4a8_packed_rows<D, 2>(xr, ldx, sr, groups, wt, t, yr, wt.n); break;
        default: w4a8_packed_rows<D, 1>(xr, ldx, sr, groups, wt, t, yr, wt.n); break;
      }
    }
    for (int64_t m = 0; m < m_rows; ++m)
      for (int64_t c = col; c < col + kP4Cols; ++c) yp[m * wt.n + c] *= xs[m];
  });
}

// Weight-only on packed tiles: the codes become floats in registers, summed per
// group against float activations, and each group adds fl(s * (sum - z * sum(x)))
// to y. A code stays where it lies in its 32-bit lane, at bit e = kBit[k mod 8]: a
// mask and a convert give c * 2^e exactly, and the activation comes pre-scaled by
// 2^-e, so each product is the exact c * x (the top nibble, whose mask would set
// the sign bit, is shifted down instead). A code then costs what an int8 weight
// does (a sign-extending load and a convert); a shift and a permute per code, on
// our AMD EPYC, ran int4 at 0.80-0.94x int8 at 4-16 rows.
#if defined(__FMA__)
#define SQ_HAVE_INT4_PACKED 1
// Bit of the code for k = 8 k8 + j in its lane: byte j's low nibble (j < 4), byte
// j - 4's high nibble.
constexpr int kBit[8] = {0, 8, 16, 24, 4, 12, 20, 28};
struct Int4Floats256 {
  using I = __m256i;
  using V = __m256;
  static constexpr int kPass = 2;  // 5 rows x 2 vectors of sums: 16 ymm registers
  static I load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  // c * 2^e for the code at bit e of each lane (c for the top nibble).
  static V codes(const uint8_t* p, int e) {
    const I v = load(p);
    return _mm256_cvtepi32_ps(e == 28 ? _mm256_srli_epi32(v, 28)
                                      : _mm256_and_si256(v, _mm256_set1_epi32(0xF << e)));
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V splat(float s) { return _mm256_set1_ps(s); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V load_f(const float* p) { return _mm256_loadu_ps(p); }
  static void store_f(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V load_z(const int8_t* z) {
    return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z))));
  }
  // fl(s * fl(a - fl(z * xsum))): no contraction, the same bits at every width.
  static V term(V a, V s, V z, float xsum) {
    V zx = _mm256_mul_ps(z, _mm256_set1_ps(xsum));
    asm("" : "+x"(zx));
    V d = _mm256_sub_ps(a, zx);
    asm("" : "+x"(d));
    V part = _mm256_mul_ps(s, d);
    asm("" : "+x"(part));  // nor with the add into y
    return part;
  }
};
#endif

#if defined(__AVX512F__)
struct Int4Floats512 {
  using I = __m512i;
  using V = __m512;
  static constexpr int kPass = 4;
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static V codes(const uint8_t* p, int e) {
    const I v = load(p);
    return _mm512_cvtepi32_ps(e == 28 ? _mm512_srli_epi32(v, 28)
                                      : _mm512_and_si512(v, _mm512_set1_epi32(0xF << e)));
  }
  static V zero() { return _mm512_setzero_ps(); }
  static V splat(float s) { return _mm512_set1_ps(s); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V load_f(const float* p) { return _mm512_loadu_ps(p); }
  static void store_f(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V load_z(const int8_t* z) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z))));
  }
  static V term(V a, V s, V z, float xsum) {
    V zx = _mm512_mul_ps(z, _mm512_set1_ps(xsum));
    asm("" : "+v"(zx));
    V d = _mm512_sub_ps(a, zx);
    asm("" : "+v"(d));
    V part = _mm512_mul_ps(s, d);
    asm("" : "+v"(part));  // nor with the add into y
    return part;
  }
};
#endif

#if defined(SQ_HAVE_INT4_PACKED)
// Rows [0, M) x tile t, every group. Each 8 k: the tile's lines are loaded once,
// and for each k the converted codes meet every row's activation.
template <class F, int M>
void int4_packed_rows(const float* x, int64_t ldx, const float* xsum, int64_t groups,
                      const PackedInt4& wt, int64_t t, float* y, int64_t ldy) {
  using I = typename F::I;
  using V = typename F::V;
  constexpr int kPer = sizeof(V) / 4;
  constexpr int kVectors = kP4Cols / kPer;  // per 8 k: 4 (512 bits) or 8 (256)
  constexpr int kPass = F::kPass;
  // One row alone: even and odd k go to separate sums (more chains in flight).
  constexpr int S = M == 1 ? 2 : 1;
  const uint8_t* base = wt.tile(t);
  const int64_t col = t * kP4Cols;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * wt.block, k1 = std::min(wt.kp, k0 + wt.block);
    for (int p = 0; p < kVectors; p += kPass) {
      V acc[M * S][kPass];
      for (int m = 0; m < M * S; ++m)
        for (int v = 0; v < kPass; ++v) acc[m][v] = F::zero();
      for (int64_t k = k0; k < k1; k += 8) {
        const uint8_t* line = base + (k / 8) * kP4Step + p * int64_t(sizeof(I));
        // Unrolled: each code's mask is then a constant (the lines are read from L1
        // by each mask rather than held in registers, which the sums fill).
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {
          V c[kPass];
          for (int v = 0; v < kPass; ++v) c[v] = F::codes(line + v * sizeof(I), kBit[j]);
          const int set = S == 1 ? 0 : j & 1;
          for (int m = 0; m < M; ++m) {
            const V xb = F::splat(x[m * ldx + k + j]);
            for (int v = 0; v < kPass; ++v) acc[m * S + set][v] = F::fma(xb, c[v], acc[m * S + set][v]);
          }
        }
      }
      for (int v = 0; v < kPass; ++v) {
        const int64_t c = col + (p + v) * kPer;
        const V s = F::load_f(wt.scale + g * wt.n + c);
        const V z = F::load_z(wt.zero + g * wt.n + c);
        for (int m = 0; m < M; ++m) {
          const V a = S == 2 ? F::add(acc[m * S][v], acc[m * S + 1][v]) : acc[m * S][v];
          const V part = F::term(a, s, z, xsum[m * groups + g]);
          float* out = y + m * ldy + c;
          F::store_f(out, g == 0 ? part : F::add(F::load_f(out), part));
        }
      }
    }
  }
}

template <class F>
void int4_packed_run(ffi::ThreadPool& pool, const float* x, int64_t ldx, int64_t m_rows,
                     const float* xsum, int64_t groups, const PackedInt4& wt, float* yp) {
  over_tiles(pool, wt.n / kP4Cols, [&](int64_t t) {
    for (int64_t m = 0; m < m_rows; m += kP4Rows) {
      const float* xr = x + m * ldx;
      const float* sr = xsum + m * groups;
      float* yr = yp + m * wt.n;
      static_assert(kP4Rows == 5, "one case per row count up to kP4Rows");
      switch (std::min<int64_t>(kP4Rows, m_rows - m)) {
        case 5: int4_packed_rows<F, 5>(xr, ldx, sr, groups, wt, t, yr, wt.n); break;
        case 4: int4_packed_rows<F, 4>(xr, ldx, sr, groups, wt, t, yr, wt.n); break;
        case 3: int4_packed_rows<F, 3>(xr, ldx, sr, groups, wt, t, yr, wt.n); break;
        case 2: int4_packed_rows<F, 2>(xr, ldx, sr, groups, wt, t, yr, wt.n); break;
        default: int4_packed_rows<F, 1>(xr, ldx, sr, groups, wt, t, yr, wt.n); break;
      }
    }
  });
}

// isa: 0 the best this build has, 2 the 256-bit path (tests compare them bit for bit).
ffi::Error Int4PackedDense(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                           ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer zero,
                           ffi::ResultBuffer<ffi::F32> y, int64_t block, int64_t isa) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be [M, K]");
  PackedInt4 wt;
  if (ffi::Error err = decode_packed_int4(w, scale, zero, xd[1], block, &wt); err.failure())
    return err;
  const int64_t m_rows = xd[0], groups = std::max<int64_t>(wt.groups(), 1);
  float* yp = y->typed_data();
  if (m_rows == 0 || wt.n == 0) return ffi::Error::Success();
  if (wt.k == 0) {
    std::fill(yp, yp + m_rows * wt.n, 0.0f);
    return ffi::Error::Success();
  }
  // Each row's sum per group, then the activations scaled by 2^-kBit[k mod 8] (1
  // for the top nibble, shifted down) to meet codes read as c * 2^kBit (exact: a
  // power of two either way; only activations under 2^-102 in magnitude, which
  // lose bits as subnormals, differ from a plain c * x) and padded with zeros to
  // whole 8 k (zero codes there would still meet whatever lay past the row).
  const float* xp = x.typed_data();
  const std::vector<float> xsum = group_sums(xp, wt.k, m_rows, wt.k, block, groups);
  std::vector<float> xs(m_rows * wt.kp, 0.0f);
  constexpr float kDown[8] = {1.0f,    0x1p-8f,  0x1p-16f, 0x1p-24f,
                              0x1p-4f, 0x1p-12f, 0x1p-20f, 1.0f};
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t k = 0; k < wt.k; ++k) xs[m * wt.kp + k] = xp[m * wt.k + k] * kDown[k & 7];
#if defined(__AVX512F__)
  if (isa != 2) {
    int4_packed_run<Int4Floats512>(pool, xs.data(), wt.kp, m_rows, xsum.data(), groups, wt, yp);
    return ffi::Error::Success();
  }
#endif
  (void)isa;
  int4_packed_run<Int4Floats256>(pool, xs.data(), wt.kp, m_rows, xsum.data(), groups, wt, yp);
  return ffi::Error::Success();
}
#endif  // SQ_HAVE_INT4_PACKED

int64_t w4a8_chunk_cols(int64_t isa) {
#if defined(__AVX512BW__)
  if (isa != 2) return 64;
#endif
  (void)isa;
  return 32;
}

// Runs fn(D{}) on the integer dot product `isa` names: 0 the best this build has,
// 1 vpmaddubsw on 512 bits, 2 on 256 bits (tests compare them bit for bit).
template <typename F>
ffi::Error with_dot(int64_t isa, F fn) {
#if defined(__AVX512BW__)
  if (isa != 2) {
#if defined(__AVX512VNNI__)
    if (isa == 0) return fn(Avx512VnniDot{});
#endif
    return fn(Avx512MaddDot{});
  }
#endif
  (void)isa;
  return fn(Avx2Dot{});
}

// int8 activations [M, K] as rows of kp bytes, zero-padded (zero activations meet
// the padding codes), and each row's sum per group for the zero points.
void pad_int8_rows(const int8_t* xp, int64_t m_rows, int64_t k, int64_t kp, int64_t block,
                   int64_t groups, std::vector<uint8_t>* xpad, std::vector<int32_t>* xsum) {
  xpad->assign(m_rows * kp, 0);
  xsum->assign(m_rows * groups, 0);
  for (int64_t m = 0; m < m_rows; ++m) {
    std::memcpy(xpad->data() + m * kp, xp + m * k, k);
    for (int64_t j = 0; j < k; ++j) (*xsum)[m * groups + j / block] += xp[m * k + j];
  }
}

#if defined(SQ_HAVE_W8A8_AMX)
// W4A8 on packed tiles with AMX tiles (groups a multiple of 64). Per tile and
// group, each 16-column line of the tile gives two weight-tile rows as it lies:
// its low nibbles are one quad of k, its high nibbles the next, so staging is a
// mask and a shift per 64 bytes. tdpbsud (signed activations x unsigned codes)
// forms the group's int32 sums exactly; they leave the tiles, and each adds
// fl(s * float(sum - z * xsum)) to y as w4a8_packed_rows does: the same bits.
constexpr int64_t kAmxW4Ld = kP4Cols * 4;  // bytes per row of a tile's int32 sums

void w4a8_amx_tile(const uint8_t* xt, int64_t kt, int64_t m_rows, const int32_t* xsum,
                   int64_t groups, const PackedInt4& wt, int64_t t, float* y, int64_t ldy,
                   uint8_t* stage, int32_t* c) {
  const uint8_t* base = wt.tile(t);
  const int64_t col = t * kP4Cols;
  const int64_t b_next = wt.block * 16;  // bytes of one column group's codes in a group
  const int64_t mp = (m_rows + 15) / 16 * 16;
  // Group g's codes as 4 weight tiles per tile step: [column group][quad row][64].
  auto stage_group = [&](int64_t g, uint8_t* out) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const int64_t k0 = g * wt.block, k1 = std::min(wt.kp, k0 + wt.block);
    for (int64_t k = k0; k < k1; k += 8) {
      const uint8_t* line = base + (k / 8) * kP4Step;
      uint8_t* row = out + (k - k0) * 16;  // quad row (k - k0) / 4
      for (int q = 0; q < 4; ++q) {
        const __m512i v = _mm512_loadu_si512(line + 64 * q);
        _mm512_storeu_si512(row + q * b_next, _mm512_and_si512(v, low));
        _mm512_storeu_si512(row + q * b_next + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
      }
    }
    for (int q = 0; q < 4; ++q)  // the last group's rows past Kp meet zero activations
      std::memset(out + q * b_next + (k1 - k0) * 16, 0, (k0 + wt.block - k1) * 16);
  };
  // Rows [m, m + 32) x group g (codes staged at b): the sums, then y += the group's term.
  auto group_rows = [&](int64_t m, int64_t g, const uint8_t* b) {
    const int8_t* a = reinterpret_cast<const int8_t*>(xt) + (m / 16) * kt * 16 + g * b_next;
    for (int p = 0; p < 2; ++p)
      amx_pair<false>(a, kt * 16, reinterpret_cast<const int8_t*>(b) + 2 * p * b_next, b_next,
                      wt.block / 64, mp - m, true, c + 32 * p, kAmxW4Ld);
    __m512i zi[4];
    __m512 sv[4];
    for (int v = 0; v < 4; ++v) {
      zi[v] = _mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(wt.zero + g * wt.n + col + 16 * v)));
      sv[v] = _mm512_loadu_ps(wt.scale + g * wt.n + col + 16 * v);
    }
    for (int64_t r = 0; r < std::min(kAmxRows, m_rows - m); ++r) {
      const __m512i xsr = _mm512_set1_epi32(xsum[(m + r) * groups + g]);
      for (int v = 0; v < 4; ++v) {
        const __m512i d = _mm512_sub_epi32(_mm512_loadu_si512(c + r * kP4Cols + 16 * v),
                                           _mm512_mullo_epi32(zi[v], xsr));
        __m512 part = _mm512_mul_ps(_mm512_cvtepi32_ps(d), sv[v]);
        asm("" : "+v"(part));  // no FMA with the add: the same bits on every ISA
        float* out = y + (m + r) * ldy + col + 16 * v;
        _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), part));
      }
    }
  };
  if (mp <= kAmxRows) {  // one row block: each group's codes staged in L1 and used at once
    for (int64_t g = 0; g < groups; ++g) {
      stage_group(g, stage);
      group_rows(0, g, stage);
    }
    return;
  }
  // More rows: the whole tile staged once, then each row block runs through every
  // group with its rows of y in L1 (measured faster than groups outside).
  for (int64_t g = 0; g < groups; ++g) stage_group(g, stage + g * wt.block * 64);
  for (int64_t m = 0; m < mp; m += kAmxRows)
    for (int64_t g = 0; g < groups; ++g) group_rows(m, g, stage + g * wt.block * 64);
}

void w4a8_amx_run(ffi::ThreadPool& pool, const int8_t* xp, int64_t m_rows, const int32_t* xsum,
                  int64_t groups, const PackedInt4& wt, const float* xs, float* yp) {
  const int64_t kt = groups * wt.block;  // every group's tile steps, zeros past K
  std::vector<uint8_t> xt;
  amx_activations(xp, m_rows, wt.k, kt, &xt);
  over_tiles(pool, wt.n / kP4Cols, [&](int64_t t) {
    thread_local std::vector<uint8_t> stage;
    thread_local std::vector<int32_t> sums;
    stage.resize(kt * 64);
    sums.resize(kAmxRows * kP4Cols);
    const int64_t col = t * kP4Cols;
    for (int64_t m = 0; m < m_rows; ++m) std::fill_n(yp + m * wt.n + col, kP4Cols, 0.0f);
    TileConfig cfg;
    for (int r = 0; r < 8; ++r) cfg.colsb[r] = 64, cfg.rows[r] = 16;
    _tile_loadconfig(&cfg);
    w4a8_amx_tile(xt.data(), kt, m_rows, xsum, groups, wt, t, yp, wt.n, stage.data(), sums.data());
    _tile_release();
    for (int64_t m = 0; m < m_rows; ++m)
      for (int64_t c = col; c < col + kP4Cols; ++c) yp[m * wt.n + c] *= xs[m];
  });
}
#endif  // SQ_HAVE_W8A8_AMX

// W4A8 on packed tiles [N / 64, Kp / 2, 64] (see PackedInt4): the same sums and
// float steps as the canonical kernel, so the same bits.
ffi::Error W4A8PackedDense(ffi::ThreadPool& pool, const ffi::AnyBuffer& xq,
                           const ffi::Buffer<ffi::F32>& xs, const ffi::AnyBuffer& w,
                           const ffi::Buffer<ffi::F32>& scale, const ffi::AnyBuffer& zero,
                           ffi::ResultBuffer<ffi::F32>& y, int64_t block, int64_t isa) {
  auto xd = xq.dimensions();
  PackedInt4 wt;
  if (ffi::Error err = decode_packed_int4(w, scale, zero, xd[1], block, &wt); err.failure())
    return err;
  if (xs.element_count() != size_t(xd[0])) return ffi::Error::InvalidArgument("xs must be [M, 1]");
  const int64_t m_rows = xd[0], groups = std::max<int64_t>(wt.groups(), 1);
  float* yp = y->typed_data();
  if (m_rows == 0 || wt.n == 0) return ffi::Error::Success();
  std::vector<uint8_t> xpad;
  std::vector<int32_t> xsum;
  pad_int8_rows(reinterpret_cast<const int8_t*>(xq.untyped_data()), m_rows, wt.k, wt.kp, block,
                groups, &xpad, &xsum);
  if (isa == 3) {
#if defined(SQ_HAVE_W8A8_AMX)
    if (amx_usable() && block % 64 == 0) {
      w4a8_amx_run(pool, reinterpret_cast<const int8_t*>(xq.untyped_data()), m_rows, xsum.data(),
                   groups, wt, xs.typed_data(), yp);
      return ffi::Error::Success();
    }
#endif
    return ffi::Error::InvalidArgument("AMX W4A8 needs AMX tiles and groups of a multiple of 64");
  }
  return with_dot(isa, [&](auto d) {
    w4a8_packed_run<decltype(d)>(pool, xpad.data(), wt.kp, m_rows, xsum.data(), groups, wt,
                                 xs.typed_data(), yp);
    return ffi::Error::Success();
  });
}

ffi::Error W4A8Dense(ffi::ThreadPool pool, ffi::AnyBuffer xq, ffi::Buffer<ffi::F32> xs,
                     ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer zero,
                     ffi::ResultBuffer<ffi::F32> y, int64_t block, int64_t isa) {
  auto xd = xq.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || xq.element_type() != ffi::S8)
    return ffi::Error::InvalidArgument("xq must be int8 [M, K]");
  if (wd.size() == 3) return W4A8PackedDense(pool, xq, xs, w, scale, zero, y, block, isa);
  if (isa == 3) return ffi::Error::InvalidArgument("AMX W4A8 runs on packed int4 tiles");
  if (w.element_type() != ffi::U8 || wd.size() != 2)
    return ffi::Error::InvalidArgument("w must be uint8 [ceil(K / 2), N]");
  if (zero.element_type() != ffi::S8) return ffi::Error::InvalidArgument("zero must be int8");
  Int4Weights wt{reinterpret_cast<const uint8_t*>(w.untyped_data()), xd[1], wd[1], block,
                 scale.typed_data(), reinterpret_cast<const int8_t*>(zero.untyped_data())};
  if (wd[0] != (wt.k + 1) / 2) return ffi::Error::InvalidArgument("xq and w disagree on K");
  if (block < 4 || block % 4) return ffi::Error::InvalidArgument("block must be a multiple of 4");
  const int64_t groups = std::max<int64_t>(wt.groups(), 1);
  if (scale.element_count() != size_t(groups * wt.n) || zero.element_count() != size_t(groups * wt.n))
    return ffi::Error::InvalidArgument("scale and zero must be [ceil(K / block), N]");
  if (xs.element_count() != size_t(xd[0])) return ffi::Error::InvalidArgument("xs must be [M, 1]");
  if (wt.n % w4a8_chunk_cols(isa)) return ffi::Error::InvalidArgument("N must be a multiple of the chunk");
  const int64_t m_rows = xd[0];
  float* yp = y->typed_data();
  if (m_rows == 0 || wt.n == 0) return ffi::Error::Success();
  // Rows padded with zeros to whole quads and one more (their products vanish).
  const int64_t kp = (wt.k + 3) / 4 * 4 + 4;
  std::vector<uint8_t> xpad;
  std::vector<int32_t> xsum;
  pad_int8_rows(reinterpret_cast<const int8_t*>(xq.untyped_data()), m_rows, wt.k, kp, block,
                groups, &xpad, &xsum);
  return with_dot(isa, [&](auto d) {
    return w4a8_run<decltype(d)>(pool, xpad, kp, m_rows, xsum, groups, wt, xs.typed_data(), yp);
  });
}

// The instruction sets this build can run W4A8 on (bit 0: the best, 1: 512-bit
// vpmaddubsw, 2: 256-bit), and whether the best is VNNI (bit 3).
int64_t w4a8_isas() {
  int64_t out = 1 | 4;
#if defined(__AVX512BW__)
  out |= 2;
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  out |= 8;
#endif
  return out;
}
#endif  // AVX2
}  // namespace

// Lets Python check its copy of the limit against this one (tests/test_native.py).
extern "C" int64_t SqW8A8MaxK() { return kW8A8MaxK; }

// Whether isa=3 (AMX tiles) runs here: built with AMX and granted by the OS.
extern "C" int64_t SqW8A8Amx() {
#if defined(SQ_HAVE_W8A8_AMX)
  return amx_usable() ? 1 : 0;
#else
  return 0;
#endif
}

#if defined(SQ_HAVE_W4A8)
extern "C" int64_t SqW4A8Isas() { return w4a8_isas(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(SqW4A8Dense, W4A8Dense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("isa"));
#endif

#if defined(SQ_HAVE_INT4_PACKED)
XLA_FFI_DEFINE_HANDLER_SYMBOL(SqInt4PackedDense, Int4PackedDense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("isa"));
#endif

XLA_FFI_DEFINE_HANDLER_SYMBOL(SqWeightOnlyDense, WeightOnlyDense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SqInt4Dense, Int4Dense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SqInt4ZeroDense, Int4ZeroDense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block"));

#if defined(SQ_HAVE_W8A8)
XLA_FFI_DEFINE_HANDLER_SYMBOL(SqW8A8Dense, W8A8Dense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("isa"));
#endif
