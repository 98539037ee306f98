// A command-line driver of the native kernels' plain entries, for running a build for another
// architecture under an emulator (tests/test_kernel_isa.py: an ARM64 build under qemu-aarch64
// gives the x86-64 build's results). Reads one little-endian binary case from stdin and
// writes the results to stdout, then the vector ISA it was built for on stderr.
//   no argument (the real whole-circuit kernel, statevector.cc): int32 n, m, batch; float vec
//     (batch, n, 2), mats (m, n, 2, 2); int32 nets and inv (m + 1, n); float g (batch, n).
//     Writes z (batch, n), dvec (batch, n, 2), gram (batch, m, n, 4).
//   "complex" (complex_circuit.cc): the same with vec (batch, n, 2, 2) and mats
//     (m, n, 2, 2, 2). Writes z (batch, n), dvec (batch, n, 2, 2), gram (m, n, 2, 2, 2).
//   "complex-rx": the same for RX layers, with the gradient against the angles, gram (m, n).
//   "complex-encode": RX layers after an RX encoding, in the Hadamard basis (the QViT's path):
//     vec (batch, n) the encoding's angles; writes z (batch, n), dvec (batch, n), gram (m, n).
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

extern "C" int qtl_statevector_forward_plain(int n, int m, int64_t batch, const float* vec,
                                             const float* mats, const int32_t* nets, float* z);
extern "C" int qtl_statevector_backward_plain(int n, int m, int64_t batch, const float* vec,
                                              const float* mats, const int32_t* nets,
                                              const int32_t* inv, const float* g, float* dvec,
                                              float* gram);
// weak: a driver built without complex_circuit.cc runs the real kernel only
extern "C" __attribute__((weak)) int qtl_complex_forward_plain(int n, int m, int64_t batch, const float* vec,
                                         const float* mats, const int32_t* nets, float* z);
extern "C" __attribute__((weak)) int qtl_complex_backward_plain(int n, int m, int64_t batch, const float* vec,
                                          const float* mats, const int32_t* nets,
                                          const int32_t* inv, const float* g, float* dvec,
                                          float* gram, int angles);
extern "C" __attribute__((weak)) int qtl_complex_rx_forward_plain(int n, int m, int64_t batch, const float* angles,
                                            const float* mats, const int32_t* nets, float* z,
                                            int hadamard);
extern "C" __attribute__((weak)) int qtl_complex_rx_backward_plain(int n, int m, int64_t batch, const float* angles,
                                             const float* mats, const int32_t* nets,
                                             const int32_t* inv, const float* g, float* dvec,
                                             float* gram, int hadamard);
extern "C" const char* qtl_kernel_isa();

template <typename T>
static bool Read(std::vector<T>& v, size_t count) {
  v.resize(count);
  return std::fread(v.data(), sizeof(T), count, stdin) == count;
}

template <typename T>
static void Write(const std::vector<T>& v) {
  std::fwrite(v.data(), sizeof(T), v.size(), stdout);
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  const bool encode = mode == "complex-encode";
  const bool complex = mode == "complex" || mode == "complex-rx" || encode;
  const int angles = mode == "complex-rx" || encode;
  if (complex && !qtl_complex_forward_plain) return 4;
  const size_t amp = complex ? 4 : 2;  // floats per 2x2 entry / 2, and per wire state
  const size_t per_wire = encode ? 1 : amp;  // floats of vec per wire
  std::vector<int32_t> head, nets, inv;
  std::vector<float> vec, mats, g;
  if (!Read(head, 3)) return 2;
  const int n = head[0], m = head[1];
  const int64_t batch = head[2];
  if (!Read(vec, batch * n * per_wire) || !Read(mats, size_t(m) * n * 2 * amp) ||
      !Read(nets, size_t(m + 1) * n) || !Read(inv, size_t(m + 1) * n) || !Read(g, batch * n))
    return 2;
  std::vector<float> z(batch * n), dvec(batch * n * per_wire);
  std::vector<float> gram(complex ? size_t(m) * n * (angles ? 1 : 8) : batch * m * n * 4);
  if (encode) {
    if (qtl_complex_rx_forward_plain(n, m, batch, vec.data(), mats.data(), nets.data(), z.data(),
                                     1) ||
        qtl_complex_rx_backward_plain(n, m, batch, vec.data(), mats.data(), nets.data(),
                                      inv.data(), g.data(), dvec.data(), gram.data(), 1))
      return 3;
  } else if (complex) {
    if (qtl_complex_forward_plain(n, m, batch, vec.data(), mats.data(), nets.data(), z.data()) ||
        qtl_complex_backward_plain(n, m, batch, vec.data(), mats.data(), nets.data(), inv.data(),
                                   g.data(), dvec.data(), gram.data(), angles))
      return 3;
  } else if (qtl_statevector_forward_plain(n, m, batch, vec.data(), mats.data(), nets.data(),
                                           z.data()) ||
             qtl_statevector_backward_plain(n, m, batch, vec.data(), mats.data(), nets.data(),
                                            inv.data(), g.data(), dvec.data(), gram.data())) {
    return 3;
  }
  Write(z);
  Write(dvec);
  Write(gram);
  std::fprintf(stderr, "%s\n", qtl_kernel_isa());
  return 0;
}
