"""The native kernels on every instruction set: builds forced down with QTL_ISA (so any CPU
runs every path), an ARM64 build under an emulator, and the kernel the benchmarks report
being the one selected here. Each build is compared with this machine's native build on the
same inputs through the kernels' plain (XLA-free) entries; the native build is pinned to the
float64 reference by tests/test_statevector_kernel.py."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qtl.bench.kernel_ab import plain_case, run_plain
from qtl.quantum import kernels

pytestmark = pytest.mark.skipif(
    kernels.statevector_targets() is None, reason="no C++ compiler: the XLA path is tested"
)

CASES = [(4, "ring", 3), (11, "even_odd", 2), (14, "ring", 2), (20, "chain", 1)]


def _case(n: int, entangler: str, batch: int):
    return plain_case(n, batch, entangler=entangler, seed=n)


_run = run_plain


def _close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    # float32 sums in another order (another vector width, FMA or not): rounding only
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def _levels() -> list[str]:
    cpu = kernels.cpu_info()
    levels = ["baseline"]
    if cpu["machine"] in ("x86_64", "AMD64"):
        levels += [lvl for lvl, flag in (("avx2", "avx2"), ("avx512", "avx512f")) if cpu[flag]]
    return levels


@pytest.fixture(scope="module")
def native() -> ctypes.CDLL:
    return kernels._library()


@pytest.mark.parametrize("level", _levels())
def test_every_isa_this_cpu_runs_gives_the_native_results(level, native, monkeypatch, tmp_path):
    monkeypatch.setenv("QTL_ISA", level)
    lib = kernels.load(tmp_path)
    lib.qtl_kernel_isa.restype = ctypes.c_char_p
    vector = lib.qtl_kernel_isa().decode()
    expected = {"baseline": ("sse2", "neon"), "avx2": ("avx2+fma",), "avx512": ("avx512f",)}
    assert vector in expected[level]
    meta = next(tmp_path.glob("*.json")).read_text()
    assert f'"isa": "{level}"' in meta  # recorded beside the library
    for n, entangler, batch in CASES:
        case = _case(n, entangler, batch)
        _close(_run(lib, case), _run(native, case))


def test_a_forced_isa_the_cpu_lacks_is_refused_not_run(monkeypatch, tmp_path):
    cpu = kernels.cpu_info()
    missing = next(
        (lvl for lvl, f in (("avx512", "avx512f"), ("avx2", "avx2")) if not cpu[f]), None
    )
    if missing is None:
        pytest.skip("this CPU has every x86 level")
    monkeypatch.setenv("QTL_ISA", missing)
    with pytest.raises(kernels.KernelUnavailable, match=f"QTL_ISA={missing}: this CPU"):
        kernels.load(tmp_path)
    monkeypatch.setenv("QTL_ISA", "sse9")
    with pytest.raises(kernels.KernelUnavailable, match="not one of native, avx512"):
        kernels.load(tmp_path)


def test_the_native_build_uses_the_widest_vectors_the_cpu_has(native):
    cpu = kernels.cpu_info()
    native.qtl_kernel_isa.restype = ctypes.c_char_p
    vector = native.qtl_kernel_isa().decode()
    if os.environ.get("QTL_ISA", "native") != "native":
        pytest.skip("QTL_ISA forces another level")
    if cpu["avx512f"]:
        assert vector == "avx512f"
    elif cpu["avx2"] and cpu["fma"]:
        assert vector == "avx2+fma"
    elif cpu["neon"]:
        assert vector == "neon"
    sel = kernels.selected()
    assert sel["kernel"] == "native" and sel["vector"] == vector and sel["isa"] == "native"


@pytest.mark.slow
def test_the_bench_reports_the_kernel_selected_here():
    from qtl.bench.circuit_worker import run_case

    case = {
        "simulator": "fast",
        "n_qubits": 6,
        "batch": 4,
        "features": 8,
        "depth": 3,
        "entangler": "ring",
        "rotation": "ry",
        "steps": 3,
        "warmup": 0,
        "max_seconds": 5,
        "max_state_mb": None,
        "native_kernel": True,
    }
    result = run_case(case)
    assert result["native_kernel_used"] == "statevector"
    assert result["kernel"] == {**kernels.selected(), "used": "statevector"}


@pytest.mark.slow
def test_the_float64_grid_passes_with_the_isa_forced_down(tmp_path):
    """The FFI path of the baseline build (SSE2 / NEON), through the same grid and tolerances
    as the native one: two of tests/test_statevector_kernel.py's cases and the QViT's circuit
    from tests/test_complex_kernel.py, in a fresh process."""
    import sys

    env = {**os.environ, "QTL_ISA": "baseline", "QTL_KERNEL_CACHE": str(tmp_path)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    grid = Path(__file__).with_name("test_statevector_kernel.py")
    complex_grid = grid.with_name("test_complex_kernel.py")  # the QViT's circuit, d = 8
    cmd += [str(grid), str(complex_grid), "-k", "matches_float64 and (4-2 or 12-3 or 8-2-qvit)"]
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=grid.parent.parent
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert "3 passed" in done.stdout
    [manifest] = tmp_path.glob("*.json")
    assert '"isa": "baseline"' in manifest.read_text()


ARM_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
DRIVER = [str(kernels.HERE / "statevector.cc"), str(kernels.HERE / "driver.cc")]


def _driver_results(
    run: list[str], case: tuple, sizes: list[int]
) -> tuple[list[np.ndarray], str]:
    """A kernel's outputs (of these sizes) for ``case`` from a driver executable (driver.cc),
    and the vector ISA it reports."""
    n, m, b, vec, mats, nets, inv, g = case
    blob = np.array([n, m, b], np.int32).tobytes() + b"".join(
        a.tobytes() for a in (vec, mats, nets, inv, g)
    )
    done = subprocess.run(run, input=blob, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-500:]
    out = np.frombuffer(done.stdout, np.float32)
    assert out.size == sum(sizes)
    return np.split(out, np.cumsum(sizes)[:-1]), done.stderr.decode().strip()


def _compare_driver(run: list[str], native: ctypes.CDLL) -> set[str]:
    """Every case through the driver against the native library; the ISAs reported."""
    reported = set()
    for n, entangler, batch in CASES:
        case = _case(n, entangler, batch)
        n_, m, b = case[:3]
        got, isa = _driver_results(run, case, [b * n_, b * n_ * 2, b * m * n_ * 4])
        want = _run(native, case)
        _close([a.reshape(w.shape) for a, w in zip(got, want, strict=True)], want)
        reported.add(isa)
    return reported


def _complex_case(n: int, m: int, batch: int, kind: str, seed: int, encode: bool = False):
    """Inputs of the complex kernel's plain entries: random wire states (``encode``: RX
    encoding angles, (batch, n)), a ring's networks and layers of RX matrices (real diagonal,
    imaginary off-diagonal), RY matrices (real) or general complex 2x2s: each of the kernel's
    gate kinds."""
    from qtl.quantum.circuit import ring_pairs
    from qtl.quantum.fast import _network_columns, network_indices

    rng = np.random.default_rng(seed)
    vec = rng.normal(size=(batch, n, 2, 2))
    vec /= np.linalg.norm(vec.reshape(batch, n, 4), axis=-1)[..., None, None]
    if encode:
        vec = rng.uniform(-2 * np.pi, 2 * np.pi, size=(batch, n))
    t = rng.uniform(0, 2 * np.pi, size=(m, n))
    c, s = np.cos(t / 2), np.sin(t / 2)
    mats = np.zeros((m, n, 2, 2, 2))
    if kind == "rx":
        mats[..., 0, 0, 0] = mats[..., 1, 1, 0] = c
        mats[..., 0, 1, 1] = mats[..., 1, 0, 1] = -s
    elif kind == "ry":
        mats[..., 0, 0, 0] = mats[..., 1, 1, 0] = c
        mats[..., 0, 1, 0], mats[..., 1, 0, 0] = -s, s
    else:
        mats = rng.normal(size=(m, n, 2, 2, 2))
    maps = [network_indices(n, ring_pairs(n)) for _ in range(m + 1)]
    nets = np.ascontiguousarray([_network_columns(gather) for gather, _ in maps], np.int32)
    inv = np.ascontiguousarray([_network_columns(back) for _, back in maps], np.int32)
    g = rng.normal(size=(batch, n))
    f32 = [np.ascontiguousarray(a, np.float32) for a in (vec, mats, g)]
    return n, m, batch, f32[0], f32[1], nets, inv, f32[2]


def _run_complex(lib: ctypes.CDLL, case: tuple, angles: bool = False) -> list[np.ndarray]:
    """The complex kernel's outputs; ``angles``: the RX layers' gradient against their angles."""
    n, m, batch, vec, mats, nets, inv, g = case
    p = ctypes.c_void_p
    z, dv = np.zeros((batch, n), np.float32), np.zeros_like(vec)
    gram = np.zeros((m, n) if angles else (m, n, 2, 2, 2), np.float32)
    args = [a.ctypes.data_as(p) for a in (vec, mats, nets)]
    assert lib.qtl_complex_forward_plain(n, m, ctypes.c_int64(batch), *args, z.ctypes) == 0
    more = [a.ctypes.data_as(p) for a in (inv, g, dv, gram)]
    status = lib.qtl_complex_backward_plain(n, m, ctypes.c_int64(batch), *args, *more, angles)
    assert status == 0
    return [z, dv, gram]


def _run_complex_rx(lib: ctypes.CDLL, case: tuple, hadamard: bool) -> list[np.ndarray]:
    """The QViT's circuits (RX encoding angles, RX layers) through the kernel's plain entries,
    in the Hadamard basis or gate by gate."""
    n, m, batch, vec, mats, nets, inv, g = case
    p = ctypes.c_void_p
    z, dv, gram = np.zeros((batch, n), np.float32), np.zeros_like(vec), np.zeros((m, n), np.float32)
    args = [a.ctypes.data_as(p) for a in (vec, mats, nets)]
    b = ctypes.c_int64(batch)
    assert lib.qtl_complex_rx_forward_plain(n, m, b, *args, z.ctypes, int(hadamard)) == 0
    more = [a.ctypes.data_as(p) for a in (inv, g, dv, gram)]
    assert lib.qtl_complex_rx_backward_plain(n, m, b, *args, *more, int(hadamard)) == 0
    return [z, dv, gram]


@pytest.mark.parametrize(
    "n, m, batch",
    # 13: the read-out's wide pairs over the whole state, the rest tile by tile (kTile)
    [(8, 3, 21), (8, 1, 8), (5, 2, 11), (2, 1, 3), (11, 2, 9), (13, 1, 3)],
)
def test_the_hadamard_basis_gives_the_gate_by_gate_results(native, n, m, batch):
    """The QViT's RX circuits run as diagonals in the Hadamard basis (what XLA gets): <Z>, the
    encoding angles' and the layers' angles' gradients must be those of applying and undoing
    every RX gate in the computational basis, on the same inputs (odd widths: a wire alone)."""
    case = _complex_case(n, m, batch, "rx", seed=n + m, encode=True)
    got = _run_complex_rx(native, case, hadamard=True)
    want = _run_complex_rx(native, case, hadamard=False)
    for name, a, w in zip(("z", "dL/da", "dL/dt"), got, want, strict=True):
        scale = max(1.0, float(np.max(np.abs(w))))
        np.testing.assert_allclose(a, w, rtol=0, atol=2e-5 * scale, err_msg=name)
    assert np.max(np.abs(want[2])) > 1e-3  # the gradients are not all zero
    general = _complex_case(n, m, batch, "general", seed=1, encode=True)
    out = np.zeros((batch, n), np.float32)
    ptrs = [a.ctypes.data_as(ctypes.c_void_p) for a in general[3:6]]
    forward = native.qtl_complex_rx_forward_plain
    assert forward(n, m, ctypes.c_int64(batch), *ptrs, out.ctypes, 1) == 2  # not RX: refused


def test_the_rx_angles_gradient_is_the_entries_gradient_chained(native):
    """For RX layers the kernel can return dL/dt per gate (4 multiply-adds a pair) instead of
    the 2x2 entries' gradient G (16): both must give the same dL/dt through dU/dt, where
    U = [[c, -is], [-is, c]], c = cos(t/2), s = sin(t/2); everything else equal."""
    case = _complex_case(8, 3, 21, "rx", seed=5)
    z, dv, gram = _run_complex(native, case)
    z2, dv2, dt = _run_complex(native, case, angles=True)
    np.testing.assert_array_equal(z2, z)
    np.testing.assert_allclose(dv2, dv, rtol=0, atol=1e-6)
    mats = case[4]
    c, s = mats[..., 0, 0, 0], -mats[..., 0, 1, 1]
    want = -(s / 2) * (gram[..., 0, 0, 0] + gram[..., 1, 1, 0]) - (c / 2) * (
        gram[..., 0, 1, 1] + gram[..., 1, 0, 1]
    )
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(dt, want, rtol=0, atol=2e-5 * scale)
    # matrices that are not RX gates are refused in that mode, not silently mis-differentiated
    general = _complex_case(6, 2, 9, "general", seed=1)
    n, m, batch, vec, mats, nets, inv, g = general
    out = [np.zeros((batch, n), np.float32), np.zeros_like(vec), np.zeros((m, n), np.float32)]
    ptrs = [a.ctypes.data_as(ctypes.c_void_p) for a in (vec, mats, nets, inv, g, *out[1:])]
    assert native.qtl_complex_backward_plain(n, m, ctypes.c_int64(batch), *ptrs, 1) == 2


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which(ARM_CXX) and shutil.which(QEMU)),
    reason="no ARM64 cross-compiler and emulator (Debian: g++-aarch64-linux-gnu, qemu-user)",
)
def test_the_arm64_build_gives_the_x86_results(native, tmp_path):
    """Both kernels, the real one (statevector.cc) and the QViT's complex one with each of its
    gate kinds, built for ARM64 (NEON) and run under qemu-aarch64."""
    import jax

    exe = tmp_path / "kernels-arm64"
    cmd = [ARM_CXX, "-O3", "-std=c++17", "-w", "-static", "-pthread", "-DQTL_ISA_BUILD"]
    cmd += [*kernels.isa_flags("baseline", "aarch64"), f"-I{jax.ffi.include_dir()}", *DRIVER]
    complex_src = str(kernels.HERE / "complex_circuit.cc")
    subprocess.run([*cmd, complex_src, "-o", str(exe)], check=True, capture_output=True)
    assert _compare_driver([QEMU, str(exe)], native) == {"neon"}
    for n, m, batch, kind in [(8, 2, 17, "rx"), (4, 4, 5, "ry"), (6, 3, 9, "general")]:
        case = _complex_case(n, m, batch, kind, seed=n * 10 + m)
        sizes = [batch * n, batch * n * 4, m * n * 8]
        modes = [("complex", False)] + ([("complex-rx", True)] if kind == "rx" else [])
        for mode, angles in modes:
            sizes[-1] = m * n if angles else m * n * 8
            got, isa = _driver_results([QEMU, str(exe), mode], case, sizes)
            assert isa == "neon"
            want = _run_complex(native, case, angles)
            for a, w in zip(got, want, strict=True):  # float32 sums in another order
                scale = max(1.0, float(np.max(np.abs(w))))
                np.testing.assert_allclose(a.reshape(w.shape), w, rtol=0, atol=2e-5 * scale)
    # the QViT's path: an RX encoding and RX layers in the Hadamard basis (odd n: a lone wire)
    for n, m, batch in [(8, 3, 17), (5, 2, 6)]:
        case = _complex_case(n, m, batch, "rx", seed=n + m, encode=True)
        got, isa = _driver_results(
            [QEMU, str(exe), "complex-encode"], case, [batch * n, batch * n, m * n]
        )
        assert isa == "neon"
        want = _run_complex_rx(native, case, hadamard=True)
        for a, w in zip(got, want, strict=True):
            scale = max(1.0, float(np.max(np.abs(w))))
            np.testing.assert_allclose(a.reshape(w.shape), w, rtol=0, atol=2e-5 * scale)


NATIVE_LANE_BITS = {"avx512f": 4, "avx2+fma": 3}  # others: 128-bit vectors, 2


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_vector_width_gives_the_native_results(bits, native, tmp_path):
    """The kernel's lanes follow the machine's registers (4, 8 or 16 floats); QTL_VEC_BITS
    builds another machine's width for this CPU (AVX-512's 16 floats as pairs of AVX2
    registers), so the lane logic of every width runs here, whatever the CPU."""
    import jax

    native.qtl_kernel_isa.restype = ctypes.c_char_p
    if NATIVE_LANE_BITS.get(native.qtl_kernel_isa().decode(), 2) == bits:
        pytest.skip("the native build's own width (test_every_isa_... covers it)")
    exe = tmp_path / f"statevector-{bits}"
    cmd = [kernels.compiler(), "-O3", "-std=c++17", "-w", "-pthread", "-DQTL_ISA_BUILD"]
    cmd += [f"-DQTL_VEC_BITS={bits}", *kernels.isa_flags("native"), f"-I{jax.ffi.include_dir()}"]
    subprocess.run([*cmd, *DRIVER, "-o", str(exe)], check=True, capture_output=True)
    _compare_driver([str(exe)], native)
