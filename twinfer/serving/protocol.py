"""The OpenAI API's request bodies (completions and chat completions), with vLLM's extra sampling fields.

Unknown fields are ignored, as vLLM does (clients send fields of newer API versions); the few this server
cannot honour (suffix, tools, structured output) are refused by request_sampling with a 400 naming them.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

NonNegativeInt = Annotated[int, Field(ge=0)]


class StreamOptions(BaseModel):
    """What a stream adds: include_usage sends a last chunk with the token counts."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM's: usage on every chunk."""


class SamplingFields(BaseModel):
    """Fields both endpoints share: OpenAI's, then vLLM's extensions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[NonNegativeInt] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[NonNegativeInt] | None = None
    prompt_logprobs: int | None = None
    """Log-probabilities of the prompt's tokens too (returned as prompt_logprobs; not with stream)."""
    truncate_prompt_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False
    """Name each token of the logprobs "token_id:ID" rather than by its text."""
    return_token_ids: bool = False
    """Add prompt_token_ids and each choice's token_ids to the response (vLLM's, for clients that count tokens)."""


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    # Token ids first and tried in order: pydantic's default (smart) union tries every member in two modes,
    # 0.2-0.4 ms for a 1,200-token prompt on every request; in order, 0.013 ms. Strict ints, so ["1", "2"]
    # stays two text prompts and true is no token id.
    prompt: Annotated[list[StrictInt] | str | list[str] | list[list[StrictInt]], Field(union_mode="left_to_right")]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    """A text part of a message's content; other kinds (images, audio) are refused."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None
    add_generation_prompt: bool = True
    """vLLM's: end the prompt with the template's assistant header."""
