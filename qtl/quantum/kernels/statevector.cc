// The whole real-amplitude circuit on the CPU, one example's state at a time: <Z_i> and the
// gradient of a loss of them (the adjoint method).
//
// Why: XLA runs the fast simulator's circuit as a chain of whole-batch ops (a gather per CNOT
// network, one GEMM per group of ~5 wires), so each op streams the batch's states (64 MiB at
// n = 19, batch 32) through DRAM, and the backward pass rematerialises the forward. Here one
// thread carries one example's state (2 MiB at n = 19) through every layer while it stays in
// cache (its core's L2 and the shared L3), and every layer is two passes: a row pass over the
// low `lb` bits (rows of 2^lb floats, in L1) and a tile pass over the high bits (columns of
// two vectors from 2^8 rows copied into a buffer in L1). A CNOT network is a GF(2)-linear
// permutation of basis indices, read as j -> hi[j >> lb] ^ lo[j & mask] from two small
// tables (in vectors: see Map), and fused into the row pass of
// the layer that follows it. The gradient recomputes the example's forward, keeping each
// layer's output, then runs the cotangent back: per layer a row pass (the gather by the
// inverse network, and the low wires' Grams), a tile pass (the high wires' Grams, then U^T)
// and a row pass (U^T on the low wires). No cotangent of the states leaves the kernel.
//
// The circuit (see qtl/quantum/fast.py): x_0 = P_0 (A (x) C), with A, C the product states
// of the high and low wires; then for l = 0 .. m - 1: y_l = U_l x_l and x_{l+1} = P_{l+1} y_l,
// where U_l applies a 2x2 to every wire; <Z_i> is measured on x_m. The networks come as
// gather maps: (P |s>)[j] = s[G(j)], each map given by the images of the
// single-bit indices (G is linear over GF(2)). Wire w is bit n - 1 - w of the index.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The vector is the machine's own register width (qtl::V, 16 floats, is a pair or four of
// them off AVX-512): a 16-float group through GatesK<3> is 16 AVX2 registers before the
// gate coefficients, so GCC kept it on the stack, and every gate paid store-to-load
// forwarding of half-vectors (measured: the row pass 18x slower on an AVX2 Zen 3).
// QTL_VEC_BITS overrides it, so that a test can run another machine's width (AVX-512's 16
// floats as pairs of AVX2 registers) on this one and compare the results.
#if defined(QTL_VEC_BITS)
#define QTL_LANE_BITS QTL_VEC_BITS
#elif defined(__AVX512F__)
#define QTL_LANE_BITS 4
#elif defined(__AVX__)
#define QTL_LANE_BITS 3
#else  // SSE2, NEON: 128-bit registers
#define QTL_LANE_BITS 2
#endif
constexpr int kVecBits = QTL_LANE_BITS;
static_assert(kVecBits >= 2 && kVecBits <= 4, "QTL_VEC_BITS: 2, 3 or 4");
constexpr int64_t kLanes = int64_t{1} << kVecBits;
typedef float V __attribute__((vector_size(4 * kLanes)));
typedef int I __attribute__((vector_size(4 * kLanes)));

QTL_ALWAYS_INLINE V Load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

// The vector with lane l replaced by lane l ^ (1 << B), B < kVecBits.
template <int B>
QTL_ALWAYS_INLINE V Flip(V v) {
  static_assert(B < kVecBits);
#if QTL_LANE_BITS == 4
  if constexpr (B == 0) return QTL_SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  if constexpr (B == 1) return QTL_SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  if constexpr (B == 2) return QTL_SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  if constexpr (B == 3) return QTL_SHUFFLE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
#elif QTL_LANE_BITS == 3
  if constexpr (B == 0) return QTL_SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6);
  if constexpr (B == 1) return QTL_SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5);
  if constexpr (B == 2) return QTL_SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3);
#else
  if constexpr (B == 0) return QTL_SHUFFLE(v, 1, 0, 3, 2);
  if constexpr (B == 1) return QTL_SHUFFLE(v, 2, 3, 0, 1);
#endif
}

constexpr int kTileBits = 8;  // a tile: 2^8 rows of kTileWidth vectors (16 KiB with AVX2, in L1)
constexpr int kTileWidth = 2;  // per row: measured ~8% faster than 1 at n = 19 (4: no better)
constexpr int kLowBits = 11;  // rows of 2^11 floats (8 KiB) stay in L1
constexpr int64_t kMaxRow = int64_t{1} << kLowBits;

// The helpers below are inlined into ForwardOne and BackwardOne, the functions compiled once
// per instruction set (QTL_CLONES): a helper compiled on its own would get only the baseline
// instructions, since a target clone does not extend to its callees (nor to lambdas).
#define QTL_INLINE QTL_ALWAYS_INLINE

// A GF(2)-linear map of basis indices: j -> hi[j >> lb] ^ lo[j & (2^lb - 1)].
//
// For the gathers, what it does inside one vector: lane k of the vector at a multiple i of
// kLanes reads index (h ^ lo[i]) ^ lo[k], and lo[k] = within[k] | (a part above the vector),
// which takes `offsets` values off[o] (2 for a ring of CNOTs). So a vector of the gather is
// `offsets` aligned loads, each permuted by within ^ (the low bits of h ^ lo[i]) and blended
// by lane: no per-element loads.
struct Map {
  std::vector<int32_t> hi, lo;
  int offsets = 0;
  int32_t off[kLanes] = {}, within[kLanes] = {}, pick[kLanes][kLanes] = {};
};

// cols[w]: the image of the index whose only set bit is wire w's.
Map MakeMap(const int32_t* cols, int n, int lb) {
  Map m;
  m.lo.assign(int64_t{1} << lb, 0);
  m.hi.assign(int64_t{1} << (n - lb), 0);
  for (int64_t j = 1; j < static_cast<int64_t>(m.lo.size()); ++j)
    m.lo[j] = m.lo[j & (j - 1)] ^ cols[n - 1 - __builtin_ctzll(j)];
  for (int64_t r = 1; r < static_cast<int64_t>(m.hi.size()); ++r)
    m.hi[r] = m.hi[r & (r - 1)] ^ cols[n - 1 - lb - __builtin_ctzll(r)];
  for (int k = 0; k < kLanes; ++k) {
    const int32_t above = m.lo[k] & ~int32_t{kLanes - 1};
    m.within[k] = m.lo[k] & (kLanes - 1);
    int o = 0;
    while (o < m.offsets && m.off[o] != above) ++o;
    if (o == m.offsets) m.off[m.offsets++] = above;
    m.pick[o][k] = -1;
  }
  return m;
}

// One wire's 2x2 (y_p = sum_q u_pq x_q) on one index bit. For a bit below 4 (inside a
// vector) it is y = a * x + b * Flip(x), with per-lane coefficients a and b (plain floats:
// a std::vector does not keep a 64-byte vector type aligned).
struct Gate {
  float u00, u01, u10, u11;
  float a[kLanes], b[kLanes];
};

Gate MakeGate(const float* u, int bit, bool transpose) {
  float m[2][2] = {{u[0], u[1]}, {u[2], u[3]}};
  if (transpose) std::swap(m[0][1], m[1][0]);
  Gate g{m[0][0], m[0][1], m[1][0], m[1][1], {}, {}};
  if (bit < kVecBits)
    for (int l = 0; l < kLanes; ++l) {
      const int p = (l >> bit) & 1;
      g.a[l] = m[p][p];
      g.b[l] = m[p][1 - p];
    }
  return g;
}

QTL_INLINE double Sum(V v) {
  float s = 0;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// Gates g[0 .. K) on the vector-index bits log2(s) .. log2(s) + K - 1 of x[0 .. count), in one
// read and write of each vector: a group of 2^K vectors stays in registers through all K.
template <int K>
QTL_INLINE void GatesK(V* x, int64_t count, int64_t s, const Gate* g) {
  constexpr int M = 1 << K;
  for (int64_t base = 0; base < count; base += M * s)
    for (int64_t i = base; i < base + s; ++i) {
      V v[M];
#pragma GCC unroll 8
      for (int k = 0; k < M; ++k) v[k] = x[i + k * s];
#pragma GCC unroll 3
      for (int j = 0; j < K; ++j) {
        const float u00 = g[j].u00, u01 = g[j].u01, u10 = g[j].u10, u11 = g[j].u11;
#pragma GCC unroll 8
        for (int k = 0; k < M; ++k)
          if (!((k >> j) & 1)) {
            const V x0 = v[k], x1 = v[k | (1 << j)];
            v[k] = u00 * x0 + u01 * x1;
            v[k | (1 << j)] = u10 * x0 + u11 * x1;
          }
      }
#pragma GCC unroll 8
      for (int k = 0; k < M; ++k) x[i + k * s] = v[k];
    }
}

// How many bits a group takes through registers (2^K vectors; for the Grams also 4K
// accumulators). Three at a time spills registers with AVX2 and NEON, yet measured fastest
// there too (AMD EPYC 7003, AVX2: 2 at a time +19% per example at n = 19, 1 for the Grams
// +50%; docs/simulator.md): every group is another pass over the tile. QTL_GATE_GROUP and
// QTL_GRAM_GROUP (1-3) override, for measuring on other CPUs.
#if !defined(QTL_GATE_GROUP)
#define QTL_GATE_GROUP 3
#endif
#if !defined(QTL_GRAM_GROUP)
#define QTL_GRAM_GROUP 3
#endif

// Gates g[0 .. bits) on consecutive vector-index bits from log2(s) up, QTL_GATE_GROUP at a time.
template <int K>
QTL_INLINE void GatesBy(V* x, int64_t count, int64_t s, const Gate* g, int bits) {
  for (; bits >= K; bits -= K, s <<= K, g += K) GatesK<K>(x, count, s, g);
  if constexpr (K > 1) {
    if (bits > 0) GatesBy<K - 1>(x, count, s, g, bits);
  }
}

QTL_INLINE void Gates(V* x, int64_t count, int64_t s, const Gate* g, int bits) {
  GatesBy<QTL_GATE_GROUP>(x, count, s, g, bits);
}

// c[j][p * 2 + q] += sum over the pairs on bit log2(s) + j of lam[..p..] * y[..q..], for
// j < K, reading each vector once.
template <int K>
QTL_INLINE void GramsK(const V* lam, const V* y, int64_t count, int64_t s, double (*c)[4]) {
  constexpr int M = 1 << K;
  V acc[K][4] = {};
  for (int64_t base = 0; base < count; base += M * s)
    for (int64_t i = base; i < base + s; ++i) {
      V l[M], x[M];
#pragma GCC unroll 8
      for (int k = 0; k < M; ++k) {
        l[k] = lam[i + k * s];
        x[k] = y[i + k * s];
      }
#pragma GCC unroll 3
      for (int j = 0; j < K; ++j)
#pragma GCC unroll 8
        for (int k = 0; k < M; ++k)
          if (!((k >> j) & 1)) {
            const int k1 = k | (1 << j);
            acc[j][0] += l[k] * x[k];
            acc[j][1] += l[k] * x[k1];
            acc[j][2] += l[k1] * x[k];
            acc[j][3] += l[k1] * x[k1];
          }
    }
  for (int j = 0; j < K; ++j)
    for (int q = 0; q < 4; ++q) c[j][q] += Sum(acc[j][q]);
}

// The Grams of consecutive vector-index bits from log2(s) up, QTL_GRAM_GROUP at a time.
template <int K>
QTL_INLINE void GramsBy(const V* lam, const V* y, int64_t count, int64_t s, double (*c)[4],
                        int bits) {
  for (; bits >= K; bits -= K, s <<= K, c += K) GramsK<K>(lam, y, count, s, c);
  if constexpr (K > 1) {
    if (bits > 0) GramsBy<K - 1>(lam, y, count, s, c, bits);
  }
}

QTL_INLINE void Grams(const V* lam, const V* y, int64_t count, int64_t s, double (*c)[4],
                      int bits) {
  GramsBy<QTL_GRAM_GROUP>(lam, y, count, s, c, bits);
}

// x = a * x + b * Flip<B>(x) for the in-vector bits B .. kVecBits - 1.
template <int B>
QTL_INLINE V InVector(V x, const V* a, const V* b) {
  if constexpr (B == kVecBits) {
    return x;
  } else {
    return InVector<B + 1>(a[B] * x + b[B] * Flip<B>(x), a, b);
  }
}

// Every low bit's gate on one row of p vectors (lb >= kVecBits: those inside each vector).
QTL_INLINE void RotateRow(V* row, int64_t p, const Gate* g, int lb) {
  V a[kVecBits], b[kVecBits];
  for (int k = 0; k < kVecBits; ++k) {
    a[k] = Load(g[k].a);
    b[k] = Load(g[k].b);
  }
  for (int64_t v = 0; v < p; ++v) row[v] = InVector<0>(row[v], a, b);
  Gates(row, p, 1, g + kVecBits, lb - kVecBits);
}

// d[B] += l * Flip<B>(x) for the in-vector bits B .. kVecBits - 1.
template <int B>
QTL_INLINE void FlipDots(V l, V x, V* d) {
  if constexpr (B < kVecBits) {
    d[B] += l * Flip<B>(x);
    FlipDots<B + 1>(l, x, d);
  }
}

// c[b] += the row's part of the Gram of the low bit b, for every b < lb.
QTL_INLINE void GramRow(const V* lam, const V* y, int64_t p, int lb, double (*c)[4]) {
  V d[kVecBits] = {}, dd{};
  for (int64_t v = 0; v < p; ++v) {
    const V l = lam[v], x = y[v];
    dd += l * x;
    FlipDots<0>(l, x, d);
  }
  for (int b = 0; b < kVecBits; ++b)
    for (int l = 0; l < kLanes; ++l) {
      const int q = (l >> b) & 1;
      c[b][q * 3] += dd[l];  // [q][q]
      c[b][q * 2 + 1 - q] += d[b][l];
    }
  Grams(lam, y, p, 1, c + kVecBits, lb - kVecBits);
}

using Layers = std::vector<std::vector<Gate>>;  // layer -> bit -> gate

struct Problem {
  int n = 0, m = 0, lb = 0;
  int64_t rows = 0, width = 0;  // the state as (rows, width = 2^lb)
  std::vector<Map> nets, inv;   // m + 1 networks: P_0 .. P_m (inv: their inverses)
  Layers gates, gates_t;  // layer -> bit -> U_l (and U_l^T), when every row shares them
  std::vector<std::pair<int, int>> tiles;         // the high bits' tile passes [lo, hi)
  int64_t size() const { return rows * width; }
  int64_t vectors() const { return width / kLanes; }
};

// A tile: `count` rows `stride` floats apart, kTileWidth vectors of each (buf[i * width + t]).
QTL_INLINE void LoadTile(V* buf, const float* x, int64_t first, int64_t stride, int64_t count) {
  for (int64_t i = 0; i < count; ++i)
    for (int t = 0; t < kTileWidth; ++t)
      buf[i * kTileWidth + t] = *reinterpret_cast<const V*>(x + first + i * stride + t * kLanes);
}

QTL_INLINE void StoreTile(const V* buf, float* x, int64_t first, int64_t stride, int64_t count) {
  for (int64_t i = 0; i < count; ++i)
    for (int t = 0; t < kTileWidth; ++t)
      *reinterpret_cast<V*>(x + first + i * stride + t * kLanes) = buf[i * kTileWidth + t];
}

// Every high bit's gate of layer `gates`, in place.
QTL_INLINE void HighGates(const Problem& p, float* x, const std::vector<Gate>& gates) {
  alignas(64) V buf[kTileWidth << kTileBits];
  for (auto [lo, hi] : p.tiles) {
    // tile (o, t): vectors at o * 2^hi + i * 2^lo + 16 t, i < 2^(hi - lo)
    const int64_t count = int64_t{1} << (hi - lo), stride = int64_t{1} << lo;
    for (int64_t o = 0; o < (int64_t{1} << (p.n - hi)); ++o)
      for (int64_t t = 0; t < stride / (kLanes * kTileWidth); ++t) {
        const int64_t first = (o << hi) + t * kLanes * kTileWidth;
        LoadTile(buf, x, first, stride, count);
        Gates(buf, count * kTileWidth, kTileWidth, &gates[lo], hi - lo);
        StoreTile(buf, x, first, stride, count);
      }
  }
}

// GCC has shuffles by a run-time index vector (vpermps on AVX2 and AVX-512, tbl on NEON);
// clang's vector extensions do not, so there the gathers stay element by element.
#if defined(__clang__)
#define QTL_VECTOR_GATHER 0
#else
#define QTL_VECTOR_GATHER 1
#endif

QTL_ALWAYS_INLINE I LoadI(const int32_t* p) {
  I v;
  __builtin_memcpy(&v, p, sizeof(I));
  return v;
}

// row[i] = src[h ^ lo[i]] for i < width: one row of a network's gather (src: a whole state,
// 64-byte aligned).
QTL_INLINE void GatherRow(const float* src, int32_t h, const Map& m, int64_t width,
                          float* row) {
#if QTL_VECTOR_GATHER
  const I within = LoadI(m.within);
  for (int64_t i = 0; i < width; i += kLanes) {
    const int32_t base = h ^ m.lo[i];
    const int32_t low = base & (kLanes - 1), high = base ^ low;
    const I idx = within ^ low;
    V r = __builtin_shuffle(Load(src + (high ^ m.off[0])), idx);
    for (int o = 1; o < m.offsets; ++o) {
      const I q = reinterpret_cast<I>(__builtin_shuffle(Load(src + (high ^ m.off[o])), idx));
      const I pick = LoadI(m.pick[o]);
      r = reinterpret_cast<V>((q & pick) | (reinterpret_cast<I>(r) & ~pick));
    }
    __builtin_memcpy(row + i, &r, sizeof(V));
  }
#else
  const int32_t* lo = m.lo.data();
  for (int64_t i = 0; i < width; ++i) row[i] = src[h ^ lo[i]];
#endif
}

// out = a (x) c, the product state in the computational basis (row r is a[r] * c).
QTL_INLINE void ProductState(const Problem& p, const float* a, const float* c, float* out) {
  for (int64_t r = 0; r < p.rows; ++r) {
    const float ar = a[r];
    V* row = reinterpret_cast<V*>(out + r * p.width);
    for (int64_t v = 0; v < p.vectors(); ++v) row[v] = ar * Load(c + v * kLanes);
  }
}

// x = U_0 P_0 (a (x) c): the product state through the first network and the first layer
// (scratch: a state's room for the product state).
QTL_INLINE void ProductLayer(const Problem& p, const std::vector<Gate>& gates, const float* a,
                             const float* c, float* scratch, float* x) {
  ProductState(p, a, c, scratch);
  const Map& g = p.nets[0];
  for (int64_t r = 0; r < p.rows; ++r) {
    float* row = x + r * p.width;
    GatherRow(scratch, g.hi[r], g, p.width, row);
    RotateRow(reinterpret_cast<V*>(row), p.vectors(), gates.data(), p.lb);
  }
  HighGates(p, x, gates);
}

// x = U_l P_l (prev), for a later layer l.
QTL_INLINE void GatherLayer(const Problem& p, int l, const std::vector<Gate>& gates,
                            const float* prev, float* x) {
  const Map& g = p.nets[l];
  for (int64_t r = 0; r < p.rows; ++r) {
    float* row = x + r * p.width;
    GatherRow(prev, g.hi[r], g, p.width, row);
    RotateRow(reinterpret_cast<V*>(row), p.vectors(), gates.data(), p.lb);
  }
  HighGates(p, x, gates);
}

// z[w] = <Z_w> of the state y after the last network P_m: from the probabilities' column
// sums (low wires) and row sums (high wires) in the measured basis.
QTL_INLINE void Measure(const Problem& p, const float* y, std::vector<double>& colsum,
                        std::vector<double>& rowsum, float* z) {
  const Map& f = p.nets[p.m];
  const int64_t nv = p.vectors();
  alignas(64) V tmp[kMaxRow / kLanes];
  alignas(64) V col[kMaxRow / kLanes];
  colsum.assign(p.width, 0.0);
  rowsum.assign(p.rows, 0.0);
  for (int64_t v = 0; v < nv; ++v) col[v] = V{};
  for (int64_t r = 0; r < p.rows; ++r) {
    GatherRow(y, f.hi[r], f, p.width, reinterpret_cast<float*>(tmp));
    V acc{};
    for (int64_t v = 0; v < nv; ++v) {
      const V sq = tmp[v] * tmp[v];
      col[v] += sq;
      acc += sq;
    }
    rowsum[r] = Sum(acc);
    if ((r & 255) == 255 || r + 1 == p.rows) {  // no float sum runs over more than 256 rows
      for (int64_t v = 0; v < nv; ++v) {
        for (int l = 0; l < kLanes; ++l) colsum[v * kLanes + l] += col[v][l];
        col[v] = V{};
      }
    }
  }
  // <Z> of bit b is the sum with bit b clear minus the sum with it set; folding the upper half
  // of the sums onto the lower gives every bit's in one pass over them
  double total = 0;
  for (int64_t r = 0; r < p.rows; ++r) total += rowsum[r];
  for (auto [sums, bits, offset] :
       {std::tuple{&colsum, p.lb, 0}, std::tuple{&rowsum, p.n - p.lb, p.lb}}) {
    std::vector<double>& a = *sums;
    for (int b = bits - 1; b >= 0; --b) {
      const int64_t half = int64_t{1} << b;
      double set = 0;
      for (int64_t i = 0; i < half; ++i) {
        set += a[half + i];
        a[i] += a[half + i];
      }
      z[p.n - 1 - (offset + b)] = static_cast<float>(total - 2 * set);
    }
  }
}

// Scratch that lives with its thread (XLA's pool threads live as long as the process), so a
// step does not page-fault fresh megabytes in for every example.
struct Scratch {
  struct Free {
    void operator()(float* f) const { std::free(f); }
  };
  std::vector<std::unique_ptr<float, Free>> states;
  int64_t floats = 0;
  std::vector<double> colsum, rowsum, dc;
  std::vector<float> orow, ocol, hi, lo, da, dlo, back1, back2;

  float* State(int i, int64_t size) {
    if (size > floats) {
      states.clear();
      floats = size;
    }
    while (static_cast<int>(states.size()) <= i) {
      void* mem = std::aligned_alloc(64, ((floats * sizeof(float) + 63) / 64) * 64);
      states.emplace_back(static_cast<float*>(mem));
    }
    return states[i].get();
  }
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// The product state of k wires' vectors v (k, 2), first wire most significant, with every
// partial product: level j (2^j floats, the first j wires) at t[2^j - 1]. Returns level k.
float* ProductTable(const float* v, int k, std::vector<float>& t) {
  t.assign((size_t{2} << k) - 1, 0.0f);
  t[0] = 1.0f;
  for (int j = 0; j < k; ++j) {
    const float* prev = t.data() + (int64_t{1} << j) - 1;
    float* next = t.data() + (int64_t{2} << j) - 1;
    for (int64_t i = 0; i < (int64_t{1} << j); ++i) {
      next[2 * i] = prev[i] * v[2 * j];
      next[2 * i + 1] = prev[i] * v[2 * j + 1];
    }
  }
  return t.data() + (int64_t{1} << k) - 1;
}

// dv (k, 2) from d (the cotangent of the table's level k), back through the levels.
void ProductTableGrad(const float* v, int k, const std::vector<float>& t, const float* d,
                      std::vector<float>& b1, std::vector<float>& b2, float* dv) {
  b1.assign(d, d + (int64_t{1} << k));
  for (int j = k - 1; j >= 0; --j) {
    const float* prev = t.data() + (int64_t{1} << j) - 1;
    b2.assign(int64_t{1} << j, 0.0f);
    double d0 = 0, d1 = 0;
    for (int64_t i = 0; i < (int64_t{1} << j); ++i) {
      d0 += double{b1[2 * i]} * prev[i];
      d1 += double{b1[2 * i + 1]} * prev[i];
      b2[i] = b1[2 * i] * v[2 * j] + b1[2 * i + 1] * v[2 * j + 1];
    }
    dv[2 * j] = static_cast<float>(d0);
    dv[2 * j + 1] = static_cast<float>(d1);
    std::swap(b1, b2);
  }
}

QTL_CLONES void ForwardOne(const Problem& p, const Layers& gates, const float* v, float* z) {
  Scratch& s = ThreadScratch();
  float* x = s.State(0, p.size());
  float* y = s.State(1, p.size());
  const float* a = ProductTable(v, p.n - p.lb, s.hi);
  const float* c = ProductTable(v + 2 * (p.n - p.lb), p.lb, s.lo);
  ProductLayer(p, gates[0], a, c, y, x);
  for (int l = 1; l < p.m; ++l) {
    GatherLayer(p, l, gates[l], x, y);
    std::swap(x, y);
  }
  Measure(p, x, s.colsum, s.rowsum, z);
}

// The tile passes of the backward step of layer l: the high bits' Grams of (lam, y), then
// U_l^T on lam's high bits. With several tile passes, every Gram is taken before lam changes.
QTL_INLINE void HighBackward(const Problem& p, const std::vector<Gate>& gates_t, float* lam,
                             const float* y, double (*c)[4]) {
  alignas(64) V lbuf[kTileWidth << kTileBits];
  alignas(64) V ybuf[kTileWidth << kTileBits];
  const bool fused = p.tiles.size() == 1;
  for (auto [lo, hi] : p.tiles) {
    const int64_t count = int64_t{1} << (hi - lo), stride = int64_t{1} << lo;
    for (int64_t o = 0; o < (int64_t{1} << (p.n - hi)); ++o)
      for (int64_t t = 0; t < stride / (kLanes * kTileWidth); ++t) {
        const int64_t first = (o << hi) + t * kLanes * kTileWidth;
        LoadTile(lbuf, lam, first, stride, count);
        LoadTile(ybuf, y, first, stride, count);
        Grams(lbuf, ybuf, count * kTileWidth, kTileWidth, c + lo, hi - lo);
        if (!fused) continue;
        Gates(lbuf, count * kTileWidth, kTileWidth, &gates_t[lo], hi - lo);
        StoreTile(lbuf, lam, first, stride, count);
      }
  }
  if (fused) return;
  HighGates(p, lam, gates_t);
}

QTL_CLONES void BackwardOne(const Problem& p, const Layers& gates, const Layers& gates_t,
                            const float* v, const float* g, float* dv, float* gram) {
  Scratch& s = ThreadScratch();
  const float* a = ProductTable(v, p.n - p.lb, s.hi);
  const float* c = ProductTable(v + 2 * (p.n - p.lb), p.lb, s.lo);
  s.da.assign(p.rows, 0.0f);
  s.dlo.assign(p.width, 0.0f);
  float* da = s.da.data();
  float* dc = s.dlo.data();
  const int64_t size = p.size(), nv = p.vectors();
  std::vector<float*> ys(p.m);
  for (int l = 0; l < p.m; ++l) ys[l] = s.State(l, size);
  float* lam = s.State(p.m, size);
  float* mu = s.State(p.m + 1, size);
  ProductLayer(p, gates[0], a, c, lam, ys[0]);
  for (int l = 1; l < p.m; ++l) GatherLayer(p, l, gates[l], ys[l - 1], ys[l]);

  // d loss / d y_m[j] = 2 y_m[j] O(j'), j' = P_m^-1 j the index after the last network, where
  // O(j') = sum_w g_w (1 - 2 bit_w(j')) = orow[j' >> lb] + ocol[j' & mask]
  s.orow.assign(p.rows, 0.0f);
  s.ocol.assign(p.width, 0.0f);
  double total = 0;
  for (int w = 0; w < p.n; ++w) total += g[w];
  s.orow[0] = static_cast<float>(total);
  for (int64_t i = 1; i < p.width; ++i)
    s.ocol[i] = s.ocol[i & (i - 1)] - 2 * g[p.n - 1 - __builtin_ctzll(i)];
  for (int64_t r = 1; r < p.rows; ++r)
    s.orow[r] = s.orow[r & (r - 1)] - 2 * g[p.n - 1 - p.lb - __builtin_ctzll(r)];

  for (int64_t r = 0; r < p.rows; ++r) {  // O in the measured basis, gathered back below
    V* row = reinterpret_cast<V*>(mu + r * p.width);
    for (int64_t v = 0; v < nv; ++v) row[v] = s.orow[r] + Load(s.ocol.data() + v * kLanes);
  }

  std::vector<double> grams(static_cast<size_t>(p.m) * p.n * 4, 0.0);
  for (int l = p.m - 1; l >= 0; --l) {
    const float* y = ys[l];
    auto* cl = reinterpret_cast<double(*)[4]>(grams.data() + l * p.n * 4);
    const Map& back = p.inv[l + 1];  // the cotangent's way back through P_{l+1}
    for (int64_t r = 0; r < p.rows; ++r) {
      float* row = lam + r * p.width;
      const float* yrow = y + r * p.width;
      GatherRow(mu, back.hi[r], back, p.width, row);
      if (l == p.m - 1)  // row holds O(j') (see above): the cotangent is 2 y O
        for (int64_t v = 0; v < nv; ++v)
          reinterpret_cast<V*>(row)[v] *= 2 * reinterpret_cast<const V*>(yrow)[v];
      GramRow(reinterpret_cast<const V*>(row), reinterpret_cast<const V*>(yrow), nv, p.lb, cl);
    }
    HighBackward(p, gates_t[l], lam, y, cl);
    for (int64_t r = 0; r < p.rows; ++r)
      RotateRow(reinterpret_cast<V*>(lam + r * p.width), nv, gates_t[l].data(), p.lb);
    std::swap(lam, mu);  // mu: d loss / d x_l
  }

  // x_0 = P_0 (a (x) c): d(a (x) c)[i] = mu[P_0^-1 i]; da and dc contract it with c and a,
  // then go back through the tables to each wire's vector
  const Map& back = p.inv[0];
  alignas(64) V tmp[kMaxRow / kLanes];
  alignas(64) V col[kMaxRow / kLanes];
  s.dc.assign(p.width, 0.0);
  for (int64_t v = 0; v < nv; ++v) col[v] = V{};
  for (int64_t r = 0; r < p.rows; ++r) {
    GatherRow(mu, back.hi[r], back, p.width, reinterpret_cast<float*>(tmp));
    V dot{};
    const float ar = a[r];
    for (int64_t v = 0; v < nv; ++v) {
      dot += tmp[v] * Load(c + v * kLanes);
      col[v] += tmp[v] * ar;
    }
    da[r] = static_cast<float>(Sum(dot));
    if ((r & 255) == 255 || r + 1 == p.rows) {
      for (int64_t v = 0; v < nv; ++v) {
        for (int l = 0; l < kLanes; ++l) s.dc[v * kLanes + l] += col[v][l];
        col[v] = V{};
      }
    }
  }
  for (int64_t i = 0; i < p.width; ++i) dc[i] = static_cast<float>(s.dc[i]);
  ProductTableGrad(v, p.n - p.lb, s.hi, da, s.back1, s.back2, dv);
  ProductTableGrad(v + 2 * (p.n - p.lb), p.lb, s.lo, dc, s.back1, s.back2, dv + 2 * (p.n - p.lb));
  for (int l = 0; l < p.m; ++l)
    for (int w = 0; w < p.n; ++w)
      for (int k = 0; k < 4; ++k)
        gram[(l * p.n + w) * 4 + k] = static_cast<float>(grams[(l * p.n + p.n - 1 - w) * 4 + k]);
}

// One set of layers' gates from mats (m, n, 2, 2), and their transposes when gates_t is given.
void BuildGates(const float* mats, int n, int m, Layers& gates, Layers* gates_t) {
  gates.resize(m);
  if (gates_t) gates_t->resize(m);
  for (int l = 0; l < m; ++l) {
    gates[l].resize(n);
    if (gates_t) (*gates_t)[l].resize(n);
    for (int b = 0; b < n; ++b) {
      const float* u = mats + (l * n + (n - 1 - b)) * 4;
      gates[l][b] = MakeGate(u, b, false);
      if (gates_t) (*gates_t)[l][b] = MakeGate(u, b, true);
    }
  }
}

// The circuit of p.n wires and p.m layers: mats (m, n, 2, 2) or null (per-row layers, built
// per example), nets (m + 1, n), inv like nets or null (forward only).
void Build(const float* mats, const int32_t* nets, const int32_t* inv, Problem& p) {
  p.lb = std::min(p.n, kLowBits);
  p.width = int64_t{1} << p.lb;
  p.rows = int64_t{1} << (p.n - p.lb);
  for (int l = 0; l <= p.m; ++l) {
    p.nets.push_back(MakeMap(nets + l * p.n, p.n, p.lb));
    if (inv) p.inv.push_back(MakeMap(inv + l * p.n, p.n, p.lb));
  }
  if (mats) BuildGates(mats, p.n, p.m, p.gates, &p.gates_t);
  for (int lo = p.lb; lo < p.n; lo += kTileBits)
    p.tiles.emplace_back(lo, std::min(p.n, lo + kTileBits));
}

// Checks the shapes and builds the circuit: vec (B, n, 2) every wire's state after the
// prefix, mats (m, n, 2, 2) shared by every row or (B, m, n, 2, 2) one set per row (the noise
// trajectories' Pauli frames: qtl/quantum/noise/pauli_frame.py), nets (m + 1, n); inv like
// nets, when given. per_row: whether mats has a row axis (then p holds no gates).
ffi::Error Setup(ffi::Buffer<ffi::F32>& vec, ffi::Buffer<ffi::F32>& mats,
                 ffi::Buffer<ffi::S32>& nets, ffi::Buffer<ffi::S32>* inv, Problem& p,
                 int64_t& batch, bool& per_row) {
  const auto vd = vec.dimensions(), full = mats.dimensions(), nd = nets.dimensions();
  per_row = full.size() == 5;
  if (vd.size() != 3 || (full.size() != 4 && !per_row) || nd.size() != 2 ||
      (per_row && full[0] != vd[0]))
    return ffi::Error::InvalidArgument(
        "statevector: expected vec (B, n, 2), mats (m, n, 2, 2) or (B, m, n, 2, 2), "
        "nets (m + 1, n)");
  const size_t o = per_row ? 1 : 0;  // mats' first layer axis
  batch = vd[0];
  p.m = static_cast<int>(full[o]);
  p.n = static_cast<int>(full[o + 1]);
  if (vd[1] != p.n || vd[2] != 2 || full[o + 2] != 2 || full[o + 3] != 2 || nd[0] != p.m + 1 ||
      nd[1] != p.n || p.m < 1 || p.n < 4 || p.n > 30)
    return ffi::Error::InvalidArgument(
        "statevector: shapes must be vec (B, n, 2), mats (m, n, 2, 2), nets (m + 1, n), "
        "with m >= 1 and 4 <= n <= 30");
  if (inv && (inv->dimensions().size() != 2 || inv->dimensions()[0] != p.m + 1 ||
              inv->dimensions()[1] != p.n))
    return ffi::Error::InvalidArgument("statevector: inv must be shaped like nets (m + 1, n)");
  Build(per_row ? nullptr : mats.typed_data(), nets.typed_data(),
        inv ? inv->typed_data() : nullptr, p);
  return ffi::Error::Success();
}

// One row's layers when every row has its own (built in its thread, reused between rows).
struct RowLayers {
  Layers gates, gates_t;
};

RowLayers& ThreadLayers() {
  thread_local RowLayers layers;
  return layers;
}

// Examples in contiguous chunks, a few per thread; each example is one thread's from start
// to end, so results do not depend on the schedule.
void OverExamples(ffi::ThreadPool& pool, int64_t batch, const std::function<void(int64_t)>& f) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::min<int64_t>(batch, 4 * threads);
  qtl::ParallelFor(pool, chunks, threads - 1, [&](int64_t t) {
    for (int64_t b = batch * t / chunks; b < batch * (t + 1) / chunks; ++b) f(b);
  });
}

// row_mats: null when every row runs p's layers, else (B, m, n, 2, 2).
void ForwardAll(ffi::ThreadPool& pool, const Problem& p, int64_t batch, const float* v,
                const float* row_mats, float* z) {
  OverExamples(pool, batch, [&](int64_t b) {
    const Layers* gates = &p.gates;
    if (row_mats) {
      RowLayers& own = ThreadLayers();
      BuildGates(row_mats + b * p.m * p.n * 4, p.n, p.m, own.gates, nullptr);
      gates = &own.gates;
    }
    ForwardOne(p, *gates, v + b * p.n * 2, z + b * p.n);
  });
}

void BackwardAll(ffi::ThreadPool& pool, const Problem& p, int64_t batch, const float* v,
                 const float* row_mats, const float* g, float* dv, float* gram) {
  OverExamples(pool, batch, [&](int64_t b) {
    const Layers *gates = &p.gates, *gates_t = &p.gates_t;
    if (row_mats) {
      RowLayers& own = ThreadLayers();
      BuildGates(row_mats + b * p.m * p.n * 4, p.n, p.m, own.gates, &own.gates_t);
      gates = &own.gates;
      gates_t = &own.gates_t;
    }
    BackwardOne(p, *gates, *gates_t, v + b * p.n * 2, g + b * p.n, dv + b * p.n * 2,
                gram + b * p.m * p.n * 4);
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vec, ffi::Buffer<ffi::F32> mats,
                   ffi::Buffer<ffi::S32> nets, ffi::ResultBuffer<ffi::F32> z) {
  Problem p;
  int64_t batch = 0;
  bool per_row = false;
  if (auto err = Setup(vec, mats, nets, nullptr, p, batch, per_row); err.failure()) return err;
  if (z->element_count() != static_cast<size_t>(batch * p.n))
    return ffi::Error::InvalidArgument("statevector: z must be (B, n)");
  ForwardAll(pool, p, batch, vec.typed_data(), per_row ? mats.typed_data() : nullptr,
             z->typed_data());
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vec, ffi::Buffer<ffi::F32> mats,
                    ffi::Buffer<ffi::S32> nets, ffi::Buffer<ffi::S32> inv,
                    ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dvec,
                    ffi::ResultBuffer<ffi::F32> gram) {
  Problem p;
  int64_t batch = 0;
  bool per_row = false;
  if (auto err = Setup(vec, mats, nets, &inv, p, batch, per_row); err.failure()) return err;
  if (g.element_count() != static_cast<size_t>(batch * p.n) ||
      dvec->element_count() != vec.element_count() ||
      gram->element_count() != static_cast<size_t>(batch * p.m * p.n * 4))
    return ffi::Error::InvalidArgument(
        "statevector: g (B, n) -> dvec like vec, gram (B, m, n, 2, 2)");
  BackwardAll(pool, p, batch, vec.typed_data(), per_row ? mats.typed_data() : nullptr,
              g.typed_data(), dvec->typed_data(), gram->typed_data());
  return ffi::Error::Success();
}

}  // namespace

// The same kernels without XLA, one example after another on the calling thread: for the
// tests that compare builds for different instruction sets (and an ARM64 build run under an
// emulator) on exactly the same inputs. Shapes as in Forward and Backward; 0 on success.
extern "C" int qtl_statevector_forward_plain(int n, int m, int64_t batch, const float* vec,
                                             const float* mats, const int32_t* nets,
                                             float* z) {
  if (m < 1 || n < 4 || n > 30) return 1;
  Problem p;
  p.n = n;
  p.m = m;
  Build(mats, nets, nullptr, p);
  for (int64_t b = 0; b < batch; ++b) ForwardOne(p, p.gates, vec + b * n * 2, z + b * n);
  return 0;
}

extern "C" int qtl_statevector_backward_plain(int n, int m, int64_t batch, const float* vec,
                                              const float* mats, const int32_t* nets,
                                              const int32_t* inv, const float* g, float* dvec,
                                              float* gram) {
  if (m < 1 || n < 4 || n > 30) return 1;
  Problem p;
  p.n = n;
  p.m = m;
  Build(mats, nets, inv, p);
  for (int64_t b = 0; b < batch; ++b)
    BackwardOne(p, p.gates, p.gates_t, vec + b * n * 2, g + b * n, dvec + b * n * 2,
                gram + b * m * n * 4);
  return 0;
}

extern "C" const char* qtl_kernel_isa() { return qtl::VectorIsa(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(QtlStatevectorForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QtlStatevectorBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
