"""The generation endpoints: a request's prompts and choices become engine requests, and their tokens come
back as an OpenAI completion or chat completion, whole or streamed as server-sent events.

A request with several prompts or n > 1 runs one engine request per choice (choice index = prompt index * n
+ i, engine request id "{i}_{id}" as vLLM names a parallel sample). A client that goes away aborts every
choice still running, which frees its KV blocks.
"""

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from twinfer.serving.api_error import APIError, bad_request
from twinfer.serving.engine_driver import Delta, EngineDriver, EngineUnavailable
from twinfer.serving.protocol import ChatCompletionRequest, CompletionRequest
from twinfer.serving.request_sampling import ChoiceSampling, choice_sampling
from twinfer.serving.text_decoder import TextDecoder


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


@dataclass
class _Choice:
    """One choice's progress."""

    index: int
    request_id: str
    prompt: _Prompt
    decoder: TextDecoder | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    num_cached_tokens: int = 0

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def apply(self, delta: Delta) -> str:
        """Take a delta in; the text it adds."""
        self.token_ids.extend(delta.token_ids)
        if delta.text is not None:  # the engine's own text (its stop strings applied)
            text = delta.text
        else:
            text = self.decoder.add(delta.token_ids, final=delta.is_last) if self.decoder is not None else ""
        self.text += text
        if delta.error is not None:
            self.error = delta.error
        elif delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
            self.num_cached_tokens = delta.sequence.num_cached_tokens or 0
        return text


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
        bad = [token for token in ids if not 0 <= token < self.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param)
        return ids

    def _encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise bad_request(f"model {self.model_name!r} has no tokenizer: send the prompt as token ids", param)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def completion_prompts(self, prompt) -> list[_Prompt]:
        """The prompts of a completion request: a string, a list of strings, token ids, or lists of them."""
        if isinstance(prompt, str):
            prompts = [_Prompt(prompt, self._encode(prompt, "prompt"))]
        elif prompt and all(isinstance(item, int) for item in prompt):
            prompts = [_Prompt(None, self._token_ids(list(prompt), "prompt"))]
        else:
            prompts = [_Prompt(item, self._encode(item, "prompt")) if isinstance(item, str)
                       else _Prompt(None, self._token_ids(list(item), "prompt")) for item in prompt]
        if not prompts or any(not item.token_ids for item in prompts):
            raise bad_request("the prompt is empty", "prompt")
        return prompts

    def chat_prompt(self, request: ChatCompletionRequest) -> _Prompt:
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
        return _Prompt(text, self._encode(text, "messages", add_special_tokens=False))

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

    async def _serve(self, request, raw: Request, prompts: list[_Prompt], *, chat: bool):
        samplings = [choice_sampling(request, prompt_len=len(prompt.token_ids), max_model_len=self.max_model_len)
                     for prompt in prompts]
        limit = self.max_concurrent_requests
        if limit is not None and self.num_in_flight >= limit:
            raise APIError(429, f"the server is serving its limit of {limit} concurrent requests; retry later",
                           code="rate_limit_exceeded")
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        choices, sink = self._start(request, response_id, prompts, samplings)
        self.num_in_flight += 1
        state = _Response(self, request, response_id, prompts, choices, sink, chat)
        if request.stream:
            return _AbortingStreamingResponse(state.events(), state.close, media_type="text/event-stream")
        try:
            return await state.whole(raw)
        finally:
            state.close()

    def _start(self, request, response_id: str, prompts: list[_Prompt],
               samplings: list[ChoiceSampling]) -> tuple[list[_Choice], asyncio.Queue]:
        sink: asyncio.Queue = asyncio.Queue()
        choices = []
        for prompt_index, (prompt, sampling) in enumerate(zip(prompts, samplings)):
            suffix = f"-{prompt_index}" if len(prompts) > 1 else ""
            for sample in range(sampling.n):
                decoder = None
                if self.tokenizer is not None:
                    decoder = TextDecoder(self.tokenizer, prompt.token_ids, request.skip_special_tokens)
                choices.append(_Choice(len(choices), f"{sample}_{response_id}{suffix}", prompt, decoder))
        try:
            index = 0
            for prompt, sampling in zip(prompts, samplings):
                for sample in range(sampling.n):
                    self.driver.add(choices[index].request_id, prompt.token_ids, sampling.for_choice(sample), sink)
                    index += 1
        except EngineUnavailable as error:
            for choice in choices[:index]:
                self.driver.abort(choice.request_id, "the request could not be started")
            raise APIError(503, str(error)) from None
        return choices, sink


class _AbortingStreamingResponse(StreamingResponse):
    """A streaming response that runs on_close however it ends: completed, failed or the client gone."""

    def __init__(self, content, on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _Response:
    """One HTTP request's choices, read from their shared queue and written as OpenAI's JSON."""

    def __init__(self, serving: OpenAIServing, request, response_id: str, prompts: list[_Prompt],
                 choices: list[_Choice], sink: asyncio.Queue, chat: bool) -> None:
        self.serving = serving
        self.request = request
        self.id = response_id
        self.prompts = prompts
        self.choices = choices
        self.by_request_id = {choice.request_id: choice for choice in choices}
        self.sink = sink
        self.chat = chat
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._closed = False
        # A streamed completion's chunks differ only in a few fields: their JSON is this head and a short tail
        # (a quarter of the time json.dumps of the whole chunk takes, on every token of every stream).
        self._chunk_head = (f'data: {{"id": {json.dumps(self.id)}, "object": "text_completion", "created": '
                            f'{self.created}, "model": {json.dumps(serving.model_name)}, "choices": [{{"index": ')

    def close(self) -> None:
        """Abort every choice still running (the client went away, or the server failed) and count the
        request out; called once, however the response ends."""
        if self._closed:
            return
        self._closed = True
        self.serving.num_in_flight -= 1
        for choice in self.choices:
            if not choice.ended:
                self.serving.driver.abort(choice.request_id, "client disconnected")

    async def _next(self) -> list[Delta]:
        """Every delta available, waiting for one when there is none."""
        sink = self.sink
        deltas = [await sink.get()]
        while not sink.empty():
            deltas.append(sink.get_nowait())
        return deltas

    def _unfinished(self) -> bool:
        return any(not choice.ended for choice in self.choices)

    def usage(self) -> dict:
        """Token counts: each prompt once, every choice's output."""
        prompt_tokens = sum(len(prompt.token_ids) for prompt in self.prompts)
        completion_tokens = sum(len(choice.token_ids) for choice in self.choices)
        n = len(self.choices) // len(self.prompts)
        cached = sum(choice.num_cached_tokens for choice in self.choices[::n])
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}

    def _error(self) -> APIError | None:
        """The error to answer with when a choice was refused or lost."""
        for choice in self.choices:
            if choice.error is not None:
                engine_failed = not self.serving.driver.is_running
                return APIError(503 if engine_failed else 400, choice.error)
        return None

    # ---- whole responses

    async def whole(self, raw: Request):
        """Wait for every choice (or the client to go away) and answer with the whole completion."""
        collect = asyncio.ensure_future(self._collect())
        disconnected = asyncio.ensure_future(_wait_for_disconnect(raw))
        done, _ = await asyncio.wait((collect, disconnected), return_when=asyncio.FIRST_COMPLETED)
        if collect not in done:
            collect.cancel()
            return JSONResponse({}, status_code=499)  # nobody reads it: the client has gone
        disconnected.cancel()
        collect.result()
        error = self._error()
        if error is not None:
            return error.response()
        return JSONResponse({"id": self.id, "object": self.object, "created": self.created,
                             "model": self.serving.model_name,
                             "choices": [self._whole_choice(choice) for choice in self.choices],
                             "usage": self.usage()})

    async def _collect(self) -> None:
        while self._unfinished():
            for delta in await self._next():
                self.by_request_id[delta.request_id].apply(delta)

    def _whole_choice(self, choice: _Choice) -> dict:
        request = self.request
        if self.chat:
            body = {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                    "logprobs": None, "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
        else:
            text = choice.text
            if request.echo:
                text = self._prompt_text(choice.prompt) + text
            body = {"index": choice.index, "text": text, "logprobs": None, "finish_reason": choice.finish_reason,
                    "stop_reason": choice.stop_reason}
        if request.return_token_ids:
            body["prompt_token_ids"] = choice.prompt.token_ids
            body["token_ids"] = choice.token_ids
        return body

    def _prompt_text(self, prompt: _Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        tokenizer = self.serving.tokenizer
        return tokenizer.decode(prompt.token_ids) if tokenizer is not None else ""

    # ---- streams

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": f"{self.object}.chunk" if self.chat else self.object,
                "created": self.created, "model": self.serving.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _completion_chunk(self, choice: _Choice, text: str, token_ids: list[int]) -> str:
        """A streamed completion's chunk after its first (the same JSON as _chunk's, built faster)."""
        finish = "null" if choice.finish_reason is None else f'"{choice.finish_reason}"'
        stop = json.dumps(choice.stop_reason, ensure_ascii=False)
        ids = f', "token_ids": {token_ids}' if self.request.return_token_ids else ""
        return (f'{self._chunk_head}{choice.index}, "text": {json.dumps(text, ensure_ascii=False)}, '
                f'"logprobs": null, "finish_reason": {finish}, "stop_reason": {stop}{ids}}}]}}\n\n')

    def _stream_choice(self, choice: _Choice, text: str, token_ids: list[int], first: bool) -> dict:
        request = self.request
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            body = {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": choice.finish_reason}
        else:
            if first and request.echo:
                text = self._prompt_text(choice.prompt) + text
            body = {"index": choice.index, "text": text, "logprobs": None, "finish_reason": choice.finish_reason,
                    "stop_reason": choice.stop_reason}
        if request.return_token_ids:
            body["token_ids"] = token_ids
            if first:
                body["prompt_token_ids"] = choice.prompt.token_ids
        return body

    async def events(self):
        """The response as server-sent events: a chunk per choice per batch of new tokens, usage when asked,
        then [DONE]; an error event if a choice is refused or the engine fails."""
        options = self.request.stream_options
        include_usage = options is not None and options.include_usage
        continuous = include_usage and options.continuous_usage_stats
        started: set[int] = set()
        if self.chat:  # the role comes first, as OpenAI sends it
            for choice in self.choices:
                started.add(choice.index)
                yield self._chunk([self._stream_choice(choice, "", [], True)], self.usage() if continuous else None)
        while self._unfinished():
            deltas = await self._next()
            # Deltas of one choice that came together go out as one chunk.
            pending: dict[str, tuple[str, list[int]]] = {}
            for delta in deltas:
                choice = self.by_request_id[delta.request_id]
                text = choice.apply(delta)
                earlier_text, earlier_ids = pending.get(delta.request_id, ("", []))
                pending[delta.request_id] = (earlier_text + text, earlier_ids + delta.token_ids)
            error = self._error()
            if error is not None:
                yield f"data: {json.dumps(error.body())}\n\n"
                break
            for request_id, (text, token_ids) in pending.items():
                choice = self.by_request_id[request_id]
                first = choice.index not in started
                if not (first or self.chat or continuous):
                    yield self._completion_chunk(choice, text, token_ids)
                    continue
                started.add(choice.index)
                yield self._chunk([self._stream_choice(choice, text, token_ids, first)],
                                  self.usage() if continuous else None)
        else:
            if include_usage:
                yield self._chunk([], self.usage())
        yield "data: [DONE]\n\n"


async def _wait_for_disconnect(raw: Request) -> None:
    """Return when the client closes the connection (the body has been read: nothing else can come)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return
