"""A streamed response's chunks, byte for byte: the chunks built from a pre-encoded head (completions and chat,
first chunks with the prompt's token ids, awkward text, stop reasons, n, non-ASCII names) are exactly the JSON the
general path (json.dumps of the whole chunk) writes, which OpenAI's clients parse."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from engine.sampling_params import SamplingParams
from twinfer.serving.engine_driver import Delta, EndedRequest
from twinfer.serving.openai_response import OpenAIResponse, Prompt, _Piece
from twinfer.serving.protocol import ChatCompletionRequest, CompletionRequest

TEXTS = ["", "hello", 'a "quote", a back\\slash,\na newline, a\ttab and \x01', "émoji 😀 中文 \u2028", "</s>"]
ENDS = [("length", None), ("stop", 42), ("stop", "END é \"x\"")]
ENDED = EndedRequest(3, 0, 1, 8, None, 0.0, 0.0, 0.0, [0.0], 1.0)


def _response(*, chat: bool, n: int, model_name: str, **fields) -> OpenAIResponse:
    if chat:
        request = ChatCompletionRequest.model_validate(
            {"model": model_name, "messages": [{"role": "user", "content": "hi"}], "stream": True, "n": n, **fields})
    else:
        request = CompletionRequest.model_validate({"model": model_name, "prompt": [[3, 4, 5], [6, 70000]],
                                                    "stream": True, "n": n, **fields})
    serving = SimpleNamespace(tokenizer=None, model_name=model_name, num_in_flight=1,
                              driver=SimpleNamespace(is_running=True, abort=lambda request_id, reason: None))
    prompts = [Prompt(None, [3, 4, 5])] if chat else [Prompt(None, [3, 4, 5]), Prompt(None, [6, 70000])]
    params = SamplingParams(n=n, max_tokens=8, logprobs=fields.get("logprobs") if not chat else None)
    return OpenAIResponse(serving, request, params, "cmpl-ü1", [(f"r{index}", prompt) for index, prompt in
                                                              enumerate(prompts)], asyncio.Queue(), chat)


def _streamed_against_general(response: OpenAIResponse, finish: str, stop) -> list[tuple[str, str]]:
    """(chunk as streamed, the general path's chunk for the same piece): a delta of every text, round the
    choices, then each choice's last delta, ended by finish and stop."""

    async def run() -> list[tuple[str, str]]:
        events = response.events()
        if response.chat:
            for _ in response.choices:  # the role chunks
                await events.__anext__()
        steps = [(response.choices[step % len(response.choices)], text, None, None) for step, text in enumerate(TEXTS)]
        steps += [(choice, "end", finish, stop) for choice in response.choices]
        pairs = []
        started = set()
        for step, (choice, text, finish_reason, stop_reason) in enumerate(steps):
            token_ids = [100 + step, 7]
            response.sink.put_nowait(Delta(response.request_ids[choice.index // response.params.n],
                                           choice.index % response.params.n, token_ids, text=text,
                                           finish_reason=finish_reason, stop_reason=stop_reason,
                                           ended=ENDED if finish_reason else None))
            chunk = await events.__anext__()
            first = not response.chat and choice.index not in started
            started.add(choice.index)
            general = response._chunk([response._stream_choice(choice, _Piece(text, token_ids), first)])
            pairs.append((chunk, general))
        return pairs

    return asyncio.run(run())


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("return_token_ids", [False, True])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("model_name", ["tiny", "modèle \"ü\""])
def test_streamed_chunks_are_the_general_paths_json_byte_for_byte(chat, return_token_ids, n, model_name):
    pairs = []
    for finish, stop in ENDS:
        response = _response(chat=chat, n=n, model_name=model_name, return_token_ids=return_token_ids,
                             stream_options={"include_usage": True})
        pairs += _streamed_against_general(response, finish, stop)
    assert len(pairs) == len(ENDS) * (len(TEXTS) + len(response.choices))
    for streamed, general in pairs:
        assert streamed == general
        chunk = json.loads(streamed.removeprefix("data: "))
        assert chunk["model"] == model_name and chunk["object"] == ("chat.completion.chunk" if chat else
                                                                   "text_completion")
    firsts = [json.loads(streamed[6:])["choices"][0] for streamed, _ in pairs if "prompt_token_ids" in streamed]
    if return_token_ids and not chat:  # each choice's first chunk, its own prompt's ids
        assert sorted((choice["index"], tuple(choice["prompt_token_ids"])) for choice in firsts) == sorted(
            [(index, (3, 4, 5) if index < n else (6, 70000)) for index in range(2 * n)] * len(ENDS))
    else:
        assert firsts == []

