"""`--mode serve`: an OpenAI-compatible HTTP server with continuous batching, and a chat page at /."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from ..util import UserError
from . import common

HELP = "serve a model: OpenAI-compatible API (chat and completions, streaming) and a web chat page"


def add_arguments(parser) -> None:
    common.add_checkpoint(parser,
                          "the model: a checkpoint directory (or its run directory) or a Hugging Face directory")
    common.add_device(parser)
    common.add_compile(parser, "by default: loaded from disk, or compiled in the background while the eager "
                               "step serves")
    common.add_precision(parser)
    common.add_attention_window(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--max-concurrent", type=int, default=16, help="requests decoded together in one batch")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a slot; more get 429")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="longest prompt accepted (413 beyond; default: the model's context - 1)")
    parser.add_argument("--max-tokens", type=int, default=512,
                        help="the most tokens a request may generate (and the default of max_tokens)")
    parser.add_argument("--request-timeout", type=float, default=300.0,
                        help="seconds a request may take, waiting included (then 503)")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0,
                        help="on SIGTERM/SIGINT, seconds the replies in flight may take to finish before they are cut "
                             "(the server then stops its model and exits 0)")
    parser.add_argument("--max-restarts", type=int, default=3,
                        help="times the model's process is started again after it dies (out of memory, a kill)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the model (default: torch's, or with --engines the cores shared "
                             "out; 1 is best on a busy machine)")
    parser.add_argument("--engines", type=int, default=1,
                        help="model processes, each decoding its own batch of the requests (data parallel): "
                             "on a CPU, 2 engines of one thread each serve several clients faster than one of two "
                             "threads (docs/serving.md)")
    parser.add_argument("--model-name", default=None, help="the model id clients use (default: the checkpoint's name)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the model in the web server's process (by default it runs in a process of its "
                             "own, so that streaming many replies does not hold up the decoding)")


@dataclass(frozen=True)
class ServeSettings:
    checkpoint: str
    host: str
    port: int
    max_concurrent: int
    max_queue: int
    max_prompt_tokens: int | None
    max_tokens: int
    request_timeout: float
    api_key: str | None
    model_name: str
    device: str = "auto"
    kernel: str = "auto"
    compile: str = "auto"  # auto | yes | no (decoder.choose_decoder; auto compiles in the background)
    threads: int | None = None
    dtype: str = "fp32"
    in_process: bool = False
    engines: int = 1
    shutdown_timeout: float = 5.0
    max_restarts: int = 3
    quantize: str = "none"
    attention_window: int | None = None  # None: the checkpoint's; 0: all


def settings(args: argparse.Namespace) -> ServeSettings:
    common.required("--resume-from CHECKPOINT_DIR (e.g. runs/tiny_10m/latest)", args.resume_from, "the model to serve")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port ({args.port}) must be in 0..65535")
    common.count("--max-concurrent", args.max_concurrent)
    common.count("--max-tokens", args.max_tokens)
    common.count("--max-queue", args.max_queue, minimum=0)
    common.count("--max-prompt-tokens", args.max_prompt_tokens)
    common.positive_float("--request-timeout", args.request_timeout)
    common.finite_float("--shutdown-timeout", args.shutdown_timeout, lo=0)
    common.count("--max-restarts", args.max_restarts, minimum=0)
    common.count("--threads", args.threads)
    common.count("--engines", args.engines)
    if args.engines > args.max_concurrent:
        raise UserError(f"--engines ({args.engines}) must not exceed --max-concurrent ({args.max_concurrent}): "
                        "each engine decodes at least one request")
    if args.engines > 1 and args.in_process:
        raise UserError("--in-process runs one engine: leave out --engines")
    threads = args.threads or (max(1, (os.cpu_count() or 1) // args.engines) if args.engines > 1 else None)
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api-key must not be empty")
    path = Path(args.resume_from)
    name = args.model_name or (path.parent.name if path.name == "latest" else path.name) or "sakimi-next"
    return ServeSettings(args.resume_from, args.host, args.port, args.max_concurrent, args.max_queue,
                         args.max_prompt_tokens, args.max_tokens, args.request_timeout, args.api_key, name,
                         args.device, common.kernel_name(args), args.compile,
                         threads, args.dtype, bool(args.in_process), args.engines, args.shutdown_timeout,
                         args.max_restarts,
                         args.quantize, common.attention_window(args))


class _Stopped(BaseException):
    """SIGTERM or SIGINT before the server runs (while the model loads)."""


def _stop(sig, frame):
    raise _Stopped(sig)


def run(s: ServeSettings) -> int:
    """Serve until SIGTERM or SIGINT, then stop within --shutdown-timeout (see serve/server.py), stop
    the model's process, and return 0."""
    import uvicorn

    from ..serve.api import ServerSettings, create_app
    from ..serve.pool import EnginePool
    from ..serve.process import EngineProcess, ModelSource
    from ..serve.server import Server

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _stop) for sig in signals}  # uvicorn has its own while it serves
    engine, outcome = None, "stopped"
    try:
        source = ModelSource(s.checkpoint, s.device, s.kernel, s.dtype, s.compile, s.threads, s.quantize,
                             s.attention_window)
        if s.compile == "yes":
            print("loading or compiling the decoding step (minutes, once)...", file=sys.stderr, flush=True)
        if s.in_process:
            engine, info = _engine_in_process(source, s.max_concurrent, s.max_queue)
        else:  # --compile: minutes, the first time
            start_seconds = 3600.0 if s.compile == "yes" else 600.0
            engine = (EngineProcess(source, s.max_concurrent, s.max_queue, start_seconds, s.max_restarts)
                      if s.engines == 1 else
                      EnginePool(source, s.engines, s.max_concurrent, s.max_queue, start_seconds, s.max_restarts))
            engine.start()  # loads the model in the child: a bad checkpoint is a UserError here
            info = engine.info
        context = engine.config.max_position_embeddings
        max_prompt = min(s.max_prompt_tokens or context - 1, context - 1)
        app = create_app(engine, ServerSettings(s.model_name, max_prompt, s.max_tokens, s.request_timeout, s.api_key))
        if info.get("note"):
            print(info["note"], file=sys.stderr)
        engines = f", {s.engines} engines" if s.engines > 1 else ""
        print(f"serving {info['source']} as {s.model_name!r} ({info['parameters']:,} parameters, {info['device']}, "
              f"{info['dtype']}{engines}) on http://{s.host}:{s.port}/  (chat page at /, API at /v1)", file=sys.stderr,
              flush=True)
        server = Server(uvicorn.Config(app, host=s.host, port=s.port, log_level="warning"), s.shutdown_timeout,
                        on_timeout=engine.stop)
        server.run()
    except _Stopped:
        outcome = "stopped before the server started"
    finally:
        for sig in signals:  # stopping already: another signal must not cut the model's stop short
            signal.signal(sig, signal.SIG_IGN)
        if engine is not None:
            engine.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(outcome, file=sys.stderr)
    return 0


def _engine_in_process(source, max_concurrent: int, max_queue: int):
    """An Engine in this process, started: (engine, model info)."""
    from ..serve.engine import Engine
    from ..serve.process import load_model

    model, tokenizer, info, decode = load_model(source)
    engine = Engine(model, tokenizer, max_concurrent, max_queue, decode, source.threads)
    engine.start()
    return engine, info
