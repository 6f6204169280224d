"""EngineArgs: bad settings fail where they are given, naming the field; flags and keywords make the same engine."""

import dataclasses
import json

import pytest

from engine.engine_args import EngineArgs, build_real_engine
from engine.model_config import PRESETS_DIR, load_model_config
from simulator.simulated_engine import build_simulated_engine
from twinfer.cli import build_parser, main
from twinfer.cli.options import engine_args_from


@pytest.mark.parametrize("field, value, message", [
    ("tensor_parallel_size", 0, "tensor_parallel_size must be a positive integer, got 0"),
    ("max_num_seqs", 0, "max_num_seqs must be a positive integer or None, got 0"),
    ("max_num_batched_tokens", -8, "max_num_batched_tokens must be a positive integer or None, got -8"),
    ("max_model_len", 1.5, "max_model_len must be a positive integer or None, got 1.5"),
    ("num_gpu_blocks_override", 0, "num_gpu_blocks_override must be a positive integer or None, got 0"),
    ("block_size", True, "block_size must be a positive integer, got True"),
    ("gpu_memory_utilization", 1.5, r"gpu_memory_utilization must be in \(0, 1\], got 1.5"),
    ("load_format", "pt", "load_format 'pt' is unknown; choose one of auto, safetensors, dummy"),
    ("attention_backend", "flashinfer", "attention_backend 'flashinfer' is unknown"),
    ("model", "", "model must name a model folder or preset"),
])
def test_a_bad_setting_is_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**{"model": "qwen3-0.6b", field: value})


def test_asynchronous_scheduling_with_tensor_parallelism_is_refused_for_every_executor():
    with pytest.raises(ValueError, match="async_scheduling needs tensor_parallel_size 1 .got 2."):
        EngineArgs(model="qwen3-0.6b", tensor_parallel_size=2, async_scheduling=True)
    # Left to its default, it is on at TP 1 and off above.
    config = load_model_config("qwen3-0.6b")
    assert EngineArgs(model="qwen3-0.6b").engine_config(config, gpu_memory_gib=80).async_scheduling
    assert not EngineArgs(model="qwen3-0.6b", tensor_parallel_size=2).engine_config(
        config, gpu_memory_gib=80).async_scheduling


def test_unset_limits_are_vllms_for_the_gpu_and_the_context_is_capped():
    config = load_model_config("qwen3-0.6b")  # 40960 positions
    args = EngineArgs(model="qwen3-0.6b")
    h100 = args.engine_config(config, gpu_memory_gib=80)
    small = args.engine_config(config, gpu_memory_gib=24)
    assert (h100.max_num_seqs, h100.max_num_batched_tokens) == (1024, 8192)
    assert (small.max_num_seqs, small.max_num_batched_tokens) == (256, 2048)
    assert h100.max_model_len == 32768
    unchunked = dataclasses.replace(args, enable_chunked_prefill=False).engine_config(config, gpu_memory_gib=80)
    assert unchunked.max_num_batched_tokens == 32768  # every prompt fits one step


def test_the_cli_refuses_a_bad_flag_before_simulating(tmp_path, capsys):
    assert main(["simulate", "demo", "--model", "qwen3-0.6b", "--max-num-seqs", "0", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 2
    assert "max_num_seqs must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_llm_refuses_a_bad_keyword_before_loading_the_model():
    from engine.llm import LLM

    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer, got 0"):
        LLM("tiny-qwen3", device="cpu", tensor_parallel_size=0)
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM("tiny-qwen3", device="cpu", max_num_seq=8)


ENGINE_FLAGS = ["--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "128", "--block-size",
                "32", "--no-enable-prefix-caching", "--num-gpu-blocks-override", "64", "--load-format", "dummy",
                "--seed", "3"]
SAME_KEYWORDS = dict(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=128, block_size=32,
                     enable_prefix_caching=False, num_gpu_blocks_override=64, load_format="dummy", seed=3,
                     async_scheduling=False)


def test_cli_flags_and_llm_keywords_make_the_same_engine():
    """`twinfer replay --executor cpu` with these flags runs the engine LLM(...) builds with the same keywords
    (async_scheduling given: the CLI's default is off, LLM's on)."""
    from engine.llm import LLM

    args = build_parser().parse_args(["replay", "trace.csv", "--executor", "cpu", "--model", "tiny-qwen3", "--out", "x",
                                      *ENGINE_FLAGS])
    from_flags = engine_args_from(args, device="cpu")
    llm = LLM("tiny-qwen3", device="cpu", **SAME_KEYWORDS)
    assert from_flags == llm.engine_args
    assert build_real_engine(from_flags).config == llm.engine_config
    assert llm.engine_config.block_size == 32 and not llm.engine_config.enable_prefix_caching
    assert llm.engine.block_manager.num_blocks == 64


def test_cli_flags_and_keywords_make_the_same_simulated_engine():
    args = build_parser().parse_args(["simulate", "demo", "--model", "qwen3-0.6b", "--out", "unused", *ENGINE_FLAGS])
    from_flags, _ = build_simulated_engine(engine_args_from(args), gpu="h100")
    from_keywords, _ = build_simulated_engine(EngineArgs(model="qwen3-0.6b", **SAME_KEYWORDS), gpu="h100")
    assert from_flags.config == from_keywords.config
    assert from_flags.config.max_num_seqs == 8 and from_flags.block_manager.num_blocks == 64


def test_llm_defaults_are_its_own_where_the_cli_differs(tmp_path):
    """LLM serves the model's whole context (at most 4096 tokens on a CPU) and schedules asynchronously at TP 1;
    the CLI caps the context at 32768 tokens and schedules synchronously unless told."""
    from engine.llm import LLM

    config = json.loads((PRESETS_DIR / "tiny-qwen3.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    llm = LLM(str(tmp_path), device="cpu", load_format="dummy")
    assert llm.engine_config.max_model_len == 4096 and llm.engine_config.async_scheduling
    args = build_parser().parse_args(["replay", "trace.csv", "--executor", "cpu", "--model", str(tmp_path),
                                      "--out", "x"])
    cli = engine_args_from(args, device="cpu").engine_config(load_model_config(str(tmp_path)), gpu_memory_gib=None)
    assert cli.max_model_len == 8192 and not cli.async_scheduling
