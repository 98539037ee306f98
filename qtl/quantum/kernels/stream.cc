// STREAM-like copy and triad (McCalpin's kernels) over float arrays, for the benchmarks' memory
// bandwidth: the floor a simulator step cannot beat is the bytes it moves over this rate.
// Built with the kernels (same flags), so the loops use the vector width they use. Called
// from Python threads over disjoint slices (ctypes releases the GIL).
#include <cstdint>

extern "C" void qtl_stream_copy(float* __restrict dst, const float* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

extern "C" void qtl_stream_triad(float* __restrict a, const float* __restrict b,
                                 const float* __restrict c, float s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = b[i] + s * c[i];
}
