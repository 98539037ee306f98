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
#include <atomic>
#include <memory>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 512;  // inner-axis block of the major-axis kernel
constexpr int kMaxBits = 10;     // W <= 1024 (QTL_DISPATCH below)

typedef float V __attribute__((vector_size(64)));
typedef int I __attribute__((vector_size(64)));

#if defined(__clang__)
#define QTL_SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define QTL_SHUFFLE(v, ...) __builtin_shuffle(v, I{__VA_ARGS__})
#endif

// The vector with lane l replaced by lane l ^ (1 << B), B < 4.
template <int B>
inline V Flip(V v) {
  if constexpr (B == 0) return QTL_SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  if constexpr (B == 1) return QTL_SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  if constexpr (B == 2) return QTL_SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  if constexpr (B == 3) return QTL_SHUFFLE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
}

inline V Load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

// No buffer here is assumed 64-byte aligned: every access goes through memcpy.
inline void AddTo(float* p, V v) {
  const V sum = Load(p) + v;
  __builtin_memcpy(p, &sum, sizeof(V));
}

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

// One compiled copy per x86 instruction set, picked at load time; elsewhere, one copy.
#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 6)
#define QTL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QTL_CLONES
#endif

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

// The chunks of one call, claimed by whichever thread gets there first.
//
// XLA:CPU runs independent thunks at once on its intra-op pool, so this kernel is often
// called *on* a pool thread while another copy of it holds the other threads. Waiting for
// scheduled tasks to run would then deadlock (each caller blocks a thread its helpers need).
// So the caller never waits for a chunk nobody has started: it claims chunks itself until
// none are left, and waits only for chunks that a running helper has claimed. A helper that
// starts late finds nothing to claim and touches only the shared_ptr'd Claims.
struct Shared {
  Shared(const Problem& p, int64_t items, int64_t chunks, std::vector<std::vector<double>>& t)
      : p(p), items(items), chunks(chunks), totals(t) {}
  const Problem p;
  const int64_t items, chunks;
  std::vector<std::vector<double>>& totals;  // chunk -> its sums; owned by the caller
};

struct Claims {
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;  // guarded by mu
  Shared* shared;    // valid while done < chunks (the caller is waiting)
  int64_t chunks;
};

// Runs chunks until none are left to claim.
void Drain(Claims& c) {
  for (;;) {
    const int64_t t = c.next.fetch_add(1, std::memory_order_relaxed);
    if (t >= c.chunks) return;
    Shared& s = *c.shared;
    s.totals[t].assign((s.p.k + 1) * s.p.width, 0.0);
    Range(s.p, s.items * t / s.chunks, s.items * (t + 1) / s.chunks, s.totals[t]);
    std::lock_guard<std::mutex> lock(c.mu);
    if (++c.done == c.chunks) c.cv.notify_all();
  }
}

void RunChunks(ffi::ThreadPool& pool, Shared& shared) {
  auto claims = std::make_shared<Claims>();
  claims->shared = &shared;
  claims->chunks = shared.chunks;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared.chunks - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([claims] { Drain(*claims); });
  Drain(*claims);
  std::unique_lock<std::mutex> lock(claims->mu);
  claims->cv.wait(lock, [&] { return claims->done == claims->chunks; });
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
  Shared shared(p, items, chunks, totals);
  RunChunks(pool, shared);
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
