"""Offline batched generation in the manner of vLLM v0.11's LLM class: prompts or chats in, RequestOutputs out,
in order."""

import warnings
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import torch

from engine.engine import Engine
from engine.engine_args import EngineArgs, build_real_engine
from engine.model_config import load_model_config
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import load_tokenizer

CPU_DEFAULT_MAX_MODEL_LEN = 4096


class LLM:
    """A model with its KV cache and scheduler, ready to generate.

    model is a local Hugging Face folder (config.json, *.safetensors, tokenizer files when present), a Hub id
    found in the local Hugging Face cache (Qwen/Qwen3-0.6B), or a bundled preset name (qwen3-0.6b, qwen3-8b,
    llama-3-8b, qwen3-32b) run with dummy weights.
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
        self.tokenizer = load_tokenizer(args.tokenizer or args.model)
        self.engine.tokenizer = self.tokenizer
        self._next_request = 0

    def get_tokenizer(self):
        """The model's tokenizer (None for a preset or a folder without tokenizer files)."""
        return self.tokenizer

    def _prompt_ids(self, index: int, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):  # vLLM's TextPrompt / TokensPrompt
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(f"prompt {index} is a dict without 'prompt' or 'prompt_token_ids'")
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
        """Complete every prompt (strings, token-id lists, or vLLM's {"prompt": ...} / {"prompt_token_ids": ...}
        dicts); one RequestOutput per prompt, in input order."""
        if isinstance(prompts, np.ndarray):
            if prompts.ndim != 1:
                raise TypeError(f"prompts is a {prompts.ndim}-D array of shape {prompts.shape}; pass one prompt as a "
                                "1-D array or list of token ids, or several as a list of them")
            prompts = [prompts]
        elif isinstance(prompts, (str, dict)) or (
                isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        prompts = list(prompts)
        return self._run([self._prompt_ids(index, prompt) for index, prompt in enumerate(prompts)],
                         sampling_params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages) or a list of them, each
        rendered by the tokenizer's chat template (or chat_template); one RequestOutput per conversation."""
        if self.tokenizer is None:
            raise ValueError(f"chat needs a tokenizer and model {self.model_config.source!r} has none")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        requests = []
        for index, conversation in enumerate(conversations):
            try:
                text = self.tokenizer.apply_chat_template(
                    conversation, tokenize=False, chat_template=chat_template,
                    add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                    **(chat_template_kwargs or {}))
            except ValueError as error:
                raise ValueError(f"conversation {index}: {error}") from None
            # The template writes the special tokens (BOS, role markers) itself.
            requests.append((text, list(self.tokenizer.encode(text, add_special_tokens=False))))
        return self._run(requests, sampling_params, use_tqdm)

    def _run(self, requests: list[tuple[str | None, list[int]]], sampling_params,
             use_tqdm: bool) -> list[RequestOutput]:
        """Check every request before queueing any, run the engine until all finish, return their outputs."""
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, (list, tuple)):
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(requests)
        if len(params) != len(requests):
            raise ValueError(f"got {len(params)} sampling params for {len(requests)} prompts")
        engine = self.engine
        max_len = self.engine_config.max_model_len
        for index, ((_, ids), param) in enumerate(zip(requests, params)):
            if not ids:
                raise ValueError(f"prompt {index} is empty")
            if param.truncate_prompt_tokens is not None:
                ids = engine.truncate_prompt(ids, param)
            resolved = engine.resolve_sampling_params(param, len(ids), f"prompt {index}")
            if len(ids) + resolved.max_tokens > max_len:
                raise ValueError(
                    f"prompt {index} has {len(ids)} tokens; with max_tokens {resolved.max_tokens} that exceeds "
                    f"max_model_len {max_len}"
                )

        request_ids = []
        try:
            for (text, ids), param in zip(requests, params):
                request_ids.append(engine.add_request(prompt_token_ids=ids, sampling_params=param,
                                                      request_id=f"llm-{self._next_request}", prompt=text))
                self._next_request += 1
            self._run_engine(request_ids, use_tqdm)
        except BaseException:
            # Ctrl-C or an error: this call's requests are dropped with their KV blocks, so the next call
            # starts as on a fresh LLM (vLLM's LLM aborts the requests it added when adding fails).
            self.abort(request_ids)
            raise

        records = engine.request_records
        outputs = []
        for index, request_id in enumerate(request_ids):
            record = records.get(request_id)
            if record is not None and record.status == "rejected":
                # It can never be served (the whole KV cache is too small for it); the others were.
                warnings.warn(f"prompt {index} was rejected: {record.reason}", RuntimeWarning, stacklevel=3)
                outputs.append(_rejected_output(request_id, requests[index], params[index], record))
                continue
            children = engine.parents.get(request_id)
            for child_id in [seq.request_id for seq in children] if children else [request_id]:
                record = records[child_id]
                if record.status != "finished":
                    raise RuntimeError(f"prompt {index} was not served ({record.status}): {record.reason}")
            outputs.append(engine.request_output(request_id))
        return outputs

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> None:
        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(request_ids), desc="Generating", unit="req", dynamic_ncols=True)
        engine = self.engine
        groups = []
        for request_id in request_ids:
            seq = engine.sequences.get(request_id)
            groups.append(engine.parents.get(request_id) or ([seq] if seq is not None else []))
        done = 0

        def on_step(engine: Engine) -> None:
            nonlocal done
            finished = sum(1 for group in groups if all(seq.is_finished for seq in group))
            if progress is not None and finished > done:
                progress.update(finished - done)
            done = finished

        try:
            engine.run(on_step=on_step)
        finally:
            if progress is not None:
                progress.close()

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


def _rejected_output(request_id: str, request: tuple[str | None, list[int]], params: SamplingParams,
                     record) -> RequestOutput:
    """The output of a prompt the engine rejected: finished, with no tokens and finish_reason "rejected"."""
    text, ids = request
    outputs = [CompletionOutput(index, "", [], None, None, "rejected") for index in range(params.n)]
    metrics = RequestMetrics(record.arrival_time, None, None, None, record.arrival_time)
    return RequestOutput(request_id, text, list(ids), None, outputs, True, metrics)
