"""The server's own share of a request's way in, on a CPU: from an ASGI call of /v1/completions (the body already
read off the socket, as uvicorn hands it over) to the request reaching the engine driver, for a streamed request
of --prompt-tokens token ids on an idle tiny model (engine on a thread, no sockets, no client). Prints p50 and
the minimum in ms; the HTTP path's whole overhead is benchmarks/serve_overhead.py's, on a GPU.

    python benchmarks/serve_way_in.py [--requests 40] [--prompt-tokens 1200]
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_model(folder: Path) -> str:
    """A two-layer Qwen3 with a word-level tokenizer (the tests' tiny model), long enough for the prompt."""
    from tests.test_llm import EOS, VOCAB
    from tests.tiny_checkpoints import save_tiny_qwen3, save_word_level_tokenizer

    save_tiny_qwen3(folder, VOCAB, eos_token_id=EOS)
    save_word_level_tokenizer(folder, VOCAB)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


async def way_in_ms(app, body: bytes, stamps: list[float]) -> float:
    """One ASGI call: ms from the call to the driver's add."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    delivered = False
    done = asyncio.Event()

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    started = time.perf_counter()
    await app(scope, receive, send)
    return 1000 * (stamps[-1] - started)


async def measure(app, body: bytes, requests: int, stamps: list[float]) -> list[float]:
    driver = app.state.driver
    driver.start()
    try:
        return [await way_in_ms(app, body, stamps) for _ in range(requests)]
    finally:
        driver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--prompt-tokens", type=int, default=1200)
    args = parser.parse_args()
    from engine import LLM
    from twinfer.serving.app import create_app

    with tempfile.TemporaryDirectory() as folder:
        llm = LLM(tiny_model(Path(folder)), device="cpu", max_num_batched_tokens=2048, max_model_len=4096)
    app = create_app(llm.engine, model_name="tiny")
    stamps: list[float] = []
    add = app.state.driver.add

    def stamped_add(*args, **kwargs):
        stamps.append(time.perf_counter())
        return add(*args, **kwargs)

    app.state.driver.add = stamped_add
    prompt = [5 + index % 100 for index in range(args.prompt_tokens)]
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0.0, "ignore_eos": True,
                       "stream": True, "return_token_ids": True}).encode()
    times = asyncio.run(measure(app, body, args.requests, stamps))
    print(f"ASGI call -> engine driver: p50 {statistics.median(times):.3f} ms, min {min(times):.3f} ms "
          f"({args.requests} requests of {args.prompt_tokens} token ids)")


if __name__ == "__main__":
    main()
