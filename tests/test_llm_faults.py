"""The LLM API under interrupts, errors, aborts and prompts it cannot serve: the same LLM afterwards generates what
a fresh one does, sync and async; bad prompts and sampling settings are refused with clear errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import LLM, SamplingParams
from tests.interrupt_in_llm import Interrupt

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
_llms: dict = {}


def tiny_llm(role: str, num_blocks: int, asynchronous: bool) -> LLM:
    """One LLM per role and setting, made once: the 'victim' is interrupted, the 'fresh' one never is."""
    key = (role, num_blocks, asynchronous)
    if key not in _llms:
        _llms[key] = LLM("tiny-qwen3", device="cpu", max_num_batched_tokens=32, max_num_seqs=4, block_size=4,
                         num_gpu_blocks_override=num_blocks, async_scheduling=asynchronous)
    return _llms[key]


def _outputs(llm: LLM, prompts, params=GREEDY):
    return [(out.outputs[0].token_ids, out.outputs[0].finish_reason) for out in llm.generate(prompts, params, use_tqdm=False)]


prompt_lists = st.lists(st.lists(st.integers(3, 4000), min_size=1, max_size=20), min_size=1, max_size=5)


@settings(max_examples=25)
@given(first=prompt_lists, then=prompt_lists, where=st.sampled_from(["model", "between"]), at=st.integers(1, 12),
       error=st.sampled_from([KeyboardInterrupt(), RuntimeError("device lost")]), num_blocks=st.sampled_from([12, 64]),
       asynchronous=st.booleans())
def test_after_an_interrupted_generate_the_llm_generates_as_a_fresh_one(first, then, where, at, error, num_blocks,
                                                                        asynchronous):
    llm = tiny_llm("victim", num_blocks, asynchronous)
    before = len(llm.engine.requests)
    with Interrupt(llm, where, at, error) as interrupt:
        try:
            llm.generate(first, GREEDY, use_tqdm=False)
        except (KeyboardInterrupt, RuntimeError) as raised:
            assert raised is error
    assert interrupt.calls >= min(at, 1)
    engine = llm.engine
    # Every request of the interrupted call is finished or aborted, exactly once, and holds no block.
    records = list(engine.request_records.values())[before:]
    assert len(records) == len(first)
    assert all(record.status in ("finished", "aborted") and record.finish_time is not None for record in records)
    assert engine.num_finished + engine.num_rejected == len(engine.requests)
    assert not engine.has_unfinished() and engine.block_manager.holds_nothing()
    assert _outputs(llm, then) == _outputs(tiny_llm("fresh", num_blocks, asynchronous), then)


def test_abort_by_id_frees_the_requests_and_ignores_unknown_ids():
    llm = tiny_llm("victim", 64, True)
    ids = [llm.engine.add_request(prompt_token_ids=[5, 6, 7, 8, 9], sampling_params=GREEDY) for _ in range(3)]
    llm.engine.step()
    llm.abort(ids[:2])
    llm.abort([ids[2], "no-such-request"])
    records = llm.engine.request_records
    assert [records[request_id].status for request_id in ids] == ["aborted"] * 3
    assert llm.engine.block_manager.holds_nothing() and not llm.engine.has_unfinished()
    prompts = [[5, 6, 7, 8, 9], [40] * 17]
    assert _outputs(llm, prompts) == _outputs(tiny_llm("fresh", 64, True), prompts)


def test_a_prompt_larger_than_the_whole_kv_cache_is_rejected_and_the_others_are_returned():
    llm = tiny_llm("victim", 12, False)  # 12 blocks of 4 tokens: 48 tokens in all
    prompts = [[5, 6, 7], [9] * 60, [11, 12]]
    with pytest.warns(RuntimeWarning, match="prompt 1 was rejected: needs 17 KV blocks"):
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [out.outputs[0].finish_reason for out in outputs] == ["length", "rejected", "length"]
    assert outputs[1].outputs[0].token_ids == [] and outputs[1].finished
    roomy = tiny_llm("fresh", 64, False)
    assert [out.outputs[0].token_ids for out in outputs[::2]] == [
        out.outputs[0].token_ids for out in roomy.generate(prompts[::2], GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("prompt, problem", [
    ([5, 6.0, 7], "prompt 0 has 6.0 \\(float\\) at position 1; token ids must be integers"),
    ([5, True], "prompt 0 has True \\(bool\\) at position 1"),
    (np.array([5.0, 6.0]), "prompt 0 is an array of float64"),
    ([[5, 6], 7], "prompt 0 has \\[5, 6\\] \\(list\\) at position 0"),
])
def test_token_ids_must_be_integers(prompt, problem):
    with pytest.raises(TypeError, match=problem):
        tiny_llm("victim", 64, False).generate([prompt], GREEDY, use_tqdm=False)


def test_a_two_dimensional_array_is_refused_and_a_one_dimensional_one_is_a_prompt():
    llm = tiny_llm("victim", 64, False)
    with pytest.raises(TypeError, match=r"prompts is a 2-D array of shape \(2, 3\)"):
        llm.generate(np.array([[5, 6, 7], [8, 9, 10]]), GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match=r"prompt 1 is a 2-D array"):
        llm.generate([[5, 6], np.array([[5, 6]])], GREEDY, use_tqdm=False)
    from_array = llm.generate(np.array([5, 6, 7], dtype=np.int32), GREEDY, use_tqdm=False)
    assert from_array[0].outputs[0].token_ids == llm.generate([5, 6, 7], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("keywords, problem", [
    ({"temperature": True}, "temperature must be a finite non-negative number .*got True"),
    ({"top_p": True}, "top_p must be in"),
])
def test_sampling_params_refuse_booleans_for_numbers(keywords, problem):
    with pytest.raises(ValueError, match=problem):
        SamplingParams(**keywords)


@pytest.mark.parametrize("where", ["model", "between"])
def test_an_interrupted_request_with_several_completions_ends_all_of_them(where):
    """n = 2: the second completion waits for the first's prompt blocks; an interrupt ends both, and the next
    call's seeded completions are a fresh LLM's."""
    llm = tiny_llm("victim", 64, True)
    params = SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=6, ignore_eos=True)
    before = len(llm.engine.requests)
    with Interrupt(llm, where, 2, KeyboardInterrupt()):
        with pytest.raises(KeyboardInterrupt):
            llm.generate([[5, 6, 7, 8, 9, 10], [11] * 9], params, use_tqdm=False)
    records = list(llm.engine.request_records.values())[before:]
    assert len(records) == 4 and all(record.status in ("finished", "aborted") for record in records)
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.holds_nothing()
    prompts = [[12, 13, 14], [15] * 20]
    again = [[c.token_ids for c in out.outputs] for out in llm.generate(prompts, params, use_tqdm=False)]
    fresh = [[c.token_ids for c in out.outputs]
             for out in tiny_llm("fresh", 64, True).generate(prompts, params, use_tqdm=False)]
    assert again == fresh
