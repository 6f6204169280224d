"""`twinfer serve MODEL`: the engine behind an OpenAI-compatible HTTP API (completions, chat, models, health,
Prometheus metrics), on 127.0.0.1 unless --host says otherwise."""

import argparse
import os
import socket
from dataclasses import replace
from pathlib import Path

from twinfer.cli.options import add_engine_options, engine_args_from

API_KEY_VARIABLE = "TWINFER_API_KEY"


def register(commands) -> None:
    parser = commands.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (streamed "
                    "as server-sent events or not), /v1/models, /health, /metrics (Prometheus, vLLM's names).")
    parser.add_argument("model", help="a Hugging Face model folder or a preset name (presets have no tokenizer: "
                                      "send prompts as token ids)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this "
                                                             "machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0: any free port)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_VARIABLE} when "
                             "set, else none)")
    parser.add_argument("--tokenizer", default=None, help="a model folder or Hub id whose tokenizer to use "
                                                            "(default: MODEL's)")
    parser.add_argument("--served-model-name", default=None, help="the name clients give as model (default: MODEL)")
    parser.add_argument("--chat-template", default=None,
                        help="a Jinja chat template, or a file holding one (default: the tokenizer's)")
    parser.add_argument("--max-concurrent-requests", type=int, default=None,
                        help="answer 429 to a request arriving while this many are being served (default: no "
                             "limit; requests beyond --max-num-seqs wait in the engine's queue)")
    parser.add_argument("--request-log", default=None, metavar="DIR",
                        help="write every request the engine accepted here as a run folder (the replay's schema) "
                             "when the server stops, and on POST /request_log")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when there is a GPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the engine's sampler and dummy weights")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="step the engine in a process of its own, as vLLM's engine core, so HTTP work never "
                             "waits for the engine's Python (default: %(default)s; --no-engine-process: a thread "
                             "of the server's process)")
    add_engine_options(parser)
    # A server schedules asynchronously where it can (EngineArgs' default); replay's flag default is off.
    parser.set_defaults(async_scheduling=None)


def run(args: argparse.Namespace) -> int:
    from analysis.run_store import RUN_FILES

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_concurrent_requests is not None and args.max_concurrent_requests < 1:
        raise ValueError(f"--max-concurrent-requests must be a positive integer, got {args.max_concurrent_requests}")
    if args.request_log is not None:
        log = Path(args.request_log)
        if log.exists() and (not log.is_dir() or (any(log.iterdir()) and not (log / RUN_FILES[0]).is_file())):
            raise ValueError(f"--request-log {log} exists and is not a run folder; refusing to replace it")
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    chat_template = _chat_template(args.chat_template)
    # Bind before loading the model: a port in use fails at once, not after minutes of loading.
    listener = socket.create_server((args.host, args.port), reuse_port=False)
    try:
        return _serve(args, listener, api_key, chat_template)
    finally:
        listener.close()


def _serve(args, listener: socket.socket, api_key: str | None, chat_template: str | None) -> int:
    import torch
    import uvicorn

    from engine.tokenizer import load_tokenizer
    from twinfer.cli.replay import real_engine_and_metadata
    from twinfer.serving.app import create_app
    from twinfer.serving.engine_process import EngineProcess, RequestLogSpec
    from twinfer.serving.request_log import RequestLog

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine_args = replace(engine_args_from(args, device=device), tokenizer=args.tokenizer)
    name = args.served_model_name or args.model
    executor_kind = "gpu" if device == "cuda" else "cpu"
    log_metadata = {"served_model_name": name, "load_format": engine_args.load_format}
    if args.engine_process:
        log_spec = (RequestLogSpec(args.request_log, executor_kind, log_metadata)
                    if args.request_log is not None else None)
        engine = EngineProcess(engine_args, tokenizer=engine_args.tokenizer or engine_args.model, request_log=log_spec)
        tokenizer, num_blocks, request_log = engine.tokenizer, engine.num_blocks, None
    else:
        engine, metadata = real_engine_and_metadata(engine_args)
        # The engine decodes each output's text itself, applying stop strings, as LLM's engine does.
        engine.tokenizer = tokenizer = load_tokenizer(engine_args.tokenizer or engine_args.model)
        num_blocks = engine.block_manager.num_blocks
        request_log = None
        if args.request_log is not None:
            request_log = RequestLog(args.request_log, executor_kind, {**metadata, **log_metadata})
    app = create_app(engine, model_name=name, model_source=args.model, api_key=api_key,
                     chat_template=chat_template, max_concurrent_requests=args.max_concurrent_requests,
                     request_log=request_log)
    host, port = listener.getsockname()[:2]
    print(f"twinfer serve: {name} on http://{host}:{port}/v1 ({executor_kind}, max_model_len "
          f"{engine.config.max_model_len}, {num_blocks} KV blocks"
          f"{', API key required' if api_key else ''}{'' if tokenizer else ', no tokenizer: token-id prompts only'})",
          flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:
        pass  # uvicorn raises Ctrl-C again once it has shut down (and the request log is written)
    finally:
        if args.engine_process:
            engine.close()  # already closed by the app's shutdown, unless uvicorn never started
    print("twinfer serve: stopped", flush=True)
    return 0


def _chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text when it names a file, else the template itself."""
    if value is None:
        return None
    path = Path(value)
    if "{" not in value and not path.is_file():
        raise FileNotFoundError(f"--chat-template {value}: no such file (and not a template: it has no '{{')")
    return path.read_text() if "{" not in value else value

