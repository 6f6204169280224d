"""The generation endpoints: a request's prompts become engine requests, and their completions come back as
an OpenAI completion or chat completion, whole or streamed as server-sent events (openai_response).

Each prompt is one engine request of n completions (the engine's n: they share the prompt's prefill); choice
index = prompt index * n + completion index, as vLLM numbers them. A client that goes away aborts every
request still running, which frees its KV blocks.
"""

import asyncio
import uuid

from fastapi import Request

from twinfer.serving.api_error import APIError, bad_request
from twinfer.serving.engine_driver import EngineDriver, EngineUnavailable
from twinfer.serving.openai_response import OpenAIResponse, Prompt, streaming_response
from twinfer.serving.protocol import ChatCompletionRequest, CompletionRequest
from twinfer.serving.request_sampling import check_context, sampling_params


class OpenAIServing:
    """Serves /v1/completions and /v1/chat/completions on one engine driver."""

    def __init__(self, driver: EngineDriver, tokenizer, *, model_name: str, max_model_len: int, vocab_size: int,
                 chat_template: str | None = None, max_concurrent_requests: int | None = None) -> None:
        self.driver = driver
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.chat_template = chat_template
        self.max_concurrent_requests = max_concurrent_requests
        self.num_in_flight = 0
        """HTTP generation requests being served now (each of any number of choices)."""

    def check_model(self, model: str) -> None:
        """404 unless the request names the served model."""
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    # ---- prompts

    def _token_ids(self, ids: list[int], param: str) -> list[int]:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):  # in C: a Python loop cost 0.1 ms a prompt
            bad = next(token for token in ids if not 0 <= token < self.vocab_size)
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param)
        return ids

    def _encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise bad_request(f"model {self.model_name!r} has no tokenizer: send the prompt as token ids", param)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def completion_prompts(self, prompt) -> list[Prompt]:
        """The prompts of a completion request: a string, a list of strings, token ids, or lists of them."""
        if isinstance(prompt, str):
            prompts = [Prompt(prompt, self._encode(prompt, "prompt"))]
        elif prompt and isinstance(prompt[0], int):  # the request's validation made the list all ints
            prompts = [Prompt(None, self._token_ids(list(prompt), "prompt"))]
        else:
            prompts = [Prompt(item, self._encode(item, "prompt")) if isinstance(item, str)
                       else Prompt(None, self._token_ids(list(item), "prompt")) for item in prompt]
        if not prompts or any(not item.token_ids for item in prompts):
            raise bad_request("the prompt is empty", "prompt")
        return prompts

    def chat_prompt(self, request: ChatCompletionRequest) -> Prompt:
        """The conversation as the chat template renders it, tokenized."""
        if self.tokenizer is None:
            raise bad_request(f"model {self.model_name!r} has no tokenizer, which chat needs; use /v1/completions "
                              "with token ids", "messages")
        messages = []
        for index, message in enumerate(request.messages):
            content = message.content
            if isinstance(content, list):
                if any(part.type != "text" for part in content):
                    kinds = sorted({part.type for part in content if part.type != "text"})
                    raise bad_request(f"messages[{index}] has content of type {', '.join(kinds)}; only text is "
                                      "supported", "messages")
                content = "".join(part.text or "" for part in content)
            messages.append({"role": message.role, "content": content or ""})
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise bad_request(f"model {self.model_name!r} has no chat template; start the server with "
                              "--chat-template", "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                      add_generation_prompt=request.add_generation_prompt)
        except Exception as error:  # a template's own errors (raise_exception) are the client's
            raise bad_request(f"the chat template failed on these messages: {error}", "messages") from None
        return Prompt(text, self._encode(text, "messages", add_special_tokens=False))

    # ---- serving

    async def completions(self, request: CompletionRequest, raw: Request):
        """POST /v1/completions."""
        self.check_model(request.model)
        prompts = self.completion_prompts(request.prompt)
        return await self._serve(request, raw, prompts, chat=False)

    async def chat_completions(self, request: ChatCompletionRequest, raw: Request):
        """POST /v1/chat/completions."""
        self.check_model(request.model)
        return await self._serve(request, raw, [self.chat_prompt(request)], chat=True)

    async def _serve(self, request, raw: Request, prompts: list[Prompt], *, chat: bool):
        params = sampling_params(request)
        for prompt in prompts:
            if params.truncate_prompt_tokens is not None:
                truncated = self.driver.truncate_prompt(prompt.token_ids, params)
                if len(truncated) < len(prompt.token_ids):
                    prompt.token_ids, prompt.text = truncated, None  # an echo shows the tokens kept
            check_context(request, len(prompt.token_ids), params.max_tokens, self.max_model_len)
        limit = self.max_concurrent_requests
        if limit is not None and self.num_in_flight >= limit:
            raise APIError(429, f"the server is serving its limit of {limit} concurrent requests; retry later",
                           code="rate_limit_exceeded")
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        sink: asyncio.Queue = asyncio.Queue()
        request_ids = [f"{response_id}-{index}" if len(prompts) > 1 else response_id for index in range(len(prompts))]
        added = []
        try:
            for request_id, prompt in zip(request_ids, prompts):
                self.driver.add(request_id, prompt.token_ids, params, sink, prompt.text)
                added.append(request_id)
        except EngineUnavailable as error:
            for request_id in added:
                self.driver.abort(request_id, "the request could not be started")
            raise APIError(503, str(error)) from None
        self.num_in_flight += 1
        response = OpenAIResponse(self, request, params, response_id, list(zip(request_ids, prompts)), sink, chat)
        if request.stream:
            return streaming_response(response)
        try:
            return await response.whole(raw)
        finally:
            response.close()
