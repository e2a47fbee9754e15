"""Bad input to ``python -m ar_course serve`` and its HTTP server: sampling configs that once broke a step (and
every other request with it), wrong JSON types, the shape of every error body, startup failures, and options
named as they are typed."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from ar_course import cli, sampling
from ar_course.sampling import SamplingConfig
from ar_course.serving import Engine, EngineConfig
from ar_course.serving.worker import EngineWorker
from serving_fixtures import _one_thread, tiny  # noqa: F401 (pytest fixtures)

GREEDY = SamplingConfig(temperature=0.0)
TINY_TEMPERATURES = [1e-30, 1e-38, 1e-40, 1e-46, 5e-324]


def _drain(ticket, timeout: float = 60.0) -> tuple[list[int], str, object]:
    tokens = []
    while True:
        kind, value = ticket.events.get(timeout=timeout)
        if kind != "token":
            return tokens, kind, value
        tokens.append(value)


# ------------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
@pytest.mark.parametrize("scale", [1.0, 1e30])
def test_a_tiny_temperature_samples_the_greedy_token(temperature: float, scale: float):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * scale
    logits[0, 3] = float("-inf")
    config = SamplingConfig(temperature=temperature)
    dist = sampling.probs(logits, sampling=config)
    assert not bool(torch.isnan(dist).any())
    assert torch.equal(dist, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())
    assert torch.equal(sampling.sample(logits, sampling=config, generator=g), sampling.greedy(logits))
    with_filters = SamplingConfig(temperature=temperature, top_k=5, top_p=0.5)
    assert torch.equal(sampling.sample(logits, sampling=with_filters, generator=g), sampling.greedy(logits))


@pytest.mark.parametrize("top_p", [1e-46, 5e-324, 1e-30])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p: float):
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    kept = torch.isfinite(sampling.top_p_filter(logits, top_p))
    assert torch.equal(kept, torch.nn.functional.one_hot(logits.argmax(-1), 30).bool())
    config = SamplingConfig(temperature=1.0, top_p=top_p)
    assert torch.equal(sampling.sample(logits, sampling=config), sampling.greedy(logits))


def test_normal_temperatures_are_the_plain_division():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2)) * 5
    for temperature in (0.05, 0.7, 1.0, 3.0):
        out = sampling.process_logits(logits, sampling=SamplingConfig(temperature=temperature))
        assert torch.equal(out, logits / temperature)


@pytest.mark.parametrize("bad, match", [(float("nan"), "NaN"), (float("inf"), r"\+inf")])
def test_bad_logits_are_still_refused_at_a_tiny_temperature(bad: float, match: str):
    logits = torch.zeros(2, 5)
    logits[1, 2] = bad
    with pytest.raises(ValueError, match=f"logits row 1 .*{match}"):
        sampling.sample(logits, sampling=SamplingConfig(temperature=1e-40))
    with pytest.raises(ValueError, match="logits row 0 .*all -inf"):
        sampling.sample(torch.full((1, 5), float("-inf")), sampling=SamplingConfig(temperature=1e-40))


# --------------------------------------------------------------------------------------------------- worker


@pytest.mark.parametrize("config", [SamplingConfig(temperature=1e-40), SamplingConfig(top_p=1e-46),
                                    SamplingConfig(temperature=5e-324, top_k=2, top_p=1e-46)],
                         ids=["temperature", "top_p", "all"])
def test_one_clients_tiny_sampling_values_break_no_request(tiny, config: SamplingConfig):  # noqa: F811
    worker = EngineWorker(Engine(tiny, EngineConfig(num_blocks=32, block_size=4, max_running=3)))
    other = worker.submit([1, 2, 3], 30, sampling=SamplingConfig(temperature=0.8), seed=0)
    odd = worker.submit([4, 5], 6, sampling=config, seed=1)
    assert _drain(other)[1:] == ("end", "length")
    tokens, kind, reason = _drain(odd)
    assert (kind, reason) == ("end", "length")
    assert tokens == tiny.generate(torch.tensor([[4, 5]]), 6, sampling=GREEDY)[0, 2:].tolist()
    worker.shutdown()


def test_a_failed_step_ends_its_requests_as_a_server_failure(tiny, monkeypatch):  # noqa: F811
    engine = Engine(tiny, EngineConfig(num_blocks=32, block_size=4, max_running=3))

    def broken() -> list:
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "step", broken)
    worker = EngineWorker(engine)
    tickets = [worker.submit([1, 2], 5), worker.submit([3], 5)]
    for ticket in tickets:
        assert _drain(ticket)[1:] == ("failed", "engine error: device lost")
    worker.shutdown()
    assert not engine.has_work and engine.cache.allocator.num_used == 0


# ----------------------------------------------------------------------------------------------- over HTTP

fastapi = pytest.importorskip("fastapi", reason="the [serve] extra (FastAPI, uvicorn) is not installed")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from ar_course.serving.server import create_app
    from ar_course.transformer import load_pretrained

    model, tok = load_pretrained("lm_draft")
    app = create_app(Engine(model, EngineConfig(num_blocks=64, block_size=16, max_running=4)), tok,
                     model_name="lm_draft", max_pending=8, timeout_s=30.0)
    with TestClient(app) as c:
        yield c, model, tok


@pytest.mark.parametrize("field, value", [
    ("max_tokens", True), ("max_tokens", "5"), ("max_tokens", 5.0), ("top_k", 2.0), ("seed", "3"),
    ("stream", "yes"), ("stream", 1), ("temperature", True), ("temperature", "0.5"), ("top_p", "0.5"),
    ("timeout_s", False), ("prompt", 12), ("model", 1),
])
def test_wrong_json_types_are_refused_not_converted(client, field: str, value: object):
    r = client[0].post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(f"{field}: Input should be a valid")


def test_json_numbers_still_fit_float_fields(client):
    r = client[0].post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0, "top_p": 1,
                                                "timeout_s": 30})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("method, path, kwargs, status, says", [
    ("POST", "/nope", {}, 404, "no POST /nope here"),
    ("GET", "/v1/completions", {}, 405, "GET /v1/completions is not allowed: /v1/completions takes POST"),
    ("DELETE", "/health", {}, 405, "takes GET"),
    ("POST", "/v1/completions", {"content": b"\xff\xfe\xfa"}, 400, "body is not valid JSON: it is not UTF-8"),
    ("POST", "/v1/completions", {"content": b'{"prompt": "\xff"}'}, 400, "body is not valid JSON: it is not UTF-8"),
    ("POST", "/v1/completions", {"content": b"{bad json"}, 400, "body is not valid JSON: Expecting property name"),
    ("POST", "/v1/completions", {"content": b'{"prompt": "hi",}'}, 400, "body is not valid JSON"),
])
def test_every_error_has_the_documented_shape(client, method: str, path: str, kwargs: dict, status: int, says: str):
    if "content" in kwargs:
        kwargs = {**kwargs, "headers": {"content-type": "application/json"}}
    r = client[0].request(method, path, **kwargs)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and r.json()["error"]["type"] == "invalid_request_error"
    assert says in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("extra", [{"temperature": 1e-40}, {"top_p": 1e-46}, {"temperature": 5e-324, "top_k": 3}])
def test_tiny_sampling_values_over_http_answer_the_greedy_text(client, extra: dict):
    c, model, tok = client
    expected = tok.decode(model.generate(tok.encode("The for")[None], 6, sampling=GREEDY)[0, 7:])
    r = c.post("/v1/completions", json={"prompt": "The for", "max_tokens": 6, **extra})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected


def test_a_body_past_the_limit_gets_a_413_before_it_is_read(client):
    """Refused by its Content-Length, and a chunked body (no Content-Length) once it passes the limit."""
    from ar_course.serving.server import max_body_bytes

    c, model, _ = client
    limit = max_body_bytes(model.config.block_size - 1)
    longest = {"prompt": "\U0001F600" * (8 * model.config.block_size), "max_tokens": 1}  # 12 bytes each in JSON
    import json

    assert len(json.dumps(longest)) <= limit  # the largest valid body fits
    r = c.post("/v1/completions", content=b"{}", headers={"content-type": "application/json",
                                                          "content-length": str(10**9)})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert r.json()["error"]["message"] == f"request body too large: at most {limit} bytes for this model's " \
                                           f"context, got Content-Length {10**9}"
    r = c.post("/v1/completions", content=b"{}", headers={"content-type": "application/json",
                                                          "content-length": "abc"})
    assert r.status_code == 400, r.text  # not "too large"
    assert r.json()["error"]["message"] == "Content-Length must be a number of bytes, got 'abc'"

    def chunks():
        yield b'{"prompt": "'
        for _ in range(limit // 1000 + 1):
            yield b"a" * 1000
        yield b'"}'

    r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json() == {"error": {"message": f"request body too large: at most {limit} bytes for this model's "
                                             f"context, got more than {limit} bytes", "type": "invalid_request_error"}}
    ok = c.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}',
                headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("stream", [False, True])
def test_a_completion_that_cannot_be_decoded_is_a_json_error_not_a_text_500(stream: bool):
    """A tokenizer that fails on a token (a vocabulary smaller than the model's) answers the documented JSON 500, or
    an error event and [DONE] in a stream: never a bare text page or an empty stream."""
    from fastapi.testclient import TestClient

    from ar_course.serving.server import create_app
    from ar_course.transformer import load_pretrained

    model, tok = load_pretrained("lm_draft")

    class Broken:
        encode = staticmethod(tok.encode)

        @staticmethod
        def decode(ids):
            raise ValueError("id 90 is outside the vocabulary")

    app = create_app(Engine(model, EngineConfig(num_blocks=16, block_size=16, max_running=2)), Broken(),
                     model_name="lm_draft", max_pending=4, timeout_s=30.0)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"prompt": "The", "max_tokens": 2, "stream": stream})
    says = "cannot decode the completion (ValueError: id 90 is outside the vocabulary)"
    if not stream:
        assert r.status_code == 500 and r.json() == {"error": {"message": says, "type": "server_error"}}, r.text
    else:
        assert r.status_code == 200 and r.text == f'data: {{"error": {{"message": "{says}", "type": ' \
                                                  f'"server_error"}}}}\n\ndata: [DONE]\n\n', r.text


# ------------------------------------------------------------------------------------------ the command line


def _serve(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    """``python -m ar_course serve ARGV`` with the uvicorn server stubbed out: (exit status, stderr)."""
    from ar_course.serving import server

    monkeypatch.setattr(server, "_run", lambda app, **kw: None)
    status = cli.main(["serve", *argv])
    return status, capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv, says", [
    (["--max-running", "300"], "--max-running must be an integer in [1, 256], got 300"),
    (["--kv-window", "4", "--kv-sinks", "10"], "--kv-sinks 10 --kv-window 4: need 0 <= kv_sinks < kv_window"),
    (["--kv-h2o-budget", "1"], "--kv-h2o-budget 1: kv_h2o_budget must be"),
    (["--kv-merge-from", "2", "--prefix-caching"], "--prefix-caching --kv-merge-from 2: "),
    (["--kv-merge-from", "100"], "--kv-merge-from must be < 11 for this 12-layer model"),
    (["--kv-merge-from", "11"], "--kv-merge-from must be < 11 for this 12-layer model"),
    (["--num-blocks", "1000000000000"], "--num-blocks 1000000000000 x --block-size 16 positions make a"),
    (["--block-size", "100000000"], "--num-blocks 256 x --block-size 100000000 positions make a"),
    (["--model", "nope"], "unknown checkpoint name 'nope'"),
    (["--model", "diffusion_lm"], "expected 'lm'"),
])
def test_bad_options_are_one_usage_error_naming_the_option(monkeypatch, capsys, argv: list[str], says: str):
    status, err = _serve(monkeypatch, capsys, ["--port", str(_free_port()), *argv])
    assert status == 2 and err.startswith("error: ") and says in err and len(err.strip().splitlines()) == 1, err
    assert "--debug" not in err and "max_step_tokens" not in err


def test_a_bad_model_file_is_a_usage_error(monkeypatch, capsys, tmp_path: Path):
    path = tmp_path / "text.safetensors"
    path.write_text("not a checkpoint")
    status, err = _serve(monkeypatch, capsys, ["--port", str(_free_port()), "--model", str(path)])
    assert status == 2 and "not a valid ar_course checkpoint" in err and "--debug" not in err, err


def test_a_model_whose_vocabulary_does_not_fit_is_refused_at_start(monkeypatch, capsys, tmp_path: Path):
    """Else it serves, and every completion fails on a token id past the vocabulary."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ar_course.checkpoint import ASSETS

    path = tmp_path / "lm.safetensors"
    with safe_open(str(ASSETS / "lm_draft.safetensors"), framework="pt") as f:
        raw, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, str(path), metadata={**raw, "extra": json.dumps({**json.loads(raw["extra"]), "vocab": "abcde"})})
    status, err = _serve(monkeypatch, capsys, ["--port", str(_free_port()), "--model", str(path)])
    assert status == 2 and err == f"error: {path} records a vocabulary that does not fit its model: expected a str " \
                                  f"of 96 distinct characters (the model's vocab_size), got 5 characters\n", err


def test_a_port_in_use_is_one_error_line(monkeypatch, capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        status, err = _serve(monkeypatch, capsys, ["--model", "lm_draft", "--port", str(port)])
    assert status == 1 and err.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use", err


def test_a_host_that_does_not_resolve_is_one_error_line(monkeypatch, capsys):
    status, err = _serve(monkeypatch, capsys, ["--model", "lm_draft", "--host", "999.1.1.1", "--port", "18005"])
    assert status == 1 and err.startswith("error: cannot listen on 999.1.1.1:18005: "), err
    assert len(err.strip().splitlines()) == 1


def test_good_options_still_start(monkeypatch, capsys):
    status, err = _serve(monkeypatch, capsys, ["--model", "lm_target", "--port", str(_free_port()),
                                               "--kv-merge-from", "10", "--max-running", "256"])
    assert status == 0, err


# ------------------------------------------------------------------------------------- content type and help

NOT_JSON = "send the body as JSON with Content-Type: application/json (got {}; with curl: -H 'Content-Type: " \
           "application/json')"


@pytest.mark.parametrize("headers, got", [
    ({"content-type": "application/x-www-form-urlencoded"}, "Content-Type: application/x-www-form-urlencoded"),
    ({"content-type": "text/plain; charset=utf-8"}, "Content-Type: text/plain; charset=utf-8"),
    ({}, "no Content-Type"),
])
def test_a_json_body_not_sent_as_json_gets_a_415_naming_the_fix(client, headers: dict, got: str):
    """What ``curl -d '{...}'`` sends without ``-H 'Content-Type: application/json'``."""
    r = client[0].post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}', headers=headers)
    assert r.status_code == 415, r.text
    assert r.json() == {"error": {"message": NOT_JSON.format(got), "type": "invalid_request_error"}}


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.api+json"])
def test_json_content_types_are_read_and_validated_as_strictly(client, content_type: str):
    c = client[0]
    r = c.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}', headers={"content-type": content_type})
    assert r.status_code == 200, r.text
    for body, says in ((b'{"prompt": "hi", "max_tokens": "2"}', "max_tokens: Input should be a valid integer"),
                       (b'{"prompt": "hi", "best_of": 2}', "best_of: Extra inputs are not permitted"),
                       (b'{"prompt": "hi", "temperature": NaN}',
                        "temperature: Input should be a finite number")):
        r = c.post("/v1/completions", content=body, headers={"content-type": content_type})
        assert r.status_code == 400 and r.json()["error"]["message"] == says, r.text


def test_serve_help_is_plain_text_naming_the_endpoints_fields_and_defaults(capsys):
    import pydantic

    from ar_course.serving.server import CHARS_PER_POSITION, _request_model, build_parser

    assert cli.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert f"at most {CHARS_PER_POSITION} characters per position of the\n" in out  # the limit the server applies
    assert "Ctrl-C or SIGTERM stops it" in out
    assert "``" not in out and "POST /v1/completions takes a JSON object (Content-Type: application/json)" in out
    assert "GET /health" in out
    assert "curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json'" in out
    for field in _request_model(pydantic, 10).model_fields:  # every field of the request, one line each
        assert f"\n  {field} " in out, field
    for shown in ("[lm_target]", "[127.0.0.1]", "[8000]", "[256]", "[16]", "[4]", "[32]", "[64]", "[60.0]", "[10.0]"):
        assert shown in out, shown
    for action in build_parser()._actions:  # every option says its default
        assert action.dest == "help" or action.help.endswith("[%(default)s]") or "(default: " in action.help, action


def test_doctor_help_is_plain_text(capsys):
    assert cli.main(["doctor", "--help"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and "\nCheck that this machine can run the course: one line per requirement" in out
