"""The device sampler: greedy, temperature, min-p, top-k, top-p (against transformers' warpers and, by chi-square
tests, against the exact distribution), per-request seeds, and log-probabilities."""

import numpy as np
import pytest
import torch

from engine.logprobs import compute_logprobs, to_token_logprobs
from engine.sampler import (
    Sampler,
    SamplingTensors,
    apply_min_p,
    apply_top_k_top_p,
    seed_key,
    seeded_exponential,
)

ROWS = 20_000


def _frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).float() / tokens.numel()


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(8, 50)
    tokens = Sampler(0, "cpu")(logits, SamplingTensors())
    assert torch.equal(tokens, logits.argmax(-1))


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(ROWS, 1)
    temperature = 0.7
    tokens = Sampler(0, "cpu")(logits, SamplingTensors(temperatures=torch.full((ROWS,), temperature)))
    expected = torch.softmax(logits[0] / temperature, -1)
    torch.testing.assert_close(_frequencies(tokens, 4), expected, atol=0.015, rtol=0)


def test_greedy_and_random_rows_mix_in_one_batch():
    logits = torch.tensor([[0.0, 0.1, 0.0]] * 1000)
    temperatures = torch.tensor([0.0, 1.0] * 500)
    tokens = Sampler(0, "cpu")(logits, SamplingTensors(temperatures=temperatures))
    assert (tokens[::2] == 1).all()
    assert len(set(tokens[1::2].tolist())) == 3


def test_top_k_keeps_only_the_k_best_renormalized():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0]).repeat(ROWS, 1)
    params = SamplingTensors(temperatures=torch.ones(ROWS), top_k=torch.full((ROWS,), 2, dtype=torch.int32))
    freq = _frequencies(Sampler(0, "cpu")(logits, params), 5)
    assert freq[2:].sum() == 0
    torch.testing.assert_close(freq[:2], torch.softmax(logits[0, :2], -1), atol=0.015, rtol=0)


@pytest.mark.parametrize("top_p, kept", [(0.45, 1), (0.55, 2), (0.79, 2), (0.81, 3), (1.0, 4)])
def test_top_p_keeps_the_token_that_crosses_p(top_p, kept):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    filtered = apply_top_k_top_p(probs.log(), None, torch.tensor([top_p]))
    assert torch.isfinite(filtered).sum().item() == kept
    assert torch.isfinite(filtered[0, :kept]).all()


def test_top_k_then_top_p_use_the_renormalized_distribution():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    # After top-k 2 the kept probabilities are 4/7 and 3/7: p = 0.5 keeps only the first.
    filtered = apply_top_k_top_p(probs.log(), torch.tensor([2]), torch.tensor([0.5]))
    assert torch.isfinite(filtered).sum().item() == 1


def test_seeded_rows_reproduce_whatever_the_batch():
    vocab = 1000
    logits = torch.randn(1, vocab).repeat(6, 1)
    alone = SamplingTensors(temperatures=torch.ones(1), seeded_rows=torch.tensor([0]),
                            seed_keys=torch.tensor([seed_key(42)]), output_indices=torch.tensor([3]))
    token_alone = Sampler(0, "cpu")(logits[:1], alone).item()
    # Same seed and output index at row 4 of a bigger batch, next to unseeded rows, with another engine seed.
    batch = SamplingTensors(temperatures=torch.ones(6), seeded_rows=torch.tensor([1, 4]),
                            seed_keys=torch.tensor([seed_key(7), seed_key(42)]), output_indices=torch.tensor([3, 3]))
    tokens = Sampler(123, "cpu")(logits, batch)
    assert tokens[4].item() == token_alone


def test_seeded_noise_is_exponential_and_differs_by_seed_and_index():
    noise = seeded_exponential(torch.tensor([seed_key(1), seed_key(2), seed_key(1)]), torch.tensor([0, 0, 1]), 50_000)
    assert noise.mean(-1).sub(1.0).abs().max() < 0.02  # Exp(1) has mean 1 and variance 1
    assert noise.var(-1).sub(1.0).abs().max() < 0.05
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])


def test_seeded_sampling_follows_the_softmax_over_seeds():
    logits = torch.tensor([1.0, 0.0, -0.5]).repeat(ROWS, 1)
    params = SamplingTensors(temperatures=torch.ones(ROWS), seeded_rows=torch.arange(ROWS),
                             seed_keys=torch.tensor([seed_key(s) for s in range(ROWS)]),
                             output_indices=torch.zeros(ROWS, dtype=torch.int64))
    freq = _frequencies(Sampler(0, "cpu")(logits, params), 3)
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)


def test_seed_key_accepts_any_python_int():
    keys = {seed_key(s) for s in (0, 1, -1, 2**70, -(2**70))}
    assert len(keys) == 5 and all(0 <= k < 2**31 for k in keys)


# ---- min-p, top-k and top-p against transformers' warpers, and their sampled frequencies against the exact
# distribution (vLLM v0.11's order: temperature, min-p, top-k, top-p)

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_min_p_keeps_what_transformers_min_p_warper_keeps(min_p):
    logits = torch.randn(16, 200, generator=torch.Generator().manual_seed(7)) * 2
    ours = apply_min_p(logits, torch.full((16,), min_p))
    theirs = transformers.MinPLogitsWarper(min_p)(None, logits.clone()) if min_p > 0 else logits
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    torch.testing.assert_close(ours[torch.isfinite(ours)], logits[torch.isfinite(ours)])


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.7), (20, 0.5), (1, 1.0)])
def test_top_k_top_p_keep_what_transformers_warpers_keep(top_k, top_p):
    logits = torch.randn(16, 200, generator=torch.Generator().manual_seed(top_k)) * 2
    ours = apply_top_k_top_p(logits, torch.full((16,), top_k), torch.full((16,), top_p))
    theirs = logits.clone()
    if top_k:
        theirs = transformers.TopKLogitsWarper(top_k)(None, theirs)
    if top_p < 1.0:
        theirs = transformers.TopPLogitsWarper(top_p)(None, theirs)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))


FALSE_ALARM_RATE = 1e-3
"""A correct sampler fails one chi-square test below with this probability over seeds; the seeds are fixed,
so each test's outcome never varies from run to run."""


def _exact_distribution(logits: np.ndarray, temperature: float, min_p: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution vLLM samples from, in float64, written independently of the sampler."""
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    keep = probs >= min_p * probs.max()
    order = np.argsort(-probs, kind="stable")
    if top_k:
        keep[order[top_k:]] = False
    kept = np.where(keep, probs, 0.0)
    kept /= kept.sum()
    # top-p: the most likely tokens until their mass reaches top_p, the one crossing it included.
    mass_before = np.cumsum(kept[order]) - kept[order]
    keep[order[mass_before >= top_p]] = False
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum()


@pytest.mark.parametrize("temperature, min_p, top_k, top_p, seeded", [
    (1.0, 0.0, 6, 1.0, False),
    (0.8, 0.0, 0, 0.6, False),
    (1.3, 0.1, 0, 1.0, False),
    (1.0, 0.05, 8, 0.8, False),
    (0.7, 0.02, 10, 0.9, True),
])
def test_sampled_frequencies_match_the_exact_distribution(temperature, min_p, top_k, top_p, seeded):
    from scipy.stats import chisquare

    vocab, rows = 24, 40_000
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 1.5
    ones = torch.ones(rows)
    params = SamplingTensors(
        temperatures=ones * temperature,
        top_k=(ones * top_k).int() if top_k else None,
        top_p=ones * top_p if top_p < 1.0 else None,
        min_p=ones * min_p if min_p else None,
        seeded_rows=torch.arange(rows) if seeded else None,
        seed_keys=torch.tensor([seed_key(seed) for seed in range(rows)]) if seeded else None,
        output_indices=torch.zeros(rows, dtype=torch.int64) if seeded else None,
    )
    tokens = Sampler(11, "cpu")(logits.repeat(rows, 1), params)
    counts = np.bincount(tokens.numpy(), minlength=vocab)
    expected = _exact_distribution(logits.double().numpy(), temperature, min_p, top_k, top_p)
    assert counts[expected == 0].sum() == 0, "a filtered token was sampled"
    support = expected > 0
    assert 2 <= support.sum() < vocab  # the filters matter here
    _, p_value = chisquare(counts[support], rows * expected[support])
    assert p_value > FALSE_ALARM_RATE
    # The test can fail: the same counts are far from the unfiltered softmax.
    unfiltered = torch.softmax(logits.double() / temperature, -1).numpy()
    assert chisquare(counts, rows * unfiltered).pvalue < 1e-9


def test_sampling_leaves_the_logits_unchanged():
    """The logprobs a request gets are those of the raw logits: sampling must not write into them."""
    logits = torch.randn(4, 50)
    before = logits.clone()
    ones = torch.ones(4)
    Sampler(0, "cpu")(logits, SamplingTensors(ones, (ones * 3).int(), ones * 0.8, min_p=ones * 0.1))
    assert torch.equal(logits, before)


def test_logprobs_and_ranks_match_a_float64_reference():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(1)) * 3
    chosen = torch.tensor([0, 7, 39, 3, 3])
    entries = to_token_logprobs(chosen.tolist(), compute_logprobs(logits, chosen, 4), [4, 0, 2, -1, 1])
    reference = torch.log_softmax(logits.double(), -1)
    for row, entry in enumerate(entries):
        token = chosen[row].item()
        assert entry.token_ids[0] == token
        assert abs(entry.logprobs[0] - reference[row, token].item()) < 1e-5
        assert entry.ranks[0] == 1 + (reference[row] > reference[row, token]).sum().item()
        top = reference[row].argsort(descending=True)
        count = [4, 0, 2, 4, 1][row]  # -1: every top token computed (4 here)
        assert entry.token_ids[1:] == top[:count].tolist() and entry.ranks[1:] == list(range(1, count + 1))
        torch.testing.assert_close(torch.tensor(entry.logprobs[1:], dtype=torch.float64), reference[row, top[:count]])


def test_seeded_rows_reproduce_whatever_the_batch_with_processors_and_min_p():
    from engine.logits_processors import ProcessorTensors

    vocab = 300
    logits = torch.randn(1, vocab).repeat(4, 1)
    bias = ProcessorTensors(bias_rows=torch.tensor([0]), bias_tokens=torch.tensor([5]), bias_values=torch.tensor([3.0]))
    alone = SamplingTensors(temperatures=torch.ones(1), seeded_rows=torch.tensor([0]),
                            seed_keys=torch.tensor([seed_key(9)]), output_indices=torch.tensor([2]),
                            min_p=torch.tensor([0.05]), processors=bias)
    token_alone = Sampler(0, "cpu")(logits[:1], alone).item()
    crowded_bias = ProcessorTensors(bias_rows=torch.tensor([2, 3]), bias_tokens=torch.tensor([5, 8]),
                                    bias_values=torch.tensor([3.0, 1.0]))
    crowded = SamplingTensors(temperatures=torch.tensor([0.0, 1.0, 1.0, 0.5]), seeded_rows=torch.tensor([2]),
                              seed_keys=torch.tensor([seed_key(9)]), output_indices=torch.tensor([2]),
                              min_p=torch.tensor([0.0, 0.2, 0.05, 0.0]), processors=crowded_bias)
    assert Sampler(77, "cpu")(logits, crowded)[2].item() == token_alone
