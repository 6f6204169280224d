"""Logits processors against transformers' processors (and a float64 reference for OpenAI's frequency and presence
penalties, which transformers lacks), on random logits and random token histories, in vLLM v0.11's order."""

from array import array

import numpy as np
import pytest
import torch

from engine.logits_processors import apply_logits_processors, prepare_processors
from engine.sampling_params import SamplingParams
from engine.scheduler_output import PENDING_TOKEN, ScheduledSequence

transformers = pytest.importorskip("transformers")
VOCAB = 64
EOS = (1,)


def _row(seq_id: int, prompt: list[int], output: list[int], params: SamplingParams, pending: bool = False):
    """A sampling row as the scheduler sends it: a decode of the last token, with its history when the
    params need one (a pending row's last output token is still on the device)."""
    history = array("i", prompt + (output[:-1] if pending else output))
    last = PENDING_TOKEN if pending else (output or prompt)[-1]
    seq = ScheduledSequence(seq_id, [last], len(prompt) + len(output) - 1, [0], bool(output), True, len(output),
                            params)
    seq.token_history, seq.num_prompt_tokens = history, len(prompt)
    return seq


def _apply(seqs, logits, pending=None):
    arrays = prepare_processors(seqs, EOS, pending or (lambda seq_id: pytest.fail("no token is pending")))
    if arrays is None:  # nothing to change in any row
        return logits.float()
    dev = {name: torch.from_numpy(value) for name, value in arrays.arrays().items()}
    return apply_logits_processors(logits, arrays.tensors(dev))


def _transformers_reference(logits: torch.Tensor, prompt: list[int], output: list[int], params: SamplingParams):
    """One row through transformers' processors in vLLM's order, then OpenAI's frequency/presence in float64."""
    scores = logits[None].double().clone()
    full = torch.tensor([prompt + output])
    if params.allowed_token_ids is not None:
        allowed = list(params.allowed_token_ids)
        scores = transformers.PrefixConstrainedLogitsProcessor(lambda batch, ids: allowed, 1)(full, scores)
    if params.bad_words_token_ids:
        # vLLM matches a bad word's prefix against the output only: give transformers the output alone.
        words = [list(word) for word in params.bad_words_token_ids]
        scores = transformers.NoBadWordsLogitsProcessor(words, eos_token_id=None)(torch.tensor([output]), scores)
    if params.min_tokens:
        stops = list(EOS) + list(params.stop_token_ids)
        scores = transformers.MinNewTokensLengthLogitsProcessor(len(prompt), params.min_tokens, stops)(full, scores)
    if params.logit_bias:
        bias = [[[token], value] for token, value in params.logit_bias.items()]
        scores = transformers.SequenceBiasLogitsProcessor(bias)(full, scores)
    if params.repetition_penalty != 1.0:
        scores = transformers.RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(full, scores)
    counts = np.bincount(np.asarray(output, np.int64), minlength=VOCAB)
    scores[0] -= torch.from_numpy(params.frequency_penalty * counts + params.presence_penalty * (counts > 0))
    return scores[0]


ROW_PARAMS = [
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(repetition_penalty=0.6, frequency_penalty=0.4, presence_penalty=-0.8),
    SamplingParams(frequency_penalty=-1.5, presence_penalty=1.2),
    SamplingParams(logit_bias={3: 5.0, 60: -7.5, 7: 150.0}),
    SamplingParams(allowed_token_ids=[2, 9, 33]),
    SamplingParams(min_tokens=50, max_tokens=100, stop_token_ids=[5, 6]),
    SamplingParams(min_tokens=2, stop_token_ids=[5]),  # reached: nothing banned
    SamplingParams(bad_words_token_ids=[[11], [12, 13], [14, 15, 16]]),
    SamplingParams(allowed_token_ids=[4, 5, 6], repetition_penalty=1.3, logit_bias={5: 2.0}, min_tokens=40,
                   max_tokens=64, stop_token_ids=[6], frequency_penalty=0.3),
    SamplingParams(temperature=0.5),  # no processor: the row is untouched
]


@pytest.mark.parametrize("seed", range(5))
def test_every_processor_matches_transformers_in_one_mixed_batch(seed):
    rng = np.random.default_rng(seed)
    logits = torch.randn(len(ROW_PARAMS), VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    seqs, histories = [], []
    for seq_id, params in enumerate(ROW_PARAMS):
        prompt = rng.integers(0, VOCAB, rng.integers(1, 30)).tolist()
        output = rng.integers(0, VOCAB, rng.integers(0, 30)).tolist()
        if params.bad_words_token_ids:
            output += [12, 14, 15]  # the prefixes of two bad words end the output: 16 is banned, 13 is not
        seqs.append(_row(seq_id, prompt, output, params))
        histories.append((prompt, output))
    ours = _apply(seqs, logits)
    for row, (params, (prompt, output)) in enumerate(zip(ROW_PARAMS, histories)):
        expected = _transformers_reference(logits[row], prompt, output, params)
        torch.testing.assert_close(ours[row].double(), expected, rtol=1e-6, atol=1e-5, msg=f"row {row}: {params}")
    assert torch.isinf(ours[7, 16]) and torch.isinf(ours[7, 11]) and torch.isfinite(ours[7, 13])
    assert torch.equal(ours[9], logits[9])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seq = _row(0, [0], [1], SamplingParams(repetition_penalty=2.0))
    # Tokens 0 (prompt) and 1 (output) are penalized; 2 and 3 are not.
    assert _apply([seq], logits).tolist() == [[1.0, -4.0, 3.0, -1.0]]


def test_the_pending_token_counts_as_the_last_output_token():
    params = SamplingParams(frequency_penalty=1.0, bad_words_token_ids=[[8, 9]])
    logits = torch.zeros(1, VOCAB)
    known = _apply([_row(0, [1, 2], [8, 8], params)], logits)
    pending = _apply([_row(0, [1, 2], [8, 8], params, pending=True)], logits, pending=lambda seq_id: 8)
    assert torch.equal(known, pending)
    assert known[0, 8] == -2.0 and torch.isinf(known[0, 9])


def test_rows_without_processors_yield_no_arrays():
    assert prepare_processors([_row(0, [1], [2], SamplingParams(temperature=0.3, min_p=0.2, logprobs=2))], EOS,
                              None) is None


@pytest.mark.parametrize("num_outputs", [0, 1, 2, 3])
def test_min_tokens_bans_eos_and_stop_tokens_until_that_many_outputs_as_transformers(num_outputs):
    params = SamplingParams(min_tokens=2, stop_token_ids=[5], ignore_eos=True)
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(num_outputs))
    output = [7] * num_outputs
    ours = _apply([_row(0, [3, 4], output, params)], logits)
    torch.testing.assert_close(ours[0].double(), _transformers_reference(logits[0], [3, 4], output, params))
    # vLLM bans EOS too while min_tokens is not reached, even with ignore_eos.
    assert torch.isinf(ours[0, [1, 5]]).all().item() == (num_outputs < 2)
