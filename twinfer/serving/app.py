"""The HTTP application: OpenAI's routes, /health, /metrics and the request log, on FastAPI.

Routes under /v1 and /request_log need `Authorization: Bearer KEY` when the server has an API key (checked
before the body is read, so a client without the key learns nothing else); /health and /metrics do not, as
in vLLM.
"""

import asyncio
import hmac
import inspect
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from engine.engine import Engine
from twinfer.serving.engine_process import EngineProcess
from twinfer.serving.api_error import APIError
from twinfer.serving.engine_driver import EngineDriver, EngineUnavailable
from twinfer.serving.metrics import CONTENT_TYPE, ServerMetrics
from twinfer.serving.openai_serving import OpenAIServing
from twinfer.serving.protocol import ChatCompletionRequest, CompletionRequest
from twinfer.serving.request_log import RequestLog


class _BearerAuth:
    """ASGI middleware: 401 for a protected route without the right bearer token."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (scope["path"].startswith("/v1") or scope["path"] == "/request_log"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                error = APIError(401, "Incorrect API key provided: send the server's --api-key as a bearer token "
                                      "(Authorization: Bearer KEY).", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_error(error: RequestValidationError | ValidationError) -> APIError:
    """A 400 naming the first field that failed, or saying the JSON is malformed."""
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON in the request body: {first.get('ctx', {}).get('error', first['msg'])}")
    if not location:
        return APIError(400, f"the request body must be a JSON object of the request's fields ({first['msg']})")
    param = ".".join(location) or None
    return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=location[0] if location else None)


async def _body(raw: Request, model: type[BaseModel]) -> BaseModel:
    """The request's JSON body as `model`, or the 400 that names what is wrong with it."""
    try:
        return model.model_validate_json(await raw.body())
    except ValidationError as error:
        raise _validation_error(error) from None


def create_app(engine: "Engine | EngineProcess", *, model_name: str, model_source: str | None = None,
               api_key: str | None = None, chat_template: str | None = None,
               max_concurrent_requests: int | None = None, request_log: RequestLog | None = None) -> FastAPI:
    """The server's app: it starts the engine's loop when it starts and stops it (writing the request log,
    when given) when it stops. The engine steps on a thread of this process (an Engine), or in a process of its
    own (an EngineProcess, whose own request log is written there). Text comes from the engine's tokenizer (it
    tokenizes prompts, decodes outputs and applies stop strings); without one, prompts are token ids and outputs
    have no text."""
    driver = EngineDriver(engine) if isinstance(engine, Engine) else engine
    if request_log is not None and not isinstance(engine, Engine):
        raise ValueError("an engine process writes its own request log: give it to EngineProcess")
    config = driver.config
    metrics = ServerMetrics(model_name, config.max_model_len)
    driver.on_finish = metrics.observe_finished
    serving = OpenAIServing(driver, driver.tokenizer, model_name=model_name, max_model_len=config.max_model_len,
                            vocab_size=config.vocab_size, chat_template=chat_template,
                            max_concurrent_requests=max_concurrent_requests)
    created = int(time.time())
    log = request_log if isinstance(engine, Engine) else None
    keeps_log = request_log is not None or getattr(driver, "keeps_request_log", False)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if isinstance(engine, Engine) and hasattr(engine.clock, "restart"):
            engine.clock.restart()  # the log's times count from the server's start
        driver.start()
        try:
            yield
        finally:
            path = await asyncio.to_thread(driver.close, log)
            if path is not None:
                print(f"twinfer serve: request log written to {path}", flush=True)

    options = {}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        # FastAPI's OpenTelemetry spans cost time on every request and chunk; nothing here reads them.
        options["telemetry"] = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    app = FastAPI(title="twinfer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, **options)
    app.state.driver = driver
    app.state.serving = serving
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return _validation_error(error).response()

    @app.exception_handler(404)
    async def not_found(request: Request, error):
        return APIError(404, f"no route {request.method} {request.url.path}").response()

    @app.exception_handler(405)
    async def wrong_method(request: Request, error):
        return APIError(405, f"{request.method} is not allowed on {request.url.path}").response()

    @app.get("/health")
    async def health() -> Response:
        if driver.is_running:
            return Response(status_code=200)
        return APIError(503, driver.error or "the engine is not running").response()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        if driver.is_running:
            try:
                metrics.update_engine_state(await driver.state())
            except EngineUnavailable:
                pass  # the engine stopped while asked: its state as last read
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "twinfer",
                "root": model_source or model_name, "parent": None, "max_model_len": config.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    # The two generation routes are plain Starlette routes that validate the body with pydantic themselves:
    # FastAPI's per-route machinery (dependency solving, body to arguments) made an ASGI call's way to the engine
    # 0.67 ms instead of 0.35 on the development CPU (benchmarks/serve_way_in.py), on every request's TTFT.
    # Errors are the same 400s as FastAPI's validation gives.
    async def completions(raw: Request):
        return await serving.completions(await _body(raw, CompletionRequest), raw)

    async def chat_completions(raw: Request):
        return await serving.chat_completions(await _body(raw, ChatCompletionRequest), raw)

    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])

    @app.post("/request_log")
    async def write_request_log() -> JSONResponse:
        if not keeps_log:
            raise APIError(404, "this server keeps no request log: start it with --request-log DIR")
        try:
            path, num_requests, complete = await driver.write_request_log(log)
        except EngineUnavailable as error:
            raise APIError(503, f"the request log cannot be written now: {error}") from None
        return JSONResponse({"path": str(path), "num_requests": num_requests, "complete": complete})

    if api_key:
        app.add_middleware(_BearerAuth, api_key=api_key)
    return app

