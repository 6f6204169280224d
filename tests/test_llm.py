"""The LLM API on CPU: token ids and strings in, completions out in order, clear errors."""

import pytest
import torch

from engine import LLM, SamplingParams

transformers = pytest.importorskip("transformers")
VOCAB = 128


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny Qwen3 with a word-level tokenizer, saved like a Hugging Face model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=256, eos_token_id=1, tie_word_embeddings=True)
    model = transformers.Qwen3ForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    model.save_pretrained(folder, safe_serialization=True)
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(folder)
    return str(folder)


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
    crowded = llm.generate([[7] * 30, [3, 4, 5], [9, 9]], [other, params, other], use_tqdm=False)[1].outputs[0].token_ids
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
