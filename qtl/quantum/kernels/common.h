// What the native kernels share: a 16-float vector type, its lane shuffles, and a parallel
// loop over XLA's intra-op thread pool that cannot deadlock when called from that pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace qtl {

constexpr int64_t kLanes = 16;

typedef float V __attribute__((vector_size(64)));
typedef int I __attribute__((vector_size(64)));

#if defined(__clang__)
#define QTL_SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define QTL_SHUFFLE(v, ...) __builtin_shuffle(v, I{__VA_ARGS__})
#endif

// Built for one instruction set (QTL_ISA_BUILD: -march=native or a forced level, see
// kernels/__init__.py), one copy; built without it, one copy per x86 set, picked at load time.
#if defined(__x86_64__) && !defined(QTL_ISA_BUILD) && (defined(__clang__) || __GNUC__ >= 6)
#define QTL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QTL_CLONES
#endif

#define QTL_ALWAYS_INLINE inline __attribute__((always_inline))

// The vector with lane l replaced by lane l ^ (1 << B), B < 4.
template <int B>
QTL_ALWAYS_INLINE V Flip(V v) {
  if constexpr (B == 0) return QTL_SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  if constexpr (B == 1) return QTL_SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  if constexpr (B == 2) return QTL_SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  if constexpr (B == 3) return QTL_SHUFFLE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
}

// No buffer is assumed 64-byte aligned: every access goes through memcpy.
QTL_ALWAYS_INLINE V Load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

QTL_ALWAYS_INLINE void Store(float* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }

QTL_ALWAYS_INLINE void AddTo(float* p, V v) { Store(p, Load(p) + v); }

// Runs task(0) ... task(chunks - 1), each once, on the caller and up to `helpers` pool threads.
//
// XLA:CPU runs independent thunks at once on its intra-op pool, so a kernel is often called
// *on* a pool thread while another kernel holds the other threads. Waiting for scheduled
// tasks to start would then deadlock (each caller blocks a thread its helpers need). So the
// caller never waits for a chunk nobody has started: it claims chunks itself until none are
// left, and waits only for chunks that a running helper has claimed. A helper that starts
// late finds nothing to claim and touches only the shared_ptr'd Claims, never the task.
struct Claims {
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;  // guarded by mu
  int64_t chunks = 0;
  const std::function<void(int64_t)>* task = nullptr;  // valid while done < chunks
};

inline void Drain(Claims& c) {
  for (;;) {
    const int64_t t = c.next.fetch_add(1, std::memory_order_relaxed);
    if (t >= c.chunks) return;
    (*c.task)(t);
    std::lock_guard<std::mutex> lock(c.mu);
    if (++c.done == c.chunks) c.cv.notify_all();
  }
}

inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t chunks, int64_t helpers,
                        const std::function<void(int64_t)>& task) {
  if (chunks <= 0) return;
  auto claims = std::make_shared<Claims>();
  claims->chunks = chunks;
  claims->task = &task;
  helpers = std::min<int64_t>(helpers, chunks - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([claims] { Drain(*claims); });
  Drain(*claims);
  std::unique_lock<std::mutex> lock(claims->mu);
  claims->cv.wait(lock, [&] { return claims->done == claims->chunks; });
}

// The vector instructions this library was compiled to (for the benchmarks' records).
inline const char* VectorIsa() {
#if defined(__AVX512F__)
  return "avx512f";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2+fma";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__AVX__)
  return "avx";
#elif defined(__ARM_NEON)
  return "neon";
#elif defined(__SSE2__)
  return "sse2";
#else
  return "scalar";
#endif
}

}  // namespace qtl
