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


def _driver_results(run: list[str], case: tuple) -> tuple[list[np.ndarray], str]:
    """The statevector kernel's outputs for ``case`` from a driver executable (driver.cc),
    and the vector ISA it reports."""
    n, m, b, vec, mats, nets, inv, g = case
    blob = np.array([n, m, b], np.int32).tobytes() + b"".join(
        a.tobytes() for a in (vec, mats, nets, inv, g)
    )
    done = subprocess.run(run, input=blob, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-500:]
    out = np.frombuffer(done.stdout, np.float32)
    sizes = [b * n, b * n * 2, b * m * n * 4]
    assert out.size == sum(sizes)
    return np.split(out, np.cumsum(sizes)[:-1]), done.stderr.decode().strip()


def _compare_driver(run: list[str], native: ctypes.CDLL) -> set[str]:
    """Every case through the driver against the native library; the ISAs reported."""
    reported = set()
    for n, entangler, batch in CASES:
        case = _case(n, entangler, batch)
        got, isa = _driver_results(run, case)
        want = _run(native, case)
        _close([a.reshape(w.shape) for a, w in zip(got, want, strict=True)], want)
        reported.add(isa)
    return reported


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which(ARM_CXX) and shutil.which(QEMU)),
    reason="no ARM64 cross-compiler and emulator (Debian: g++-aarch64-linux-gnu, qemu-user)",
)
def test_the_arm64_build_gives_the_x86_results(native, tmp_path):
    import jax

    exe = tmp_path / "statevector-arm64"
    cmd = [ARM_CXX, "-O3", "-std=c++17", "-w", "-static", "-pthread", "-DQTL_ISA_BUILD"]
    cmd += [*kernels.isa_flags("baseline", "aarch64"), f"-I{jax.ffi.include_dir()}", *DRIVER]
    subprocess.run([*cmd, "-o", str(exe)], check=True, capture_output=True)
    assert _compare_driver([QEMU, str(exe)], native) == {"neon"}


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
