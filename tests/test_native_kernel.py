"""The native wire-Gram kernel (qtl/quantum/kernels): its build, its sums, and the simulator's
gradients with and without it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl.quantum import kernels
from qtl.quantum.circuit import CircuitSpec
from qtl.quantum.dressed import head_loss, init_params
from qtl.quantum.fast import fast_circuit, native_ok

pytestmark = pytest.mark.skipif(
    kernels.wire_gram_target() is None, reason="no C++ compiler: the XLA path is tested instead"
)


def reference(d: np.ndarray, x: np.ndarray, minor: bool) -> np.ndarray:
    """C_j[p, q] = sum over amplitudes whose wire-j bit is p of d[a] x[a with the bit := q]."""
    d3 = d.reshape(d.shape[0], d.shape[1], 1) if minor else d.reshape(1, *d.shape)
    x3 = x.reshape(d3.shape)
    width = d3.shape[1]
    k = width.bit_length() - 1
    out = np.zeros((k, 2, 2))
    for j in range(k):
        bit = k - 1 - j  # wire 0 is the most significant bit of the group index
        for a in range(width):
            p = (a >> bit) & 1
            for q in range(2):
                partner = (a & ~(1 << bit)) | (q << bit)
                out[j, p, q] += np.sum(d3[:, a, :].astype(np.float64) * x3[:, partner, :])
    return out


def wire_gram(d, x, minor: bool):
    k = (d.shape[1] if minor else d.shape[0]).bit_length() - 1
    call = jax.ffi.ffi_call(kernels.TARGET, jax.ShapeDtypeStruct((k, 2, 2), jnp.float32))
    return np.asarray(jax.jit(lambda a, b: call(a, b, minor=minor))(d, x))


@pytest.mark.parametrize(
    "shape, minor",
    [
        ((37, 8), True),  # rows not a multiple of the 16-lane vector
        ((4096, 16), True),
        ((300, 32), True),  # several work items: split over threads
        ((100, 128), True),  # rows of several vectors: partners across vectors
        ((64, 2), True),  # 8 rows packed per vector
        ((4, 23), False),  # ragged inner axis, padded copy
        ((32, 100), False),
        ((16, 4096), False),
        ((2, 40), False),
        ((1024, 16), False),
        ((2**15, 32), True),  # big enough to be split over the thread pool
        ((32, 2**15), False),
    ],
)
def test_wire_gram_matches_a_direct_sum(shape, minor):
    rng = np.random.default_rng(sum(shape))
    d = rng.normal(size=shape).astype(np.float32)
    x = rng.normal(size=shape).astype(np.float32)
    want = reference(d, x, minor)
    got = wire_gram(d, x, minor)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(d.size))


def test_wire_gram_rejects_widths_that_are_not_powers_of_two():
    d = np.ones((4, 12), np.float32)
    with pytest.raises(Exception, match="W must be 2\\^k"):
        wire_gram(d, d, minor=True)


@pytest.mark.parametrize("n, rotation", [(5, "ry"), (8, "ry"), (13, "ry"), (6, "rz_ry")])
def test_native_and_xla_gradients_agree(n, rotation):
    """Native (real circuits) or not (complex ones fall back): the same loss and gradients."""
    spec = CircuitSpec(n, 3, "ring", rotation)
    rng = np.random.default_rng(n)
    params = {k: v.astype(np.float32) for k, v in init_params(rng, spec, 6).items()}
    feats = rng.normal(size=(5, 6)).astype(np.float32)
    labels = (rng.uniform(size=(5, n)) < 0.3).astype(np.float32)
    args = (params, feats, labels)
    on = jax.jit(jax.value_and_grad(head_loss(fast_circuit(spec, native=True))))(*args)
    off = jax.jit(jax.value_and_grad(head_loss(fast_circuit(spec, native=False))))(*args)
    for a, b in zip(jax.tree.leaves(on), jax.tree.leaves(off), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def test_native_gradients_under_vmap():
    """vmap over weight sets (e.g. per-seed ensembles) works and equals the XLA path."""
    spec = CircuitSpec(6, 2)
    x = np.random.default_rng(1).uniform(-1.5, 1.5, size=(4, 6)).astype(np.float32)
    thetas = np.random.default_rng(2).normal(size=(3, 2, 6)).astype(np.float32)

    def grads(native):
        f = fast_circuit(spec, native=native)
        return jax.jit(jax.vmap(jax.grad(lambda t: jnp.sum(f(x, t) ** 2))))(thetas)

    np.testing.assert_allclose(grads(True), grads(False), atol=2e-6)


DONATED_STEPS = """
import jax, jax.numpy as jnp, numpy as np
from qtl.quantum.circuit import CircuitSpec
from qtl.quantum.dressed import head_loss, init_params
from qtl.quantum.fast import fast_circuit, native_ok

assert native_ok()
spec = CircuitSpec(14, 3)
loss = head_loss(fast_circuit(spec))
params = init_params(np.random.default_rng(0), spec, 16)
params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
feats, labels = jnp.zeros((32, 16)), jnp.zeros((32, 14))

def step(p, x, y):
    value, grads = jax.value_and_grad(loss)(p, x, y)
    return jax.tree.map(lambda a, g: a - 1e-3 * g, p, grads), value

step = jax.jit(step, donate_argnums=0)
for i in range(3):
    params, value = step(params, feats, labels)
    print("step", i, float(value), flush=True)
"""


@pytest.mark.slow
def test_donated_train_steps_do_not_hang():
    """The trainer's donated step, called again and again, with the kernel split over XLA's
    pool while other work holds its threads (it deadlocked on the second call when the kernel
    waited for helper tasks that no free thread could run). A subprocess, so a hang fails."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        done = subprocess.run(
            [sys.executable, "-c", DONATED_STEPS],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the donated step hung; it printed: {err.stdout!r}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line.split()[1] for line in done.stdout.splitlines()] == ["0", "1", "2"]


def test_native_kernels_are_in_the_compiled_step():
    """The real-circuit float32 step on CPU runs the whole-circuit kernels; native="gram" only
    the Gram kernel; native=False neither."""
    assert native_ok()
    spec = CircuitSpec(8, 2)
    rng = np.random.default_rng(0)
    params = {k: v.astype(np.float32) for k, v in init_params(rng, spec, 4).items()}
    args = (params, np.ones((3, 4), np.float32), np.zeros((3, 8), np.float32))

    def hlo(native):
        step = jax.value_and_grad(head_loss(fast_circuit(spec, native=native)))
        return jax.jit(step).lower(*args).as_text()

    whole, gram, xla = hlo(True), hlo("gram"), hlo(False)
    assert kernels.FORWARD in whole and kernels.BACKWARD in whole
    assert kernels.TARGET not in whole
    assert kernels.TARGET in gram and kernels.FORWARD not in gram
    assert not any(t in xla for t in (kernels.TARGET, kernels.FORWARD, kernels.BACKWARD))


def test_build_is_cached_atomic_and_recorded(tmp_path):
    first = kernels.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert kernels.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    [manifest] = tmp_path.glob("*.json")
    # no temp file left behind: the library (named by its content) and its manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, manifest.name])
    meta = json.loads(manifest.read_text())
    assert meta["library"] == first.name
    assert meta["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert first.name.startswith(manifest.stem + "-") and meta["sha256"][:16] in first.name
    assert first.stat().st_mode & 0o777 == 0o755 and manifest.stat().st_mode & 0o777 == 0o644


STUB = """
#include <stdio.h>
extern "C" int qtl_stub_id(void) { return STUB_ID; }
extern "C" void QtlWireGram(void) {}
#ifdef MARK  /* what a planted library would do: run code the moment it is loaded */
__attribute__((constructor)) static void planted(void) { fclose(fopen(MARK, "w")); }
#endif
"""


@pytest.fixture
def stub_compiler(tmp_path, monkeypatch):
    """A compiler that builds a tiny stand-in library in a second instead of the kernel: the
    cache's checks are what is tested, on real shared objects."""
    real = kernels.compiler()
    source = tmp_path / "stub.cc"
    source.write_text(STUB)
    fake = tmp_path / "stub-c++"
    fake.write_text(
        "#!/bin/sh\n"
        '[ "$1" = "--version" ] && { echo "stub compiler 1"; exit 0; }\n'
        'while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done\n'
        f'exec {real} -shared -fPIC -DSTUB_ID=1 {source} -o "$out"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))

    def planted(path: Path, marker: Path) -> None:
        """Overwrite ``path`` with a valid library that creates ``marker`` when loaded."""
        cmd = [real, "-shared", "-fPIC", "-DSTUB_ID=2", f'-DMARK="{marker}"', str(source)]
        subprocess.run([*cmd, "-o", str(path)], check=True)

    return planted


def test_a_tampered_cached_library_is_never_loaded(tmp_path, stub_compiler):
    cache = tmp_path / "cache"
    lib = kernels.build(cache)
    good = lib.read_bytes()
    assert kernels.load(cache).qtl_stub_id() == 1

    marker = tmp_path / "planted-code-ran"
    stub_compiler(lib, marker)  # the cached file replaced by another working library
    with pytest.warns(RuntimeWarning, match=f"{lib.name} has sha256 .* not the .* recorded"):
        loaded = kernels.load(cache)
    assert not marker.exists()  # its code never ran
    assert loaded.qtl_stub_id() == 1 and lib.read_bytes() == good  # rebuilt, then loaded

    lib.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit
    with pytest.warns(RuntimeWarning, match="has sha256"):
        assert kernels.build(cache) == lib
    assert lib.read_bytes() == good

    lib.chmod(0o777)  # anyone could have replaced it
    with pytest.warns(RuntimeWarning, match=r"writable by others \(mode 0o777\)"):
        kernels.load(cache)
    assert lib.stat().st_mode & 0o777 == 0o755
    manifest = next(cache.glob("*.json"))
    manifest.write_bytes(b"\x80\x04not json")
    with pytest.warns(RuntimeWarning, match="is unreadable"):
        kernels.load(cache)
    if os.geteuid() == 0:  # a file of another user (root can make one)
        os.chown(lib, 65534, 65534)
        with pytest.warns(RuntimeWarning, match="belongs to user id 65534"):
            kernels.load(cache)
    assert json.loads(manifest.read_text())["sha256"] == hashlib.sha256(good).hexdigest()


def test_a_broken_compiler_is_a_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "c++"
    fake.write_text("#!/bin/sh\necho 'fake compiler: no' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(kernels.KernelUnavailable, match="fake compiler: no"):
        kernels.build(tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*"))


def test_without_a_compiler_the_simulator_warns_and_still_runs(tmp_path):
    """A fresh process with no compiler and an empty cache: a warning, then the XLA path.

    Three layers: at one layer the whole circuit is the product-state prefix, and no rotation
    layer (the only place the kernel runs) is left.
    """
    code = (
        "import warnings, jax, numpy as np\n"
        "from qtl.quantum.circuit import CircuitSpec\n"
        "from qtl.quantum.fast import fast_circuit\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    f = jax.jit(jax.grad(lambda t: fast_circuit(CircuitSpec(4, 3))("
        "np.ones((2, 4), np.float32), t).sum()))\n"
        "    g = f(np.ones((3, 4), np.float32))\n"
        "print(any('native CPU kernel unavailable' in str(x.message) for x in w), g.shape)\n"
    )
    env = {**os.environ, "CXX": "", "PATH": str(tmp_path), "QTL_KERNEL_CACHE": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "(3,", "4)"]
