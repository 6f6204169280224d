"""The LLM API on CPU: token ids, strings and chats in, vLLM v0.11's RequestOutputs out in order, every sampling
parameter against transformers on a tiny random model, n > 1 sharing one prefill, Hub ids, clear errors."""

import dataclasses
import shutil

import pytest
import torch

from engine import LLM, SamplingParams

transformers = pytest.importorskip("transformers")
from tests.tiny_checkpoints import save_tiny_qwen3, save_word_level_tokenizer  # noqa: E402 (needs transformers)

VOCAB = 128
EOS = 1


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny Qwen3 with a word-level tokenizer, saved like a Hugging Face model folder."""
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    save_tiny_qwen3(folder, VOCAB, eos_token_id=EOS)
    save_word_level_tokenizer(folder, VOCAB)
    return str(folder)


@pytest.fixture(scope="module")
def reference(model_folder):
    """The same checkpoint in transformers."""
    return transformers.Qwen3ForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(model_folder):
    return LLM(model_folder, device="cpu", max_num_batched_tokens=64)


def test_outputs_come_back_in_input_order_with_their_lengths(llm):
    prompts = [[5, 6, 7], [8] * 20, [9, 10]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 5)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outputs] == [3, 9, 5]
    # Greedy is a function of the prompt alone: the same prompt alone gives the same tokens.
    alone = llm.generate([prompts[1]], params[1], use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == outputs[1].outputs[0].token_ids


def test_string_prompts_are_tokenized_and_decoded(llm):
    out = llm.generate(["w3 w4 w5"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt_token_ids == [5, 6, 7] and out.prompt == "w3 w4 w5"
    completion = out.outputs[0]
    assert completion.text.split() == [f"w{token - 2}" for token in completion.token_ids]
    assert (completion.finish_reason, completion.stop_reason) == ("length", None)


def test_seeded_requests_reproduce_in_any_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=8, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate([[3, 4, 5]], params, use_tqdm=False)[0].outputs[0].token_ids
    crowded = llm.generate([[7] * 30, [3, 4, 5], [9, 9]], [other, params, other], use_tqdm=False)[1]
    crowded = crowded.outputs[0].token_ids
    assert alone == crowded


def test_generation_stops_at_a_stop_token_and_eos_comes_from_the_config(llm):
    free = llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    free = free.outputs[0]
    stop = free.token_ids[2]
    stopped = llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=(stop,)),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == free.token_ids[:free.token_ids.index(stop) + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    assert 1 in llm.engine_config.eos_token_ids


def test_prompt_too_long_names_its_index(llm):
    with pytest.raises(ValueError, match="prompt 1 has 300 tokens"):
        llm.generate([[1, 2], [3] * 300], SamplingParams(max_tokens=4), use_tqdm=False)


def test_out_of_vocabulary_token_is_refused(llm):
    with pytest.raises(ValueError, match=f"prompt 0 has token id {VOCAB}"):
        llm.generate([[VOCAB]], use_tqdm=False)


def test_string_prompt_without_tokenizer_is_a_clear_error(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    llm = LLM(str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="prompt 0 is a string but .* has no tokenizer"):
        llm.generate(["hello"], use_tqdm=False)


def test_unknown_model_names_the_presets():
    with pytest.raises(FileNotFoundError, match="qwen3-0.6b"):
        LLM("no-such-model", device="cpu")


def test_asynchronous_scheduling_with_tensor_parallelism_is_refused_before_any_worker_starts():
    from engine.config import EngineConfig
    from engine.model_executor import ModelExecutor

    config = EngineConfig(max_model_len=256, async_scheduling=True)
    with pytest.raises(ValueError, match="asynchronous scheduling needs tensor_parallel_size 1"):
        ModelExecutor("tiny-qwen3", config, device="cpu", tensor_parallel_size=2, load_format="dummy")
    # LLM picks synchronous scheduling itself above TP 1, and asynchronous at TP 1.
    assert LLM("tiny-qwen3", device="cpu", max_model_len=256).engine_config.async_scheduling


# ---- sampling parameters against transformers on the same checkpoint

PROMPTS = [[5, 6, 7, 8, 9], [20, 21, 20, 21, 20, 21, 22], [40] * 12]
NEW_TOKENS = 10


class OpenAIPenalties(transformers.LogitsProcessor):
    """OpenAI's frequency and presence penalties over the generated tokens, in float64 (transformers has none)."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        output = input_ids[:, self.prompt_len:]
        counts = torch.zeros(scores.shape, dtype=torch.float64).scatter_add_(1, output, torch.ones(output.shape,
                                                                                                  dtype=torch.float64))
        return (scores.double() - self.frequency * counts - self.presence * (counts > 0)).to(scores.dtype)


def _transformers_greedy(reference, prompt: list[int], **kwargs) -> list[int]:
    frequency, presence = kwargs.pop("frequency_penalty", 0.0), kwargs.pop("presence_penalty", 0.0)
    processors = transformers.LogitsProcessorList([OpenAIPenalties(len(prompt), frequency, presence)])
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 logits_processor=processors, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


# (our SamplingParams beyond greedy NEW_TOKENS tokens, transformers' generate arguments); min_tokens = max_tokens
# bans EOS at every step as transformers' min_new_tokens does.
CASES = [
    ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
    # Below 1 it favours the prompt's tokens: the presence penalty drives the output off its first token.
    ({"repetition_penalty": 0.7, "presence_penalty": 2.0}, {"repetition_penalty": 0.7, "presence_penalty": 2.0}),
    ({"frequency_penalty": 1.5, "presence_penalty": 0.5}, {"frequency_penalty": 1.5, "presence_penalty": 0.5}),
    ({"repetition_penalty": 1.3, "frequency_penalty": 0.8}, {"repetition_penalty": 1.3, "frequency_penalty": 0.8}),
    ({"logit_bias": {30: 4.0, 9: -3.0}}, {"sequence_bias": [[[30], 4.0], [[9], -3.0]]}),
    ({"bad_words_token_ids": [[9], [50]]}, {"bad_words_ids": [[9], [50]]}),
]


@pytest.mark.parametrize("ours, theirs", CASES, ids=[str(case[0]) for case in CASES])
def test_greedy_with_sampling_params_matches_transformers_generate(llm, reference, ours, theirs):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, **ours)
    # One batch, plus a plain request beside them: the processors touch only their rows.
    plain = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS + [PROMPTS[0]], [params] * len(PROMPTS) + [plain], use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == _transformers_greedy(reference, prompt, **theirs), prompt
    assert outputs[-1].outputs[0].token_ids == llm.generate([PROMPTS[0]], plain, use_tqdm=False)[0].outputs[0].token_ids


def test_the_cases_above_change_the_output(llm):
    """Each case's params change what greedy decoding produces, so matching transformers means something."""
    base = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS),
                        use_tqdm=False)
    for ours, _ in CASES:
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, **ours)
        changed = llm.generate(PROMPTS, params, use_tqdm=False)
        assert any(a.outputs[0].token_ids != b.outputs[0].token_ids for a, b in zip(base, changed)), ours


def test_min_p_of_one_keeps_only_the_most_likely_token_as_transformers_does(llm, reference):
    """Sampling at min_p 1 can only pick the most likely token: transformers' sampling with its MinPLogitsWarper
    at 1 gives the same tokens, and so does greedy decoding."""
    sampled = SamplingParams(temperature=1.0, min_p=1.0, seed=2, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS,
                             presence_penalty=1.0)  # the penalty keeps the tokens varied
    outputs = llm.generate(PROMPTS, sampled, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        theirs = _transformers_greedy(reference, prompt, presence_penalty=1.0, do_sample=True, min_p=1.0, top_k=0,
                                      temperature=1.0)
        assert output.outputs[0].token_ids == theirs
        assert len(set(theirs)) > 1
    free = llm.generate(PROMPTS, dataclasses.replace(sampled, min_p=0.0), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in free] != [o.outputs[0].token_ids for o in outputs]


def test_min_tokens_holds_eos_back(llm):
    eager = SamplingParams(temperature=0, max_tokens=8, logit_bias={EOS: 100.0})
    assert llm.generate([[5, 6]], eager, use_tqdm=False)[0].outputs[0].token_ids == [EOS]
    held = llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=8, logit_bias={EOS: 100.0}, min_tokens=3),
                        use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) == 4 and held.token_ids[-1] == EOS and EOS not in held.token_ids[:3]
    assert (held.finish_reason, held.stop_reason) == ("stop", None)


def test_allowed_token_ids_and_bad_words(llm):
    allowed = SamplingParams(temperature=1.0, seed=3, max_tokens=30, ignore_eos=True, allowed_token_ids=[10, 11, 12])
    tokens = llm.generate([[5, 6]], allowed, use_tqdm=False)[0].outputs[0].token_ids
    assert set(tokens) <= {10, 11, 12} and len(set(tokens)) > 1
    seeded = SamplingParams(temperature=1.0, seed=8, max_tokens=8, ignore_eos=True)
    free = llm.generate([PROMPTS[1]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    # A two-token bad word whose first token appears first at index i: its second is banned at i + 1 only.
    i = next(i for i in range(1, 7) if free[i] not in free[:i])
    word = free[i:i + 2]
    banned = llm.generate([PROMPTS[1]], dataclasses.replace(seeded, bad_words_token_ids=[word]),
                          use_tqdm=False)[0].outputs[0]
    assert banned.token_ids[:i + 1] == free[:i + 1] and banned.token_ids[i + 1] != word[1]
    # A bad word as text, through the tokenizer ("w7" is token 9, whatever precedes it).
    text_banned = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                                  bad_words=["w7"]), use_tqdm=False)[0].outputs[0]
    assert 9 not in text_banned.token_ids and "w7" not in text_banned.text.split()


def test_logprobs_and_prompt_logprobs_match_transformers(llm, reference):
    prompt = PROMPTS[1]
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    output = llm.generate([prompt], params, use_tqdm=False)[0]
    completion = output.outputs[0]
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + completion.token_ids])).logits[0].double()
    expected = torch.log_softmax(logits, -1)  # the raw distribution: before temperature, as vLLM returns
    assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
    for position, entry in enumerate(output.prompt_logprobs[1:], 1):
        _check_position(entry, prompt[position], expected[position - 1], 2)
    assert len(completion.logprobs) == len(completion.token_ids)
    for index, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        _check_position(entry, token, expected[len(prompt) - 1 + index], 3)
    total = sum(expected[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion.token_ids))
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-3)
    plain = llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None and plain.outputs[0].logprobs is None
    assert plain.outputs[0].cumulative_logprob is None


def _check_position(entry, token: int, expected: torch.Tensor, num_top: int) -> None:
    """entry holds the chosen token first with its logprob and rank, then the num_top most likely tokens."""
    ids = list(entry)
    assert ids[0] == token
    assert entry[token].logprob == pytest.approx(expected[token].item(), abs=1e-4)
    assert entry[token].rank == 1 + (expected > expected[token] + 1e-9).sum().item()
    assert entry[token].decoded_token == f"w{token - 2}"
    top = expected.argsort(descending=True)[:num_top].tolist()
    assert set(ids[1:]) | {token} == set(top) | {token}
    for rank, top_token in enumerate(top, 1):
        assert entry[top_token].rank == rank or top_token == token


def test_prompt_logprobs_cover_a_prompt_already_in_the_prefix_cache(llm):
    prompt = list(range(40, 80))
    llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)  # caches the prompt's blocks
    first_step = len(llm.engine.step_records)
    output = llm.generate([prompt], SamplingParams(max_tokens=2, prompt_logprobs=0), use_tqdm=False)[0]
    assert all(entry is not None for entry in output.prompt_logprobs[1:])
    assert sum(step.num_prefill_tokens for step in llm.engine.step_records[first_step:]) == len(prompt)


# ---- n > 1, truncation, max_tokens None

def test_n_completions_share_one_prefill_of_the_prompt(llm):
    prompt = list(range(10, 50))  # 40 tokens: two full blocks of 16, and 8 more
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    first_step = len(llm.engine.step_records)
    output = llm.generate([prompt], params, use_tqdm=False)[0]
    steps = llm.engine.step_records[first_step:]
    # The first completion computes the prompt; the others find its full blocks cached and compute the rest.
    assert sum(step.num_prefill_tokens for step in steps) == 40 + 2 * 8
    assert sum(step.prefix_cache_hit_tokens for step in steps) == 2 * 32
    assert [c.index for c in output.outputs] == [0, 1, 2] and output.finished
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in output.outputs)
    assert len({tuple(c.token_ids) for c in output.outputs}) == 3
    # vLLM's seeds: completion i samples as a request of its own with seed + i.
    for completion in output.outputs:
        alone = SamplingParams(temperature=1.0, seed=5 + completion.index, max_tokens=6, ignore_eos=True)
        assert llm.generate([prompt], alone, use_tqdm=False)[0].outputs[0].token_ids == completion.token_ids


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    prompt = list(range(3, 23))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    truncated = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                      truncate_prompt_tokens=5), use_tqdm=False)[0]
    assert truncated.prompt_token_ids == prompt[-5:]
    assert truncated.outputs[0].token_ids == llm.generate([prompt[-5:]], params, use_tqdm=False)[0].outputs[0].token_ids


def test_max_tokens_none_generates_up_to_max_model_len(llm):
    output = llm.generate([[5] * 200], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert len(output.outputs[0].token_ids) == llm.engine_config.max_model_len - 200


# ---- chat and Hub ids

def test_chat_renders_the_tokenizer_chat_template(model_folder, tmp_path):
    folder = tmp_path / "chat-model"
    shutil.copytree(model_folder, folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}w0{% endif %}{% if extra %} w1{% endif %}")
    tokenizer.save_pretrained(folder)
    llm = LLM(str(folder), device="cpu")
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    conversation = [{"role": "w2", "content": "w3 w4"}, {"role": "w5", "content": "w6"}]
    output = llm.chat(conversation, greedy, use_tqdm=False)[0]
    assert output.prompt == "w2 w3 w4 w5 w6 w0"
    assert output.prompt_token_ids == [4, 5, 6, 7, 8, 2]
    same = llm.generate([output.prompt_token_ids], greedy, use_tqdm=False)[0]
    assert output.outputs[0].token_ids == same.outputs[0].token_ids
    both = llm.chat([conversation, conversation[:1]], greedy, use_tqdm=False, add_generation_prompt=False,
                    chat_template_kwargs={"extra": True})
    assert [o.prompt for o in both] == ["w2 w3 w4 w5 w6  w1", "w2 w3 w4  w1"]


def test_chat_without_a_template_names_the_conversation(llm):
    with pytest.raises(ValueError, match="conversation 0: .*chat.template"):
        llm.chat([{"role": "user", "content": "w3"}], use_tqdm=False)


def _fake_hub_cache(cache, repo_id: str, model_folder) -> None:
    """model_folder's files laid out as huggingface_hub caches a download of repo_id."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_folder, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")


def test_a_hub_id_resolves_from_the_local_cache(model_folder, tmp_path, monkeypatch):
    from simulator.model_shape import ModelShape

    _fake_hub_cache(tmp_path, "acme/tiny-chat", model_folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    llm = LLM("acme/tiny-chat", device="cpu")
    local = LLM(model_folder, device="cpu")
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    assert llm.tokenizer is not None
    assert llm.generate(["w3 w4"], greedy, use_tqdm=False)[0].outputs[0].text == \
        local.generate(["w3 w4"], greedy, use_tqdm=False)[0].outputs[0].text
    assert ModelShape.load("acme/tiny-chat").vocab_size == VOCAB  # the simulator's models too


def test_a_hub_id_not_in_the_cache_names_the_cache_and_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"not in the local Hugging Face cache \({tmp_path}.*hf download "
                                                r"Qwen/Qwen3-0.6B"):
        LLM("Qwen/Qwen3-0.6B", device="cpu")


def test_stop_strings_and_bad_words_need_a_tokenizer():
    llm = LLM("tiny-qwen3", device="cpu", max_model_len=64)
    with pytest.raises(ValueError, match="prompt 0.*stop strings \\['x'\\] need a tokenizer"):
        llm.generate([[1, 2]], SamplingParams(stop="x"), use_tqdm=False)
    with pytest.raises(ValueError, match="bad_words need a tokenizer"):
        llm.generate([[1, 2]], SamplingParams(bad_words=["x"]), use_tqdm=False)
    with pytest.raises(ValueError, match=r"logit_bias has token id\(s\) \[999999\] outside the vocabulary"):
        llm.generate([[1, 2]], SamplingParams(logit_bias={999999: 1.0}), use_tqdm=False)
    assert llm.engine.requests == {}  # nothing was queued


# ---- the same on CUDA: decode and mixed-step CUDA graphs, the triton backend, asynchronous scheduling

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mixed_cuda_graphs", [False, True])
def test_sampling_features_on_cuda_graphs_match_transformers(model_folder, reference, mixed_cuda_graphs):
    llm = LLM(model_folder, device="cuda", dtype="float32", attention_backend="triton", max_num_batched_tokens=16,
              max_num_seqs=8, mixed_cuda_graphs=mixed_cuda_graphs)
    for ours, theirs in CASES:
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, **ours)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        for prompt, output in zip(PROMPTS, outputs):
            assert output.outputs[0].token_ids == _transformers_greedy(reference, prompt, **theirs), (ours, prompt)
    assert any(step.cuda_graph_batch_size for step in llm.engine.step_records)
    # Logprobs of sampled tokens (decode graphs) and of a prompt split into chunks of 16 (eager or mixed graphs).
    prompt = list(range(30, 70))
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    output = llm.generate([prompt], params, use_tqdm=False)[0]
    completion = output.outputs[0]
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([prompt + completion.token_ids])).logits[0].double(), -1)
    for position, entry in enumerate(output.prompt_logprobs[1:], 1):
        _check_position(entry, prompt[position], expected[position - 1], 2)
    for index, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        _check_position(entry, token, expected[len(prompt) - 1 + index], 3)
    # n > 1 shares the prefill; seeded completions reproduce alone.
    first_step = len(llm.engine.step_records)
    fresh = list(range(80, 120))  # a prompt no earlier request cached
    shared = llm.generate([fresh], SamplingParams(n=2, seed=9, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert sum(step.num_prefill_tokens for step in llm.engine.step_records[first_step:]) == 40 + 8
    alone = llm.generate([fresh], SamplingParams(seed=10, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert shared.outputs[1].token_ids == alone.outputs[0].token_ids
    llm.shutdown()
