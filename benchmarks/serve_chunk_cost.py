"""What one streamed chunk costs each side of the HTTP path, on a CPU: the event-loop time per SSE chunk that
every engine step's burst (one chunk per running stream) takes before a new request's first chunk, or its way in,
gets the loop.

- server: --streams open /v1/completions streams (as `twinfer bench serve` asks: token ids, usage), each step one
  delta per stream handed over as the engine process's reader hands a batch over; the time from the hand-over to
  the last chunk passed to the ASGI server, per chunk (openai_response's chunk building, Starlette's
  StreamingResponse; uvicorn's own write is not in it), the first chunks (they carry the prompt's token ids)
  apart.
- engine: a step's deltas made (text detokenized) and pickled for the pipe by the engine process's driver, with
  --streams running and a new request's first token among them: how soon that first token is handed over.
- client: a process of its own writes such bursts of chunks (HTTP/1.1 chunked, as uvicorn does) over --streams
  loopback connections, and `twinfer bench serve`'s reading of a stream (twinfer.serving.http_request.read_stream,
  aiohttp on uvloop) takes them; the client process's CPU time per chunk.

    python benchmarks/serve_chunk_cost.py [--streams 32] [--steps 400] [--prompt-tokens 1000] [--side both]
"""

import argparse
import asyncio
import json
import multiprocessing
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # serve_way_in's tiny model


# ---- server side


async def _server_per_chunk_us(num_streams: int, num_steps: int, prompt_tokens: int) -> tuple[float, float]:
    """(us per first chunk, us per later chunk)."""
    from engine.sampling_params import SamplingParams
    from twinfer.serving.engine_driver import Delta, EndedRequest, deliver
    from twinfer.serving.http_request import HttpRequest, request_body
    from twinfer.serving.openai_response import OpenAIResponse, Prompt, streaming_response
    from twinfer.serving.protocol import CompletionRequest

    prompt = [5 + index % 1000 for index in range(prompt_tokens)]
    body = request_body(HttpRequest("r", 0.0, prompt, num_steps), "qwen3-0.6b")
    request = CompletionRequest.model_validate(body)
    driver = SimpleNamespace(is_running=True, abort=lambda request_id, reason: None)
    serving = SimpleNamespace(tokenizer=None, model_name="qwen3-0.6b", driver=driver, num_in_flight=num_streams)
    sent = 0
    all_sent = asyncio.Event()
    goal = 0

    async def send(message) -> None:
        nonlocal sent
        if message["type"] == "http.response.body" and message.get("more_body"):
            sent += 1
            if sent == goal:
                all_sent.set()

    never = asyncio.Event()

    async def receive():
        await never.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}
    sinks, tasks = [], []
    for index in range(num_streams):
        sink = asyncio.Queue()
        params = SamplingParams(max_tokens=num_steps, temperature=0.0, ignore_eos=True)
        response = OpenAIResponse(serving, request, params, f"cmpl-{index}", [(f"cmpl-{index}", Prompt(None, prompt))],
                                  sink, chat=False)
        sinks.append(sink)
        tasks.append(asyncio.ensure_future(streaming_response(response)(scope, receive, send)))
    await asyncio.sleep(0.01)
    elapsed = first = 0.0
    loop = asyncio.get_running_loop()
    ended = EndedRequest(1, 0, num_steps, num_steps, None, 0.0, 0.0, 0.0, [0.0] * num_steps, 1.0)
    for step in range(num_steps):
        last = step == num_steps - 1
        batch = [(sink, Delta(f"cmpl-{index}", 0, [1000 + step], text="", finish_reason="length" if last else None,
                              ended=ended if last else None))
                 for index, sink in enumerate(sinks)]
        goal = sent + num_streams * (3 if last else 1)  # the last step: its chunk, usage and [DONE]
        all_sent.clear()
        started = time.perf_counter()
        loop.call_soon(deliver, batch, None)  # as the engine process's reader thread hands a batch over
        await asyncio.wait_for(all_sent.wait(), 10)  # a stream that failed: raised below
        if step == 0:
            first = time.perf_counter() - started
        else:
            elapsed += time.perf_counter() - started
    await asyncio.gather(*tasks)
    return first / num_streams * 1e6, elapsed / ((num_steps - 1) * num_streams + 2 * num_streams) * 1e6


# ---- the engine process's side


def _publish_us(num_streams: int, num_new: int) -> tuple[float, float]:
    """(us from a step's end to a new request's first token handed to the pipe, us to the whole step's deltas
    handed over), medians over num_new new requests joining num_streams running ones (tiny model, its word-level
    detokenizer; each batch pickled as the engine process's pipe pickles it)."""
    import pickle
    import statistics
    import tempfile

    from engine import LLM
    from engine.sampling_params import SamplingParams
    from twinfer.serving.engine_driver import EngineDriver
    from serve_way_in import tiny_model

    with tempfile.TemporaryDirectory() as folder:
        llm = LLM(tiny_model(Path(folder)), device="cpu", max_num_batched_tokens=2048, max_model_len=4096)
    sent: list[tuple[float, list[str]]] = []

    def send(batch: list) -> None:
        pickle.dumps(batch)
        sent.append((time.perf_counter(), [delta.request_id for _, delta in batch]))

    driver = EngineDriver(llm.engine, send=send)
    params = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)
    for index in range(num_streams):
        driver._apply(("add", f"s{index}", f"s{index}", [5 + index, 6, 7, 8], params, 0.0, None))
    for _ in range(3):
        llm.engine.step()
        driver._publish()
    to_first, to_all = [], []
    for index in range(num_new):
        new = f"new{index}"
        driver._apply(("add", new, new, [9, 10, 11], SamplingParams(temperature=0, max_tokens=1), 0.0, None))
        while True:
            llm.engine.step()
            del sent[:]
            started = time.perf_counter()
            driver._publish()
            firsts = [at for at, request_ids in sent if new in request_ids]
            if firsts:
                to_first.append((firsts[0] - started) * 1e6)
                to_all.append((sent[-1][0] - started) * 1e6)
                break
    llm.engine.abort_all("measured")
    return statistics.median(to_first), statistics.median(to_all)


# ---- client side

CHUNK = ('data: {"id": "cmpl-%d", "object": "text_completion", "created": 1764780000, "model": "qwen3-0.6b", '
         '"choices": [{"index": 0, "text": "", "logprobs": null, "finish_reason": null, "stop_reason": null, '
         '"token_ids": [%d]}]}\n\n')
LAST = ('data: {"id": "cmpl-%d", "object": "text_completion", "created": 1764780000, "model": "qwen3-0.6b", '
        '"choices": [{"index": 0, "text": "", "logprobs": null, "finish_reason": "length", "stop_reason": null, '
        '"token_ids": [%d]}]}\n\ndata: {"id": "cmpl-%d", "object": "text_completion", "created": 1764780000, '
        '"model": "qwen3-0.6b", "choices": [], "usage": {"prompt_tokens": 195, "completion_tokens": %d, '
        '"total_tokens": %d, "prompt_tokens_details": {"cached_tokens": 0}}}\n\ndata: [DONE]\n\n')


def _framed(text: str) -> bytes:
    data = text.encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


def _blaster(listener: socket.socket, num_streams: int, num_steps: int, step_s: float) -> None:
    """Answer num_streams requests with SSE streams, a chunk each every step_s (one burst for all of them)."""

    async def main() -> None:
        writers = []
        ready = asyncio.Event()

        async def accept(reader, writer) -> None:
            await reader.readuntil(b"\r\n\r\n")  # the client's body is ignored: a few bytes more are harmless
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            writers.append(writer)
            if len(writers) == num_streams:
                ready.set()

        server = await asyncio.start_server(accept, sock=listener)
        await ready.wait()
        for step in range(num_steps):
            for index, writer in enumerate(writers):
                if step < num_steps - 1:
                    writer.write(_framed(CHUNK % (index, step)))
                else:
                    writer.write(_framed(LAST % (index, step, index, num_steps, num_steps + 195)) + b"0\r\n\r\n")
            await asyncio.sleep(step_s)
        for writer in writers:
            await writer.drain()
            writer.close()
        server.close()

    asyncio.run(main())


def _client_per_chunk_us(num_streams: int, num_steps: int) -> float:
    import aiohttp
    import uvloop

    from twinfer.serving.http_request import HttpRequest, send_request

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    blaster = multiprocessing.get_context("fork").Process(target=_blaster,
                                                          args=(listener, num_streams, num_steps, 0.0025))
    blaster.start()
    listener.close()

    async def main() -> float:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, read_bufsize=1 << 20) as session:
            start = time.perf_counter()
            cpu = time.process_time()
            requests = [HttpRequest(f"r{index}", 0.0, [1, 2, 3], num_steps) for index in range(num_streams)]
            records = await asyncio.gather(*(send_request(session, f"http://127.0.0.1:{port}/v1/completions", {},
                                                          request, "qwen3-0.6b", start) for request in requests))
            cpu = time.process_time() - cpu
        assert all(record.output_len == num_steps and str(record.status) == "finished" for record in records), \
            [(record.status, record.reason, record.output_len) for record in records[:3]]
        return cpu / (num_streams * (num_steps + 1)) * 1e6

    try:
        return uvloop.run(main())
    finally:
        blaster.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="each stream's prompt (server side)")
    parser.add_argument("--side", choices=["server", "engine", "client", "both", "all"], default="all",
                        help="both: server and client")
    args = parser.parse_args()
    if args.side in ("server", "both", "all"):
        import uvloop

        first, later = min(uvloop.run(_server_per_chunk_us(args.streams, args.steps, args.prompt_tokens))
                           for _ in range(3))
        print(f"server: {later:.1f} us per chunk, {first:.1f} us per first chunk ({args.prompt_tokens}-token prompts) "
              f"({args.streams} streams x {args.steps} steps, best of 3)")
    if args.side in ("engine", "all"):
        to_first, to_all = _publish_us(args.streams, 40)
        print(f"engine: a new request's first token handed over {to_first:.0f} us after its step, the step's "
              f"deltas {to_all:.0f} us ({args.streams} running streams, median of 40)")
    if args.side in ("client", "both", "all"):
        client = min(_client_per_chunk_us(args.streams, args.steps) for _ in range(5))
        print(f"client: {client:.1f} us CPU per chunk ({args.streams} streams x {args.steps} steps, best of 5)")


if __name__ == "__main__":
    main()
