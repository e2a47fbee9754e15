"""Bad input to the serving package fails at once with a one-line TypeError/ValueError naming the argument: a
model the engine cannot serve (class-conditional, bidirectional, not a GPT), bad request seeds and ids, and
block tables or pools that do not fit paged attention."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from ar_course.serving import Engine, EngineConfig, gather_kv, paged_attention
from ar_course.serving.compression import heldout_nll
from ar_course.serving.h2o import h2o_decode
from ar_course.serving.minicache import merged_generate
from ar_course.serving.server import create_app
from ar_course.serving.worker import EngineWorker
from ar_course.transformer import GPT, GPTConfig
from ar_course.var import VAR, VARConfig
from serving_fixtures import _one_thread, tiny  # noqa: F401 (pytest fixtures)

CONFIG = EngineConfig(num_blocks=8, block_size=4, max_running=2, max_step_tokens=8)


def _gpt(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=10, block_size=16, n_layer=1, n_head=2, n_embd=16, **options)).eval()


def _var() -> VAR:
    return VAR(VARConfig(vocab_size=5, latent_dim=3, scales=(1, 2, 4), n_classes=3, n_layer=1, n_head=2,
                         n_embd=16)).eval()


UNSERVABLE = [
    pytest.param(lambda: _gpt(n_classes=3), ValueError, "n_classes=3", id="class-conditional"),
    pytest.param(lambda: _gpt(causal=False), ValueError, "causal=False", id="bidirectional"),
    pytest.param(_var, TypeError, "model must be a GPT.*got VAR", id="VAR"),
    pytest.param(lambda: "lm_target", TypeError, "model must be a GPT.*got str", id="a name"),
]


@pytest.mark.parametrize("make, error, match", UNSERVABLE)
def test_engine_refuses_a_model_it_cannot_serve(make: Callable, error: type, match: str):
    with pytest.raises(error, match=match):
        Engine(make(), CONFIG)


@pytest.mark.parametrize("make, error, match", UNSERVABLE)
@pytest.mark.parametrize("plain_path", [
    pytest.param(lambda m: h2o_decode(m, [1, 2], 3, 8, 2, 4), id="h2o_decode"),
    pytest.param(lambda m: merged_generate(m, [1, 2], 3, 0), id="merged_generate"),
    # a bidirectional model's next-token NLL sees the token it predicts: it used to be measured
    pytest.param(lambda m: heldout_nll(m, torch.tensor([[1, 2, 3]])), id="heldout_nll"),
])
def test_plain_paths_refuse_the_same_models(plain_path: Callable, make: Callable, error: type, match: str):
    with pytest.raises(error, match=match):
        plain_path(make())


@pytest.mark.parametrize("build", [
    pytest.param(lambda m: EngineWorker(m), id="EngineWorker"),
    pytest.param(lambda m: create_app(m, None), id="create_app"),
])
def test_worker_and_server_take_an_engine_not_a_model(build: Callable, tiny: GPT):  # noqa: F811
    with pytest.raises(TypeError, match="engine must be an Engine.*got GPT"):
        build(tiny)


@pytest.fixture
def engine(tiny: GPT) -> Engine:  # noqa: F811
    return Engine(tiny, CONFIG)


@pytest.mark.parametrize("seed, error", [(1.5, TypeError), ("7", TypeError), (True, TypeError),
                                         (2**64, ValueError), (-(2**63) - 1, ValueError)])
def test_add_request_checks_the_seed(engine: Engine, seed: object, error: type):
    with pytest.raises(error, match="seed"):
        engine.add_request([1, 2], 2, seed=seed)
    assert not engine.requests  # nothing queued


@pytest.mark.parametrize("request_id, error, match", [
    (42, ValueError, "request_id 42 is unknown"),
    (-1, ValueError, "request_id -1 is unknown"),
    ("0", TypeError, "request_id must be an integer"),
    (0.0, TypeError, "request_id must be an integer"),
])
def test_cancel_names_an_unknown_id(engine: Engine, request_id: object, error: type, match: str):
    engine.add_request([1, 2], 2)
    with pytest.raises(error, match=match):
        engine.cancel(request_id)
    assert engine.requests[0].status == "waiting"


def test_seeded_requests_and_cancel_still_work(engine: Engine):
    a = engine.add_request([1, 2], 3, seed=2**64 - 1)
    b = engine.add_request([3], 3, seed=-(2**63))
    engine.cancel(b)
    out = engine.run()
    assert len(out[a]) == 3 and engine.requests[b].status == "cancelled"


# -- paged attention ---------------------------------------------------------------------------------------

NUM_BLOCKS, BS, H, D = 4, 2, 2, 4


def _paged_args(**changes) -> dict:
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(NUM_BLOCKS, BS, H, D, generator=g)
    args = dict(q=torch.randn(2, H, D, generator=g), k_pool=pool, v_pool=pool.clone(),
                block_tables=torch.tensor([[0, 1], [2, 3]]), lengths=torch.tensor([3, 4]))
    return {**args, **changes}


@pytest.mark.parametrize("changes, error, match", [
    ({"block_tables": torch.tensor([[0, 9], [2, 3]])}, ValueError, r"block_tables must lie in \[0, 3\], got 9"),
    ({"block_tables": torch.tensor([[0, -1], [2, 3]])}, ValueError, r"block_tables must lie in \[0, 3\], got -1"),
    ({"block_tables": torch.tensor([[0.0, 1.0], [2.0, 3.0]])}, ValueError, "block_tables must be a"),
    ({"block_tables": torch.tensor([[0, 1]])}, ValueError, "block_tables must be a"),
    ({"block_tables": [[0, 1], [2, 3]]}, TypeError, "block_tables must be a"),
    ({"q": torch.randn(2, 3, D)}, ValueError, r"k_pool must be .* with \(H, D\) = \(3, 4\)"),
    ({"q": torch.randn(2, H, 8)}, ValueError, r"k_pool must be .* with \(H, D\) = \(2, 8\)"),
    ({"q": torch.randn(2, H * D)}, ValueError, r"q must be a \(B, H, D\) tensor"),
    ({"v_pool": torch.randn(NUM_BLOCKS + 1, BS, H, D)}, ValueError, "k_pool and v_pool must have the same shape"),
    ({"v_pool": torch.randn(NUM_BLOCKS, BS, 3, D)}, ValueError, "v_pool must be"),
    ({"k_pool": torch.randn(NUM_BLOCKS * BS, H, D)}, ValueError, "k_pool must be"),
    ({"lengths": torch.tensor([3, 4, 1])}, ValueError, r"lengths must be \(2,\)"),
    ({"lengths": [3, 4]}, TypeError, "lengths must be a tensor"),
    ({"lengths": torch.tensor([2.5, 4.0])}, ValueError, "lengths must be an integer tensor"),
    ({"lengths": torch.tensor([True, True])}, ValueError, "lengths must be an integer tensor"),
])
def test_paged_attention_checks_tables_and_shapes(changes: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        paged_attention(**_paged_args(**changes))


def test_paged_attention_takes_int32_tables():
    args = _paged_args()
    expected = paged_attention(**args)
    torch.testing.assert_close(paged_attention(**{**args, "block_tables": args["block_tables"].int()}), expected)


@pytest.mark.parametrize("pool, table, length, error, match", [
    (torch.randn(4, 2, 2, 4), torch.tensor([0, 9]), 3, ValueError, r"block_table must lie in \[0, 3\], got 9"),
    (torch.randn(4, 2, 2, 4), torch.tensor([-1, 0]), 3, ValueError, r"block_table must lie in \[0, 3\], got -1"),
    (torch.randn(4, 2, 2, 4), torch.tensor([[0, 1]]), 3, ValueError, r"block_table must be a \(n_blocks,\)"),
    (torch.randn(4, 2, 2, 4), torch.tensor([0, 1]), -1, ValueError, "length must be an integer >= 0"),
    (torch.randn(4, 2, 2, 4), torch.tensor([0, 1]), 2.0, TypeError, "length must be an integer"),
    (torch.randn(8, 2, 4), torch.tensor([0, 1]), 3, ValueError, r"pool must be a \(num_blocks, block_size, H, D\)"),
    ([[0.0]], torch.tensor([0, 1]), 3, TypeError, "pool must be a"),
])
def test_gather_kv_checks_its_table_and_pool(pool: object, table: object, length: object, error: type, match: str):
    with pytest.raises(error, match=match):
        gather_kv(pool, table, length)


@pytest.mark.parametrize("options, error, match", [
    ({"max_pending": 0}, ValueError, "max_pending must be an integer >= 1, got 0"),
    ({"max_pending": 2.0}, TypeError, "max_pending must be an integer"),
    ({"timeout_s": 0}, ValueError, "timeout_s must be a finite number > 0"),
    ({"timeout_s": float("inf")}, ValueError, "timeout_s must be a finite number > 0"),
    ({"timeout_s": "60"}, TypeError, "timeout_s must be a"),
])
def test_worker_checks_its_queue_options(options, error, match):
    with pytest.raises(error, match=match):
        EngineWorker(Engine(_gpt(), CONFIG), **options)


def test_block_tables_of_a_narrow_integer_dtype_index_like_int64():
    """A uint8 block table is ids, not a mask (torch would read it as one); int8/int16 index at all (audit 23)."""
    torch.manual_seed(0)
    pool, q = torch.randn(4, 2, 1, 3), torch.randn(2, 1, 3)  # (blocks, block_size, H, D), (B, H, D)
    table, lengths = torch.tensor([[3, 1], [0, 2]]), torch.tensor([4, 3])
    want = paged_attention(q, pool, pool, table, lengths)
    for dtype in (torch.uint8, torch.int8, torch.int16):
        torch.testing.assert_close(gather_kv(pool, table[0].to(dtype), 3), gather_kv(pool, table[0], 3))
        torch.testing.assert_close(paged_attention(q, pool, pool, table.to(dtype), lengths), want)
