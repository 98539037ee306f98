// Per-wire 2x2 Gram matrices of two states: the rotation layers' weight gradient on CPU.
//
// For a rotation group of k wires (W = 2^k amplitudes along its axis), the gradient of each
// wire's 2x2 gate follows from C[p][q] = sum, over amplitudes whose bit for that wire is p,
// of d[.. a ..] * x[.. a with that bit set to q ..], for two states d and x (in qtl: the
// group's output cotangent and its output). Autodiff gets it from the full W x W product
// of the two states (2W FLOPs per amplitude, in a GEMM that XLA:CPU runs on one thread);
// this kernel reads each state once, does k+1 multiply-adds per amplitude, and splits the
// work over XLA's intra-op thread pool. Both states are 2-D, row-major: (rows, W) when the
// group's axis is the minor one (``minor`` = true), (W, columns)
// when it is the major one. Internally a state is viewed as (outer, W, inner).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using qtl::AddTo;
using qtl::Flip;
using qtl::kLanes;
using qtl::Load;
using qtl::V;

constexpr int64_t kBlock = 512;  // inner-axis block of the major-axis kernel
constexpr int kMaxBits = 10;     // W <= 1024 (QTL_DISPATCH below)

template <int K, int B, int P>
inline void FlipTerms(const V (&dd)[P], const V (&xx)[P], V (&acc)[K + 1][P]) {
  if constexpr (B < K && B < 4) {
    for (int v = 0; v < P; ++v) acc[B + 1][v] += dd[v] * Flip<B>(xx[v]);
    FlipTerms<K, B + 1, P>(dd, xx, acc);
  }
}

// Minor-axis layout: the state is a sequence of rows of P 16-float vectors (W >= 16: one row
// of W amplitudes; W < 16: 16 / W rows packed in one vector, so that the lane bits below K
// are the wire bits). acc[t][v] accumulates d * partner_t(x), where t = 0 is the amplitude
// itself and t = b + 1 its partner across bit b (a lane shuffle for b < 4, another vector of
// the row above). The accumulators stay in registers; acc_out receives their sum.
template <int K>
inline __attribute__((always_inline)) void MinorAxisK(const float* d, const float* x,
                                                      int64_t rows, float* acc_out) {
  constexpr int P = K >= 4 ? 1 << (K - 4) : 1;
  V acc[K + 1][P] = {};
  for (int64_t r = 0; r < rows; ++r) {
    V dd[P], xx[P];
    for (int v = 0; v < P; ++v) {
      dd[v] = Load(d + (r * P + v) * kLanes);
      xx[v] = Load(x + (r * P + v) * kLanes);
    }
    for (int v = 0; v < P; ++v) acc[0][v] += dd[v] * xx[v];
    FlipTerms<K, 0, P>(dd, xx, acc);
    for (int b = 4; b < K; ++b)
      for (int v = 0; v < P; ++v) acc[b + 1][v] += dd[v] * xx[v ^ (1 << (b - 4))];
  }
  for (int t = 0; t <= K; ++t)
    for (int v = 0; v < P; ++v) AddTo(acc_out + (t * P + v) * kLanes, acc[t][v]);
}

// Major-axis layout: W rows `stride` apart, `len` (a multiple of 16) of their columns summed.
// For each row a, its d block is read once and multiplied with the K + 1 partner rows of x;
// acc_out[(t * W + a) * 16 + l] receives lane l of the sums.
template <int K>
inline __attribute__((always_inline)) void MajorAxisK(const float* d, const float* x,
                                                      int64_t stride, int64_t len,
                                                      float* acc_out) {
  constexpr int64_t W = int64_t{1} << K;
  for (int64_t a = 0; a < W; ++a) {
    V s[K + 1] = {};
    const float* da = d + a * stride;
    const float* xt[K + 1];
    xt[0] = x + a * stride;
    for (int b = 0; b < K; ++b) xt[b + 1] = x + (a ^ (int64_t{1} << b)) * stride;
    for (int64_t i = 0; i < len; i += kLanes) {
      const V dd = Load(da + i);
      for (int t = 0; t <= K; ++t) s[t] += dd * Load(xt[t] + i);
    }
    for (int t = 0; t <= K; ++t) AddTo(acc_out + (t * W + a) * kLanes, s[t]);
  }
}

#define QTL_DISPATCH(F, k, ...)                                            \
  switch (k) {                                                             \
    case 1: F<1>(__VA_ARGS__); break;                                      \
    case 2: F<2>(__VA_ARGS__); break;                                      \
    case 3: F<3>(__VA_ARGS__); break;                                      \
    case 4: F<4>(__VA_ARGS__); break;                                      \
    case 5: F<5>(__VA_ARGS__); break;                                      \
    case 6: F<6>(__VA_ARGS__); break;                                      \
    case 7: F<7>(__VA_ARGS__); break;                                      \
    case 8: F<8>(__VA_ARGS__); break;                                      \
    case 9: F<9>(__VA_ARGS__); break;                                      \
    default: F<10>(__VA_ARGS__); break;                                    \
  }

QTL_CLONES void MinorAxis(
    const float* d, const float* x, int64_t rows, int k, float* acc) {
  QTL_DISPATCH(MinorAxisK, k, d, x, rows, acc)
}

QTL_CLONES void MajorAxis(
    const float* d, const float* x, int k, int64_t stride, int64_t len, float* acc) {
  QTL_DISPATCH(MajorAxisK, k, d, x, stride, len, acc)
}

struct Problem {
  const float* d;
  const float* x;
  int64_t outer, width, inner;
  int k;
  bool minor() const { return inner == 1 && (outer * width) % kLanes == 0; }
  // Work items: groups of minor-axis rows, or (outer index, inner block) pairs.
  int64_t per_row() const { return std::max<int64_t>(1, width / kLanes); }
  int64_t rows() const { return outer * width / (per_row() * kLanes); }
  int64_t rows_per_item() const { return std::max<int64_t>(1, 4096 / (per_row() * kLanes)); }
  int64_t blocks() const { return (inner + kBlock - 1) / kBlock; }
  int64_t items() const {
    return minor() ? (rows() + rows_per_item() - 1) / rows_per_item() : outer * blocks();
  }
  int64_t acc_floats() const { return (k + 1) * (minor() ? per_row() : width) * kLanes; }
};

// Adds a float accumulator (acc_floats() of them) into total[t * W + a], in double.
void Flush(const Problem& p, std::vector<float>& acc, std::vector<double>& total) {
  for (int t = 0; t <= p.k; ++t) {
    if (p.minor()) {
      const int64_t span = p.per_row() * kLanes;  // lane position -> a = position % W
      for (int64_t e = 0; e < span; ++e) total[t * p.width + e % p.width] += acc[t * span + e];
    } else {
      for (int64_t a = 0; a < p.width; ++a)
        for (int64_t l = 0; l < kLanes; ++l)
          total[t * p.width + a] += acc[(t * p.width + a) * kLanes + l];
    }
  }
  std::fill(acc.begin(), acc.end(), 0.0f);
}

// Accumulates items [begin, end) into total ((k + 1) * W doubles). Each item is summed in
// float and then added in double, so no float sum runs over more than one item.
void Range(const Problem& p, int64_t begin, int64_t end, std::vector<double>& total) {
  std::vector<float> acc(p.acc_floats(), 0.0f);
  std::vector<float> td, tx;
  for (int64_t item = begin; item < end; ++item) {
    if (p.minor()) {
      const int64_t floats_per_row = p.per_row() * kLanes;
      const int64_t first = item * p.rows_per_item();
      const int64_t last = std::min(p.rows(), first + p.rows_per_item());
      MinorAxis(p.d + first * floats_per_row, p.x + first * floats_per_row, last - first, p.k,
                acc.data());
      Flush(p, acc, total);
      continue;
    }
    const int64_t o = item / p.blocks(), i = (item % p.blocks()) * kBlock;
    const int64_t n = std::min(kBlock, p.inner - i);
    const float* dp = p.d + o * p.width * p.inner + i;
    const float* xp = p.x + o * p.width * p.inner + i;
    if (n % kLanes == 0) {
      MajorAxis(dp, xp, p.k, p.inner, n, acc.data());
    } else {  // ragged end (or a tiny inner axis): a zero-padded (W, len) copy
      const int64_t len = (n + kLanes - 1) / kLanes * kLanes;
      td.assign(p.width * len, 0.0f);
      tx.assign(p.width * len, 0.0f);
      for (int64_t a = 0; a < p.width; ++a) {
        std::copy(dp + a * p.inner, dp + a * p.inner + n, td.begin() + a * len);
        std::copy(xp + a * p.inner, xp + a * p.inner + n, tx.begin() + a * len);
      }
      MajorAxis(td.data(), tx.data(), p.k, len, len, acc.data());
    }
    Flush(p, acc, total);
  }
}

ffi::Error WireGram(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> d, ffi::Buffer<ffi::F32> x,
                    ffi::ResultBuffer<ffi::F32> out, bool minor) {
  const auto dims = d.dimensions();
  if (dims.size() != 2 || x.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("wire_gram: expected 2-D states");
  for (int i = 0; i < 2; ++i)
    if (dims[i] != x.dimensions()[i])
      return ffi::Error::InvalidArgument("wire_gram: the two states differ in shape");
  Problem p = minor ? Problem{d.typed_data(), x.typed_data(), dims[0], dims[1], 1, 0}
                    : Problem{d.typed_data(), x.typed_data(), 1, dims[0], dims[1], 0};
  while ((int64_t{1} << p.k) < p.width) ++p.k;
  if ((int64_t{1} << p.k) != p.width || p.k < 1 || p.k > kMaxBits ||
      out->element_count() != static_cast<size_t>(4 * p.k))
    return ffi::Error::InvalidArgument(
        "wire_gram: W must be 2^k, 2 <= W <= 1024, the result (k, 2, 2)");

  // ~1M multiply-adds per chunk keep the scheduling cost negligible; a few chunks per thread
  // balance the load when other work shares the pool
  const int64_t items = p.items();
  const int64_t work = p.outer * p.width * p.inner * (p.k + 1);
  const int64_t chunks = std::clamp<int64_t>(
      std::min<int64_t>(4 * int64_t{pool.num_threads()}, work >> 20), 1,
      std::max<int64_t>(items, 1));
  std::vector<std::vector<double>> totals(chunks);
  qtl::ParallelFor(pool, chunks, pool.num_threads(), [&](int64_t t) {
    totals[t].assign((p.k + 1) * p.width, 0.0);
    Range(p, items * t / chunks, items * (t + 1) / chunks, totals[t]);
  });
  std::vector<double> total((p.k + 1) * p.width, 0.0);
  for (int64_t t = 0; t < chunks; ++t)  // in chunk order: the same sums whoever ran them
    for (size_t e = 0; e < total.size(); ++e) total[e] += totals[t][e];

  // wire j is bit k-1-j of a: C_j[q][q] sums total[0][a], C_j[q][1-q] sums total[b+1][a]
  // over the a whose bit is q
  float* c = out->typed_data();
  for (int j = 0; j < p.k; ++j) {
    const int b = p.k - 1 - j;
    double sums[2][2] = {{0, 0}, {0, 0}};
    for (int64_t a = 0; a < p.width; ++a) {
      const int q = (a >> b) & 1;
      sums[q][q] += total[a];
      sums[q][1 - q] += total[(b + 1) * p.width + a];
    }
    for (int r = 0; r < 2; ++r)
      for (int s = 0; s < 2; ++s) c[j * 4 + r * 2 + s] = static_cast<float>(sums[r][s]);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QtlWireGram, WireGram,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("minor"));
