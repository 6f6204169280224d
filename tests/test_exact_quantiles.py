"""Exact order statistics over batches read again: the values numpy's percentile gives on the whole array."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import analysis.exact_quantiles as exact_quantiles
from analysis.exact_quantiles import BatchStatistics

PERCENTILES = [0, 0.1, 1, 25, 50, 90, 95, 99, 99.9, 100]


@settings(max_examples=60)
@given(values=arrays(np.float64, st.integers(1, 3000),
                     elements=st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([0.0, 0.0125, -3.5]))),
       num_batches=st.integers(1, 9), gather_at_most=st.sampled_from([0, 7, 1 << 22]))
def test_percentiles_mean_and_std_are_numpys(values, num_batches, gather_at_most):
    batches = np.array_split(values, num_batches)
    previous = exact_quantiles._GATHER_AT_MOST, exact_quantiles._GATHER_ALL_AT_MOST
    # 0: histogram down to the last bit
    exact_quantiles._GATHER_AT_MOST = exact_quantiles._GATHER_ALL_AT_MOST = gather_at_most
    try:
        statistics = BatchStatistics(lambda: iter(batches))
        got = statistics.percentiles(PERCENTILES)
    finally:
        exact_quantiles._GATHER_AT_MOST, exact_quantiles._GATHER_ALL_AT_MOST = previous
    assert [got[p] for p in PERCENTILES] == np.percentile(values, PERCENTILES).tolist()
    scale = max(1.0, float(np.abs(values).max()))
    assert statistics.count == values.size
    assert abs(statistics.mean - values.mean()) <= 1e-12 * scale
    assert abs(statistics.std - values.std()) <= 1e-6 * scale
