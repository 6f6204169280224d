"""An OpenAI request's sampling fields as the engine's SamplingParams, by the field names of vLLM's.

Every vLLM sampling field a request gives is passed on as it is; SamplingParams validates them, and its message
(which starts with the field's name) becomes a 400 naming that field. n is the engine's own: one engine request
of n completions sharing the prompt's prefill, completion i seeded with seed + i (vLLM's rule).
"""

import re

from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from twinfer.serving.api_error import bad_request
from twinfer.serving.protocol import ChatCompletionRequest, CompletionRequest

MAX_N = 128

# Request fields passed to SamplingParams under the same name whenever the request gives them (None: not given,
# SamplingParams' default applies).
_PASSED_ON = (
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "seed", "min_tokens", "ignore_eos", "stop", "stop_token_ids", "bad_words", "allowed_token_ids", "logit_bias",
    "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
)
_FIELD_NAME = re.compile(r"[a-z_]+")


def sampling_params(request: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
    """The request's SamplingParams, or a 400 naming the field that is out of range or not supported.

    max_tokens is the request's (chat: max_completion_tokens first); by default 16 for completions (OpenAI's)
    and None for chat, which the engine resolves to the rest of the context (vLLM's)."""
    _refuse_unsupported(request)
    if not 1 <= request.n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {request.n}", "n")
    kwargs = {name: getattr(request, name) for name in _PASSED_ON if getattr(request, name) is not None}
    max_tokens, max_tokens_param = max_tokens_of(request)
    kwargs["max_tokens"] = max_tokens
    logprobs, logprobs_param = _logprobs(request)
    kwargs["logprobs"] = logprobs
    prompt_logprobs = request.prompt_logprobs
    if prompt_logprobs is None and isinstance(request, CompletionRequest) and request.echo:
        prompt_logprobs = logprobs  # the echoed prompt's tokens get logprobs too (vLLM's rule)
    _check_logprobs_count(prompt_logprobs, "prompt_logprobs")
    kwargs["prompt_logprobs"] = prompt_logprobs
    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as error:
        field = _FIELD_NAME.match(str(error))
        param = field.group() if field else None
        param = {"max_tokens": max_tokens_param, "logprobs": logprobs_param}.get(param, param)
        raise bad_request(str(error), param if param in type(request).model_fields else None) from None


def max_tokens_of(request) -> tuple[int | None, str]:
    """The request's max_tokens and the field that gave it."""
    if isinstance(request, ChatCompletionRequest):
        if request.max_completion_tokens is not None:
            return request.max_completion_tokens, "max_completion_tokens"
        return request.max_tokens, "max_tokens"
    return (16 if request.max_tokens is None else request.max_tokens), "max_tokens"


def check_context(request, prompt_len: int, max_tokens: int | None, max_model_len: int) -> None:
    """A 400 in OpenAI's words when the prompt and the completion cannot fit the model's context."""
    wanted = max(max_tokens or 1, 1)
    if prompt_len + wanted <= max_model_len:
        return
    where = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
    raise bad_request(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_len + wanted} tokens ({prompt_len} in the {where}, {wanted} in the completion). Please reduce "
        f"the length of the {where} or completion.", max_tokens_of(request)[1])


def _refuse_unsupported(request) -> None:
    if isinstance(request, CompletionRequest):
        if request.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise bad_request(f"best_of must equal n ({request.n}) here; other values are not supported", "best_of")
    else:
        if request.tools:
            raise bad_request("tool calling is not supported", "tools")
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise bad_request("only the text response format is supported", "response_format")
    if request.stream and request.prompt_logprobs is not None:
        raise bad_request("prompt_logprobs are not available when stream is enabled", "prompt_logprobs")


def _logprobs(request) -> tuple[int | None, str]:
    """How many top alternatives each output token's logprobs list (0: only the sampled token), or None."""
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        value, param = (request.top_logprobs or 0) if request.logprobs else None, "top_logprobs"
    else:
        value, param = request.logprobs, "logprobs"
    _check_logprobs_count(value, param)
    return value, param


def _check_logprobs_count(value: int | None, param: str) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise bad_request(f"{param} must be between 0 and {MAX_LOGPROBS}, got {value}", param)
