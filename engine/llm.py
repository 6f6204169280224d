"""Offline batched generation in the manner of vLLM's LLM class: prompts in, completions out, in order."""

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from engine.engine import Engine
from engine.engine_args import EngineArgs, build_real_engine
from engine.model_config import is_preset, load_model_config
from engine.sampling_params import SamplingParams

CPU_DEFAULT_MAX_MODEL_LEN = 4096


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One prompt's completion."""

    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    """stop or length, as vLLM's; "rejected" for a prompt that the whole KV cache cannot hold (no tokens)."""


class LLM:
    """A model with its KV cache and scheduler, ready to generate.

    model is a local Hugging Face folder (config.json, *.safetensors, tokenizer files when present) or a
    bundled preset name (qwen3-0.6b, qwen3-8b, llama-3-8b, qwen3-32b) run with dummy weights.
    """

    def __init__(self, model: str, **kwargs) -> None:
        """kwargs are EngineArgs' fields, by vLLM's names. Two defaults are the LLM's own: max_model_len is the
        model's whole max_position_embeddings (as vLLM's; at most 4096 on a CPU), where the CLI caps it at 32768;
        and async_scheduling is EngineArgs' (on at tensor_parallel_size 1), where the CLI's is off."""
        args = EngineArgs(model=model, **kwargs)
        model_config = load_model_config(args.model)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        max_model_len = args.max_model_len
        if max_model_len is None:
            max_model_len = model_config.max_position_embeddings
            if torch.device(device).type != "cuda":
                max_model_len = min(max_model_len, CPU_DEFAULT_MAX_MODEL_LEN)
        self.engine_args = replace(args, device=device, max_model_len=max_model_len)
        self.engine = build_real_engine(self.engine_args)
        self.engine_config = self.engine.config
        self.executor = self.engine.executor
        self.model_config = model_config
        self.tokenizer = self._load_tokenizer(args.tokenizer or args.model)
        self._next_request = 0

    @staticmethod
    def _load_tokenizer(model: str):
        if is_preset(model) or not Path(model).is_dir():
            return None
        folder = Path(model)
        if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))

    def _prompt_ids(self, index: int, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"prompt {index} is a string but model {self.model_config.source!r} has no tokenizer; "
                    "pass lists of token ids instead"
                )
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, np.ndarray) and prompt.ndim != 1:
            raise TypeError(f"prompt {index} is a {prompt.ndim}-D array of shape {prompt.shape}; a prompt of token "
                            "ids is 1-D (pass a list of 1-D prompts for a batch)")
        if not isinstance(prompt, (list, tuple, np.ndarray)):
            raise TypeError(f"prompt {index} must be a string or a list of token ids, got {type(prompt).__name__}")
        if isinstance(prompt, np.ndarray) and prompt.dtype.kind not in "iu":
            raise TypeError(f"prompt {index} is an array of {prompt.dtype}; token ids must be integers")
        # Floats are refused, not truncated, and bools are not token ids even though Python counts them as ints.
        for position, token in enumerate(() if isinstance(prompt, np.ndarray) else prompt):
            if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
                raise TypeError(f"prompt {index} has {token!r} ({type(token).__name__}) at position {position}; "
                                "token ids must be integers")
        ids = [int(token) for token in prompt]
        vocab = self.model_config.vocab_size
        bad = [token for token in ids if not 0 <= token < vocab]
        if bad:
            raise ValueError(f"prompt {index} has token id {bad[0]} outside the vocabulary [0, {vocab})")
        return None, ids

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt (strings or token-id lists); outputs come back in input order."""
        if isinstance(prompts, np.ndarray):
            if prompts.ndim != 1:
                raise TypeError(f"prompts is a {prompts.ndim}-D array of shape {prompts.shape}; pass one prompt as a "
                                "1-D array or list of token ids, or several as a list of them")
            prompts = [prompts]
        elif isinstance(prompts, str) or (
                isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        max_len = self.engine_config.max_model_len
        requests = []
        for index, (prompt, param) in enumerate(zip(prompts, params)):
            text, ids = self._prompt_ids(index, prompt)
            if not ids:
                raise ValueError(f"prompt {index} is empty")
            if len(ids) + param.max_tokens > max_len:
                raise ValueError(
                    f"prompt {index} has {len(ids)} tokens; with max_tokens {param.max_tokens} that exceeds "
                    f"max_model_len {max_len}"
                )
            requests.append((text, ids, param))

        request_ids = []
        progress = None
        try:
            for text, ids, param in requests:
                request_ids.append(self.engine.add_request(
                    prompt_token_ids=ids, sampling_params=param, request_id=f"llm-{self._next_request}"))
                self._next_request += 1
            if use_tqdm:
                from tqdm.auto import tqdm

                progress = tqdm(total=len(requests), desc="Generating", unit="req", dynamic_ncols=True)
            sequences = [self.engine.sequences.get(rid) for rid in request_ids]
            done = 0

            def on_step(engine: Engine) -> None:
                nonlocal done
                finished = sum(1 for seq in sequences if seq is not None and seq.is_finished)
                if progress is not None and finished > done:
                    progress.update(finished - done)
                done = finished

            self.engine.run(on_step=on_step)
        except BaseException:
            # Ctrl-C or an error: this call's requests are dropped with their KV blocks, so the next call
            # starts as on a fresh LLM.
            self.abort(request_ids)
            raise
        finally:
            if progress is not None:
                progress.close()

        records = self.engine.request_records
        outputs = []
        for index, (rid, (text, ids, _)) in enumerate(zip(request_ids, requests)):
            record = records[rid]
            if record.status == "rejected":
                # It can never be served (the whole KV cache is too small for it); the others were.
                warnings.warn(f"prompt {index} was rejected: {record.reason}", RuntimeWarning, stacklevel=2)
                outputs.append(RequestOutput(index, text, ids, [], None, "rejected"))
                continue
            if record.status != "finished":
                raise RuntimeError(f"prompt {index} was not served ({record.status}): {record.reason}")
            token_ids = list(self.engine.output_token_ids(rid))
            completion = self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer else None
            outputs.append(RequestOutput(index, text, ids, token_ids, completion, record.reason))
        return outputs

    def abort(self, request_ids: str | Iterable[str]) -> None:
        """Abort requests by id (one or several; those unknown or finished are ignored), freeing their KV blocks."""
        self.engine.abort(request_ids)

    def shutdown(self) -> None:
        """Release worker processes (tensor parallelism)."""
        self.executor.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
