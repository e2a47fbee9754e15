"""The engine worker and the HTTP server (chapter 09): every request ends with exactly one final event
(length, timeout or cancelled), the queue is bounded, shutdown drains or cancels, and the server on
127.0.0.1 answers OpenAI-style completions (whole and streamed) and refuses bad requests with a clear 4xx."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

from ar_course.sampling import SamplingConfig
from ar_course.serving import Engine, EngineConfig
from ar_course.serving.worker import HISTORY, EngineWorker, QueueFull, ShuttingDown
from ar_course.transformer import load_pretrained
from serving_fixtures import _one_thread, tiny  # noqa: F401 (pytest fixtures)

GREEDY = SamplingConfig(temperature=0.0)


def _drain(ticket, timeout=30.0):
    tokens, deadline = [], time.monotonic() + timeout
    while True:
        kind, value = ticket.events.get(timeout=max(deadline - time.monotonic(), 0.01))
        if kind == "token":
            tokens.append(value)
        else:
            return tokens, kind, value


def test_worker_answers_every_request_like_generate(tiny):
    worker = EngineWorker(Engine(tiny, EngineConfig(num_blocks=32, block_size=4, max_running=3)))
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    tickets = [worker.submit(p, 6, sampling=GREEDY) for p in prompts]
    for p, t in zip(prompts, tickets):
        tokens, kind, reason = _drain(t)
        assert (kind, reason) == ("end", "length")
        assert tokens == tiny.generate(torch.tensor(p)[None], 6, sampling=GREEDY)[0, len(p):].tolist()
    bad = worker.submit([], 3, sampling=GREEDY)
    assert _drain(bad)[1] == "error"
    assert worker.shutdown() == {"length": 3, "timeout": 0, "cancelled": 0}
    with pytest.raises(ShuttingDown):
        worker.submit([1], 2, sampling=GREEDY)


def test_a_long_running_worker_forgets_ended_requests_and_old_steps(tiny):
    """Every ended request (finished, refused, cancelled, timed out) is released from the engine, and the engine
    keeps the newest HISTORY step records: a server's memory does not grow with the requests it has served."""
    engine = Engine(tiny, EngineConfig(num_blocks=32, block_size=4, max_running=3))
    worker = EngineWorker(engine)
    assert engine.history.maxlen == HISTORY
    for _ in range(2):
        tickets = [worker.submit([1, 2, i], 6, sampling=GREEDY, seed=i) for i in range(4)]
        tickets.append(worker.submit([1], 0, sampling=GREEDY))
        tickets.append(worker.submit([1], 50, sampling=GREEDY, timeout_s=0.0))
        assert [_drain(t)[1:] for t in tickets] == [("end", "length")] * 5 + [("end", "timeout")]
        assert worker.pending == 0 and engine.requests == {}
    worker.shutdown()
    bounded = Engine(tiny, EngineConfig(num_blocks=32, block_size=4), max_history=5)
    EngineWorker(bounded).shutdown()
    assert bounded.history.maxlen == 5  # the engine's own bound is kept


def test_worker_bounds_its_queue_times_out_and_cancels_on_shutdown(tiny):
    worker = EngineWorker(Engine(tiny, EngineConfig(num_blocks=64, block_size=4, max_running=2)), max_pending=3)
    # three long requests fill the queue (none can finish 60 tokens before the next line); a request past its
    # deadline could be expired by the worker between two submits, so it comes after
    a, b, c = (worker.submit([i], 60, sampling=GREEDY) for i in (3, 4, 5))
    with pytest.raises(QueueFull):
        worker.submit([6], 2, sampling=GREEDY)
    worker.cancel(c)
    worker.cancel(a)
    assert _drain(c)[1:] == ("end", "cancelled") and _drain(a)[1:] == ("end", "cancelled")
    slow = worker.submit([1, 2], 60, sampling=GREEDY, timeout_s=0.0)  # already past its deadline
    assert _drain(slow)[1:] == ("end", "timeout")
    completed = worker.shutdown(drain_s=0.0)
    assert _drain(b)[1] == "end" and sum(completed.values()) == 4
    assert worker.engine.cache.allocator.num_used == 0 and not worker.engine.has_work


@pytest.mark.parametrize("timeout_s, error", [("5", TypeError), (float("nan"), ValueError), (-1.0, ValueError)])
def test_a_bad_timeout_is_refused_without_taking_a_slot(tiny, timeout_s, error):
    worker = EngineWorker(Engine(tiny, EngineConfig(num_blocks=16, block_size=4)), max_pending=1)
    for _ in range(2):  # the slot is not taken, so the second call gets the same error, not QueueFull
        with pytest.raises(error, match="timeout_s must be a finite number >= 0"):
            worker.submit([1, 2], 3, timeout_s=timeout_s)
    assert worker.pending == 0
    assert _drain(worker.submit([1, 2], 3, timeout_s=5))[1:] == ("end", "length")
    worker.shutdown()


# ------------------------------------------------------------------------------------------------ over HTTP

fastapi = pytest.importorskip("fastapi", reason="the [serve] extra (FastAPI, uvicorn) is not installed")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def server():
    from ar_course.serving.server import create_app

    model, tok = load_pretrained("lm_draft")
    app = create_app(Engine(model, EngineConfig(num_blocks=64, block_size=16, max_running=4)), tok,
                     model_name="lm_draft", max_pending=8, timeout_s=30.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", model, tok, app
    srv.should_exit = True
    thread.join(timeout=30)


def test_completion_whole_and_streamed_equal_generate(server):
    url, model, tok, _ = server
    prompt = "The for statement"
    expected = tok.decode(model.generate(tok.encode(prompt)[None], 12, sampling=GREEDY)[0, len(prompt):])
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == expected and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 12
        with client.stream("POST", "/v1/completions",
                           json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            lines = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_usage_counts_prompt_and_completion_tokens(server):
    """``total_tokens`` is the prompt's tokens plus the completion's, as in OpenAI's usage field."""
    r = httpx.post(f"{server[0]}/v1/completions", json={"prompt": "The for", "max_tokens": 3, "temperature": 0},
                   timeout=30)
    assert r.json()["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


@pytest.mark.parametrize("body, says", [
    ({"prompt": "", "max_tokens": 5}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 10_000}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 5, "best_of": 3}, "best_of"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "h\u00e9llo", "max_tokens": 5}, "vocabulary"),
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": "hi", "model": "gpt-4"}, "serves 'lm_draft'"),
])
def test_bad_requests_get_a_clear_4xx(server, body, says):
    url = server[0]
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    assert says in r.json()["error"]["message"]


def test_max_tokens_is_at_most_the_context_minus_one(server):
    """The bound the --help gives, ``max_tokens`` at most the context - 1, is enforced even when a one-token
    prompt would still fit."""
    limit = server[1].config.block_size - 1
    r = httpx.post(f"{server[0]}/v1/completions", json={"prompt": "T", "max_tokens": limit + 1}, timeout=30)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, says", [
    ({"prompt": "a" * 300, "max_tokens": 100}, "300 prompt tokens and 100 new tokens need 399 positions, more than "
                                               "the model's context of 384 (config.block_size)"),
    ({"prompt": "hi", "max_tokens": 5, "seed": 2**64}, "seed"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_cannot_run_gets_its_400_streamed_or_not(server, body, says, stream):
    r = httpx.post(f"{server[0]}/v1/completions", json={**body, "stream": stream}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(says) or says in r.json()["error"]["message"], r.text


def test_a_huge_prompt_is_refused_before_it_is_tokenized(server, monkeypatch):
    url, model, tok, _ = server
    limit = 8 * model.config.block_size  # CHARS_PER_POSITION characters per position of the context
    monkeypatch.setattr(tok, "encode", lambda text: pytest.fail("a prompt past the limit was tokenized"))
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "a" * (limit + 1), "max_tokens": 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"] == \
        f"prompt: at most {limit} characters (8 per position of the model's context of {model.config.block_size}), " \
        f"got {limit + 1}", r.text


@pytest.mark.parametrize("field", ["temperature", "top_p", "timeout_s"])
def test_nan_is_refused_as_not_finite(server, field):
    body = '{"prompt": "hi", "max_tokens": 2, "%s": NaN}' % field
    r = httpx.post(f"{server[0]}/v1/completions", content=body, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"] == f"{field}: Input should be a finite number"


def test_completion_ids_are_unique(server):
    with httpx.Client(base_url=server[0], timeout=30) as client:  # one after another: each ticket freed in turn
        ids = [client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).json()["id"] for _ in range(20)]
    assert len(set(ids)) == 20, ids


def test_a_client_gone_before_its_whole_answer_is_cancelled(server, monkeypatch):
    url, engine = server[0], server[3].state.serving["worker"].engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step())[1])  # 380 tokens: over 7 s
    before = httpx.get(f"{url}/health", timeout=10).json()["completed"]["cancelled"]
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "The", "max_tokens": 380, "temperature": 0}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.3)  # the request is running; the client hangs up before its answer
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/health", timeout=10).json()["completed"]["cancelled"] == before:
        assert time.monotonic() < deadline, "the abandoned request was not cancelled"
        time.sleep(0.05)


def test_a_streaming_client_gone_midway_is_cancelled(server, monkeypatch):
    """A streamed request whose client hangs up after the first tokens is cancelled, not run to its end."""
    url, engine = server[0], server[3].state.serving["worker"].engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step())[1])
    before = httpx.get(f"{url}/health", timeout=10).json()["completed"]["cancelled"]
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": "The", "max_tokens": 380, "temperature": 0, "stream": True}).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        s.recv(256)  # the stream has started; the client hangs up
    deadline = time.monotonic() + 20
    while httpx.get(f"{url}/health", timeout=10).json()["completed"]["cancelled"] == before:
        assert time.monotonic() < deadline, "the abandoned stream was not cancelled"
        time.sleep(0.05)


def test_an_engine_failure_mid_stream_is_a_server_error(server, monkeypatch):
    """An engine failure after a stream has started is the server's fault: a ``server_error``, not an
    ``invalid_request_error``."""
    engine = server[3].state.serving["worker"].engine
    monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("device lost")))
    with httpx.stream("POST", f"{server[0]}/v1/completions", timeout=30,
                      json={"prompt": "The", "max_tokens": 5, "stream": True}) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert json.loads(first.removeprefix("data: "))["error"]["type"] == "server_error"


def test_concurrent_clients_all_answered(server):
    url = server[0]
    results = []

    def client(i):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": f"Item {i}: ", "max_tokens": 8, "seed": i,
                                                       "temperature": 0.8}, timeout=60)
        results.append(r.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["pending"] == 0 and health["completed"]["length"] >= 6


def test_the_server_runs_in_a_thread_other_than_the_main_one():
    """Only the main thread may set a signal handler: serving from another (a notebook's background thread) must
    not try (ValueError: signal only works in main thread)."""
    from ar_course.serving.server import _run, create_app

    model, tok = load_pretrained("lm_draft")
    app = create_app(Engine(model, EngineConfig(num_blocks=16, block_size=16)), tok, model_name="lm_draft")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    errors = []

    def serve():
        try:
            _run(app, host="127.0.0.1", port=port, banner="up")
        except BaseException as exc:  # noqa: BLE001 - the failure this test looks for
            errors.append(exc)

    threading.Thread(target=serve, daemon=True).start()
    deadline = time.monotonic() + 60
    while not errors and time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    assert not errors, errors
    assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "a", "max_tokens": 2},
                      timeout=30).status_code == 200


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_cli_server_shuts_down_gracefully_on_ctrl_c(tmp_path, signame):
    """``python -m ar_course serve`` on 127.0.0.1: Ctrl-C (SIGINT) or SIGTERM while streams are running lets each of
    them end with a finish reason and [DONE], and the process exits 0."""
    import os
    import signal
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ar_course", "serve", "--model", "lm_draft", "--port", str(port),
                             "--drain", "20"], env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180  # importing torch and the app on a loaded host
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            proc.kill()
            pytest.fail(f"the server did not come up: {proc.communicate()[1].decode()[-2000:]}")
        started = [threading.Event() for _ in range(3)]  # Ctrl-C once every stream runs (a late one is refused)

        def stream(i):
            body = {"prompt": f"Item {i}", "max_tokens": 300, "temperature": 0, "stream": True}
            lines = []
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
                        started[i].set()
            return lines

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(stream, i) for i in range(3)]
            assert all(event.wait(30) for event in started)
            proc.send_signal(getattr(signal, signame))
            results = [f.result(timeout=60) for f in futures]
        assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)  # reaps it and closes its pipes (ResourceWarnings otherwise, audit 30)
    for lines in results:
        assert lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["choices"][0]["finish_reason"] in ("length", "cancelled")


def test_serve_builds_the_engine_with_the_kv_options_and_refuses_bad_ones(monkeypatch, capsys):
    from ar_course.serving import server as srv

    built = {}
    monkeypatch.setattr(srv, "create_app", lambda engine, tok, **kw: built.setdefault("engine", engine))
    monkeypatch.setattr(srv, "_run", lambda app, **kw: built.setdefault("ran", app))
    monkeypatch.setattr(srv, "_cannot_listen", lambda host, port: None)  # nothing listens: port 8000 may be taken
    assert srv.main(["--model", "lm_draft", "--kv-bits", "4", "--kv-window", "64", "--kv-sinks", "2"]) == 0
    config = built["engine"].config
    assert (config.kv_bits, config.kv_window, config.kv_sinks) == (4, 64, 2) and built["ran"] is built["engine"]
    assert built["engine"].cache.k.dtype == torch.uint8
    built.clear()
    assert srv.main(["--model", "lm_draft", "--kv-h2o-budget", "64", "--kv-h2o-recent", "16"]) == 0
    config = built["engine"].config
    assert (config.kv_h2o_budget, config.kv_h2o_recent) == (64, 16)
    built.clear()
    assert srv.main(["--model", "lm_target", "--kv-merge-from", "8"]) == 0  # 12 layers: pairs (8, 9), (10, 11)
    engine = built["engine"]
    assert engine.config.kv_merge_from == 8 and engine.cache.k.shape[0] == 10 and engine.cache.k_norm.shape[0] == 4
    for argv, message in ((["--kv-window", "16", "--prefix-caching"], "prefix_caching"),
                          (["--kv-window", "4", "--kv-sinks", "4"], "kv_sinks < kv_window"),
                          (["--kv-bits", "3"], "kv-bits"),
                          (["--kv-h2o-budget", "64", "--kv-window", "16"], "kv_window"),
                          (["--kv-h2o-budget", "64", "--kv-h2o-recent", "64"], "kv_h2o_recent < kv_h2o_budget"),
                          (["--kv-merge-from", "-1"], "kv-merge-from"),
                          (["--kv-merge-from", "2", "--kv-bits", "8"], "kv_bits"),
                          (["--kv-merge-from", "2", "--prefix-caching"], "prefix_caching")):
        with pytest.raises(SystemExit) as e:
            srv.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_server_says_where_it_listens_once_ready():
    """``python -m ar_course serve`` prints one line on stdout once the model is loaded and the port listens (a
    request right after it is answered, with no retry), and nothing else: no access log."""
    import os
    import select
    import signal
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ar_course", "serve", "--model", "lm_draft", "--port", str(port)],
                            env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)  # importing torch and the app on a loaded host
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            pytest.fail(f"the server printed nothing: {proc.communicate()[1][-2000:]}")
        assert line == (f"serving lm_draft on http://127.0.0.1:{port} (POST /v1/completions, GET /health); "
                        "Ctrl-C stops\n")
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and out == "" and "HTTP/1.1" not in err and "INFO" not in err, (out, err)
