"""``python -m ar_course serve``: an OpenAI-style completions endpoint over the serving engine (extra ``[serve]``).

``POST /v1/completions`` with ``{"prompt": str, "max_tokens": int, "temperature", "top_k", "top_p", "seed",
"stream": bool, "model": str, "timeout_s": float}`` (any other field is refused; a ``model`` other than the
one served is a 404; a request past its timeout ends with ``finish_reason: "timeout"``). With ``"stream":
true`` the answer is server-sent events, one ``data: {...}`` chunk per token and ``data: [DONE]`` at the end;
otherwise one JSON object. Every bad request gets a 4xx with ``{"error": {"message": ..., "type":
"invalid_request_error"}}``; a full queue gets 503. Shutdown (Ctrl-C): uvicorn stops accepting connections
and lets every request in flight finish (each bounded by its timeout), so each gets its last chunk with a
finish reason; then the engine's worker waits up to ``--drain`` seconds for anything left (requests whose
client went away) and ends it with ``"cancelled"``. ``GET /health`` reports the queue.

Needs FastAPI and uvicorn (``pip install -e ".[serve]"``); imported only by this command.
"""


import asyncio
import json
import time
from typing import AsyncIterator

from ar_course.sampling import SamplingConfig
from ar_course.serving.engine import Engine, EngineConfig
from ar_course.serving.worker import EngineWorker, QueueFull, ShuttingDown, Ticket


def _fastapi():
    try:
        import fastapi
        import pydantic
        import uvicorn
    except ImportError as exc:
        raise RuntimeError(f"serving over HTTP needs FastAPI and uvicorn: pip install -e '.[serve]' ({exc})") from None
    return fastapi, pydantic, uvicorn


def _error(fastapi, status: int, message: str):
    return fastapi.responses.JSONResponse({"error": {"message": message, "type": "invalid_request_error"}},
                                          status_code=status)


def _request_model(pydantic, limit: int):
    class CompletionRequest(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        prompt: str = pydantic.Field(min_length=1)
        max_tokens: int = pydantic.Field(16, ge=1, le=limit)
        temperature: float = pydantic.Field(1.0, ge=0.0, le=10.0)
        top_k: int | None = pydantic.Field(None, ge=1)
        top_p: float | None = pydantic.Field(None, gt=0.0, le=1.0)
        seed: int | None = None
        stream: bool = False
        model: str | None = None
        timeout_s: float | None = pydantic.Field(None, gt=0.0, le=600.0)

    return CompletionRequest


def _chunk(cid: str, model: str, text: str, finish: str | None) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


async def _events(ticket: Ticket, queue: asyncio.Queue, tokenizer, worker: EngineWorker) -> AsyncIterator[tuple]:
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


def create_app(engine: Engine, tokenizer, *, model_name: str = "lm_target", max_pending: int = 64,
               timeout_s: float = 60.0, drain_s: float = 10.0):
    """The FastAPI app serving ``engine`` (its worker starts with the app and drains on shutdown)."""
    fastapi, pydantic, _ = _fastapi()
    from contextlib import asynccontextmanager

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

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def invalid(request, exc):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return _error(fastapi, 400, f"{where}: {first.get('msg', 'invalid value')}")

    @app.get("/health")
    async def health():
        worker = state["worker"]
        return {"status": "ok", "pending": worker.pending, "max_pending": worker.max_pending,
                "completed": worker.completed}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await _complete(fastapi, state["worker"], tokenizer, body, model_name)

    return app


async def _complete(fastapi, worker: EngineWorker, tokenizer, body, model_name: str):
    """Submit one completion and answer it, streamed or whole."""
    if body.model is not None and body.model != model_name:
        return _error(fastapi, 404, f"model {body.model!r} is not served here; this server serves {model_name!r}")
    try:
        prompt = tokenizer.encode(body.prompt).tolist()
        sampling = SamplingConfig(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
    except ValueError as exc:
        return _error(fastapi, 400, str(exc))
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    try:
        ticket = worker.submit(prompt, body.max_tokens, sampling, body.seed, body.timeout_s,
                               deliver=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
    except (QueueFull, ShuttingDown) as exc:
        return fastapi.responses.JSONResponse({"error": {"message": str(exc), "type": "overloaded"}}, status_code=503)
    cid = f"cmpl-{id(ticket):x}"
    events = _events(ticket, queue, tokenizer, worker)
    if body.stream:
        async def sse():
            async for kind, value in events:
                if kind == "error":
                    yield f"data: {json.dumps({'error': {'message': value}})}\n\n"
                    break
                text, finish = (tokenizer.decode([value]), None) if kind == "token" else ("", value)
                yield f"data: {json.dumps(_chunk(cid, model_name, text, finish))}\n\n"
            yield "data: [DONE]\n\n"

        return fastapi.responses.StreamingResponse(sse(), media_type="text/event-stream")
    tokens, finish = [], None
    async for kind, value in events:
        if kind == "error":
            return _error(fastapi, 400, str(value))
        if kind == "token":
            tokens.append(value)
        else:
            finish = value
    out = _chunk(cid, model_name, tokenizer.decode(tokens), finish)
    out["usage"] = {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                    "total_tokens": len(prompt) + len(tokens)}
    return out


def main(argv: list[str] | None = None) -> int:
    from ar_course.cli import ArgumentParser, float_in, int_in

    parser = ArgumentParser(prog="python -m ar_course serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lm_target", help="a shipped text model (lm_target, lm_draft) or a path")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int_in(1, 65535), default=8000)
    parser.add_argument("--num-blocks", type=int_in(1), default=256)
    parser.add_argument("--block-size", type=int_in(1), default=16)
    parser.add_argument("--max-running", type=int_in(1), default=16)
    parser.add_argument("--prefix-caching", action="store_true")
    parser.add_argument("--kv-bits", type=int, choices=(8, 4), default=None, help="quantize the KV pool (default: no)")
    parser.add_argument("--kv-window", type=int_in(1), default=None,
                        help="sinks + window: a query sees the sinks and the last positions, up to this many; "
                             "blocks out of the window are freed")
    parser.add_argument("--kv-sinks", type=int_in(0), default=4, help="with --kv-window: first positions kept")
    parser.add_argument("--kv-h2o-budget", type=int_in(1), default=None,
                        help="heavy-hitter eviction: positions a sequence keeps; its lowest-scoring blocks are freed")
    parser.add_argument("--kv-h2o-recent", type=int_in(0), default=32,
                        help="with --kv-h2o-budget: newest positions never evicted")
    parser.add_argument("--kv-merge-from", type=int_in(0), default=None,
                        help="MiniCache: layers (a, a+1) from this one on store one merged direction per token "
                             "(default: no merging)")
    parser.add_argument("--max-pending", type=int_in(1), default=64, help="requests in flight before 503")
    parser.add_argument("--timeout", type=float_in(0, lo_open=True), default=60.0, help="seconds a request may take")
    parser.add_argument("--drain", type=float_in(0), default=10.0,
                        help="seconds the worker waits for leftovers at shutdown")
    args = parser.parse_args(argv)
    try:
        config = EngineConfig(num_blocks=args.num_blocks, block_size=args.block_size, max_running=args.max_running,
                              prefix_caching=args.prefix_caching, kv_bits=args.kv_bits, kv_window=args.kv_window,
                              kv_sinks=args.kv_sinks, kv_h2o_budget=args.kv_h2o_budget,
                              kv_h2o_recent=args.kv_h2o_recent, kv_merge_from=args.kv_merge_from)
    except ValueError as e:
        parser.error(str(e))
    _, _, uvicorn = _fastapi()
    from ar_course.transformer import load_pretrained

    model, tokenizer = load_pretrained(args.model)
    engine = Engine(model, config)
    app = create_app(engine, tokenizer, model_name=str(args.model), max_pending=args.max_pending,
                     timeout_s=args.timeout, drain_s=args.drain)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
