"""An OpenAI request's sampling fields as the engine's SamplingParams, by the field names of vLLM's.

A field is passed on when SamplingParams has a field of its vLLM name; a request that sets one to a value
other than its neutral default while SamplingParams lacks it is refused with a 400 naming the field, rather
than silently served without it. `n` is not passed on: the server runs n requests (choices), as vLLM does,
each with seed + index when a seed is given.
"""

import dataclasses
from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from twinfer.serving.api_error import bad_request
from twinfer.serving.protocol import ChatCompletionRequest, CompletionRequest

MAX_N = 128
MAX_LOGPROBS = 20

# (request field, SamplingParams field by vLLM's name, the value that changes nothing). Fields whose neutral
# value is None are passed on whenever given.
_OPTIONAL_FIELDS = (
    ("top_k", "top_k", None),
    ("min_p", "min_p", 0.0),
    ("presence_penalty", "presence_penalty", 0.0),
    ("frequency_penalty", "frequency_penalty", 0.0),
    ("repetition_penalty", "repetition_penalty", 1.0),
    ("min_tokens", "min_tokens", 0),
    ("seed", "seed", None),
    ("ignore_eos", "ignore_eos", False),
    ("include_stop_str_in_output", "include_stop_str_in_output", False),
)


@dataclass(frozen=True)
class ChoiceSampling:
    """How to sample every choice of one request."""

    params: SamplingParams
    """Choice 0's; choice i differs only by seed + i."""
    n: int
    logprobs: int | None
    """How many top alternatives to return per token (0: only the sampled token's); None: no logprobs."""

    def for_choice(self, index: int) -> SamplingParams:
        """The params of choice `index`: a different seed for each when a seed is given (vLLM's rule)."""
        if index == 0 or self.params.seed is None:
            return self.params
        return dataclasses.replace(self.params, seed=self.params.seed + index)


def supported_fields() -> frozenset[str]:
    """The vLLM sampling fields this engine's SamplingParams has."""
    return frozenset(field.name for field in dataclasses.fields(SamplingParams))


def choice_sampling(request: CompletionRequest | ChatCompletionRequest, *, prompt_len: int,
                    max_model_len: int) -> ChoiceSampling:
    """The request's SamplingParams, or a 400 naming the field that is out of range or not supported."""
    supported = supported_fields()
    _refuse_unsupported(request)
    if not 1 <= request.n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {request.n}", "n")
    max_tokens, max_tokens_param = _max_tokens(request, prompt_len, max_model_len)
    kwargs: dict = {"max_tokens": max_tokens}
    if request.temperature is not None:
        kwargs["temperature"] = request.temperature
    if request.top_p is not None:
        kwargs["top_p"] = request.top_p
    for name, field, neutral in _OPTIONAL_FIELDS:
        value = getattr(request, name)
        if value is None or value == neutral:
            continue
        if field not in supported:
            raise bad_request(f"{name} is not supported by this server's engine", name)
        kwargs[field] = value
    if request.stop_token_ids:
        kwargs["stop_token_ids"] = tuple(request.stop_token_ids)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if stop:
        if "stop" not in supported:
            raise bad_request("stop strings are not supported by this server's engine", "stop")
        kwargs["stop"] = stop
    if request.logit_bias:
        if "logit_bias" not in supported:
            raise bad_request("logit_bias is not supported by this server's engine", "logit_bias")
        try:
            kwargs["logit_bias"] = {int(token): float(bias) for token, bias in request.logit_bias.items()}
        except ValueError:
            raise bad_request("logit_bias keys must be token ids", "logit_bias") from None
    logprobs, logprobs_param = _logprobs(request)
    if logprobs is not None:
        if "logprobs" not in supported:
            raise bad_request("logprobs are not supported by this server's engine", logprobs_param)
        kwargs["logprobs"] = logprobs
    if "skip_special_tokens" in supported:
        kwargs["skip_special_tokens"] = request.skip_special_tokens
    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError) as error:
        # SamplingParams' messages begin with the field's name.
        field = str(error).split(" ", 1)[0]
        raise bad_request(str(error), max_tokens_param if field == "max_tokens" else field) from None
    return ChoiceSampling(params, request.n, logprobs)


def _refuse_unsupported(request) -> None:
    if isinstance(request, CompletionRequest):
        if request.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise bad_request(f"best_of must equal n ({request.n}) here; other values are not supported", "best_of")
        if request.echo and request.logprobs is not None:
            raise bad_request("echo with logprobs (prompt logprobs) is not supported", "echo")
    else:
        if request.tools:
            raise bad_request("tool calling is not supported", "tools")
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise bad_request("only the text response format is supported", "response_format")


def _max_tokens(request, prompt_len: int, max_model_len: int) -> tuple[int, str]:
    """max_tokens (chat: max_completion_tokens first); by default 16 for completions (OpenAI's) and the rest
    of the context for chat (vLLM's)."""
    param = "max_tokens"
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        max_tokens, param = request.max_completion_tokens, "max_completion_tokens"
    elif request.max_tokens is not None:
        max_tokens = request.max_tokens
    else:
        max_tokens = 16 if isinstance(request, CompletionRequest) else max_model_len - prompt_len
    where = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
    if prompt_len + max(max_tokens, 1) > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max(max_tokens, 1)} tokens ({prompt_len} in the {where}, {max(max_tokens, 1)} in the "
            f"completion). Please reduce the length of the {where} or completion.", param)
    return max_tokens, param


def _logprobs(request) -> tuple[int | None, str]:
    if isinstance(request, ChatCompletionRequest):
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        value, param = (request.top_logprobs or 0) if request.logprobs else None, "top_logprobs"
    else:
        value, param = request.logprobs, "logprobs"
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise bad_request(f"{param} must be between 0 and {MAX_LOGPROBS}, got {value}", param)
    return value, param

