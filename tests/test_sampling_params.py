"""SamplingParams has vLLM v0.11's fields and defaults; bad values fail at construction naming the field."""

import dataclasses

import pytest

from engine.sampling_params import MAX_LOGPROBS, SamplingParams

# vLLM v0.11's SamplingParams fields that twinfer serves, with vLLM's defaults (lists kept as tuples here).
VLLM_DEFAULTS = {
    "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "temperature": 1.0,
    "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": None, "stop": (), "stop_token_ids": (), "bad_words": (),
    "include_stop_str_in_output": False, "ignore_eos": False, "max_tokens": 16, "min_tokens": 0, "logprobs": None,
    "prompt_logprobs": None, "detokenize": True, "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "logit_bias": None, "allowed_token_ids": None, "truncate_prompt_tokens": None,
}


def test_vllm_fields_and_defaults():
    params = SamplingParams()
    for name, default in VLLM_DEFAULTS.items():
        assert getattr(params, name) == default, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -2}, "top_k must be 0 .* got -2"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.2}, "top_p"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\], got 1.5"),
        ({"min_p": float("nan")}, "min_p"),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be less than or equal to max_tokens=4, got 5"),
        ({"seed": "7"}, "seed"),
        ({"n": 0}, "n must be an integer of at least 1, got 0"),
        ({"n": 2, "temperature": 0}, "n must be 1 when using greedy sampling, got 2"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2.5"),
        ({"frequency_penalty": -3}, r"frequency_penalty must be in \[-2, 2\], got -3"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number greater than zero, got 0.0"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"logprobs": -2}, "logprobs must be a non-negative integer, -1 .* got -2"),
        ({"prompt_logprobs": 1.5}, "prompt_logprobs"),
        ({"stop_token_ids": [1, -3]}, "stop_token_ids must contain only non-negative integers, got -3"),
        ({"stop": ["ok", ""]}, "stop cannot contain an empty string"),
        ({"stop": [3]}, "stop must contain only strings, got 3"),
        ({"stop": "x", "detokenize": False}, "stop strings are only supported when detokenize is True"),
        ({"bad_words": [""]}, "bad_words cannot contain an empty string"),
        ({"allowed_token_ids": []}, "allowed_token_ids is not None and empty"),
        ({"allowed_token_ids": [2, "a"]}, "allowed_token_ids"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias key 'x' is not a token id"),
        ({"logit_bias": {3: float("nan")}}, r"logit_bias\[3\] must be a finite number"),
        ({"logit_bias": [1, 2]}, "logit_bias must be a dict"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be an integer >= 1, -1 .* got 0"),
        ({"bad_words_token_ids": [[1, 2], []]}, "bad_words_token_ids cannot contain an empty token sequence"),
    ],
)
def test_invalid_values_are_rejected_naming_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_lists_become_tuples_and_strings_lists():
    params = SamplingParams(stop="end", stop_token_ids=[3, 4, 3], allowed_token_ids=[5, 6],
                            bad_words=["a", "b", "a"], logit_bias={"7": 150, 8: -0.5})
    assert params.stop == ("end",)
    assert params.stop_token_ids == (3, 4)  # duplicates dropped, as vLLM does
    assert params.allowed_token_ids == (5, 6)
    assert params.bad_words == ("a", "b")
    assert params.logit_bias == {7: 100.0, 8: -0.5}  # OpenAI's string keys, values clamped to [-100, 100]
    assert hash(params) == hash(dataclasses.replace(params))  # shareable: hashable despite its dict


def test_greedy_resets_the_filters_as_vllm_does():
    params = SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.3)
    assert params.greedy and (params.top_k, params.top_p, params.min_p) == (0, 1.0, 0.0)
    assert SamplingParams(temperature=1e-6).greedy  # below vLLM's 1e-5
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy


def test_feature_flags_pick_the_sampler_path():
    assert not SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, logprobs=3).uses_logits_processors
    for kwargs in ({"presence_penalty": 0.5}, {"frequency_penalty": -0.5}, {"repetition_penalty": 1.2},
                   {"min_tokens": 2}, {"logit_bias": {1: 1.0}}, {"allowed_token_ids": [1]},
                   {"bad_words_token_ids": [[4]]}):
        assert SamplingParams(**kwargs).uses_logits_processors, kwargs
    # History is shipped to the sampler only for penalties and bad words of more than one token.
    assert SamplingParams(repetition_penalty=1.1).needs_token_history
    assert not SamplingParams(bad_words_token_ids=[[4]]).needs_token_history
    assert SamplingParams(bad_words_token_ids=[[4], [5, 6]]).needs_token_history


def test_check_vocab_names_the_field_and_the_ids():
    with pytest.raises(ValueError, match=r"allowed_token_ids has token id\(s\) \[100\] outside the vocabulary"):
        SamplingParams(allowed_token_ids=[1, 100]).check_vocab(100)
    with pytest.raises(ValueError, match=r"logit_bias has token id\(s\) \[200\]"):
        SamplingParams(logit_bias={200: 1.0}).check_vocab(100)
    with pytest.raises(ValueError, match=f"greater than the most allowed, {MAX_LOGPROBS}"):
        SamplingParams(logprobs=MAX_LOGPROBS + 1).check_vocab(1000)
    with pytest.raises(ValueError, match="prompt_logprobs: requested 1000"):
        SamplingParams(prompt_logprobs=-1).check_vocab(1000)
    SamplingParams(stop_token_ids=[99], logprobs=MAX_LOGPROBS).check_vocab(100)


def test_bad_words_become_token_sequences_with_and_without_a_leading_space():
    class SpaceAwareTokenizer:
        """Words map to one id alone and another after a space, as byte-level BPE tokenizers do."""

        def encode(self, text, add_special_tokens=False):
            return [hash(word) % 1000 + (1000 if text.startswith(" ") else 0) for word in text.split()]

    params = SamplingParams(bad_words=["bad", "very bad"]).with_tokenizer(SpaceAwareTokenizer())
    tokenizer = SpaceAwareTokenizer()
    assert params.bad_words_token_ids == (
        tuple(tokenizer.encode("bad")), tuple(tokenizer.encode(" bad")),
        tuple(tokenizer.encode("very bad")), tuple(tokenizer.encode(" very bad")),
    )
