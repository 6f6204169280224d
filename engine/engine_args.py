"""EngineArgs: every setting of an engine, by vLLM's names, and the one way from flags or keywords to an engine.

The CLI maps its options onto one EngineArgs, `LLM(model, **kwargs)` builds one from its keywords, and the
builders of the real and the simulated engine take one; each derives the scheduler's EngineConfig from it.
Defaults are vLLM's except where a field's note says otherwise.
"""

import json
import os
from dataclasses import dataclass

from engine.config import EngineConfig, default_max_model_len, vllm_default_limits
from engine.model_config import ModelConfig, model_folder

LOAD_FORMATS = ("auto", "safetensors", "dummy")
ATTENTION_BACKENDS = ("auto", "triton", "flash-attn", "torch")


@dataclass(frozen=True, slots=True)
class EngineArgs:
    """How to build an engine of any executor; validated here, so a bad value fails before anything loads."""

    model: str
    """A Hugging Face model folder, a Hub id in the local Hugging Face cache (Qwen/Qwen3-0.6B), or a bundled
    preset name (qwen3-0.6b, qwen3-8b, ...)."""
    tokenizer: str | None = None
    """None: the model's folder."""
    dtype: str = "auto"
    """"auto": the checkpoint's on CUDA, float32 on CPU; the simulator reads it as bfloat16."""
    seed: int = 0
    block_size: int = 16
    max_model_len: int | None = None
    """None: the model's max_position_embeddings capped at 32768 (vLLM: not capped)."""
    max_num_seqs: int | None = None
    """None: as vLLM picks it for an online server on this GPU (vllm_default_limits)."""
    max_num_batched_tokens: int | None = None
    """None: as vLLM picks it for an online server on this GPU; without chunked prefill at least max_model_len."""
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_gpu_blocks_override: int | None = None
    """Force the KV block count; None: as many as gpu_memory_utilization leaves room for."""
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    async_scheduling: bool | None = None
    """Schedule the next step while one runs. None: on at tensor_parallel_size 1, where only rank 0 holds the
    samples the next step reads, off above (vLLM: on wherever it supports it)."""
    load_format: str = "auto"
    """"dummy": random weights of the checkpoint's names and shapes (how every figure here is measured)."""
    attention_backend: str = "auto"
    mixed_cuda_graphs: bool | None = None
    """twinfer's: also run steps with prompt chunks as CUDA graphs. None: on at tensor_parallel_size 1 with the
    triton backend, unless enforce_eager."""
    device: str | None = None
    """None: cuda when there is a GPU, else cpu (vLLM picks its platform itself)."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise ValueError(f"model must name a model folder or preset, got {self.model!r}")
        object.__setattr__(self, "model", os.fspath(self.model))
        for name in ("block_size", "tensor_parallel_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks_override"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name), "or None")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format {self.load_format!r} is unknown; choose one of {', '.join(LOAD_FORMATS)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend {self.attention_backend!r} is unknown; choose one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError(
                f"async_scheduling needs tensor_parallel_size 1 (got {self.tensor_parallel_size}): only rank 0 "
                "holds the samples the next step reads; turn it off (--no-async-scheduling)"
            )

    def engine_config(self, model_config: ModelConfig, *, gpu_memory_gib: float | None) -> EngineConfig:
        """The scheduler's EngineConfig for this model on a GPU of this much memory (None: a CPU or unknown)."""
        max_model_len = self.max_model_len or default_max_model_len(model_config.max_position_embeddings)
        if model_config.max_position_embeddings and max_model_len > model_config.max_position_embeddings:
            # As vLLM, and as the real engine refuses it: positions beyond the model's are not simulated either.
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings "
                             f"({model_config.max_position_embeddings}, {model_config.source})")
        default_seqs, default_tokens = vllm_default_limits(gpu_memory_gib)
        max_num_batched_tokens = self.max_num_batched_tokens
        if max_num_batched_tokens is None:
            # Without chunking every prompt must fit one step; an explicit smaller budget is EngineConfig's error.
            max_num_batched_tokens = default_tokens
            if not self.enable_chunked_prefill:
                max_num_batched_tokens = max(default_tokens, max_model_len)
        async_scheduling = self.async_scheduling
        if async_scheduling is None:
            async_scheduling = self.tensor_parallel_size == 1
        return EngineConfig(
            block_size=self.block_size,
            max_model_len=max_model_len,
            max_num_seqs=self.max_num_seqs or default_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
            enable_chunked_prefill=self.enable_chunked_prefill,
            num_kv_blocks=self.num_gpu_blocks_override,
            eos_token_ids=tuple(dict.fromkeys(model_config.eos_token_ids + _generation_eos_ids(self.model))),
            vocab_size=model_config.vocab_size,
            async_scheduling=async_scheduling,
        )


def build_real_engine(args: EngineArgs):
    """An Engine over the real model executor (GPU or CPU) with a wall clock."""
    import torch

    from engine.clock import WallClock
    from engine.engine import Engine
    from engine.model_config import load_model_config
    from engine.model_executor import ModelExecutor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        why = "torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"device {device!r} needs a CUDA GPU, and {why}; run on the CPU (device 'cpu', "
                         "--executor cpu) or simulate (--executor sim)")
    gpu_memory_gib = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30 if on_cuda else None
    config = args.engine_config(load_model_config(args.model), gpu_memory_gib=gpu_memory_gib)
    executor = ModelExecutor(
        args.model,
        config,
        dtype=args.dtype,
        device=device,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        attention_backend=args.attention_backend,
        load_format=args.load_format,
        seed=args.seed,
        mixed_cuda_graphs=args.mixed_cuda_graphs,
    )
    return Engine(config, executor, WallClock())


def _check_positive_int(name: str, value, alternative: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' ' + alternative if alternative else ''}, got {value!r}")


def _generation_eos_ids(model: str) -> tuple[int, ...]:
    """EOS ids from generation_config.json when the model folder has one (chat models list several)."""
    folder = model_folder(model)
    if folder is None:
        return ()
    path = folder / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
