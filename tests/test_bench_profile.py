"""qtl.bench.profile (per-operation times of the fast simulator's step, by phase and kind) and
qtl.bench.native_ab (native kernel against XLA, alternating in one process)."""

from __future__ import annotations

import sys

from qtl.bench import profile


def test_phase_reads_the_jax_op_path():
    assert profile.phase("jit(loss)/jvp()/while/body/closed_call/dot_general") == "fwd"
    assert profile.phase("jit(loss)/transpose(jvp())/while/body/checkpoint/dot_general") == "bwd"
    path = "jit(loss)/transpose(jvp())/while/body/checkpoint/rematted_computation/gather"
    assert profile.phase(path) == "remat"


def test_profile_attributes_the_traced_ops(monkeypatch, capsys, tmp_path):
    # chunks of 2 examples at n=6 (256 B states): forward, recomputation and backward all run
    monkeypatch.setattr(
        sys, "argv", ["profile", "--qubits", "6", "--batch", "4", "--features", "8",
                      "--steps", "2", "--max-state-mb", str(2 * 2**6 * 4 / 2**20),
                      "--trace-dir", str(tmp_path / "a")],
    )  # fmt: skip
    profile.main()
    out = capsys.readouterr().out
    assert "n=6 batch 4: step" in out and "| ms/step | phase | op | output |" in out
    assert list((tmp_path / "a").glob("**/*.trace.json.gz"))
    # the per-layer path: chunks of 2 examples at n=6, so the forward is recomputed
    s = profile.profile(6, 4, 8, 2, 2 * 2**6 * 4 / 2**20, tmp_path / "b", native="gram")
    assert set(s["by_phase"]) == {"fwd", "remat", "bwd"}
    assert all(ms > 0 for ms in s["by_phase"].values())
    kinds = {(ph, op) for (ph, op, _), _ms in s["by_kind"]}
    assert ("bwd", "dot_general") in kinds and ("fwd", "dot_general") in kinds
    # the whole-circuit kernel: one custom call each way, no recomputation outside it
    s = profile.profile(6, 4, 8, 2, None, tmp_path / "c")
    calls = {ph for (ph, op, _), _ms in s["by_kind"] if op == "ffi_call"}
    assert calls == {"fwd", "bwd"} and "remat" not in s["by_phase"]


def test_native_ab_times_every_variant_on_the_same_results(monkeypatch, capsys):
    from qtl.bench import native_ab

    r = native_ab.compare(6, 4, 8, steps=2)
    assert r["native_ok"] and r["max_abs_diff"] < 1e-5
    for name in ("xla", "gram", "state"):
        assert 0 < r[name]["min_ms"] <= r[name]["median_ms"]
    monkeypatch.setattr(sys, "argv", ["native_ab", "--qubits", "5", "--batch", "3",
                                      "--features", "4", "--steps", "1"])  # fmt: skip
    native_ab.main()
    out = capsys.readouterr().out
    assert "| xla |" in out and "| gram |" in out and "| state |" in out
    assert "largest result difference from xla" in out
