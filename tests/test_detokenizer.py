"""Incremental detokenization and stop strings (vLLM v0.11's semantics) with a real byte-level BPE tokenizer:
characters split over tokens, stop strings across token boundaries, and the stop taking effect in the engine."""

import pytest

from engine.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")
from engine.detokenizer import IncrementalDetokenizer  # noqa: E402 (needs the tokenizers library)
from tests.tiny_checkpoints import save_byte_level_tokenizer, save_tiny_qwen3  # noqa: E402

VOCAB = 320


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Qwen3 whose vocabulary is the byte-level tokenizer's (EOS 0, special tokens 0-2)."""
    folder = tmp_path_factory.mktemp("tiny-bpe")
    save_byte_level_tokenizer(folder, VOCAB)
    save_tiny_qwen3(folder, VOCAB, eos_token_id=0, seed=1)
    return folder


@pytest.fixture(scope="module")
def tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def _feed(detokenizer: IncrementalDetokenizer, tokens: list[int]) -> tuple[int | None, str | None]:
    """Feed tokens until a stop string; (how many were fed then, the stop string), or (None, None)."""
    for count, token in enumerate(tokens, 1):
        stop = detokenizer.update(token, stop_terminated=False)
        if stop is not None:
            return count, stop
    return None, None


def test_text_grows_to_the_full_decode_across_split_characters(tokenizer):
    prompt = tokenizer.encode("hello world,")
    output = tokenizer.encode(" café naïve 日本語 テキスト!")
    pieces = [tokenizer.decode([token]) for token in output]
    assert any("\ufffd" in piece for piece in pieces)  # some characters are split over tokens
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    for count, token in enumerate(output, 1):
        detokenizer.update(token, stop_terminated=False)
        assert "\ufffd" not in detokenizer.output_text
        assert tokenizer.decode(output[:count]).startswith(detokenizer.output_text)
    assert detokenizer.output_text == tokenizer.decode(output) == " café naïve 日本語 テキスト!"


def test_a_stop_string_across_a_token_boundary_cuts_the_text_at_that_token(tokenizer):
    output = tokenizer.encode(" the quick brown fox jumps over the lazy dog")
    text = tokenizer.decode(output)
    boundaries = [len(tokenizer.decode(output[:i])) for i in range(1, len(output))]
    boundary = next(b for b in boundaries if text[b - 2:b + 2].strip() == text[b - 2:b + 2] and b > 8)
    stop = text[boundary - 2:boundary + 2]  # two characters of one token and two of the next
    completing = next(i for i in range(1, len(output) + 1) if stop in tokenizer.decode(output[:i]))

    detokenizer = IncrementalDetokenizer(tokenizer, [5, 6], SamplingParams(stop=["never", stop]))
    assert _feed(detokenizer, output) == (completing, stop)
    assert detokenizer.output_text == text[:text.index(stop)]

    included = IncrementalDetokenizer(tokenizer, [5, 6], SamplingParams(stop=stop, include_stop_str_in_output=True))
    assert _feed(included, output) == (completing, stop)
    assert included.output_text == text[:text.index(stop) + len(stop)]


def test_of_two_stop_strings_in_one_token_the_earlier_wins(tokenizer):
    output = tokenizer.encode(" lazy dog")
    detokenizer = IncrementalDetokenizer(tokenizer, [5], SamplingParams(stop=["dog", "lazy"]))
    _feed(detokenizer, output)
    assert detokenizer.output_text == " "


def test_a_running_sequence_holds_back_what_may_start_a_stop_string(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, [5], SamplingParams(stop=["brown fox"]))
    _feed(detokenizer, tokenizer.encode(" the quick brown"))
    assert detokenizer.output_text == " the quick brown"
    assert detokenizer.text(finished=False) == " the quick brown"[:-len("brown fox") + 1]
    assert detokenizer.text(finished=True) == " the quick brown"


def test_stop_strings_wait_for_min_tokens(tokenizer):
    output = tokenizer.encode(" dog dog dog")
    first, _ = _feed(IncrementalDetokenizer(tokenizer, [5], SamplingParams(stop="dog")), output)
    detokenizer = IncrementalDetokenizer(tokenizer, [5], SamplingParams(stop="dog", min_tokens=3, max_tokens=9))
    count, _ = _feed(detokenizer, output)
    assert first <= 3 < count
    # It stops at a later "dog", completed by the token it stops at.
    assert detokenizer.output_text == tokenizer.decode(output[:count]).rsplit("dog", 1)[0]
    assert "dog" not in tokenizer.decode(output[:count - 1])[len(detokenizer.output_text):]


def test_a_stop_token_adds_no_text_unless_asked_and_special_tokens_are_skipped_unless_asked(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    word = tokenizer.encode(" dog")
    for params, expected in [(SamplingParams(), " dog"),
                             (SamplingParams(skip_special_tokens=False), " dog<|im_end|>")]:
        detokenizer = IncrementalDetokenizer(tokenizer, [5], params)
        for token in word + [im_end]:
            detokenizer.update(token, stop_terminated=False)
        assert detokenizer.output_text == expected
    stop_token = tokenizer.encode("!")[0]
    for include, expected in [(False, " dog"), (True, " dog!")]:
        detokenizer = IncrementalDetokenizer(tokenizer, [5], SamplingParams(include_stop_str_in_output=include))
        for token in word:
            detokenizer.update(token, stop_terminated=False)
        detokenizer.update(stop_token, stop_terminated=True)
        assert detokenizer.output_text == expected


def test_stop_strings_end_the_sequence_in_the_engine(folder, tokenizer):
    from engine import LLM

    llm = LLM(str(folder), device="cpu")
    prompt = "the quick brown fox"
    seeded = SamplingParams(temperature=1.0, seed=4, max_tokens=40, ignore_eos=True, skip_special_tokens=False)
    free = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0]
    assert free.text == tokenizer.decode(free.token_ids, skip_special_tokens=False)
    # A clean stop string across a token boundary, well inside the text.
    ends = [len(tokenizer.decode(free.token_ids[:i], skip_special_tokens=False)) for i in range(1, 30)]
    boundary = next(b for b in ends[5:] if "\ufffd" not in free.text[b - 2:b + 2] and len(free.text[b - 2:b + 2]) == 4)
    stop = free.text[boundary - 2:boundary + 2]
    completing = next(i for i in range(1, 41)
                      if stop in tokenizer.decode(free.token_ids[:i], skip_special_tokens=False))

    import dataclasses

    first_step = len(llm.engine.step_records)
    stopped = llm.generate([prompt], dataclasses.replace(seeded, stop=[stop]), use_tqdm=False)[0].outputs[0]
    # It finished at the step whose token completed the stop string (nothing generated then trimmed).
    assert stopped.token_ids == free.token_ids[:completing]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    assert stopped.text == free.text[:free.text.index(stop)]
    steps = llm.engine.step_records[first_step:]
    assert sum(step.num_decode_tokens for step in steps) <= completing  # async scheduling may compute one more
    assert llm.engine.block_manager.num_used_blocks == 0
    kept = llm.generate([prompt], dataclasses.replace(seeded, stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == free.text[:free.text.index(stop) + len(stop)]
