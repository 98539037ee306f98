// Complex-amplitude circuits of few qubits over a very large batch (the QViT's quantum layers:
// images x tokens x projections rows of d = 4..16 qubits): <Z_i> and the gradient of a loss of
// them by the adjoint method, on the CPU.
//
// Why its own kernel: through XLA these circuits are a chain of tiny complex ops over the
// whole batch (each streaming every row's state through memory, complex arithmetic unfused),
// and the whole-circuit kernel of statevector.cc is real-only and vectorises inside one large
// state. Here the SIMD lanes are *examples*: a group of W rows is simulated together, amplitude
// j of all W rows in one vector (real and imaginary parts in two), so every gate on every wire
// is the same vertical multiply-add, a CNOT network moves whole vectors, and no lane shuffle is
// ever needed. At d = 8 a group's state is 16 KiB (in L1).
//
// The backward pass is the adjoint method without stored states: the gates are unitary, so
// the forward is recomputed to the last layer and then undone gate by gate (x = U^H y) while
// the cotangent goes back (lam_x = U^H lam_y); each gate's gradient is sum lam_p conj(x_q).
//
// The circuit (see qtl/quantum/fast.py): x_0 = P_0 (v_0 (x) ... (x) v_{n-1}), v_w the wire
// states after the prefix; then for l = 0 .. m - 1: y_l = U_l x_l (a 2x2 on every wire, wire 0
// first) and x_{l+1} = P_{l+1} y_l; <Z_i> is measured on x_m. The networks come as gather
// maps (P |s>)[j] = s[G(j)], each given by the images of the single-bit indices (G is linear
// over GF(2)). Wire w is bit n - 1 - w of the index. Complex numbers travel as (re, im) float
// pairs, gradients as d/dre + i d/dim.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kW = 8;  // rows per group: one AVX2 register per part (half an AVX-512 one)
typedef float F __attribute__((vector_size(kW * 4)));
typedef int32_t FI __attribute__((vector_size(kW * 4)));

// sin and cos of every lane in float32 (Cephes' minimax polynomials on [-pi/4, pi/4] after a
// three-part Cody-Waite reduction by pi/2; measured against double precision for |x| < 1e4: at
// most 9.2e-8 absolute error, 1.6 ulp away from the zeros):
// the encoding's RX(a)|0> = (cos(a/2), -i sin(a/2)) per row and wire, which through XLA:CPU's
// elementwise cosines and their gradient took about a third of the layer (docs/simulator.md).
QTL_ALWAYS_INLINE void SinCos(F x, F& sin_x, F& cos_x) {
  const F round = F{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const F q = (x * 0.636619772367581343f + round) - round;
  const FI quadrant = __builtin_convertvector(q, FI);
  const F r = ((x - q * 1.5703125f) - q * 4.837512969970703125e-4f) - q * 7.54978995489188216e-8f;
  const F r2 = r * r;
  const F sr = r + r * r2 * (-1.6666654611e-1f + r2 * (8.3321608736e-3f + r2 * -1.9515295891e-4f));
  const F cr = 1.0f - 0.5f * r2 +
               r2 * r2 * (4.166664568298827e-2f + r2 * (-1.388731625493765e-3f + r2 * 2.443315711809948e-5f));
  const FI odd = (quadrant & 1) != 0;
  const F s0 = odd ? cr : sr, c0 = odd ? sr : cr;
  sin_x = ((quadrant & 2) != 0) ? -s0 : s0;
  cos_x = (((quadrant + 1) & 2) != 0) ? -c0 : c0;
}

constexpr int kMaxQubits = 20;

#define QTL_INLINE QTL_ALWAYS_INLINE

struct C {
  float r, i;
};

// A complex number per lane: one coefficient of a gate for each row of a group.
struct FC {
  F r, i;
};

struct Problem {
  int n = 0, m = 0;
  int64_t size = 0;
  std::vector<std::vector<int32_t>> g, ginv;  // (m + 1) full index maps of 2^n entries
  std::vector<C> u;                           // (m, n, 2, 2), when every row shares them
  const float* row_mats = nullptr;  // else (B, m, n, 2, 2, 2): each row's own (noise frames)
  int kind = 0;                     // of every gate in u: kGeneral, kReal or kRx
  bool encode = false;  // vec is (B, n) RX angles a: the wire states are RX(a)|0>, built here
  bool rx = false;      // every gate is RX(t) (AllRx) and shared by every row
  bool angles = false;  // and the backward returns dL/dt, (m, n) per slot
  // RX layers after an RX encoding, run in the Hadamard basis (UseHadamard, below): there the
  // networks' gather maps (m + 1, each 2^n entries; hginv the inverses of the first m, which
  // the backward undoes: the last one it never gathers through, XCotangent) and every layer's
  // diagonal (m, 2^n) as real and imaginary parts
  bool hadamard = false;
  std::vector<std::vector<int32_t>> hg, hginv;
  std::vector<float> dr, di;
};

// What every gate of a circuit has as exact zeros, read from its matrices: RY layers are
// real, RX layers (the QViT's) have a real diagonal and an imaginary off-diagonal. Either
// halves the multiply-adds of applying or undoing a gate; anything else is kGeneral.
constexpr int kGeneral = 0, kReal = 1, kRx = 2;

int GateKind(const std::vector<C>& u) {
  bool real = true, rx = true;
  for (size_t k = 0; k < u.size(); k += 4) {
    real = real && u[k].i == 0 && u[k + 1].i == 0 && u[k + 2].i == 0 && u[k + 3].i == 0;
    rx = rx && u[k].i == 0 && u[k + 3].i == 0 && u[k + 1].r == 0 && u[k + 2].r == 0;
  }
  return real ? kReal : rx ? kRx : kGeneral;
}

// Whether every gate is RX(t) of one angle: u00 = u11 = c, u01 = u10 = -is (the angles
// mode's promise, checked).
bool AllRx(const std::vector<C>& u) {
  for (size_t k = 0; k < u.size(); k += 4)
    if (u[k].i != 0 || u[k + 3].i != 0 || u[k + 1].r != 0 || u[k + 2].r != 0 ||
        u[k].r != u[k + 3].r || u[k + 1].i != u[k + 2].i)
      return false;
  return true;
}

std::vector<int32_t> FullMap(const int32_t* cols, int n) {
  std::vector<int32_t> map(size_t{1} << n, 0);
  for (int64_t j = 1; j < static_cast<int64_t>(map.size()); ++j)
    map[j] = map[j & (j - 1)] ^ cols[n - 1 - __builtin_ctzll(j)];
  return map;
}

void Build(int n, int m, const float* mats, const int32_t* nets, const int32_t* inv,
           Problem& p) {
  p.n = n;
  p.m = m;
  p.size = int64_t{1} << n;
  for (int l = 0; l <= m; ++l) {
    p.g.push_back(FullMap(nets + l * n, n));
    if (inv) p.ginv.push_back(FullMap(inv + l * n, n));
  }
  if (!mats) return;
  p.u.resize(size_t(m) * n * 4);
  for (size_t k = 0; k < p.u.size(); ++k) p.u[k] = C{mats[2 * k], mats[2 * k + 1]};
  p.kind = GateKind(p.u);
  p.rx = AllRx(p.u);
}

// ---- The Hadamard basis (RX layers after an RX encoding: the QViT's circuits)
//
// RX(t) = H diag(e^{-it/2}, e^{it/2}) H, so in the basis H^n (H on every wire) a layer of RX
// gates is one diagonal, D[j] = prod_w e^{-i s_w(j) t_w / 2} with s_w(j) = +1 where wire w's
// bit of j is 0, else -1: one complex multiply per amplitude instead of n gates. A CNOT
// network stays a permutation there: H^n P_A H^n = P_{A^-T} for |k> -> |A k>, so its gather
// map G (= A^-1) becomes (A^-T)^-1 = A^T = (G^-1)^T. The encoding's wire state H RX(a)|0>
// is (e^{-ia/2}, e^{ia/2}) / sqrt 2, and <Z_w> of the state is <X_w> of its H^n image, read
// from pairs of amplitudes. Every gradient is then a fold: for y = D u (or the encoding's
// product state, which is a diagonal too), dL/dt_w = 1/2 sum_j s_w(j) Im(conj(lam_j) y_j).

// The linear map over GF(2) whose image of bit b is col[b], in full.
std::vector<int32_t> MapOfColumns(const std::vector<int32_t>& col, int n) {
  std::vector<int32_t> map(size_t{1} << n, 0);
  for (int64_t j = 1; j < static_cast<int64_t>(map.size()); ++j)
    map[j] = map[j & (j - 1)] ^ col[__builtin_ctzll(j)];
  return map;
}

// The transpose over GF(2) of the matrix whose column b is col[b].
std::vector<int32_t> Transposed(const std::vector<int32_t>& col, int n) {
  std::vector<int32_t> t(n, 0);
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) t[b] |= ((col[a] >> b) & 1) << a;
  return t;
}

// The Hadamard-basis maps and diagonals of a problem whose layers are all RX (p.rx).
void UseHadamard(Problem& p) {
  const int n = p.n;
  const int64_t size = p.size;
  for (int l = 0; l <= p.m; ++l) {
    const std::vector<int32_t>& g = p.g[l];
    std::vector<int32_t> inv(size), col(n), col_inv(n);
    for (int64_t j = 0; j < size; ++j) inv[g[j]] = static_cast<int32_t>(j);
    for (int b = 0; b < n; ++b) {
      col[b] = g[int64_t{1} << b];
      col_inv[b] = inv[int64_t{1} << b];
    }
    p.hg.push_back(MapOfColumns(Transposed(col_inv, n), n));  // (G^-1)^T
    if (l < p.m) p.hginv.push_back(MapOfColumns(Transposed(col, n), n));  // its inverse, G^T
  }
  // D in double (n unit factors per entry), wire 0 the most significant bit like Product
  p.dr.resize(size_t(p.m) * size);
  p.di.resize(size_t(p.m) * size);
  std::vector<double> re(size), im(size);
  for (int l = 0; l < p.m; ++l) {
    re[0] = 1.0;
    im[0] = 0.0;
    int64_t len = 1;
    for (int w = 0; w < n; ++w) {
      const double c = p.u[(l * n + w) * 4].r, sn = -p.u[(l * n + w) * 4 + 1].i;  // u01 = -is
      for (int64_t j = len - 1; j >= 0; --j) {
        const double pr = re[j], pi = im[j];
        re[2 * j + 1] = pr * c - pi * sn;  // bit 1: e^{+it/2} = c + is
        im[2 * j + 1] = pr * sn + pi * c;
        re[2 * j] = pr * c + pi * sn;  // bit 0: e^{-it/2} = c - is
        im[2 * j] = pi * c - pr * sn;
      }
      len *= 2;
    }
    for (int64_t j = 0; j < size; ++j) {
      p.dr[l * size + j] = static_cast<float>(re[j]);
      p.di[l * size + j] = static_cast<float>(im[j]);
    }
  }
  p.hadamard = true;
}

// Scratch that lives with its thread (XLA's pool threads live as long as the process).
struct Scratch {
  std::vector<F> sr, si, tr, ti, lr, li;
  std::vector<F> ys;  // angles mode: every layer's output state, (m, 2, 2^n)
  std::vector<F> vr, vi;  // (n, 2) wire states of the group
  std::vector<FC> u;      // (m, n, 2, 2) the group's gates, per lane
  std::vector<F> gs;      // (n, 8) one layer's gate gradients, per lane
  void Fit(int64_t size, int n) {
    for (auto* v : {&sr, &si, &tr, &ti, &lr, &li})
      if (static_cast<int64_t>(v->size()) < size) v->resize(size);
    vr.resize(2 * n);
    vi.resize(2 * n);
  }
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// The group's wire states (rows b0 .. b0 + rows - 1; lanes past them are |0>).
void LoadVectors(const Problem& p, const float* vec, int64_t b0, int rows, Scratch& s) {
  const int n = p.n;
  if (p.encode) {  // RX(a)|0> = (cos(a/2), -i sin(a/2)); lanes past the rows: a = 0, |0>
    constexpr float kHalf = 0.70710678118654752f;  // 1 / sqrt 2
    for (int w = 0; w < n; ++w) {
      F a = {};
      for (int k = 0; k < rows; ++k) a[k] = vec[(b0 + k) * n + w];
      F sn, c;
      SinCos(0.5f * a, sn, c);
      if (p.hadamard) {  // H RX(a)|0> = (c - is, c + is) / sqrt 2
        s.vr[2 * w] = s.vr[2 * w + 1] = kHalf * c;
        s.vi[2 * w] = -kHalf * sn;
        s.vi[2 * w + 1] = kHalf * sn;
        continue;
      }
      s.vr[2 * w] = c;
      s.vi[2 * w] = F{};
      s.vr[2 * w + 1] = F{};
      s.vi[2 * w + 1] = -sn;
    }
    return;
  }
  for (int w = 0; w < n; ++w)
    for (int a = 0; a < 2; ++a) {
      F re = {}, im = {};
      for (int k = 0; k < kW; ++k) {
        if (k < rows) {
          const float* v = vec + ((b0 + k) * n + w) * 4 + a * 2;
          re[k] = v[0];
          im[k] = v[1];
        } else {
          re[k] = a == 0 ? 1.0f : 0.0f;
        }
      }
      s.vr[w * 2 + a] = re;
      s.vi[w * 2 + a] = im;
    }
}

// The group's gates as lane vectors: p.u in every lane, or each row's own (lanes past the
// group's rows get the unit matrix).
void GroupGates(const Problem& p, int64_t b0, int rows, Scratch& s) {
  const size_t count = size_t(p.m) * p.n * 4;
  s.u.resize(count);
  if (!p.row_mats) {
    for (size_t k = 0; k < count; ++k) s.u[k] = FC{F{} + p.u[k].r, F{} + p.u[k].i};
    return;
  }
  for (size_t k = 0; k < count; ++k) {
    FC f{F{} + ((k % 4 == 0 || k % 4 == 3) ? 1.0f : 0.0f), F{}};
    for (int lane = 0; lane < rows; ++lane) {
      const float* c = p.row_mats + ((b0 + lane) * count + k) * 2;
      f.r[lane] = c[0];
      f.i[lane] = c[1];
    }
    s.u[k] = f;
  }
}

// out[0 .. 2^(hi - lo)) = the product state of wires lo .. hi - 1 (wire lo most significant).
QTL_INLINE void Product(const Scratch& s, int lo, int hi, F* outr, F* outi) {
  outr[0] = F{} + 1.0f;
  outi[0] = F{};
  int64_t len = 1;
  for (int w = lo; w < hi; ++w) {
    const F v0r = s.vr[2 * w], v0i = s.vi[2 * w], v1r = s.vr[2 * w + 1], v1i = s.vi[2 * w + 1];
    for (int64_t j = len - 1; j >= 0; --j) {
      const F pr = outr[j], pi = outi[j];
      outr[2 * j + 1] = pr * v1r - pi * v1i;
      outi[2 * j + 1] = pr * v1i + pi * v1r;
      outr[2 * j] = pr * v0r - pi * v0i;
      outi[2 * j] = pr * v0i + pi * v0r;
    }
    len *= 2;
  }
}

// (x0, x1) = U (a, b) for one pair of amplitudes, leaving out the products with the entries
// that a gate of kind K has as exact zeros.
template <int K>
QTL_INLINE void Apply(const FC& u00, const FC& u01, const FC& u10, const FC& u11, F ar, F ai,
                      F br, F bi, F& x0r, F& x0i, F& x1r, F& x1i) {
  if constexpr (K == kReal) {
    x0r = u00.r * ar + u01.r * br;
    x0i = u00.r * ai + u01.r * bi;
    x1r = u10.r * ar + u11.r * br;
    x1i = u10.r * ai + u11.r * bi;
  } else if constexpr (K == kRx) {
    x0r = u00.r * ar - u01.i * bi;
    x0i = u00.r * ai + u01.i * br;
    x1r = u11.r * br - u10.i * ai;
    x1i = u11.r * bi + u10.i * ar;
  } else {
    x0r = u00.r * ar - u00.i * ai + u01.r * br - u01.i * bi;
    x0i = u00.r * ai + u00.i * ar + u01.r * bi + u01.i * br;
    x1r = u10.r * ar - u10.i * ai + u11.r * br - u11.i * bi;
    x1i = u10.r * ai + u10.i * ar + u11.r * bi + u11.i * br;
  }
}

// y = U x on wire w for every pair of amplitudes.
template <int K>
QTL_INLINE void Gate(F* __restrict sr, F* __restrict si, int64_t size, int64_t stride,
                     const FC* u) {
  const FC u00 = u[0], u01 = u[1], u10 = u[2], u11 = u[3];
  for (int64_t base = 0; base < size; base += 2 * stride)
    for (int64_t i = base; i < base + stride; ++i) {
      const int64_t k = i + stride;
      Apply<K>(u00, u01, u10, u11, sr[i], si[i], sr[k], si[k], sr[i], si[i], sr[k], si[k]);
    }
}

// One gate undone on the state (x = U^H y) and the cotangent (lam_x = U^H lam_y), and the
// gate's gradient G_pq += lam_p conj(x_q) summed into g (4 complex, per lane).
template <int K>
QTL_INLINE void GateBack(F* __restrict sr, F* __restrict si, F* __restrict lr,
                         F* __restrict li, int64_t size, int64_t stride, const FC* u, F* g) {
  // U^H: h00 = conj(u00), h01 = conj(u10), h10 = conj(u01), h11 = conj(u11) (same kind as U)
  const FC h00{u[0].r, -u[0].i}, h01{u[2].r, -u[2].i}, h10{u[1].r, -u[1].i},
      h11{u[3].r, -u[3].i};
  F g00r = {}, g00i = {}, g01r = {}, g01i = {}, g10r = {}, g10i = {}, g11r = {}, g11i = {};
  for (int64_t base = 0; base < size; base += 2 * stride)
    for (int64_t i = base; i < base + stride; ++i) {
      const int64_t k = i + stride;
      F x0r, x0i, x1r, x1i;
      Apply<K>(h00, h01, h10, h11, sr[i], si[i], sr[k], si[k], x0r, x0i, x1r, x1i);
      const F l0r = lr[i], l0i = li[i], l1r = lr[k], l1i = li[k];
      // lam_p conj(x_q) = (lr xr + li xi) + i (li xr - lr xi)
      g00r += l0r * x0r + l0i * x0i;
      g00i += l0i * x0r - l0r * x0i;
      g01r += l0r * x1r + l0i * x1i;
      g01i += l0i * x1r - l0r * x1i;
      g10r += l1r * x0r + l1i * x0i;
      g10i += l1i * x0r - l1r * x0i;
      g11r += l1r * x1r + l1i * x1i;
      g11i += l1i * x1r - l1r * x1i;
      sr[i] = x0r;
      si[i] = x0i;
      sr[k] = x1r;
      si[k] = x1i;
      Apply<K>(h00, h01, h10, h11, l0r, l0i, l1r, l1i, lr[i], li[i], lr[k], li[k]);
    }
  g[0] += g00r;
  g[1] += g00i;
  g[2] += g01r;
  g[3] += g01i;
  g[4] += g10r;
  g[5] += g10i;
  g[6] += g11r;
  g[7] += g11i;
}

// ---- RX layers of one angle per gate (the QViT's; the angles mode)
//
// Every gate of a layer is RX(t) = [[c, -is], [-is, c]] on its own wire, so the gates of a
// layer commute: two wires are applied in one pass over the state (half the loads and stores
// of one pass per wire, which bounded the per-wire loops), and each gate's gradient can be
// taken at the layer's output, dL/dt = 1/2 sum Im(conj(lam_p) y_q + conj(lam_q) y_p) over the
// gate's pairs (p, q). The backward then keeps every layer's output from its forward (m
// states of 16 KiB per group at d = 8) and never undoes the state: per layer one gradient
// pass (loads only) and one pass undoing the cotangent.

// (a, b) <- RX (a, b) for one pair of amplitudes; RX^H = RX(-t) is the same with -s.
QTL_INLINE void Rx(F c, F s, F& ar, F& ai, F& br, F& bi) {
  const F x0r = c * ar + s * bi, x0i = c * ai - s * br;
  const F x1r = c * br + s * ai, x1i = c * bi - s * ar;
  ar = x0r, ai = x0i, br = x1r, bi = x1i;
}

// One layer's RX gates on a state in place (sign -1: undone), two wires per pass.
QTL_INLINE void RxLayer(F* __restrict r, F* __restrict im, const Problem& p, const Scratch& s,
                        int l, float sign) {
  const int n = p.n;
  const int64_t size = p.size;
  auto coef = [&](int w, F& c, F& sn) {
    const FC* u = &s.u[(l * n + w) * 4];
    c = u[0].r;
    sn = -sign * u[1].i;  // u01 = -i s
  };
  int w = 0;
  for (; w + 1 < n; w += 2) {
    F ca, sa, cb, sb;
    coef(w, ca, sa);
    coef(w + 1, cb, sb);
    const int64_t da = int64_t{1} << (n - 1 - w), db = da / 2;
    for (int64_t a0 = 0; a0 < size; a0 += 2 * da)
      for (int64_t b0 = a0; b0 < a0 + da; b0 += 2 * db)
        for (int64_t j = b0; j < b0 + db; ++j) {
          F r0 = r[j], i0 = im[j], r1 = r[j + db], i1 = im[j + db];
          F r2 = r[j + da], i2 = im[j + da], r3 = r[j + da + db], i3 = im[j + da + db];
          Rx(ca, sa, r0, i0, r2, i2);
          Rx(ca, sa, r1, i1, r3, i3);
          Rx(cb, sb, r0, i0, r1, i1);
          Rx(cb, sb, r2, i2, r3, i3);
          r[j] = r0, im[j] = i0, r[j + db] = r1, im[j + db] = i1;
          r[j + da] = r2, im[j + da] = i2, r[j + da + db] = r3, im[j + da + db] = i3;
        }
  }
  if (w < n) {  // odd n: the last wire (stride 1) alone
    F c, sn;
    coef(w, c, sn);
    for (int64_t j = 0; j < size; j += 2) Rx(c, sn, r[j], im[j], r[j + 1], im[j + 1]);
  }
}

// Im(conj(l_p) y_q + conj(l_q) y_p) for one pair.
QTL_INLINE F PairIm(F lpr, F lpi, F lqr, F lqi, F ypr, F ypi, F yqr, F yqi) {
  return lpr * yqi - lpi * yqr + lqr * ypi - lqi * ypr;
}

// Every gate's dL/dt of layer l from its output state y and cotangent lam, two wires per pass
// (loads only); g[w] (per lane) gets wire w's.
QTL_INLINE void RxGrads(const F* __restrict yr, const F* __restrict yi, const F* __restrict lr,
                        const F* __restrict li, const Problem& p, F* g) {
  const int n = p.n;
  const int64_t size = p.size;
  int w = 0;
  for (; w + 1 < n; w += 2) {
    const int64_t da = int64_t{1} << (n - 1 - w), db = da / 2;
    F ga0 = {}, ga1 = {}, gb0 = {}, gb1 = {};
    for (int64_t a0 = 0; a0 < size; a0 += 2 * da)
      for (int64_t b0 = a0; b0 < a0 + da; b0 += 2 * db)
        for (int64_t j = b0; j < b0 + db; ++j) {
          const int64_t j1 = j + db, j2 = j + da, j3 = j + da + db;
          // wire a: pairs (0, 2), (1, 3); wire b: (0, 1), (2, 3)
          ga0 += PairIm(lr[j], li[j], lr[j2], li[j2], yr[j], yi[j], yr[j2], yi[j2]);
          ga1 += PairIm(lr[j1], li[j1], lr[j3], li[j3], yr[j1], yi[j1], yr[j3], yi[j3]);
          gb0 += PairIm(lr[j], li[j], lr[j1], li[j1], yr[j], yi[j], yr[j1], yi[j1]);
          gb1 += PairIm(lr[j2], li[j2], lr[j3], li[j3], yr[j2], yi[j2], yr[j3], yi[j3]);
        }
    g[w] = 0.5f * (ga0 + ga1);
    g[w + 1] = 0.5f * (gb0 + gb1);
  }
  if (w < n) {
    F acc = {};
    for (int64_t j = 0; j < size; j += 2)
      acc += PairIm(lr[j], li[j], lr[j + 1], li[j + 1], yr[j], yi[j], yr[j + 1], yi[j + 1]);
    g[w] = 0.5f * acc;
  }
}

// dst[j] = src[map[j]] for both parts.
QTL_INLINE void Gather(const F* __restrict sr, const F* __restrict si, F* __restrict dr,
                       F* __restrict di, const int32_t* map, int64_t size) {
  for (int64_t j = 0; j < size; ++j) {
    dr[j] = sr[map[j]];
    di[j] = si[map[j]];
  }
}

// The forward to y_{m-1} (the state after the last rotation layer) in s.sr / s.si.
template <int K>
QTL_INLINE void ForwardStateK(const Problem& p, Scratch& s) {
  const int n = p.n;
  const int64_t size = p.size;
  Product(s, 0, n, s.tr.data(), s.ti.data());
  Gather(s.tr.data(), s.ti.data(), s.sr.data(), s.si.data(), p.g[0].data(), size);
  for (int l = 0; l < p.m; ++l) {
    if (l > 0) {
      Gather(s.sr.data(), s.si.data(), s.tr.data(), s.ti.data(), p.g[l].data(), size);
      std::swap(s.sr, s.tr);
      std::swap(s.si, s.ti);
    }
    for (int w = 0; w < n; ++w)
      Gate<K>(s.sr.data(), s.si.data(), size, int64_t{1} << (n - 1 - w), &s.u[(l * n + w) * 4]);
  }
}

// The forward of an all-RX circuit, to s.sr / s.si; ys: also every layer's output there,
// (m, 2, 2^n), the last one included.
void ForwardRx(const Problem& p, Scratch& s, F* ys) {
  const int64_t size = p.size;
  Product(s, 0, p.n, s.tr.data(), s.ti.data());
  const F *pr = s.tr.data(), *pi = s.ti.data();
  for (int l = 0; l < p.m; ++l) {
    if (ys) {
      F* r = ys + 2 * l * size;
      Gather(pr, pi, r, r + size, p.g[l].data(), size);
      RxLayer(r, r + size, p, s, l, 1.0f);
      pr = r, pi = r + size;
      continue;
    }
    Gather(s.tr.data(), s.ti.data(), s.sr.data(), s.si.data(), p.g[l].data(), size);
    RxLayer(s.sr.data(), s.si.data(), p, s, l, 1.0f);
    if (l + 1 < p.m) {
      std::swap(s.sr, s.tr);
      std::swap(s.si, s.ti);
    }
  }
}

void ForwardState(const Problem& p, Scratch& s) {
  if (p.rx) return ForwardRx(p, s, nullptr);
  if (p.kind == kReal) return ForwardStateK<kReal>(p, s);
  if (p.kind == kRx) return ForwardStateK<kRx>(p, s);
  ForwardStateK<kGeneral>(p, s);
}

// Every gate of layer l undone, wires n - 1 .. 0 (see GateBack); gs[w * 8 ..] its gradient.
template <int K>
void LayerBackK(const Problem& p, Scratch& s, int l, F* gs) {
  for (int w = p.n - 1; w >= 0; --w)
    GateBack<K>(s.sr.data(), s.si.data(), s.lr.data(), s.li.data(), p.size,
                int64_t{1} << (p.n - 1 - w), &s.u[(l * p.n + w) * 4], gs + w * 8);
}

void LayerBack(const Problem& p, Scratch& s, int l, F* gs) {
  if (p.kind == kReal) return LayerBackK<kReal>(p, s, l, gs);
  if (p.kind == kRx) return LayerBackK<kRx>(p, s, l, gs);
  LayerBackK<kGeneral>(p, s, l, gs);
}

// out[w] = sum_j s_w(j) v[j] for every wire, s_w(j) = +1 where wire w's bit of j is 0, else
// -1: halve v n times, the first half minus the second being the next wire's (v overwritten).
void Fold(F* __restrict v, int n, int64_t size, F* out) {
  int64_t len = size;
  for (int w = 0; w < n; ++w) {
    const int64_t half = len / 2;
    F acc0 = {}, acc1 = {};  // two chains: the adds' latency, not their count, bounds a chain
    int64_t j = 0;
    for (; j + 1 < half; j += 2) {
      acc0 += v[j] - v[j + half];
      acc1 += v[j + 1] - v[j + 1 + half];
      v[j] += v[j + half];
      v[j + 1] += v[j + 1 + half];
    }
    if (j < half) {
      acc0 += v[j] - v[j + half];
      v[j] += v[j + half];
    }
    out[w] = acc0 + acc1;
    len = half;
  }
}

// out[w] = sum_j s_w(j) Im(conj(lam_j) y_j) (2 dL/dt_w at a diagonal's output y), the first
// halving done as Im(...) is formed; buf (2^(n-1)) is scratch.
void FoldIm(const F* __restrict lr, const F* __restrict li, const F* __restrict yr,
            const F* __restrict yi, F* __restrict buf, int n, int64_t size, F* out) {
  const int64_t half = size / 2;
  F acc = {};
  for (int64_t j = 0; j < half; ++j) {
    const int64_t k = j + half;
    const F a = lr[j] * yi[j] - li[j] * yr[j], b = lr[k] * yi[k] - li[k] * yr[k];
    acc += a - b;
    buf[j] = a + b;
  }
  out[0] = acc;
  Fold(buf, n - 1, half, out + 1);
}

// dst[j] = D[j] src[G(j)]: a network, then a layer's diagonal (Hadamard basis).
QTL_INLINE void GatherPhase(const F* __restrict sr, const F* __restrict si, F* __restrict dr,
                            F* __restrict di, const int32_t* map, const float* pr,
                            const float* pi, int64_t size) {
  for (int64_t j = 0; j < size; ++j) {
    const F ar = sr[map[j]], ai = si[map[j]];
    const float c = pr[j], sn = pi[j];
    dr[j] = ar * c - ai * sn;
    di[j] = ar * sn + ai * c;
  }
}

// The same undone: dst[k] = conj(D[i]) src[i], i = G^-1(k).
QTL_INLINE void UnphaseGather(const F* __restrict sr, const F* __restrict si, F* __restrict dr,
                              F* __restrict di, const int32_t* inv, const float* pr,
                              const float* pi, int64_t size) {
  for (int64_t k = 0; k < size; ++k) {
    const int32_t i = inv[k];
    const F ar = sr[i], ai = si[i];
    const float c = pr[i], sn = pi[i];
    dr[k] = ar * c + ai * sn;
    di[k] = ai * c - ar * sn;
  }
}

// The read-out's passes over pairs of wires (w, w + 1), wire w's stride da, w + 1's da / 2:
// pass(w, lo, hi) covers the amplitudes [lo, hi). Pairs whose quads span more than kTile
// amplitudes go over the whole state; the rest, tile by tile, all of them while a tile is in
// cache (at d = 16 a state is 4 MiB per part; at d <= 11 everything is one tile).
constexpr int64_t kTile = 2048;

template <class Pass>
QTL_INLINE void OverWirePairs(int n, int64_t size, const Pass& pass) {
  int w = 0;
  for (; w + 1 < n && (int64_t{2} << (n - 1 - w)) > kTile; w += 2) pass(w, 0, size);
  for (int64_t lo = 0; lo < size; lo += kTile)
    for (int v = w; v < n; v += 2) pass(v, lo, std::min(size, lo + kTile));
}

// <X_w> of a state for every wire, two wires a pass: 2 Re sum conj(a) b over w's pairs (a, b).
void XExpect(const F* __restrict r, const F* __restrict i, int n, int64_t size, F* out) {
  for (int w = 0; w < n; ++w) out[w] = F{};
  OverWirePairs(n, size, [&](int w, int64_t lo, int64_t hi) {
    if (w + 1 == n) {  // odd n: the last wire (stride 1) alone
      F acc = {};
      for (int64_t j = lo; j < hi; j += 2) acc += r[j] * r[j + 1] + i[j] * i[j + 1];
      out[w] += 2.0f * acc;
      return;
    }
    const int64_t da = int64_t{1} << (n - 1 - w), db = da / 2;
    F xa0 = {}, xa1 = {}, xb0 = {}, xb1 = {};
    for (int64_t a0 = lo; a0 < hi; a0 += 2 * da)
      for (int64_t b0 = a0; b0 < a0 + da; b0 += 2 * db)
        for (int64_t j = b0; j < b0 + db; ++j) {
          const int64_t j1 = j + db, j2 = j + da, j3 = j + da + db;
          xa0 += r[j] * r[j2] + i[j] * i[j2];
          xa1 += r[j1] * r[j3] + i[j1] * i[j3];
          xb0 += r[j] * r[j1] + i[j] * i[j1];
          xb1 += r[j2] * r[j3] + i[j2] * i[j3];
        }
    out[w] += 2.0f * (xa0 + xa1);
    out[w + 1] += 2.0f * (xb0 + xb1);
  });
}

// The cotangent of sum_w g_w <X_w> of the state after a network, in the basis before it:
// lam[j] = 2 sum_w g_w y[j ^ flip[w]], y the state before the network and flip[w] = G(wire w's
// bit) (G, its gather map, is linear over GF(2), so X_w after it flips the bits flip[w]
// before it). So neither the state nor the cotangent is gathered through the last network.
// Each amplitude is summed from its n partners at once: one store per amplitude. (Wire
// pairs a pass, read-modify-writing lam n / 2 times between two gathers, took longer per
// backward at every d measured, AMD EPYC Zen 3: docs/simulator.md.)
void XCotangent(const F* __restrict r, const F* __restrict i, const F* gw, const int32_t* map,
                int n, int64_t size, F* __restrict lr, F* __restrict li) {
  F g2[kMaxQubits];
  int64_t flip[kMaxQubits];
  for (int w = 0; w < n; ++w) {
    g2[w] = 2.0f * gw[w];
    flip[w] = map[int64_t{1} << (n - 1 - w)];
  }
  for (int64_t j = 0; j < size; ++j) {
    F ar = g2[0] * r[j ^ flip[0]], ai = g2[0] * i[j ^ flip[0]];
    for (int w = 1; w < n; ++w) {
      ar += g2[w] * r[j ^ flip[w]];
      ai += g2[w] * i[j ^ flip[w]];
    }
    lr[j] = ar;
    li[j] = ai;
  }
}

// The forward in the Hadamard basis: s.sr / s.si end as the last layer's output (before the
// last network). ys: also every layer's output there, (m, 2, 2^n), and the encoding's
// product state after them (the backward reads them instead of undoing the state).
void ForwardHadamard(const Problem& p, Scratch& s, F* ys) {
  const int64_t size = p.size;
  F* pr = ys ? ys + 2 * p.m * size : s.tr.data();
  F* pi = ys ? pr + size : s.ti.data();
  Product(s, 0, p.n, pr, pi);
  for (int l = 0; l < p.m; ++l) {
    F* r = ys ? ys + 2 * l * size : s.sr.data();
    F* i = ys ? r + size : s.si.data();
    GatherPhase(pr, pi, r, i, p.hg[l].data(), &p.dr[l * size], &p.di[l * size], size);
    if (!ys && l + 1 < p.m) {
      std::swap(s.sr, s.tr);
      std::swap(s.si, s.ti);
      r = s.tr.data();
      i = s.ti.data();
    }
    pr = r;
    pi = i;
  }
}

void ForwardGroupHadamard(const Problem& p, int64_t b0, int rows, float* z, Scratch& s) {
  ForwardHadamard(p, s, nullptr);
  Gather(s.sr.data(), s.si.data(), s.tr.data(), s.ti.data(), p.hg[p.m].data(), p.size);
  F x[kMaxQubits];
  XExpect(s.tr.data(), s.ti.data(), p.n, p.size, x);
  for (int w = 0; w < p.n; ++w)
    for (int k = 0; k < rows; ++k) z[(b0 + k) * p.n + w] = x[w][k];
}

// The adjoint method in the Hadamard basis: the forward recomputed keeping each layer's
// output, then per layer the gradient (a fold) and the cotangent undone (a multiply by
// conj(D) and the network's inverse).
void BackwardGroupHadamard(const Problem& p, const float* gz, int64_t b0, int rows,
                           float* dvec, float* gram, Scratch& s) {
  const int n = p.n;
  const int64_t size = p.size;
  s.ys.resize(size_t(2) * (p.m + 1) * size);
  F* ys = s.ys.data();
  ForwardHadamard(p, s, ys);
  const F* last = ys + 2 * (p.m - 1) * size;
  F gw[kMaxQubits], out[kMaxQubits];
  for (int w = 0; w < n; ++w) {
    gw[w] = F{};
    for (int k = 0; k < rows; ++k) gw[w][k] = gz[(b0 + k) * n + w];
  }
  XCotangent(last, last + size, gw, p.hg[p.m].data(), n, size, s.lr.data(), s.li.data());
  for (int l = p.m - 1; l >= 0; --l) {
    const F* y = ys + 2 * l * size;
    FoldIm(s.lr.data(), s.li.data(), y, y + size, s.tr.data(), n, size, out);
    for (int w = 0; w < n; ++w) {
      double sum = 0;
      for (int k = 0; k < kW; ++k) sum += out[w][k];
      gram[l * n + w] += static_cast<float>(0.5 * sum);
    }
    UnphaseGather(s.lr.data(), s.li.data(), s.tr.data(), s.ti.data(), p.hginv[l].data(),
                  &p.dr[l * size], &p.di[l * size], size);
    std::swap(s.lr, s.tr);
    std::swap(s.li, s.ti);
  }
  // the encoding's product state is a diagonal in its angles too
  const F* product = ys + 2 * p.m * size;
  FoldIm(s.lr.data(), s.li.data(), product, product + size, s.tr.data(), n, size, out);
  for (int w = 0; w < n; ++w)
    for (int k = 0; k < rows; ++k) dvec[(b0 + k) * n + w] = 0.5f * out[w][k];
}

void ForwardGroup(const Problem& p, const float* vec, int64_t b0, int rows, float* z) {
  Scratch& s = ThreadScratch();
  s.Fit(p.size, p.n);
  LoadVectors(p, vec, b0, rows, s);
  if (p.hadamard) return ForwardGroupHadamard(p, b0, rows, z, s);
  GroupGates(p, b0, rows, s);
  ForwardState(p, s);
  // probabilities in the measured order, then <Z_w> = their fold
  F* prob = s.tr.data();
  const int32_t* last = p.g[p.m].data();
  for (int64_t j = 0; j < p.size; ++j) {
    const F r = s.sr[last[j]], i = s.si[last[j]];
    prob[j] = r * r + i * i;
  }
  F out[kMaxQubits];
  Fold(prob, p.n, p.size, out);
  for (int w = 0; w < p.n; ++w)
    for (int k = 0; k < rows; ++k) z[(b0 + k) * p.n + w] = out[w][k];
}

void BackwardGroup(const Problem& p, const float* vec, const float* gz, int64_t b0, int rows,
                   float* dvec, float* gram) {
  Scratch& s = ThreadScratch();
  const int n = p.n;
  const int64_t size = p.size;
  s.Fit(size, n);
  LoadVectors(p, vec, b0, rows, s);
  if (p.hadamard) return BackwardGroupHadamard(p, gz, b0, rows, dvec, gram, s);
  GroupGates(p, b0, rows, s);
  const F *yr, *yi;  // the last layer's output (ForwardState may swap s.sr's buffer)
  if (p.angles) {
    s.ys.resize(size_t(2) * p.m * size);
    ForwardRx(p, s, s.ys.data());
    yr = s.ys.data() + 2 * (p.m - 1) * size;
    yi = yr + size;
  } else {
    ForwardState(p, s);
    yr = s.sr.data();
    yi = s.si.data();
  }
  // the cotangent of y_{m-1}: lam[k] = 2 y[k] O(Ginv(k)), O(j) = sum_w g_w (-1)^(bit w of j)
  F* obs = s.tr.data();
  obs[0] = F{};
  for (int w = 0; w < n; ++w) {
    F gw = {};
    for (int k = 0; k < rows; ++k) gw[k] = gz[(b0 + k) * n + w];
    const int64_t len = int64_t{1} << w;
    for (int64_t j = len - 1; j >= 0; --j) {
      const F o = obs[j];
      obs[2 * j + 1] = o - gw;
      obs[2 * j] = o + gw;
    }
  }
  const int32_t* back = p.ginv[p.m].data();
  for (int64_t k = 0; k < size; ++k) {
    const F o = 2.0f * obs[back[k]];
    s.lr[k] = o * yr[k];
    s.li[k] = o * yi[k];
  }
  for (int l = p.m - 1; l >= 0; --l) {
    if (p.angles) {  // gradients at the layer's output, then the cotangent undone (RxLayer)
      const F* y = s.ys.data() + 2 * l * size;
      s.gs.resize(size_t(n) * 8);
      RxGrads(y, y + size, s.lr.data(), s.li.data(), p, s.gs.data());
      for (int w = 0; w < n; ++w) {
        double sum = 0;
        for (int k = 0; k < kW; ++k) sum += s.gs[w][k];
        gram[l * n + w] += static_cast<float>(sum);
      }
      RxLayer(s.lr.data(), s.li.data(), p, s, l, -1.0f);
      Gather(s.lr.data(), s.li.data(), s.tr.data(), s.ti.data(), p.ginv[l].data(), size);
      std::swap(s.lr, s.tr);
      std::swap(s.li, s.ti);
      continue;
    }
    std::vector<F>& gs = s.gs;
    gs.assign(size_t(n) * 8, F{});
    LayerBack(p, s, l, gs.data());
    for (int w = n - 1; w >= 0; --w) {
      const F* g = gs.data() + w * 8;
      if (p.row_mats) {  // each row's own gradient: gram (B, m, n, 2, 2, 2)
        for (int k = 0; k < rows; ++k)
          for (int q = 0; q < 8; ++q)
            gram[(((b0 + k) * p.m + l) * n + w) * 8 + q] = g[q][k];
        continue;
      }
      float* out = gram + (l * n + w) * 8;
      for (int q = 0; q < 8; ++q) {
        double sum = 0;
        for (int k = 0; k < kW; ++k) sum += g[q][k];
        out[q] += static_cast<float>(sum);
      }
    }
    // x_l = P_l y_{l-1}: y_{l-1}[k] = x_l[Ginv_l(k)] (the state only while it is needed)
    const int32_t* inv = p.ginv[l].data();
    if (l > 0) {
      Gather(s.sr.data(), s.si.data(), s.tr.data(), s.ti.data(), inv, size);
      std::swap(s.sr, s.tr);
      std::swap(s.si, s.ti);
    }
    Gather(s.lr.data(), s.li.data(), s.tr.data(), s.ti.data(), inv, size);
    std::swap(s.lr, s.tr);
    std::swap(s.li, s.ti);
  }
  // s.lr / s.li: the cotangent of the product state A (x) C (A: wires 0 .. h - 1, C: the rest)
  const int h = n / 2, low = n - h;
  const int64_t na = int64_t{1} << h, nc = int64_t{1} << low;
  std::vector<F> ar(na), ai(na), cr(nc), ci(nc), dar(na, F{}), dai(na, F{}), dcr(nc, F{}),
      dci(nc, F{});
  Product(s, 0, h, ar.data(), ai.data());
  Product(s, h, n, cr.data(), ci.data());
  for (int64_t a = 0; a < na; ++a)
    for (int64_t c = 0; c < nc; ++c) {
      const F lr = s.lr[a * nc + c], li = s.li[a * nc + c];
      // lam conj(C) into dA, lam conj(A) into dC
      dar[a] += lr * cr[c] + li * ci[c];
      dai[a] += li * cr[c] - lr * ci[c];
      dcr[c] += lr * ar[a] + li * ai[a];
      dci[c] += li * ar[a] - lr * ai[a];
    }
  // each wire of a half: its cotangent against the other wires of that half
  auto wires = [&](int lo, int bits, const std::vector<F>& dr, const std::vector<F>& di) {
    const int64_t len = int64_t{1} << bits;
    for (int w = 0; w < bits; ++w) {
      F outr[2] = {}, outi[2] = {};
      for (int64_t a = 0; a < len; ++a) {
        F pr = F{} + 1.0f, pi = F{};
        for (int u = 0; u < bits; ++u) {
          if (u == w) continue;
          const int bit = (a >> (bits - 1 - u)) & 1;
          const F vr = s.vr[2 * (lo + u) + bit], vi = s.vi[2 * (lo + u) + bit];
          const F r = pr * vr - pi * vi;
          pi = pr * vi + pi * vr;
          pr = r;
        }
        const int bit = (a >> (bits - 1 - w)) & 1;
        outr[bit] += dr[a] * pr + di[a] * pi;  // d conj(prod)
        outi[bit] += di[a] * pr - dr[a] * pi;
      }
      if (p.encode) {  // dL/da = -(s d/dre v0 + c d/dim v1) / 2, v = (c, -i s)
        const F c = s.vr[2 * (lo + w)], sn = -s.vi[2 * (lo + w) + 1];
        const F da = -0.5f * (sn * outr[0] + c * outi[1]);
        for (int k = 0; k < rows; ++k) dvec[(b0 + k) * n + lo + w] = da[k];
        continue;
      }
      for (int k = 0; k < rows; ++k)
        for (int b = 0; b < 2; ++b) {
          float* o = dvec + ((b0 + k) * n + lo + w) * 4 + b * 2;
          o[0] = outr[b][k];
          o[1] = outi[b][k];
        }
    }
  };
  wires(0, h, dar, dai);
  wires(h, low, dcr, dci);
}

// Groups of kW rows in `chunks` contiguous chunks; each group is one thread's from start to
// end, so results do not depend on the schedule.
void OverGroups(ffi::ThreadPool* pool, int64_t batch, int64_t chunks,
                const std::function<void(int64_t, int64_t, int)>& f) {
  const int64_t groups = (batch + kW - 1) / kW;
  chunks = std::max<int64_t>(1, std::min(chunks, groups));
  auto run = [&](int64_t t) {
    for (int64_t q = groups * t / chunks; q < groups * (t + 1) / chunks; ++q)
      f(t, q * kW, static_cast<int>(std::min<int64_t>(kW, batch - q * kW)));
  };
  if (!pool) {
    for (int64_t t = 0; t < chunks; ++t) run(t);
    return;
  }
  const int64_t threads = std::max<int64_t>(1, pool->num_threads());
  qtl::ParallelFor(*pool, chunks, threads - 1, run);
}

bool ShapesOk(int n, int m) { return m >= 1 && n >= 2 && n <= kMaxQubits; }

void ForwardAll(ffi::ThreadPool* pool, const Problem& p, int64_t batch, const float* vec,
                float* z) {
  const int64_t threads = pool ? std::max<int64_t>(1, pool->num_threads()) : 1;
  OverGroups(pool, batch, 4 * threads, [&](int64_t, int64_t b0, int rows) {
    ForwardGroup(p, vec, b0, rows, z);
  });
}

// gram: (slots, m, n, 2, 2, 2), one slice per chunk of the batch (the caller sums them): no
// two threads write the same floats, and the sums' order does not depend on the thread count.
// With each row's own gates (p.row_mats), gram is (B, m, n, 2, 2, 2), each row's gradient.
void BackwardAll(ffi::ThreadPool* pool, const Problem& p, int64_t batch, const float* vec,
                 const float* g, float* dvec, float* gram, int64_t slots) {
  const int64_t per = int64_t{p.m} * p.n * (p.angles ? 1 : 8);
  if (p.row_mats) {
    const int64_t threads = pool ? std::max<int64_t>(1, pool->num_threads()) : 1;
    OverGroups(pool, batch, 4 * threads, [&](int64_t, int64_t b0, int rows) {
      BackwardGroup(p, vec, g, b0, rows, dvec, gram);
    });
    return;
  }
  std::fill(gram, gram + slots * per, 0.0f);
  OverGroups(pool, batch, slots, [&](int64_t chunk, int64_t b0, int rows) {
    BackwardGroup(p, vec, g, b0, rows, dvec, gram + chunk * per);
  });
}

// mats: (m, n, 2, 2, 2) shared by every row, or (B, m, n, 2, 2, 2) each row's own (per_row).
ffi::Error Check(ffi::Buffer<ffi::F32>& vec, ffi::Buffer<ffi::F32>& mats,
                 ffi::Buffer<ffi::S32>& nets, int64_t& batch, int& n, int& m, bool& per_row,
                 bool& encode) {
  const auto vd = vec.dimensions(), md = mats.dimensions(), nd = nets.dimensions();
  per_row = md.size() == 6;
  encode = vd.size() == 2;  // (B, n): every wire's RX encoding angle
  if ((vd.size() != 4 && !encode) || (md.size() != 5 && !per_row) || nd.size() != 2 ||
      (per_row && md[0] != vd[0]))
    return ffi::Error::InvalidArgument(
        "complex circuit: expected vec (B, n, 2, 2) or (B, n) RX angles, mats (m, n, 2, 2, 2) "
        "or (B, m, n, 2, 2, 2), nets (m + 1, n)");
  const size_t o = per_row ? 1 : 0;  // mats' first layer axis
  batch = vd[0];
  m = static_cast<int>(md[o]);
  n = static_cast<int>(md[o + 1]);
  if (vd[1] != n || (!encode && (vd[2] != 2 || vd[3] != 2)) || md[o + 2] != 2 ||
      md[o + 3] != 2 || md[o + 4] != 2 || nd[0] != m + 1 || nd[1] != n || !ShapesOk(n, m))
    return ffi::Error::InvalidArgument(
        "complex circuit: shapes must be vec (B, n, 2, 2) or (B, n), mats (m, n, 2, 2, 2), "
        "nets (m + 1, n), with m >= 1 and 2 <= n <= 20");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vec, ffi::Buffer<ffi::F32> mats,
                   ffi::Buffer<ffi::S32> nets, ffi::ResultBuffer<ffi::F32> z) {
  int64_t batch = 0;
  int n = 0, m = 0;
  bool per_row = false, encode = false;
  if (auto err = Check(vec, mats, nets, batch, n, m, per_row, encode); err.failure())
    return err;
  if (z->element_count() != static_cast<size_t>(batch * n))
    return ffi::Error::InvalidArgument("complex circuit: z must be (B, n)");
  Problem p;
  Build(n, m, per_row ? nullptr : mats.typed_data(), nets.typed_data(), nullptr, p);
  if (per_row) p.row_mats = mats.typed_data();
  p.encode = encode;
  if (encode && p.rx) UseHadamard(p);
  ForwardAll(&pool, p, batch, vec.typed_data(), z->typed_data());
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vec, ffi::Buffer<ffi::F32> mats,
                    ffi::Buffer<ffi::S32> nets, ffi::Buffer<ffi::S32> inv,
                    ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dvec,
                    ffi::ResultBuffer<ffi::F32> gram) {
  int64_t batch = 0;
  int n = 0, m = 0;
  bool per_row = false, encode = false;
  if (auto err = Check(vec, mats, nets, batch, n, m, per_row, encode); err.failure())
    return err;
  const auto gd = gram->dimensions();
  // gram (S, m, n): the angles mode (every gate RX(t), dL/dt per gate; shared mats only)
  const bool angles = gd.size() == 3 && !per_row;
  if (inv.dimensions().size() != 2 || inv.dimensions()[0] != m + 1 ||
      inv.dimensions()[1] != n || g.element_count() != static_cast<size_t>(batch * n) ||
      dvec->element_count() != vec.element_count() || (gd.size() != 6 && !angles) ||
      gd[1] != m || gd[2] != n || gd[0] < 1 || (per_row && gd[0] != batch))
    return ffi::Error::InvalidArgument(
        "complex circuit: inv like nets, g (B, n) -> dvec like vec, gram (S, m, n, 2, 2, 2) "
        "(S = B with each row's own mats) or (S, m, n) for RX angles");
  Problem p;
  Build(n, m, per_row ? nullptr : mats.typed_data(), nets.typed_data(), inv.typed_data(), p);
  if (per_row) p.row_mats = mats.typed_data();
  p.encode = encode;
  if (angles) {
    if (!p.rx)
      return ffi::Error::InvalidArgument(
          "complex circuit: gram (S, m, n) asks for RX angles' gradients, but the layers' "
          "matrices are not all RX gates");
    p.angles = true;
    if (encode) UseHadamard(p);
  }
  BackwardAll(&pool, p, batch, vec.typed_data(), g.typed_data(), dvec->typed_data(),
              gram->typed_data(), gd[0]);
  return ffi::Error::Success();
}

// The plain entries' bodies: 0 on success, 1 for bad shapes, 2 if RX gates are required
// (encode: the RX encoding's angles as vec; angles: dL/dt per gate) and the gates are not.
int PlainForward(int n, int m, int64_t batch, const float* vec, const float* mats,
                 const int32_t* nets, float* z, bool encode, bool hadamard) {
  if (!ShapesOk(n, m)) return 1;
  Problem p;
  Build(n, m, mats, nets, nullptr, p);
  if (encode && !p.rx) return 2;
  p.encode = encode;
  if (hadamard) UseHadamard(p);
  ForwardAll(nullptr, p, batch, vec, z);
  return 0;
}

int PlainBackward(int n, int m, int64_t batch, const float* vec, const float* mats,
                  const int32_t* nets, const int32_t* inv, const float* g, float* dvec,
                  float* gram, bool angles, bool encode, bool hadamard) {
  if (!ShapesOk(n, m)) return 1;
  Problem p;
  Build(n, m, mats, nets, inv, p);
  if ((angles || encode) && !p.rx) return 2;
  p.angles = angles;
  p.encode = encode;
  if (hadamard) UseHadamard(p);
  BackwardAll(nullptr, p, batch, vec, g, dvec, gram, 1);
  return 0;
}

}  // namespace

// The same kernels without XLA, on the calling thread (for the tests that compare builds for
// different instruction sets on exactly the same inputs). gram: (m, n, 2, 2, 2). 0 on success.
extern "C" int qtl_complex_forward_plain(int n, int m, int64_t batch, const float* vec,
                                         const float* mats, const int32_t* nets, float* z) {
  return PlainForward(n, m, batch, vec, mats, nets, z, false, false);
}

// angles != 0: every gate is RX(t) and gram is (m, n), dL/dt (2 if the gates are not RX).
extern "C" int qtl_complex_backward_plain(int n, int m, int64_t batch, const float* vec,
                                          const float* mats, const int32_t* nets,
                                          const int32_t* inv, const float* g, float* dvec,
                                          float* gram, int angles) {
  return PlainBackward(n, m, batch, vec, mats, nets, inv, g, dvec, gram, angles != 0, false,
                       false);
}

// The QViT's circuits as XLA runs them: vec (B, n) the RX encoding's angles, every layer's
// gates RX (mats), gram (m, n) dL/dt, dvec (B, n) dL/da; hadamard != 0 in the Hadamard basis
// (what XLA gets), 0 gate by gate in the computational basis: the two formulations, for the
// tests to compare on the same inputs. 0 on success, 2 if the gates are not all RX.
extern "C" int qtl_complex_rx_forward_plain(int n, int m, int64_t batch, const float* angles,
                                            const float* mats, const int32_t* nets, float* z,
                                            int hadamard) {
  return PlainForward(n, m, batch, angles, mats, nets, z, true, hadamard != 0);
}

extern "C" int qtl_complex_rx_backward_plain(int n, int m, int64_t batch, const float* angles,
                                             const float* mats, const int32_t* nets,
                                             const int32_t* inv, const float* g, float* dvec,
                                             float* gram, int hadamard) {
  return PlainBackward(n, m, batch, angles, mats, nets, inv, g, dvec, gram, true, true,
                       hadamard != 0);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(QtlComplexForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QtlComplexBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

