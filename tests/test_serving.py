"""`twinfer serve` on CPU: a tiny model behind the OpenAI API on a loopback port, driven by the `openai` client.

Outputs are checked against LLM.generate on the same weights (greedy), KV blocks against leaks after clients
go away, and every bad request against its OpenAI error body. Where a test needs the engine to hold still (a
request in flight while a client disconnects), it parks the engine's thread on a gate: nothing depends on
timing.
"""

import asyncio
import json
import socket
import threading

import httpx
import openai
import pytest

from analysis.run_store import read_run
from engine import LLM, SamplingParams
from tests.http_server import ServerThread
from tests.test_llm import VOCAB, model_folder  # noqa: F401 (the tiny model fixture)
from twinfer.serving.app import create_app
from twinfer.serving.engine_driver import EngineDriver
from twinfer.serving.request_log import RequestLog

MODEL = "tiny"
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"


@pytest.fixture(scope="module")
def reference(model_folder):  # noqa: F811
    return LLM(model_folder, device="cpu", max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def served(model_folder):  # noqa: F811
    """The LLM whose engine the servers of this module serve (one server at a time)."""
    return LLM(model_folder, device="cpu", max_num_batched_tokens=64)


@pytest.fixture()
def serve(served):
    """Start a server on the shared engine with these options; stopped after the test."""
    started = []

    def start(**options) -> ServerThread:
        options.setdefault("chat_template", CHAT_TEMPLATE)
        app = create_app(served.engine, model_name=MODEL, **options)
        server = ServerThread(app).__enter__()
        server.app = app
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def client(server, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=options.pop("api_key", "unused"), max_retries=0,
                         **options)


def async_client(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def greedy(reference, prompt, max_tokens: int) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return reference.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


class Gate:
    """Parks the server's engine thread (it takes no step) until opened."""

    def __init__(self, server) -> None:
        self._open = threading.Event()
        self._parked = threading.Event()

        def park(engine):
            self._parked.set()
            self._open.wait(timeout=60)

        server.app.state.driver.run_on_thread(park)
        assert self._parked.wait(timeout=60)

    def open(self) -> None:
        self._open.set()


def engine_state(server, function):
    """function(engine) evaluated on the engine's thread between steps."""
    return server.app.state.driver.run_on_thread(function).result(timeout=60)


def wait_for(condition, what: str) -> None:
    """Wait (bounded) until condition() holds."""
    for _ in range(1200):
        if condition():
            return
        threading.Event().wait(0.05)
    raise AssertionError(f"still not {what} after 60 s")


def wait_until_idle(server) -> None:
    """Wait (bounded) until the engine has nothing left: every abort applied, every request ended."""
    for _ in range(600):
        if not engine_state(server, lambda engine: engine.has_unfinished()):
            return
        threading.Event().wait(0.05)
    raise AssertionError("the engine still has unfinished requests after 30 s")


def free_blocks(server) -> tuple[int, int]:
    return engine_state(server, lambda engine: (engine.block_manager.num_free_blocks, engine.block_manager.num_blocks))


# ---- the API with the openai client


def test_completion_whole_and_streamed_equal_generate(serve, reference):
    server = serve()
    expected = greedy(reference, [5, 6, 7, 8], 6)
    whole = client(server).completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=6, temperature=0,
                                              extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = whole.choices[0]
    assert choice.token_ids == expected and choice.finish_reason == "length"
    assert choice.text.split() == [f"w{token - 2}" for token in expected]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (4, 6, 10)

    chunks = list(client(server).completions.create(
        model=MODEL, prompt="w3 w4 w5 w6", max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "return_token_ids": True}))
    streamed = [token for chunk in chunks for choice in chunk.choices for token in choice.token_ids]
    assert streamed == expected
    assert "".join(choice.text for chunk in chunks for choice in chunk.choices).split() == choice.text.split()
    assert [choice.finish_reason for chunk in chunks for choice in chunk.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_chat_whole_and_streamed_follow_the_template(serve, reference):
    server = serve()
    messages = [{"role": "system", "content": "w10 w11"}, {"role": "user", "content": "w12 w13 w14"}]
    prompt = reference.tokenizer.encode("w10 w11 w12 w13 w14 ", add_special_tokens=False)
    expected = greedy(reference, prompt, 5)
    whole = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                   extra_body={"ignore_eos": True, "return_token_ids": True})
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].token_ids == expected
    assert whole.usage.prompt_tokens == len(prompt)

    chunks = list(client(server).chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    assert content.split() == whole.choices[0].message.content.split()
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 5


def test_n_choices_and_several_prompts_each_get_their_index(serve, reference):
    server = serve()
    prompts = [[5, 6, 7], [9, 10]]
    response = client(server).completions.create(
        model=MODEL, prompt=prompts, n=3, max_tokens=4, temperature=1.0, seed=11,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [choice.index for choice in response.choices] == list(range(6))
    # Choice prompt * n + i is completion i of that prompt: seeded with seed + i, as LLM.generate's n.
    expected = reference.generate(prompts, SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=4,
                                                          ignore_eos=True), use_tqdm=False)
    assert [choice.token_ids for choice in response.choices] == [
        completion.token_ids for output in expected for completion in output.outputs]
    assert response.usage.prompt_tokens == 5 and response.usage.completion_tokens == 24


def test_text_prompts_in_a_list_are_each_a_prompt(serve):
    server = serve()
    # w5 w6 w7 is token ids [7, 8, 9] in the tiny word-level vocabulary; "1" and "2" are text, never ids.
    texts = client(server).completions.create(model=MODEL, prompt=["w5 w6 w7", "1", "2"], max_tokens=3,
                                              temperature=0, extra_body={"return_token_ids": True})
    ids = client(server).completions.create(model=MODEL, prompt=[[7, 8, 9], [0], [0]], max_tokens=3,
                                            temperature=0, extra_body={"return_token_ids": True})
    assert len(texts.choices) == 3
    assert [choice.token_ids for choice in texts.choices] == [choice.token_ids for choice in ids.choices]


def test_n_completions_share_one_prefill(serve):
    server = serve()
    prompt = list(range(60, 100))  # 40 tokens no other test sends: two full blocks of 16, and 8 more
    first_step = engine_state(server, lambda engine: len(engine.step_records))
    response = client(server).completions.create(model=MODEL, prompt=prompt, n=2, max_tokens=3, temperature=1.0,
                                                 seed=3, extra_body={"ignore_eos": True})
    assert [choice.index for choice in response.choices] == [0, 1]
    steps = engine_state(server, lambda engine: engine.step_records[first_step:])
    # The first completion computes the prompt; the second finds its full blocks cached and computes the rest.
    assert sum(step.num_prefill_tokens for step in steps) == 40 + 8
    assert sum(step.prefix_cache_hit_tokens for step in steps) == 32
    assert response.usage.prompt_tokens == 40 and response.usage.completion_tokens == 6


def test_seeded_choices_differ_and_reproduce(serve):
    server = serve()

    def sample():
        return [choice.token_ids for choice in client(server).completions.create(
            model=MODEL, prompt=[5, 6], n=2, max_tokens=12, temperature=1.0, seed=7,
            extra_body={"ignore_eos": True, "return_token_ids": True}).choices]

    first = sample()
    assert first == sample()
    assert first[0] != first[1]  # choice i samples with seed + i, as vLLM's parallel sampling


def test_models_health_and_metrics(serve):
    server = serve()
    models = client(server).models.list()
    assert [model.id for model in models.data] == [MODEL]
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    for _ in range(3):
        client(server).completions.create(model=MODEL, prompt=[5, 6, 7] * 8, max_tokens=3, temperature=0)
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_sum"):
        assert f"{name}{{" in text, name
    samples = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:") and "_bucket" not in line}
    assert samples["vllm:time_to_first_token_seconds_count"] == 3
    assert samples["vllm:request_generation_tokens_sum"] == 9
    assert samples["vllm:num_requests_running"] == 0
    # The same 24-token prompt three times: its full blocks are found in the prefix cache the second time.
    assert samples["vllm:prefix_cache_hits_total"] >= 16


# ---- the engine's sampling fields, stop strings and logprobs over HTTP


def generate_one(reference, prompt, params: SamplingParams):
    """LLM.generate's completion of one prompt (the reference the server must equal)."""
    return reference.generate([prompt], params, use_tqdm=False)[0].outputs[0]


def test_stop_strings_end_the_text_whole_and_streamed(serve, reference):
    server = serve()
    prompt = [5, 6, 7]
    sampled = dict(temperature=1.0, seed=21, max_tokens=12, ignore_eos=True)
    words = generate_one(reference, prompt, SamplingParams(**sampled)).text.split()
    stop = f"{words[4]} {words[5]}"  # two tokens: found across a token boundary
    expected = generate_one(reference, prompt, SamplingParams(**sampled, stop=[stop]))
    assert stop not in expected.text and expected.finish_reason == "stop"

    body = {"model": MODEL, "prompt": prompt, **sampled, "stop": [stop], "return_token_ids": True}
    whole = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert (whole["text"], whole["token_ids"]) == (expected.text, expected.token_ids)
    assert (whole["finish_reason"], whole["stop_reason"]) == ("stop", stop)

    chunks = list(client(server).completions.create(stream=True, **{
        key: value for key, value in body.items() if key in ("model", "prompt", "max_tokens", "temperature", "seed",
                                                              "stop")}, extra_body={"ignore_eos": True}))
    texts = [choice.text for chunk in chunks for choice in chunk.choices]
    assert all(stop not in text for text in texts)
    assert "".join(texts) == expected.text
    assert chunks[-1].choices[0].finish_reason == "stop"

    kept = httpx.post(f"{server.base_url}/v1/completions", json={**body, "include_stop_str_in_output": True},
                      timeout=60).json()["choices"][0]
    assert kept["text"] == expected.text + stop


def test_penalties_are_applied_as_llm_generate_applies_them(serve, reference):
    server = serve()
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    greedy_params = dict(temperature=0, max_tokens=10, ignore_eos=True)
    penalties = dict(presence_penalty=1.5, frequency_penalty=1.0, repetition_penalty=1.3)
    plain = generate_one(reference, prompt, SamplingParams(**greedy_params))
    expected = generate_one(reference, prompt, SamplingParams(**greedy_params, **penalties))
    assert expected.token_ids != plain.token_ids  # greedy repeats itself on this model; penalties stop that
    response = client(server).completions.create(
        model=MODEL, prompt=prompt, max_tokens=10, temperature=0, presence_penalty=1.5, frequency_penalty=1.0,
        extra_body={"ignore_eos": True, "repetition_penalty": 1.3, "return_token_ids": True})
    assert response.choices[0].token_ids == expected.token_ids
    assert response.choices[0].text == expected.text


@pytest.mark.parametrize("fields", [
    {"min_tokens": 3, "logit_bias": {"1": 100}},  # EOS forced, but not before 3 tokens
    {"allowed_token_ids": [7, 9, 11], "temperature": 1.0, "seed": 4},
    {"bad_words": ["w4"], "temperature": 0},
    {"min_p": 0.5, "temperature": 1.0, "seed": 5},
    {"top_k": 3, "temperature": 1.0, "seed": 6},
    {"stop_token_ids": [6]},
    {"truncate_prompt_tokens": 2},
])
def test_every_vllm_sampling_field_reaches_the_engine(serve, reference, fields):
    server = serve()
    prompt = [5, 6, 7, 8]
    fields = {"temperature": 0, "max_tokens": 8, **fields}
    expected = generate_one(reference, prompt, SamplingParams(**fields))
    body = {"model": MODEL, "prompt": prompt, "return_token_ids": True, **fields}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert (choice["token_ids"], choice["text"]) == (expected.token_ids, expected.text)
    assert (choice["finish_reason"], choice["stop_reason"]) == (expected.finish_reason, expected.stop_reason)
    if "truncate_prompt_tokens" in fields:
        assert response.json()["usage"]["prompt_tokens"] == 2


def _approx(values):
    return pytest.approx(values, abs=1e-5)


def test_completion_logprobs_are_openais_shape_of_llm_generates(serve, reference):
    server = serve()
    prompt = [5, 6, 7]
    expected = generate_one(reference, prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                              logprobs=2))
    chosen = [entry[token] for token, entry in zip(expected.token_ids, expected.logprobs)]
    tokens = [logprob.decoded_token for logprob in chosen]
    options = dict(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2,
                   extra_body={"ignore_eos": True})
    logprobs = client(server).completions.create(**options).choices[0].logprobs
    assert logprobs.tokens == tokens
    assert logprobs.token_logprobs == _approx([logprob.logprob for logprob in chosen])
    # The sampled token and the 2 most likely (greedy: the sampled is the most likely, so 2 in all).
    assert [set(top) for top in logprobs.top_logprobs] == [
        {logprob.decoded_token for logprob in entry.values()} for entry in expected.logprobs]
    for top, entry in zip(logprobs.top_logprobs, expected.logprobs):
        assert list(top.values()) == _approx([logprob.logprob for logprob in entry.values()])
    assert logprobs.text_offset == [sum(len(token) for token in tokens[:index]) for index in range(len(tokens))]

    chunks = list(client(server).completions.create(**options, stream=True))
    streamed = [chunk.choices[0].logprobs for chunk in chunks]
    assert [token for part in streamed for token in part.tokens] == tokens
    assert [value for part in streamed for value in part.token_logprobs] == logprobs.token_logprobs
    assert [top for part in streamed for top in part.top_logprobs] == logprobs.top_logprobs
    # Each chunk's offsets start where the text streamed before it ends.
    text_before = 0
    for chunk, part in zip(chunks, streamed):
        assert part.text_offset[0] == text_before
        text_before += len(chunk.choices[0].text)


def test_echo_with_logprobs_scores_the_prompt_too(serve, reference):
    server = serve()
    prompt = [5, 6, 7]
    expected = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, logprobs=1,
                                                           prompt_logprobs=1), use_tqdm=False)[0]
    response = httpx.post(f"{server.base_url}/v1/completions", json={
        "model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "logprobs": 1,
        "echo": True, "prompt_logprobs": 1}, timeout=60).json()["choices"][0]
    logprobs = response["logprobs"]
    assert logprobs["tokens"] == ["w3", "w4", "w5"] + [
        entry[token].decoded_token for token, entry in zip(expected.outputs[0].token_ids, expected.outputs[0].logprobs)]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:3] == _approx([entry[token].logprob for token, entry
                                                       in zip(prompt[1:], expected.prompt_logprobs[1:])])
    assert response["prompt_logprobs"][0] is None
    assert {int(token): value["logprob"] for token, value in response["prompt_logprobs"][1].items()} == _approx(
        {token: logprob.logprob for token, logprob in expected.prompt_logprobs[1].items()})


def test_chat_logprobs_are_openais_shape_of_llm_generates(serve, reference):
    server = serve()
    messages = [{"role": "user", "content": "w10 w11 w12"}]
    prompt = reference.tokenizer.encode("w10 w11 w12 ", add_special_tokens=False)
    expected = generate_one(reference, prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                              logprobs=3))
    options = dict(model=MODEL, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
                   extra_body={"ignore_eos": True})
    content = client(server).chat.completions.create(**options).choices[0].logprobs.content
    assert len(content) == 4
    for item, token, entry in zip(content, expected.token_ids, expected.logprobs):
        assert item.token == entry[token].decoded_token and item.logprob == _approx(entry[token].logprob)
        assert item.bytes == list(item.token.encode())
        most_likely = sorted(entry.values(), key=lambda logprob: logprob.rank)
        assert [top.token for top in item.top_logprobs] == [logprob.decoded_token for logprob in most_likely]
        assert [top.logprob for top in item.top_logprobs] == _approx([logprob.logprob for logprob in most_likely])

    chunks = list(client(server).chat.completions.create(**options, stream=True))
    streamed = [item for chunk in chunks for choice in chunk.choices if choice.logprobs
                for item in choice.logprobs.content]
    assert [item.model_dump() for item in streamed] == [item.model_dump() for item in content]
    no_logprobs = client(server).chat.completions.create(**{**options, "logprobs": False, "top_logprobs": None})
    assert no_logprobs.choices[0].logprobs is None


# ---- many clients, and clients that go away


def test_64_concurrent_streams_equal_generate(serve, reference):
    server = serve()
    prompts = [[2 + (7 * index + offset) % (VOCAB - 2) for offset in range(3 + index % 9)] for index in range(64)]
    lengths = [4 + index % 13 for index in range(64)]
    expected = reference.generate(prompts, [SamplingParams(temperature=0, max_tokens=length, ignore_eos=True)
                                            for length in lengths], use_tqdm=False)

    async def one(api, prompt, length):
        stream = await api.completions.create(model=MODEL, prompt=prompt, max_tokens=length, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        return [token async for chunk in stream for choice in chunk.choices for token in choice.token_ids]

    async def all_of_them():
        api = async_client(server)
        return await asyncio.gather(*(one(api, prompt, length) for prompt, length in zip(prompts, lengths)))

    outputs = asyncio.run(all_of_them())
    assert outputs == [output.outputs[0].token_ids for output in expected]
    wait_until_idle(server)
    assert free_blocks(server)[0] == free_blocks(server)[1]


def _read_sse_events(response, count: int) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
            if len(events) == count:
                break
    return events


def test_a_stream_closed_mid_way_aborts_its_request_and_frees_its_blocks(serve):
    server = serve()
    body = {"model": MODEL, "prompt": list(range(2, 40)), "max_tokens": 150, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.base_url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert _read_sse_events(response, 1)  # running: it has sampled a token
            gate = Gate(server)  # hold the engine so the request is surely unfinished when the client leaves
    # Leaving the with blocks closed the connection; once the server has seen it, the engine may go on.
    wait_for(lambda: server.app.state.serving.num_in_flight == 0, "seen the disconnect")
    gate.open()
    wait_until_idle(server)
    records = engine_state(server, lambda engine: engine.request_records)
    aborted = [record for record in records.values() if record.reason == "aborted: client disconnected"]
    assert aborted and aborted[-1].output_len < 150
    assert free_blocks(server)[0] == free_blocks(server)[1]


def test_a_whole_response_whose_client_leaves_is_aborted(serve):
    server = serve()
    gate = Gate(server)
    body = json.dumps({"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        # The request is queued behind the gate; wait until the server has read it, then leave.
        wait_for(lambda: server.app.state.serving.num_in_flight == 1, "reading the request")
    wait_for(lambda: server.app.state.serving.num_in_flight == 0, "seen the disconnect")
    gate.open()
    wait_until_idle(server)
    records = engine_state(server, lambda engine: engine.request_records)
    assert list(records.values())[-1].reason == "aborted: client disconnected"
    assert free_blocks(server)[0] == free_blocks(server)[1]


def test_over_the_concurrency_limit_is_429(serve):
    server = serve(max_concurrent_requests=1)
    gate = Gate(server)
    results = {}

    def first():
        results["first"] = client(server).completions.create(model=MODEL, prompt=[5], max_tokens=2)

    thread = threading.Thread(target=first)
    thread.start()
    wait_for(lambda: server.app.state.serving.num_in_flight == 1, "serving the first request")
    with pytest.raises(openai.RateLimitError) as refused:
        client(server).completions.create(model=MODEL, prompt=[5], max_tokens=2)
    assert refused.value.body["code"] == "rate_limit_exceeded"
    gate.open()
    thread.join(timeout=60)
    assert results["first"].usage.completion_tokens == 2


# ---- bad input and auth


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "malformed JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"prompt": [5]}, 400, "model", "model"),
    ({"model": "other", "prompt": [5]}, 404, "model", "does not exist"),
    ({"model": MODEL, "prompt": [5] * 250, "max_tokens": 10}, 400, "max_tokens", "maximum context length is 256"),
    ({"model": MODEL, "prompt": [5], "temperature": -0.5}, 400, "temperature", "temperature"),
    ({"model": MODEL, "prompt": [5], "top_p": 0}, 400, "top_p", "top_p"),
    ({"model": MODEL, "prompt": [5], "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"model": MODEL, "prompt": [5], "n": 0}, 400, "n", "n must be"),
    ({"model": MODEL, "prompt": [5], "temperature": "hot"}, 400, "temperature", "number"),
    ({"model": MODEL, "prompt": []}, 400, "prompt", "empty"),
    ({"model": MODEL, "prompt": [VOCAB]}, 400, "prompt", "outside the vocabulary"),
    ({"model": MODEL, "prompt": [-1]}, 400, "prompt", "token id -1 is outside"),
    ({"model": MODEL, "prompt": [5, "w3"]}, 400, "prompt", "prompt"),  # token ids and text in one list
    ({"model": MODEL, "prompt": [True]}, 400, "prompt", "prompt"),
    ({"model": MODEL, "prompt": [5.5]}, 400, "prompt", "prompt"),
    ({"model": MODEL, "prompt": [5], "suffix": "x"}, 400, "suffix", "not supported"),
    ({"model": MODEL, "prompt": [5], "n": 2, "temperature": 0}, 400, "n", "greedy"),
    ({"model": MODEL, "prompt": [5], "stop": ["w3", ""]}, 400, "stop", "empty string"),
    ({"model": MODEL, "prompt": [5], "logit_bias": {"x": 1}}, 400, "logit_bias", "not a token id"),
    ({"model": MODEL, "prompt": [5], "presence_penalty": 3}, 400, "presence_penalty", "[-2, 2]"),
    ({"model": MODEL, "prompt": [5], "min_tokens": 20, "max_tokens": 4}, 400, "min_tokens", "max_tokens=4"),
    ({"model": MODEL, "prompt": [5], "logprobs": 21}, 400, "logprobs", "between 0 and 20"),
    ({"model": MODEL, "prompt": [5], "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs", "stream"),
    ({"model": MODEL, "prompt": [5], "allowed_token_ids": [VOCAB]}, 400, None, "outside the vocabulary"),
])
def test_bad_completion_requests_get_openai_errors(serve, body, status, param, words):
    server = serve()
    if isinstance(body, dict):
        response = httpx.post(f"{server.base_url}/v1/completions", json=body)
    else:
        response = httpx.post(f"{server.base_url}/v1/completions", content=body,
                              headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = error_of(response)
    assert error["param"] == param and words in error["message"]
    assert error["type"] == "invalid_request_error"


def test_bad_chat_requests_get_openai_errors(serve, served):
    server = serve(chat_template=None)
    url = f"{server.base_url}/v1/chat/completions"
    no_template = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "w3"}]})
    assert no_template.status_code == 400 and "no chat template" in error_of(no_template)["message"]
    no_messages = httpx.post(url, json={"model": MODEL, "messages": []})
    assert no_messages.status_code == 400 and error_of(no_messages)["param"] == "messages"
    bad_role = httpx.post(url, json={"model": MODEL, "messages": [{"role": "robot", "content": "w3"}]})
    assert bad_role.status_code == 400 and error_of(bad_role)["param"] == "messages"
    image = httpx.post(url, json={"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert image.status_code == 400 and "image_url" in error_of(image)["message"]


def test_a_request_larger_than_the_whole_kv_cache_is_refused_and_logged(model_folder, tmp_path):  # noqa: F811
    llm = LLM(model_folder, device="cpu", max_num_batched_tokens=64, num_gpu_blocks_override=4)
    app = create_app(llm.engine, model_name=MODEL,
                     request_log=RequestLog(tmp_path / "log", "cpu", {"model": model_folder}))
    with ServerThread(app) as server:
        for n in (1, 2):  # every choice of a refused request is answered, whole or streamed
            for stream in (False, True):
                response = httpx.post(f"{server.base_url}/v1/completions", timeout=60, json={
                    "model": MODEL, "prompt": [5] * 60, "max_tokens": 20, "n": n, "stream": stream})
                if stream:
                    error = _read_sse_events(response, 1)[0]["error"]
                    assert response.status_code == 200 and "KV blocks" in error["message"]
                else:
                    assert response.status_code == 400 and "KV blocks" in error_of(response)["message"]
    run = read_run(tmp_path / "log")
    assert run.requests.column("status").to_pylist() == ["rejected"] * 4


def test_a_model_without_tokenizer_serves_token_ids_and_says_what_needs_text():
    llm = LLM("tiny-qwen3", device="cpu", max_model_len=256, max_num_batched_tokens=64)  # a preset: no tokenizer
    with ServerThread(create_app(llm.engine, model_name=MODEL)) as server:
        url = f"{server.base_url}/v1/completions"
        body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                "logprobs": 0, "return_token_ids": True}
        choice = httpx.post(url, json=body, timeout=60).json()["choices"][0]
        assert choice["text"] == "" and len(choice["token_ids"]) == 3
        assert choice["logprobs"]["tokens"] == [f"token_id:{token}" for token in choice["token_ids"]]
        stop = httpx.post(url, json={**body, "stop": ["w3"]}, timeout=60)
        assert stop.status_code == 400 and "need a tokenizer" in error_of(stop)["message"]
        text = httpx.post(url, json={**body, "prompt": "w3 w4"}, timeout=60)
        assert text.status_code == 400 and "send the prompt as token ids" in error_of(text)["message"]


def test_api_key_is_required_on_v1_routes_only(serve):
    server = serve(api_key="sesame")
    with pytest.raises(openai.AuthenticationError):
        client(server).models.list()
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key="wrong").completions.create(model=MODEL, prompt=[5], max_tokens=1)
    unauthorized = httpx.post(f"{server.base_url}/v1/completions", content=b"{not json")
    assert unauthorized.status_code == 401 and error_of(unauthorized)["code"] == "invalid_api_key"
    assert client(server, api_key="sesame").completions.create(model=MODEL, prompt=[5], max_tokens=1).choices
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200


# ---- the request log


def test_every_accepted_request_is_in_the_request_log(model_folder, tmp_path):  # noqa: F811
    llm = LLM(model_folder, device="cpu", max_num_batched_tokens=64)
    log = RequestLog(tmp_path / "log", "cpu", {"model": model_folder})
    app = create_app(llm.engine, model_name=MODEL, request_log=log)
    with ServerThread(app) as server:
        api = client(server)
        api.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, extra_body={"ignore_eos": True})
        api.completions.create(model=MODEL, prompt=[5, 6], n=2, max_tokens=2, extra_body={"ignore_eos": True})
        with pytest.raises(openai.BadRequestError):  # refused before the engine: not accepted, not logged
            api.completions.create(model=MODEL, prompt=[5], temperature=-1)
        written = httpx.post(f"{server.base_url}/request_log").json()
        assert written["num_requests"] == 3 and written["complete"]
        on_demand = read_run(tmp_path / "log")
        assert on_demand.requests.column("output_len").to_pylist() == [3, 2, 2]
        api.completions.create(model=MODEL, prompt=[8], max_tokens=1)
    run = read_run(tmp_path / "log")  # rewritten when the server stopped
    assert run.requests.num_rows == 4 and set(run.requests.column("status").to_pylist()) == {"finished"}
    assert run.steps.num_rows > 0 and run.metadata["executor_kind"] == "cpu"


# ---- load, and the command line


@pytest.mark.slow
def test_a_bounded_load_ends_with_every_request_answered_and_no_block_leaked(serve):
    """400 requests from 48 clients at once, streamed or whole, a quarter of the streams dropped after their
    first chunk; it stops by itself (a fixed count, each request bounded by the client's timeout)."""
    server = serve()
    outcomes = []

    async def one(api, index):
        prompt = [2 + (index * 5 + offset) % 100 for offset in range(4 + index % 20)]
        options = dict(model=MODEL, prompt=prompt, max_tokens=1 + index % 24, temperature=0.7, seed=index,
                       extra_body={"ignore_eos": True})
        if index % 2:
            response = await api.completions.create(**options)
            outcomes.append(("whole", response.usage.completion_tokens == options["max_tokens"]))
            return
        stream = await api.completions.create(**options, stream=True)
        if index % 8 == 0:
            async for _ in stream:
                break
            await stream.close()
            outcomes.append(("dropped", True))
            return
        finish = [choice.finish_reason async for chunk in stream for choice in chunk.choices if choice.finish_reason]
        outcomes.append(("streamed", finish == ["length"]))

    async def load():
        api = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        limit = asyncio.Semaphore(48)

        async def bounded(index):
            async with limit:
                await one(api, index)

        await asyncio.gather(*(bounded(index) for index in range(400)))

    asyncio.run(load())
    assert len(outcomes) == 400 and all(ok for _, ok in outcomes)
    wait_until_idle(server)
    assert free_blocks(server)[0] == free_blocks(server)[1]
    assert server.app.state.serving.num_in_flight == 0


@pytest.mark.slow
def test_twinfer_serve_command_serves_and_writes_its_log_on_ctrl_c(model_folder, tmp_path):  # noqa: F811
    import os
    import signal
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "twinfer", "serve", model_folder, "--port", "0", "--device", "cpu",
         "--served-model-name", MODEL, "--api-key", "k", "--request-log", str(tmp_path / "log"),
         "--chat-template", CHAT_TEMPLATE],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stdout.readline()
        assert " on http://127.0.0.1:" in line, line
        base_url = line.split(" on ", 1)[1].split("/v1", 1)[0]
        api = openai.OpenAI(base_url=f"{base_url}/v1", api_key="k", max_retries=0)
        reply = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w3 w4"}],
                                            max_tokens=3, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 3
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "request log written" in output and "Traceback" not in output
    assert read_run(tmp_path / "log").requests.column("output_len").to_pylist() == [3]


def test_first_tokens_are_handed_on_before_the_running_streams(model_folder):  # noqa: F811
    llm = LLM(model_folder, device="cpu", max_num_batched_tokens=64)
    batches = []
    driver = EngineDriver(llm.engine, send=batches.append)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for name in ("a", "b"):
        driver._apply(("add", name, name, [5, 6, 7], params, 0.0, None))
    while not any(delta.token_ids for batch in batches for _, delta in batch):
        llm.engine.step()
        driver._publish()
    driver._apply(("add", "new", "new", [9, 10], params, 0.0, None))
    while not any(delta.request_id == "new" and delta.token_ids for batch in batches for _, delta in batch):
        llm.engine.step()
        driver._publish()
    # The step that gave "new" its first token gave a and b one more each: new's goes out first, on its own.
    assert [[delta.request_id for _, delta in batch] for batch in batches[-2:]] == [["new"], ["a", "b"]]
    llm.engine.abort_all("test over")
