"""``python -m ar_course serve``: an OpenAI-style completions endpoint over the serving engine (extra ``[serve]``).

``POST /v1/completions`` with ``{"prompt": str, "max_tokens": int, "temperature", "top_k", "top_p", "seed",
"stream": bool, "model": str, "timeout_s": float}`` (any other field is refused; a ``model`` other than the
one served is a 404; a request past its timeout ends with ``finish_reason: "timeout"``). With ``"stream":
true`` the answer is server-sent events, one ``data: {...}`` chunk per token and ``data: [DONE]`` at the end;
otherwise one JSON object. Field types are strict (``"max_tokens": "5"``, ``5.0`` or ``true`` is refused, so is
``"stream": "yes"``). Every bad request gets a 4xx with ``{"error": {"message": ..., "type":
"invalid_request_error"}}``: a wrong field, body (not JSON, not UTF-8), content type (415), path (404) or method
(405), a prompt past :data:`CHARS_PER_POSITION` characters per position of the context (refused before it is
tokenized), or a request that cannot run (too long for the context, a seed out of range: checked before anything
is queued or streamed); a full queue gets 503 (type ``"overloaded"``), and a request in flight when the engine
fails 500 (type ``"server_error"``). A client that hangs up before its answer, streamed or whole, has its request
cancelled (``GET /health`` counts it under ``"cancelled"``). The body must be sent as JSON with ``Content-Type:
application/json`` (or another ``application/*+json`` type): any other content type, or none (``curl -d`` alone sends
``application/x-www-form-urlencoded``), gets the 415 ``send the body as JSON with Content-Type: application/json
...`` whatever the body (so a web page cannot post to this server from another origin without a CORS preflight,
which it does not answer). A body longer than :func:`max_body_bytes` (12 bytes per character of the longest prompt,
the most JSON can spend on one, plus 4 KiB for the other fields: a few tens of kB) gets a 413 before it is read
or parsed, whether it announces its length (``Content-Length``) or is streamed (chunked: refused once that many bytes
have arrived). A completion that fails unexpectedly (say, a token the tokenizer cannot decode) gets the 500 JSON
error, or an error event in a stream, never a bare text page.
Shutdown (Ctrl-C or SIGTERM, exit status 0): uvicorn stops accepting connections and lets every request in flight
finish (each bounded by its timeout), so each gets its last chunk with a finish reason; then the engine's worker
waits up to ``--drain`` seconds for anything left (requests whose client went away) and ends it with
``"cancelled"``. ``GET /health`` reports the queue. Once the model is loaded and the port listens, one line on
stdout says where (``serving lm_target on http://127.0.0.1:8000 (POST /v1/completions, GET /health); Ctrl-C
stops``); uvicorn's own logs (access log included) are off but for warnings. Startup problems are one ``error:``
line: a bad option or ``--model`` (exit 2), a host and port that cannot be listened on (exit 1).

Needs FastAPI, uvicorn and pydantic 2 (the ``serve`` extra); imported only by this command.
"""


import argparse
import asyncio
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, AsyncIterator

from ar_course.checkpoint import CheckpointError
from ar_course.cli import exception_line
from ar_course.project import install_command
from ar_course.sampling import SamplingConfig
from ar_course.serving.engine import Engine, EngineConfig, check_merge_from
from ar_course.serving.paged import PagedKVCache
from ar_course.serving.worker import EngineWorker, QueueFull, ShuttingDown, Ticket, check_engine

if TYPE_CHECKING:
    import fastapi

    from ar_course.data.text import CharTokenizer


def _fastapi():
    try:
        import fastapi
        import pydantic
        import uvicorn
    except ImportError as exc:
        raise RuntimeError(f"serving over HTTP needs FastAPI and uvicorn: {install_command('serve')} ({exc})") from None
    if int(pydantic.VERSION.split(".")[0]) < 2:  # pydantic 1 ignores model_config: bad requests would pass
        raise RuntimeError(f"serving over HTTP needs pydantic 2 (its strict request checks), found "
                           f"{pydantic.VERSION}: {install_command('serve')}")
    return fastapi, pydantic, uvicorn


def _error(fastapi, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
    return fastapi.responses.JSONResponse({"error": {"message": message, "type": kind}}, status_code=status,
                                          headers=headers)


def _is_json(content_type: str | None) -> bool:
    """Whether ``content_type`` (a Content-Type header, None when absent) is one FastAPI reads as JSON:
    ``application/json`` or ``application/*+json``, parameters such as ``; charset=utf-8`` aside."""
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


CHARS_PER_POSITION = 8
"""A prompt may hold at most this many characters per position of the model's context: more cannot fit whatever
the tokenizer (the shipped ones spend one position per character), and is refused before it is tokenized."""


def max_body_bytes(limit: int) -> int:
    """The largest request body the server reads for a model of ``limit + 1`` positions of context: 12 bytes (a
    JSON escape of a character beyond the BMP, ``\\ud83d\\ude00``) per character of the longest prompt
    (:data:`CHARS_PER_POSITION` per position), plus 4 KiB for the other fields."""
    return 12 * CHARS_PER_POSITION * (limit + 1) + 4096


class _BodyLimit:
    """ASGI middleware: a request body of more than ``max_bytes`` gets the 413 JSON error, before it is read when its
    ``Content-Length`` says so, else as soon as that many bytes of it have arrived."""

    def __init__(self, app, max_bytes: int, fastapi) -> None:
        self.app, self.max_bytes, self.fastapi = app, max_bytes, fastapi

    def _message(self, got: str) -> str:
        return f"request body too large: at most {self.max_bytes} bytes for this model's context, got {got}"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException

        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and not length.isdigit():
            message = f"Content-Length must be a number of bytes, got {length.decode('latin-1')[:40]!r}"
            return await _error(self.fastapi, 400, message)(scope, receive, send)
        if length is not None and int(length) > self.max_bytes:
            got = f"Content-Length {length.decode('latin-1')}"
            return await _error(self.fastapi, 413, self._message(got))(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI re-raises an HTTPException: the app's 413 JSON error
                    raise HTTPException(413, self._message(f"more than {self.max_bytes} bytes"))
            return message

        await self.app(scope, limited, send)


def _request_model(pydantic, limit: int):
    finite = dict(allow_inf_nan=False)  # NaN and inf are refused as not finite, not as out of range

    class CompletionRequest(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid", strict=True)  # no "5" or true for an int
        prompt: str = pydantic.Field(min_length=1, max_length=CHARS_PER_POSITION * (limit + 1))
        max_tokens: int = pydantic.Field(16, ge=1, le=limit)
        temperature: float = pydantic.Field(1.0, ge=0.0, le=10.0, **finite)
        top_k: int | None = pydantic.Field(None, ge=1)
        top_p: float | None = pydantic.Field(None, gt=0.0, le=1.0, **finite)
        seed: int | None = None
        stream: bool = False
        model: str | None = None
        timeout_s: float | None = pydantic.Field(None, gt=0.0, le=600.0, **finite)

    return CompletionRequest


def _chunk(cid: str, model: str, text: str, finish: str | None) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


async def _events(ticket: Ticket, queue: asyncio.Queue, worker: EngineWorker) -> AsyncIterator[tuple]:
    """``(kind, value)`` of ``ticket`` as they arrive; cancels the request if the consumer stops early."""
    ended = False
    try:
        while not ended:
            kind, value = await queue.get()
            ended = kind != "token"
            yield kind, value
    finally:
        if not ended:
            worker.cancel(ticket)


def create_app(engine: Engine, tokenizer: "CharTokenizer", *, model_name: str = "lm_target", max_pending: int = 64,
               timeout_s: float = 60.0, drain_s: float = 10.0) -> "fastapi.FastAPI":
    """The FastAPI app serving ``engine`` (its worker starts with the app and drains on shutdown).

    ``tokenizer``: what encodes a prompt (``encode(str)`` -> 1-D tensor of ids) and decodes tokens (``decode(list)``
    -> str), as :func:`~ar_course.transformer.load_pretrained` returns it; ``model_name``: the name answered in
    ``"model"`` (another requested name is a 404); ``max_pending``, ``timeout_s``: the
    :class:`~ar_course.serving.worker.EngineWorker`'s limits (``timeout_s``: a request's default deadline, in
    seconds); ``drain_s``: seconds the worker waits for requests in flight at shutdown.

    Raises:
        TypeError: ``engine`` is not an :class:`~ar_course.serving.Engine` (which checks its model when built).
        RuntimeError: FastAPI or uvicorn is not installed."""
    check_engine(engine)
    fastapi, pydantic, _ = _fastapi()
    from contextlib import asynccontextmanager

    from starlette.exceptions import HTTPException  # what FastAPI's routing raises: 404, 405, an unreadable body

    limit = engine.model.config.block_size - 1
    CompletionRequest = _request_model(pydantic, limit)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["worker"] = EngineWorker(engine, max_pending=max_pending, timeout_s=timeout_s)
        yield
        state["completed"] = await asyncio.to_thread(state["worker"].shutdown, drain_s)

    app = fastapi.FastAPI(title="ar-course serving", lifespan=lifespan)
    app.state.serving = state
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes(limit), fastapi=fastapi)

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def invalid(request, exc):
        content_type = request.headers.get("content-type")
        if not _is_json(content_type):  # FastAPI read no JSON: the model got the raw bytes, or nothing
            got = f"Content-Type: {content_type}" if content_type else "no Content-Type"
            return _error(fastapi, 415, f"send the body as JSON with Content-Type: application/json (got {got}; "
                                        "with curl: -H 'Content-Type: application/json')")
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":  # loc: ("body", character offset)
            at = first["loc"][-1]
            return _error(fastapi, 400, f"body is not valid JSON: {first['ctx']['error']} (at character {at})")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        if where == "prompt" and first.get("type") == "string_too_long":  # say where the limit comes from
            return _error(fastapi, 400, f"prompt: at most {first['ctx']['max_length']} characters "
                                        f"({CHARS_PER_POSITION} per position of the model's context of {limit + 1}), "
                                        f"got {len(first['input'])}")
        return _error(fastapi, 400, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # the same error shape as every other refusal
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"no {where} here: this server answers POST /v1/completions and GET /health"
        elif exc.status_code == 405:
            message = f"{where} is not allowed: {request.url.path} takes {(exc.headers or {}).get('Allow', '?')}"
        elif isinstance(exc.__cause__, UnicodeDecodeError):
            message = f"body is not valid JSON: it is not UTF-8 text ({exc.__cause__.reason} at byte " \
                      f"{exc.__cause__.start})"
        else:
            message = str(exc.detail)
        return _error(fastapi, exc.status_code, message, headers=exc.headers)

    @app.get("/health")
    async def health():
        worker = state["worker"]
        return {"status": "ok", "pending": worker.pending, "max_pending": worker.max_pending,
                "completed": worker.completed}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: fastapi.Request):
        return await _complete(fastapi, state["worker"], tokenizer, body, model_name, request)

    return app


def _failure(exc: Exception) -> str:
    """The message of an unexpected failure while answering: ``cannot decode the completion (ValueError: ...)``."""
    return f"cannot decode the completion ({exception_line(exc)})"


async def _watch_disconnect(request, worker: EngineWorker, ticket: Ticket) -> None:
    """Cancel ``ticket`` once the client of ``request`` has gone away (polled every 0.1 s)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    worker.cancel(ticket)


async def _complete(fastapi, worker: EngineWorker, tokenizer, body, model_name: str, request):
    """Submit one completion and answer it, streamed or whole. The request is checked in full before it is
    queued, so a bad one gets its 400 even when it asks for a stream."""
    if body.model is not None and body.model != model_name:
        return _error(fastapi, 404, f"model {body.model!r} is not served here; this server serves {model_name!r}")
    try:
        prompt = tokenizer.encode(body.prompt).tolist()
        sampling = SamplingConfig(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
        worker.engine.check_request(prompt, body.max_tokens, sampling=sampling, seed=body.seed)
    except ValueError as exc:
        return _error(fastapi, 400, str(exc))
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    try:
        ticket = worker.submit(prompt, body.max_tokens, sampling=sampling, seed=body.seed, timeout_s=body.timeout_s,
                               deliver=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
    except (QueueFull, ShuttingDown) as exc:
        return fastapi.responses.JSONResponse({"error": {"message": str(exc), "type": "overloaded"}}, status_code=503)
    cid = f"cmpl-{uuid.uuid4().hex[:24]}"
    events = _events(ticket, queue, worker)
    if body.stream:
        async def sse():
            async for kind, value in events:
                if kind in ("error", "failed"):
                    error = {"message": value, "type": "invalid_request_error" if kind == "error" else "server_error"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
                try:
                    text, finish = (tokenizer.decode([value]), None) if kind == "token" else ("", value)
                except Exception as exc:  # noqa: BLE001 - an error event, never a stream cut short
                    error = {"message": _failure(exc), "type": "server_error"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
                yield f"data: {json.dumps(_chunk(cid, model_name, text, finish))}\n\n"
            yield "data: [DONE]\n\n"

        return fastapi.responses.StreamingResponse(sse(), media_type="text/event-stream")
    tokens, finish = [], None
    watcher = asyncio.create_task(_watch_disconnect(request, worker, ticket))  # a client gone: "cancelled"
    try:
        async for kind, value in events:
            if kind == "error":
                return _error(fastapi, 400, str(value))
            if kind == "failed":
                return _error(fastapi, 500, str(value), "server_error")
            if kind == "token":
                tokens.append(value)
            else:
                finish = value
    finally:
        watcher.cancel()
    try:
        text = tokenizer.decode(tokens)
    except Exception as exc:  # noqa: BLE001 - the documented JSON 500, never a bare text page
        return _error(fastapi, 500, _failure(exc), "server_error")
    out = _chunk(cid, model_name, text, finish)
    out["usage"] = {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                    "total_tokens": len(prompt) + len(tokens)}
    return out


_ENGINE_OPTIONS = ("num_blocks", "block_size", "max_running", "prefix_caching", "kv_bits", "kv_window", "kv_sinks",
                   "kv_h2o_budget", "kv_h2o_recent", "kv_merge_from")  # EngineConfig fields set by an option


def _as_options(message: str, args: argparse.Namespace) -> str:
    """``message`` about :class:`EngineConfig` fields, led by the options that set them as they stand on the command
    line: ``--kv-sinks 4 --kv-window 4: need 0 <= kv_sinks < kv_window, got 4 and 4``."""
    named = sorted((m.start(), field) for field in _ENGINE_OPTIONS if (m := re.search(rf"\b{field}\b", message)))
    options = []
    for _, field in named:
        value, option = getattr(args, field), "--" + field.replace("_", "-")
        options.append(option if value is True else f"{option} {value}")
    return f"{' '.join(options)}: {message}" if options else message


def _cannot_listen(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now (``"[Errno 98] Address already in use"``), or None when every
    address it names binds, as uvicorn will bind them."""
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
    except OSError as exc:  # socket.gaierror for a host that does not resolve
        return exc.strerror or str(exc)
    return None


def _memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_engine_options(parser, args: argparse.Namespace, model, config: EngineConfig) -> None:
    """The options that depend on the loaded model: ``--kv-merge-from`` must merge a pair of its layers, and the
    KV pool (``--num-blocks`` x ``--block-size`` positions) must fit in this machine's memory (usage errors)."""
    try:
        check_merge_from(model.config.n_layer, config.kv_merge_from)
    except ValueError as exc:
        parser.error(str(exc).replace("kv_merge_from", "--kv-merge-from", 1))
    per_position = PagedKVCache.for_model(model, 1, 1, config.kv_bits, config.kv_merge_from).bytes_per_block()
    pool, memory = per_position * config.num_blocks * config.block_size, _memory_bytes()
    if memory is not None and pool > memory:
        parser.error(f"--num-blocks {config.num_blocks} x --block-size {config.block_size} positions make a "
                     f"{pool / 2**30:.3g} GiB KV pool, more than this machine's {memory / 2**30:.3g} GiB of memory")


_DESCRIPTION = """\
Serve a text model over HTTP: OpenAI-style completions, whole or streamed.
Once the model is loaded and the port listens, it prints one line saying where;
Ctrl-C or SIGTERM stops it (the requests in flight end first) with exit status 0.

POST /v1/completions takes a JSON object (Content-Type: application/json):
  prompt       string, required, at most 8 characters per position of the
               model's context (the shipped models: one position per character)
  max_tokens   integer, 1 to the model's context - 1 [16]
  temperature  number in [0, 10], 0 = greedy [1.0]
  top_k        integer >= 1 (default: no top-k)
  top_p        number in (0, 1] (default: no top-p)
  seed         integer (default: unseeded)
  stream       true: server-sent events, one "data: {...}" chunk per token,
               then "data: [DONE]" [false]
  model        the served model's name (--model); another name is a 404
  timeout_s    seconds, in (0, 600] [--timeout]
Any other field, or a value of another JSON type ("5" for 5), is a 400; a body
sent as another content type (curl -d without -H) is a 415. The answer:
{"choices": [{"text": ..., "finish_reason": ...}], "usage": {...}}.
GET /health reports the queue: status, pending, max_pending, completed.

example:
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
    -d '{"prompt": "The for statement", "max_tokens": 20, "temperature": 0}'
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m ar_course serve`` (each option's value is checked as it is parsed)."""
    from ar_course.cli import ArgumentParser, checkpoint_arg, float_in, int_in

    parser = ArgumentParser(prog="python -m ar_course serve", description=_DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=checkpoint_arg, default="lm_target",
                        help="a shipped text model (lm_target, lm_draft, lm_small) or a path [%(default)s]")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface) [%(default)s]")
    parser.add_argument("--port", type=int_in(1, 65535), default=8000, help="TCP port [%(default)s]")
    parser.add_argument("--num-blocks", type=int_in(1), default=256, help="blocks in the KV pool [%(default)s]")
    parser.add_argument("--block-size", type=int_in(1), default=16, help="positions in a KV block [%(default)s]")
    parser.add_argument("--max-running", type=int_in(1, EngineConfig.max_step_tokens), default=16,
                        help="sequences in a batch (at most the tokens of one forward pass, "
                             f"{EngineConfig.max_step_tokens}) [%(default)s]")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="share the KV blocks of a prompt prefix between requests (default: no)")
    parser.add_argument("--kv-bits", type=int, choices=(8, 4), default=None, help="quantize the KV pool (default: no)")
    parser.add_argument("--kv-window", type=int_in(1), default=None,
                        help="sinks + window: a query sees the sinks and the last positions, up to this many; "
                             "blocks out of the window are freed (default: no window)")
    parser.add_argument("--kv-sinks", type=int_in(0), default=4,
                        help="with --kv-window: first positions kept [%(default)s]")
    parser.add_argument("--kv-h2o-budget", type=int_in(1), default=None,
                        help="heavy-hitter eviction: positions a sequence keeps; its lowest-scoring blocks are freed "
                             "(default: no eviction)")
    parser.add_argument("--kv-h2o-recent", type=int_in(0), default=32,
                        help="with --kv-h2o-budget: newest positions never evicted [%(default)s]")
    parser.add_argument("--kv-merge-from", type=int_in(0), default=None,
                        help="MiniCache: layers (a, a+1) from this one on store one merged direction per token "
                             "(default: no merging)")
    parser.add_argument("--max-pending", type=int_in(1), default=64,
                        help="requests in flight before 503 [%(default)s]")
    parser.add_argument("--timeout", type=float_in(0, lo_open=True), default=60.0,
                        help="seconds a request may take, unless it sets timeout_s [%(default)s]")
    parser.add_argument("--drain", type=float_in(0), default=10.0,
                        help="seconds the worker waits for leftovers at shutdown [%(default)s]")
    return parser


def _run(app, *, host: str, port: int, banner: str) -> None:
    """Serve ``app`` on ``host:port`` with uvicorn until stopped (its logs off but for warnings, no access log), and
    print ``banner`` on stdout once the socket listens."""
    _, _, uvicorn = _fastapi()

    class Server(uvicorn.Server):
        async def startup(self, sockets: list | None = None) -> None:  # the app's startup, the bind (or exit)
            await super().startup(sockets)
            print(banner, flush=True)

    # uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the signal again for the handler it found:
    # Ctrl-C becomes a KeyboardInterrupt, and SIGTERM (which would kill the process, status -15) a _Stopped
    # (only the main thread may set a handler; elsewhere uvicorn installs none either)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stopped) if main else None
    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)).run()
    except (KeyboardInterrupt, _Stopped):
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


class _Stopped(Exception):
    """SIGTERM, raised again by uvicorn once it has shut down."""


def _stopped(signum: int, frame) -> None:
    raise _Stopped


def main(argv: list[str] | None = None) -> int:
    """``python -m ar_course serve``: parse ``argv`` (default: the command line), load the model and serve it
    until stopped (see the module docstring), printing one line on stdout once it listens; returns 0. A bad option
    exits with status 2 and a host and port that cannot be listened on with status 1; a bad ``--model`` raises
    :class:`~ar_course.cli.UsageError` (status 2 under ``python -m ar_course``)."""
    from ar_course.cli import EXIT_FAILURE, UsageError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = EngineConfig(num_blocks=args.num_blocks, block_size=args.block_size, max_running=args.max_running,
                              prefix_caching=args.prefix_caching, kv_bits=args.kv_bits, kv_window=args.kv_window,
                              kv_sinks=args.kv_sinks, kv_h2o_budget=args.kv_h2o_budget,
                              kv_h2o_recent=args.kv_h2o_recent, kv_merge_from=args.kv_merge_from)
    except ValueError as e:
        parser.error(_as_options(str(e), args))
    _fastapi()  # FastAPI and uvicorn are there before the model loads
    from ar_course.transformer import load_pretrained

    if (why := _cannot_listen(args.host, args.port)) is not None:
        parser.exit(EXIT_FAILURE, f"error: cannot listen on {args.host}:{args.port}: {why}\n")
    try:
        model, tokenizer = load_pretrained(args.model)
    except CheckpointError as exc:  # a bad --model is bad input, as in generate
        raise UsageError(str(exc)) from None
    try:
        _check_engine_options(parser, args, model, config)
        engine = Engine(model, config)
    except ValueError as e:  # e.g. --kv-bits 4 with an odd head size
        parser.error(_as_options(str(e), args))
    app = create_app(engine, tokenizer, model_name=str(args.model), max_pending=args.max_pending,
                     timeout_s=args.timeout, drain_s=args.drain)
    where = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address
    _run(app, host=args.host, port=args.port,
         banner=f"serving {args.model} on http://{where}:{args.port} (POST /v1/completions, GET /health); "
                "Ctrl-C stops")
    return 0
