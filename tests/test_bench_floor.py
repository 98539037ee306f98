"""The bench's memory floor: the bandwidth it measures and the passes it counts."""

from __future__ import annotations

import pytest

from qtl.bench.floor import floor_ms, llc_bytes, memory_bandwidth, state_passes


def test_passes_grow_by_a_fixed_amount_per_layer_and_with_the_tile_passes():
    # a layer adds the same passes each time (recomputed forward + adjoint back)
    for n in (8, 14, 19, 27):
        steps = [state_passes(n, m + 1) - state_passes(n, m) for m in range(1, 5)]
        assert len(set(steps)) == 1 and steps[0] > 0
    # one row (n <= 11) has no tile passes; each 8 high bits add one per layer
    assert state_passes(8, 3) == state_passes(11, 3) < state_passes(12, 3) == state_passes(19, 3)
    assert state_passes(19, 3) < state_passes(20, 3)


def test_the_floor_is_bytes_over_bandwidth():
    one = floor_ms(19, 3, 1, 10.0)
    assert one == pytest.approx(state_passes(19, 3) * 4 * 2**19 / 10e9 * 1e3)
    assert floor_ms(19, 3, 32, 10.0) == pytest.approx(32 * one)
    assert floor_ms(19, 3, 32, 20.0) == pytest.approx(16 * one)


def test_bandwidth_is_measured_over_arrays_of_at_least_8x_the_llc():
    bw = memory_bandwidth(reps=1, threads=1)
    assert bw["array_mib"] * 2**20 >= 8 * llc_bytes()
    assert bw["copy_gbs"] > 0.1 and bw["triad_gbs"] > 0.1 and bw["threads"] == 1
