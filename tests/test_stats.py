"""The statistics core against closed forms in float64."""

import numpy as np
import pytest

from bncal.stats import ChannelMoments, StackedMoments, batch_moments, fixed_point_passes, max_relative_change


def _split(x, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(x[start:start + s])
        start += s
    assert start == len(x)
    return out


@pytest.mark.parametrize("sizes", [[100], [1, 99], [37, 41, 22], [50, 1, 49]])
def test_merge_equals_population_statistics_for_any_split(sizes):
    rng = np.random.default_rng(0)
    # A large offset against a small spread: where E[x^2] - E[x]^2 in float32 would fail.
    x = (1e4 + rng.standard_normal((100, 3, 4, 5))).astype(np.float32)
    moments = ChannelMoments.empty(3)
    for part in _split(x, sizes):
        moments.add_array(part)
    ref = x.astype(np.float64)
    np.testing.assert_allclose(moments.mean, ref.mean(axis=(0, 2, 3)), rtol=1e-14)
    np.testing.assert_allclose(moments.variance, ref.var(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(moments.unbiased_variance, ref.var(axis=(0, 2, 3), ddof=1), rtol=1e-9)
    assert moments.count == 100 * 20


@pytest.mark.parametrize("zero_at", [None, (0, 1), (2, 0)])
def test_stacked_moments_equal_layer_by_layer_merges_bit_for_bit(zero_at):
    # Three layers of different widths and counts, as a graph's BNs after each batch; a zero
    # count (a layer that saw no values in a batch) takes merge's own special cases.
    rng = np.random.default_rng(2)
    channels = {"a": 3, "b": 5, "c": 2}
    stacked, separate = StackedMoments(channels), {name: ChannelMoments.empty(c) for name, c in channels.items()}
    for batch in range(4):
        counts = [int(rng.integers(2, 50)) for _ in channels]
        if zero_at is not None and batch == zero_at[0]:
            counts[zero_at[1]] = 0
        means = [(1e3 + rng.standard_normal(c)).astype(np.float32) for c in channels.values()]
        variances = [rng.uniform(0.1, 2.0, c).astype(np.float32) for c in channels.values()]
        stacked.add_batches(counts, means, variances)
        for (name, layer), count, mean, var in zip(separate.items(), counts, means, variances):
            if count:
                layer.add_batch(count, mean, var)
    for name, layer in separate.items():
        assert stacked.layers[name].count == layer.count
        np.testing.assert_array_equal(stacked.layers[name].mean, layer.mean)
        np.testing.assert_array_equal(stacked.layers[name].m2, layer.m2)
    with pytest.raises(ValueError):
        stacked.add_batches([2, 2], means[:2], variances[:2])


def test_pack_round_trip_and_combine_order_independence():
    rng = np.random.default_rng(1)
    parts = [ChannelMoments.empty(4).add_array(rng.standard_normal((n, 4))) for n in (3, 10, 7)]
    for p in parts:
        back = ChannelMoments.from_array(p.to_array())
        assert back.count == p.count
        np.testing.assert_array_equal(back.mean, p.mean)
    a = ChannelMoments.combine(parts)
    b = ChannelMoments.combine(parts[::-1])
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-14)
    np.testing.assert_allclose(a.m2, b.m2, rtol=1e-13)


def test_batch_moments_channel_axis():
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    count, mean, var = batch_moments(x, channel_axis=2)
    assert count == 6
    np.testing.assert_allclose(mean, x.reshape(-1, 4).mean(0))
    np.testing.assert_allclose(var, x.reshape(-1, 4).var(0))


def test_empty_moments_refuse_variance_and_mismatched_merge():
    with pytest.raises(ValueError):
        ChannelMoments.empty(2).variance
    with pytest.raises(ValueError):
        ChannelMoments.empty(2).merge(ChannelMoments.empty(3).add_array(np.ones((2, 3))))


def test_fixed_point_driver_stops_at_tolerance():
    # A contraction x -> x/2 + 1 towards 2, packed as moments of one channel.
    def moments(v):
        return {"bn": ChannelMoments(10, np.array([v]), np.array([10.0]))}

    state = {"calls": 0}

    def train_pass():
        return moments(0.0)

    def eval_pass(current):
        state["calls"] += 1
        return moments(current["bn"].mean[0] / 2 + 1)

    result, passes, converged, change = fixed_point_passes(train_pass, eval_pass, mode="eval", tol=1e-3, max_passes=50)
    assert converged and change <= 1e-3
    assert passes == state["calls"] + 1
    assert abs(result["bn"].mean[0] - 2) < 2e-3
    _, passes, converged, _ = fixed_point_passes(train_pass, eval_pass, mode="eval", tol=0, max_passes=3)
    assert passes == 3 and not converged
    assert max_relative_change(moments(1.0), moments(1.0)) == 0.0
