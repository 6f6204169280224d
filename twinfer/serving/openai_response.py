"""One HTTP generation request's answer: its choices' deltas from the engine driver, written as OpenAI's JSON,
whole (when every choice has ended) or streamed as server-sent events."""

import asyncio
import json
import time
from dataclasses import dataclass, field
from json.encoder import encode_basestring

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine.outputs import logprob_dict
from engine.sampling_params import SamplingParams
from engine.scheduler_output import TokenLogprobs
from twinfer.serving.api_error import APIError
from twinfer.serving.engine_driver import Delta
from twinfer.serving.openai_logprobs import chat_logprobs, completion_logprobs, prompt_logprobs_json


@dataclass
class Prompt:
    """A prompt as the client gave it (text, or None for token ids) and as the engine gets it."""

    text: str | None
    token_ids: list[int]


@dataclass
class _Choice:
    """One choice's output so far: a completion of one prompt's engine request."""

    index: int
    prompt: Prompt
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    num_chars_streamed: int = 0
    """Characters of text (the echoed prompt's included) streamed so far: where the next chunk's text starts."""

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def apply(self, delta: Delta) -> None:
        """Take a delta in."""
        self.token_ids.extend(delta.token_ids)
        self.text += delta.text
        if delta.logprobs is not None:
            self.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.error is not None:
            self.error = delta.error
        elif delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
            self.num_cached_tokens = delta.ended.num_cached_tokens


@dataclass
class _Piece:
    """What one chunk of a streamed choice carries: the deltas of that choice that came together."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)


class OpenAIResponse:
    """One HTTP request's choices, read from their shared queue and written as OpenAI's JSON."""

    def __init__(self, serving, request, params: SamplingParams, response_id: str,
                 prompts: list[tuple[str, Prompt]], sink: asyncio.Queue, chat: bool) -> None:
        """prompts: (engine request id, prompt) for each prompt, in order."""
        self.serving = serving
        self.tokenizer = serving.tokenizer
        self.request = request
        self.params = params
        self.id = response_id
        self.request_ids = [request_id for request_id, _ in prompts]
        self.prompts = [prompt for _, prompt in prompts]
        n = params.n
        self.choices = [_Choice(index, prompt)
                        for index, prompt in enumerate(prompt for prompt in self.prompts for _ in range(n))]
        self.by_completion = {(request_id, completion): self.choices[prompt_index * n + completion]
                              for prompt_index, request_id in enumerate(self.request_ids) for completion in range(n)}
        self.sink = sink
        self.chat = chat
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._closed = False
        # A stream's chunks differ only in a few fields: their JSON is this head and a short tail (a fifth of the
        # time json.dumps of the whole chunk takes, on every token of every stream).
        chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self._chunk_head = (f'data: {{"id": {_json_str(self.id)}, "object": "{chunk_object}", "created": '
                            f'{self.created}, "model": {_json_str(serving.model_name)}, "choices": [{{"index": ')
        self._prompt_ids_json: list[str] = []
        """Each prompt's token ids as JSON, for its choices' first chunks (made before the first token comes)."""

    def close(self) -> None:
        """Abort every engine request still running (the client went away, or the server failed) and count the
        HTTP request out; called once, however the response ends."""
        if self._closed:
            return
        self._closed = True
        self.serving.num_in_flight -= 1
        n = self.params.n
        for prompt_index, request_id in enumerate(self.request_ids):
            if any(not choice.ended for choice in self.choices[prompt_index * n:(prompt_index + 1) * n]):
                self.serving.driver.abort(request_id, "client disconnected")

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
        cached = sum(choice.num_cached_tokens for choice in self.choices[::self.params.n])
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}

    def _error(self) -> APIError | None:
        """The error to answer with when a choice was refused or lost."""
        for choice in self.choices:
            if choice.error is not None:
                engine_failed = not self.serving.driver.is_running
                return APIError(503 if engine_failed else 400, choice.error)
        return None

    # ---- logprobs

    def _dicts(self, entries) -> list:
        return [None if entry is None else logprob_dict(entry, self.tokenizer) for entry in entries]

    def _logprobs(self, choice: _Choice, token_ids: list[int], entries: list[TokenLogprobs], with_prompt: bool,
                  text_offset: int) -> dict | None:
        """The OpenAI logprobs of these tokens of a choice (after the prompt's, for an echo that asks)."""
        if self.params.logprobs is None:
            return None
        as_token_ids = self.request.return_tokens_as_token_ids
        if self.chat:
            return chat_logprobs(token_ids, self._dicts(entries), self.params.logprobs, self.tokenizer,
                                 as_token_ids=as_token_ids)
        if with_prompt and choice.prompt_logprobs is not None:
            token_ids = choice.prompt.token_ids + token_ids
            entries = list(choice.prompt_logprobs) + entries
        return completion_logprobs(token_ids, self._dicts(entries), self.tokenizer, text_offset=text_offset,
                                   as_token_ids=as_token_ids)

    def _prompt_logprobs(self, choice: _Choice) -> list | None:
        """vLLM's prompt_logprobs field, when the request asks for it."""
        if self.request.prompt_logprobs is None or choice.prompt_logprobs is None:
            return None
        return prompt_logprobs_json(self._dicts(choice.prompt_logprobs))

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
        body = {"id": self.id, "object": self.object, "created": self.created, "model": self.serving.model_name,
                "choices": [self._whole_choice(choice) for choice in self.choices], "usage": self.usage()}
        if self.chat and self.request.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._prompt_logprobs(self.choices[0])  # vLLM's: one chat, one prompt
        return JSONResponse(body)

    def _apply(self, delta: Delta) -> _Choice:
        """Take a delta in; the choice it belongs to. An error (a request refused or lost) ends every choice of
        its engine request: nothing more comes for any of them."""
        choice = self.by_completion[delta.request_id, delta.index]
        choice.apply(delta)
        if delta.error is not None:
            for completion in range(self.params.n):
                self.by_completion[delta.request_id, completion].error = delta.error
        return choice

    async def _collect(self) -> None:
        while self._unfinished():
            for delta in await self._next():
                self._apply(delta)

    def _whole_choice(self, choice: _Choice) -> dict:
        request = self.request
        logprobs = self._logprobs(choice, choice.token_ids, choice.logprobs, not self.chat and request.echo, 0)
        if self.chat:
            body = {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                    "logprobs": logprobs, "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}
        else:
            text = choice.text
            if request.echo:
                text = self._prompt_text(choice.prompt) + text
            body = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason,
                    "stop_reason": choice.stop_reason}
            if request.prompt_logprobs is not None:
                body["prompt_logprobs"] = self._prompt_logprobs(choice)
        if request.return_token_ids:
            body["prompt_token_ids"] = choice.prompt.token_ids
            body["token_ids"] = choice.token_ids
        return body

    def _prompt_text(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids) if self.tokenizer is not None else ""

    # ---- streams

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": f"{self.object}.chunk" if self.chat else self.object,
                "created": self.created, "model": self.serving.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _plain_chunk(self, choice: _Choice, piece: _Piece, first: bool) -> str:
        """A streamed chunk without logprobs, usage or echo, and not a chat's first (its role): the same JSON as
        _chunk of _stream_choice's, built faster."""
        text = piece.text
        choice.num_chars_streamed += len(text)
        if self.chat:
            body = f'"delta": {{"content": {_json_str(text)}}}' if text else '"delta": {}'
        else:
            body = f'"text": {_json_str(text)}'
        finish = "null" if choice.finish_reason is None else _json_str(choice.finish_reason)
        stop = choice.stop_reason
        stop = "null" if stop is None else (_json_str(stop) if isinstance(stop, str) else json.dumps(stop))
        ids = ""
        if self.request.return_token_ids:
            ids = f', "token_ids": {json.dumps(piece.token_ids)}'
            if first:
                ids += f', "prompt_token_ids": {self._prompt_ids_json[choice.index // self.params.n]}'
        return (f'{self._chunk_head}{choice.index}, {body}, "logprobs": null, "finish_reason": {finish}, '
                f'"stop_reason": {stop}{ids}}}]}}\n\n')

    def _stream_choice(self, choice: _Choice, piece: _Piece, first: bool) -> dict:
        request = self.request
        text = piece.text
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            logprobs = self._logprobs(choice, piece.token_ids, piece.logprobs, False, 0) if piece.token_ids else None
            body = {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": choice.finish_reason,
                    "stop_reason": choice.stop_reason}
        else:
            echo = first and request.echo
            if echo:
                text = self._prompt_text(choice.prompt) + text
            logprobs = self._logprobs(choice, piece.token_ids, piece.logprobs, echo, choice.num_chars_streamed)
            body = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason,
                    "stop_reason": choice.stop_reason}
        choice.num_chars_streamed += len(text)
        if request.return_token_ids:
            body["token_ids"] = piece.token_ids
            if first:
                body["prompt_token_ids"] = choice.prompt.token_ids
        return body

    async def events(self):
        """The response as server-sent events: a chunk per choice per batch of new tokens, usage when asked,
        then [DONE]; an error event if a choice is refused or the engine fails."""
        options = self.request.stream_options
        include_usage = options is not None and options.include_usage
        continuous = include_usage and options.continuous_usage_stats
        plain = not (continuous or self.params.logprobs is not None)
        """Chunks by _plain_chunk (a completion's first too, unless it echoes the prompt)."""
        if self.request.return_token_ids:  # while the prompt is computed, not on the first token's way out
            self._prompt_ids_json = [json.dumps(prompt.token_ids) for prompt in self.prompts]
        started: set[int] = set()
        if self.chat:  # the role comes first, as OpenAI sends it
            for choice in self.choices:
                started.add(choice.index)
                yield self._chunk([self._stream_choice(choice, _Piece(), True)], self.usage() if continuous else None)
        while self._unfinished():
            # Deltas of one choice that came together go out as one chunk.
            pieces: dict[int, _Piece] = {}
            for delta in await self._next():
                choice = self._apply(delta)
                piece = pieces.setdefault(choice.index, _Piece())
                piece.text += delta.text
                piece.token_ids += delta.token_ids
                if delta.logprobs is not None:
                    piece.logprobs += delta.logprobs
            error = self._error()
            if error is not None:
                yield f"data: {json.dumps(error.body())}\n\n"
                break
            for index, piece in pieces.items():
                choice = self.choices[index]
                first = index not in started
                started.add(index)
                if plain and not (first and (self.chat or self.request.echo)):
                    yield self._plain_chunk(choice, piece, first)
                else:
                    yield self._chunk([self._stream_choice(choice, piece, first)],
                                      self.usage() if continuous else None)
        else:
            if include_usage:
                yield self._chunk([], self.usage())
        yield "data: [DONE]\n\n"


def _json_str(text: str) -> str:
    """A string as JSON, as json.dumps(text, ensure_ascii=False) writes it (its C encoder, without json.dumps'
    encoder object)."""
    return encode_basestring(text)


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


def streaming_response(response: OpenAIResponse) -> StreamingResponse:
    """The response's events as a text/event-stream that aborts what is still running however it ends."""
    return _AbortingStreamingResponse(response.events(), response.close, media_type="text/event-stream")


async def _wait_for_disconnect(raw: Request) -> None:
    """Return when the client closes the connection (the body has been read: nothing else can come)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return
