"""The device sampler: greedy, temperature, top-k, top-p boundary, and per-request seeds."""

import pytest
import torch

from engine.sampler import Sampler, SamplingTensors, apply_top_k_top_p, seed_key, seeded_exponential

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
