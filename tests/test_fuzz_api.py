"""Fuzz tests of the public API (issue #15): Hypothesis feeds good and bad input to the sampler, GPT generation,
speculative decoding, the quantizers and VQ-VAE, VAR and raster sampling, and ``Generator.generate``.

Each case is judged against an oracle written here from the documented rules: input the rules accept must
return a result of the documented shape, dtype and range; input they refuse must raise the documented error
(``TypeError`` when the only problems are wrong types, ``ValueError`` when they are wrong values, either when
both) with a one-line message. Anything else -- an ``IndexError``, ``RuntimeError`` or ``KeyError`` from deep
inside, a refused good input, a silently accepted bad one -- fails. Sizes are tiny and examples derandomized,
so the file runs in well under a minute on 2 CPU cores. Case counts appear in pytest's summary (fuzz_report).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fuzz_report import record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ar_course import raster, sampling
from ar_course.speculative import sjd_generate, speculative_generate
from ar_course.system import Generator
from ar_course.tokenizers import VQVAE, MultiScaleVQ, ResidualVQ, VectorQuantizer, VQVAEConfig
from ar_course.transformer.model import GPT, GPTConfig, SelfAttention, sdpa_attention
from ar_course.var import VAR, VARConfig, sample_pyramid
from ar_course.var import functional as var_ref

NAN, INF = float("nan"), float("inf")
BASE = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and the machine is shared: one torch thread while this runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fuzz(cases: int) -> settings:
    """Derandomized settings with no deadline (a shared CPU is slow at times) for ``cases`` examples."""
    return settings(BASE, max_examples=cases)


# (good values, bad values) of the sampling convention's arguments
TEMPERATURES = ([1.0, 0, 0.7, 2, 1e-30, 1e30, -0.0, np.float32(0.5)], [-1.0, NAN, INF, True, "1", None])
TOP_KS = ([None, 1, 3, 10**12, np.int64(2)], [0, -2, 2.0, True, "3"])
TOP_PS = ([None, 0.5, 1.0, 1, 1e-9], [0, -0.1, 1.5, NAN, INF, True, "0.5"])


def pick(data, clean: bool, options: tuple[list, list], label: str):
    """One of the good options, or (unless the case is ``clean``) of the good and bad ones. Half the cases are
    clean, so that good input is exercised as much as bad input."""
    good, bad = options
    return data.draw(st.sampled_from(good if clean else good + bad), label=label)


def draw_sampling(data, clean: bool) -> tuple:
    return (pick(data, clean, TEMPERATURES, "temperature"), pick(data, clean, TOP_KS, "top_k"),
            pick(data, clean, TOP_PS, "top_p"))


def config(temperature, top_k, top_p) -> sampling.SamplingConfig:
    """The drawn values as a SamplingConfig (made inside the judged call: a bad value raises there)."""
    return sampling.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)


# -- the oracle ----------------------------------------------------------------------------------------------

def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def number_problem(x: object, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> str | None:
    """``"type"``, ``"value"`` or ``None``: what ``check_number`` must say of ``x``."""
    if not _is_real(x):
        return "type"
    x = float(x)
    bad = not math.isfinite(x) or (lo is not None and (x <= lo if lo_open else x < lo)) or (hi is not None and x > hi)
    return "value" if bad else None


def int_problem(x: object, lo: int | None = None, hi: int | None = None) -> str | None:
    """What ``check_int`` must say of ``x`` (floats, even integral ones, are the wrong type)."""
    if not isinstance(x, (int, np.integer)) or isinstance(x, (bool, np.bool_)):
        return "type"
    return "value" if (lo is not None and x < lo) or (hi is not None and x > hi) else None


def bool_problem(x: object) -> str | None:
    return None if isinstance(x, (bool, np.bool_)) else "type"


def sampling_problems(temperature: object, top_k: object, top_p: object) -> list[str]:
    found = [number_problem(temperature, lo=0), None if top_k is None else int_problem(top_k, lo=1),
             None if top_p is None else number_problem(top_p, lo=0, hi=1, lo_open=True)]
    return [p for p in found if p]


def ids_problem(x: torch.Tensor, high: int, shape: tuple, dtype: torch.dtype | None = torch.long,
                allow_empty: bool = False) -> str | None:
    """What ``check_ids`` must say of ``x``: shape entries that are ints are exact, others free."""
    if not isinstance(x, torch.Tensor):
        return "type"
    good_dtype = x.dtype == dtype if dtype is not None else not (x.is_floating_point() or x.dtype == torch.bool)
    good_shape = x.ndim == len(shape) and all(not isinstance(d, int) or n == d for n, d in zip(x.shape, shape))
    if not (good_dtype and good_shape) or (x.numel() == 0 and not allow_empty):
        return "value"
    return "value" if bool(((x < 0) | (x >= high)).any()) else None


def judge(name: str, call, problems: list[str | None]):
    """Run ``call()`` as one case of fuzz target ``name``. With no problems it must return (its result is
    returned); with problems it must raise the documented error with a one-line message (``None`` is returned).
    Counts the case, and the cases that returned a result, for the summary."""
    problems = [p for p in problems if p]
    record(name, 1)
    if not problems:
        out = call()
        record(f"{name} (returned a result)", 1)
        return out
    kinds = set(problems)
    expected = (TypeError if kinds == {"type"} else ValueError) if len(kinds) == 1 else (TypeError, ValueError)
    with pytest.raises(expected) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message, repr(message)
    return None


def bad_rows(x: torch.Tensor) -> bool:
    """A row with NaN, +inf, or nothing above -inf: what the sampler refuses."""
    return bool(((torch.isnan(x) | torch.isposinf(x)).any(-1) | (x.amax(-1) == -INF)).any())


# -- sampling ------------------------------------------------------------------------------------------------

PLAIN = st.floats(-20, 20, width=32)
VALUES = {
    "plain": PLAIN,
    "masked": st.one_of(PLAIN, st.just(-INF)),
    "special": st.sampled_from([NAN, INF, -INF, 0.0, 1.0]),
    "huge": st.sampled_from([3e38, -3e38, 1e30, -1e30, 0.0, 1.0]),
}


def _tensor(data, shape: list[int], kind: str) -> torch.Tensor:
    n = math.prod(shape)
    values = data.draw(st.lists(VALUES[kind], min_size=n, max_size=n), label="values")
    return torch.tensor(values, dtype=torch.float32).view(shape)


@fuzz(400)
@given(data=st.data())
def test_fuzz_sample_probs_and_cfg_mix(data):
    clean = data.draw(st.booleans(), label="clean")
    shape = data.draw(st.lists(st.integers(0, 3), max_size=2), label="batch")
    shape.append(data.draw(st.integers(1 if clean else 0, 6), label="V"))
    kind = pick(data, clean, (["plain", "plain", "masked"], ["special", "huge"]), "kind")
    logits = _tensor(data, shape, kind)
    temperature, top_k, top_p = draw_sampling(data, clean)
    problems = sampling_problems(temperature, top_k, top_p)
    if data.draw(st.booleans(), label="guided"):
        w = pick(data, clean, ([0.0, 0, 1.5, -1.0, np.float64(2)], [NAN, INF, True, "2"]), "w")
        uncond = _tensor(data, shape, pick(data, clean, (["plain"], ["masked"]), "uncond kind"))
        mixed = judge("sampling.cfg_mix", lambda: sampling.cfg_mix(logits, uncond, w),
                      [number_problem(w), "value" if shape[-1] == 0 else None])
        if mixed is None:
            return
        torch.testing.assert_close(mixed, (1 + float(w)) * logits - float(w) * uncond, equal_nan=True)
        logits = mixed
    V = shape[-1]
    if V == 0:
        problems.append("value")
    elif not problems:
        rows = logits.reshape(-1, V)
        if bad_rows(rows):  # NaN / +inf / all -inf; logits / temperature overflowing is sampled (max first)
            problems.append("value")
    gen = torch.Generator().manual_seed(0)
    out = judge("sampling.sample", lambda: sampling.sample(logits, sampling=config(temperature, top_k, top_p),
                                                           generator=gen), problems)
    dist = judge("sampling.probs", lambda: sampling.probs(logits, sampling=config(temperature, top_k, top_p)),
                 problems)
    if out is None:
        return
    assert out.shape == logits.shape[:-1] and out.dtype == torch.long
    assert bool(((out >= 0) & (out < V)).all())
    rows, ids = logits.reshape(-1, V), out.reshape(-1)
    chosen = rows.gather(1, ids[:, None])[:, 0]  # (N,)
    assert bool((chosen > -INF).all())  # never an excluded token
    if float(temperature) == 0:
        assert torch.equal(ids, rows.argmax(-1))
    elif top_k is not None and int(top_k) < V:
        assert bool((chosen >= rows.topk(int(top_k), dim=-1).values[:, -1]).all())
    assert dist.shape == logits.shape and bool(torch.isfinite(dist).all()) and bool((dist >= 0).all())
    torch.testing.assert_close(dist.sum(-1), torch.ones(logits.shape[:-1]), atol=1e-4, rtol=0)
    assert bool((dist.reshape(-1, V)[rows == -INF] == 0).all())


@fuzz(200)
@given(data=st.data())
def test_fuzz_sample_from_probs(data):
    clean = data.draw(st.booleans(), label="clean")
    shape = data.draw(st.lists(st.integers(0, 3), max_size=2), label="batch")
    shape.append(data.draw(st.integers(1 if clean else 0, 5), label="V"))
    special = st.sampled_from([0.0, 1e-45] if clean else [0.0, -1.0, NAN, INF, 1e-45, 3e38])
    n = math.prod(shape)
    elements = st.lists(st.one_of(st.floats(0.25, 5, width=32), special), min_size=n, max_size=n)
    p = torch.tensor(data.draw(elements, label="p"), dtype=torch.float32).view(shape)
    rows = p.reshape(-1, shape[-1]) if shape[-1] else p
    valid = shape[-1] > 0 and not bool((torch.isnan(rows) | (rows < 0)).any()
                                       | (~torch.isfinite(rows.sum(-1))).any() | (rows.sum(-1) <= 0).any())
    out = judge("sampling.sample_from_probs", lambda: sampling.sample_from_probs(p, torch.Generator().manual_seed(1)),
                [None if valid else "value"])
    if out is not None:
        assert out.shape == p.shape[:-1] and out.dtype == torch.long
        assert bool((rows.gather(1, out.reshape(-1, 1)) > 0).all())  # in range (gather would fail) and possible


# -- GPT and speculative decoding ----------------------------------------------------------------------------

def _tiny_gpt(seed: int, n_classes: int = 0, n_embd: int = 16) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=7, block_size=10, n_layer=1, n_head=2, n_embd=n_embd, n_classes=n_classes)).eval()


MODELS = {False: (_tiny_gpt(0), _tiny_gpt(1, n_embd=8)), True: (_tiny_gpt(2, 3), _tiny_gpt(3, 3, n_embd=8))}
"""(target, draft) of 7 tokens and 10 positions, unconditional and with 3 classes."""
ID_DTYPES = ([torch.long], [torch.int32, torch.float32, torch.bool])


def _ids(data, clean: bool, shape: tuple[int, ...], high: int, label: str) -> torch.Tensor:
    """Ids of ``shape`` in ``[0, high)``, long; unless ``clean``, sometimes one out of range or another dtype."""
    n = math.prod(shape)
    values = data.draw(st.lists(st.integers(0, high - 1), min_size=n, max_size=n), label=label)
    if n and not clean and data.draw(st.integers(0, 3), label=f"{label} corrupt") == 0:
        values[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from([-1, high, 10**6]))
    dtype = pick(data, clean, ID_DTYPES, f"{label} dtype")
    return torch.tensor(values, dtype=torch.long).view(shape).to(dtype)


def _classes(data, clean: bool, conditional: bool, B: int, n_classes: int = 3) -> torch.Tensor | None:
    """``(B,)`` classes (the null class included) for a conditional model, None for another; unless ``clean``,
    also the other way round or a wrong shape."""
    right = "tensor" if conditional else "none"
    kind = pick(data, clean, ([right], ["none", "tensor", "wrong shape"]), "classes kind")
    if kind == "none":
        return None
    shape = (B,) if kind == "tensor" else data.draw(st.sampled_from([(B + 1,), (B, 1), ()]), label="classes shape")
    return _ids(data, clean, shape, n_classes + 1, "classes")


def _classes_problem(classes, conditional: bool, B: int, n_classes: int = 3) -> str | None:
    if not conditional:
        return None if classes is None else "value"
    return "value" if classes is None else ids_problem(classes, n_classes + 1, (B,))


def _room_problem(model: GPT, T: int, max_new: object) -> str | None:
    """A prompt of ``T`` tokens and ``max_new`` new ones must start a sequence and fit in 10 positions."""
    n = max(int(max_new), 0) if int_problem(max_new) is None else 0
    return "value" if model.config.n_prefix + T == 0 or model.config.n_prefix + T + max(n - 1, 0) > 10 else None


MAX_NEW = ([0, 1, 2, 3, 5], [9, 10, -1, 2.0, True, None])
CFGS = ([0.0, 0, 1.0, 1.5, -1.5], [NAN, INF, "1"])


def _draw_sequence(data, clean: bool, conditional: bool, rows: int) -> tuple[int, torch.Tensor]:
    """A prompt ``(rows, T)`` with ``T`` short enough to leave room when the case is ``clean``."""
    T = data.draw(st.integers(0 if conditional else 1, 4) if clean else st.integers(0, 11), label="T")
    return T, _ids(data, clean, (rows, T), 7, "idx")


@fuzz(200)
@given(data=st.data())
def test_fuzz_gpt_generate(data):
    clean, conditional = data.draw(st.booleans(), label="clean"), data.draw(st.booleans(), label="conditional")
    model = MODELS[conditional][0]
    B = data.draw(st.integers(1 if clean else 0, 2), label="B")
    T, idx = _draw_sequence(data, clean, conditional, B)
    classes = _classes(data, clean, conditional, B)
    max_new, cfg = pick(data, clean, MAX_NEW, "max_new_tokens"), pick(data, clean, CFGS, "cfg")
    if clean and not conditional:
        cfg = 0.0
    temperature, top_k, top_p = draw_sampling(data, clean)
    use_cache = pick(data, clean, ([True, False, np.bool_(True)], [1, "yes", None]), "use_cache")
    guided = number_problem(cfg) is None and float(cfg) != 0.0
    problems = [*sampling_problems(temperature, top_k, top_p), int_problem(max_new, lo=0), number_problem(cfg),
                bool_problem(use_cache), ids_problem(idx, 7, ("B", "T"), allow_empty=True),
                "value" if B == 0 else None, _classes_problem(classes, conditional, B),
                "value" if guided and classes is None else None, _room_problem(model, T, max_new)]
    out = judge("GPT.generate", lambda: model.generate(idx, max_new, sampling=config(temperature, top_k, top_p),
                                                       cfg=cfg, classes=classes,
                                                       generator=torch.Generator().manual_seed(0),
                                                       use_cache=use_cache), problems)
    if out is not None:
        assert out.shape == (B, T + max_new) and out.dtype == torch.long and torch.equal(out[:, :T], idx)
        assert bool(((out >= 0) & (out < 7)).all())


@fuzz(150)
@given(data=st.data())
def test_fuzz_gpt_forward(data):
    clean, conditional = data.draw(st.booleans(), label="clean"), data.draw(st.booleans(), label="conditional")
    model = MODELS[conditional][0]
    B = data.draw(st.integers(1 if clean else 0, 2), label="B")
    T, idx = _draw_sequence(data, clean, conditional, B)
    classes = _classes(data, clean, conditional, B)
    T_out = T + int(conditional)
    targets = None
    if data.draw(st.booleans(), label="with targets"):
        shape = (B, T_out) if clean else data.draw(st.sampled_from([(B, T_out), (B, T_out + 1)]), label="shape")
        targets = _ids(data, clean, shape, 7, "targets")
        if targets.numel() and data.draw(st.booleans(), label="ignore one"):
            targets.view(-1)[0] = -100
    target_problem = None
    if targets is not None:
        ok_values = (targets == -100) | ((targets >= 0) & (targets < 7))
        shape_ok = targets.dtype == torch.long and tuple(targets.shape) == (B, T_out)
        target_problem = None if shape_ok and targets.numel() and bool(ok_values.all()) else "value"
    problems = [ids_problem(idx, 7, ("B", "T"), allow_empty=True), "value" if B == 0 else None,
                _classes_problem(classes, conditional, B), "value" if T_out == 0 or T_out > 10 else None,
                target_problem]
    out = judge("GPT.forward", lambda: model(idx, targets=targets, classes=classes), problems)
    if out is not None:
        logits, loss = out
        assert logits.shape == (B, T_out, 7) and logits.dtype == torch.float32
        assert (loss is None) == (targets is None)


def _draw_decoding(data) -> tuple:
    """What both speculative decoders take: (clean, conditional, target, draft, T, prefix, classes, new tokens,
    cfg, temperature, top_k, top_p) and the problems the oracle sees in them."""
    clean, conditional = data.draw(st.booleans(), label="clean"), data.draw(st.booleans(), label="conditional")
    target, draft = MODELS[conditional]
    T, prefix = _draw_sequence(data, clean, conditional, pick(data, clean, ([1], [2]), "rows"))
    classes = _classes(data, clean, conditional, 1)
    n_new, cfg = pick(data, clean, MAX_NEW, "new tokens"), pick(data, clean, CFGS, "cfg")
    if clean and not conditional:
        cfg = 0.0
    temperature, top_k, top_p = draw_sampling(data, clean)
    guided = number_problem(cfg) is None and float(cfg) != 0.0
    problems = [*sampling_problems(temperature, top_k, top_p), int_problem(n_new, lo=0), number_problem(cfg),
                ids_problem(prefix, 7, (1, "T"), allow_empty=True), _classes_problem(classes, conditional, 1),
                "value" if guided and not conditional else None, _room_problem(target, T, n_new)]
    return clean, target, draft, T, prefix, classes, n_new, cfg, temperature, top_k, top_p, problems


def _check_decoded(out, T: int, n_new: int, prefix: torch.Tensor) -> None:
    if out is not None:
        seq, stats = out
        assert seq.shape == (1, T + n_new) and seq.dtype == torch.long and torch.equal(seq[:, :T], prefix)
        assert bool(((seq >= 0) & (seq < 7)).all()) and stats.new_tokens == n_new


@fuzz(150)
@given(data=st.data())
def test_fuzz_speculative_generate(data):
    clean, target, draft, T, prefix, classes, n_new, cfg, temperature, top_k, top_p, problems = \
        _draw_decoding(data)
    gamma = pick(data, clean, ([3, 0, 1, 8], [-1, 2.0, True]), "gamma")
    out = judge("speculative.speculative_generate", lambda: speculative_generate(
        target, draft, prefix, n_new, gamma=gamma, sampling=config(temperature, top_k, top_p), cfg=cfg,
        classes=classes, generator=torch.Generator().manual_seed(0)), [*problems, int_problem(gamma, lo=0)])
    _check_decoded(out, T, n_new, prefix)


@fuzz(150)
@given(data=st.data())
def test_fuzz_sjd_generate(data):
    clean, target, _, T, prefix, classes, n_new, cfg, temperature, top_k, top_p, problems = _draw_decoding(data)
    window = pick(data, clean, ([3, 0, 1, 8], [-1, 2.0, True]), "window")
    delta = pick(data, clean, ([0.0, 0, 0.3, 5], [-0.1, NAN, "0.1"]), "delta")
    neighbors = pick(data, clean, (["good"], [None, "bad"]), "neighbors")
    nbrs = {None: None, "good": torch.tensor([[(v + 1) % 7, (v + 2) % 7] for v in range(7)]),
            "bad": torch.full((7, 2), 9)}[neighbors]
    relaxed = number_problem(delta, lo=0) is None and float(delta) > 0
    problems += [int_problem(window, lo=0), number_problem(delta, lo=0),
                 "value" if relaxed and neighbors != "good" else None]
    out = judge("speculative.sjd_generate", lambda: sjd_generate(
        target, n_new, prefix=prefix, classes=classes, window=window, sampling=config(temperature, top_k, top_p),
        cfg=cfg, generator=torch.Generator().manual_seed(0), delta=delta, neighbors=nbrs), problems)
    _check_decoded(out, T, n_new, prefix)


# -- quantizers and VQ-VAE -----------------------------------------------------------------------------------

torch.manual_seed(0)
QUANTIZERS = {"vq": VectorQuantizer(5, 3), "rvq": ResidualVQ(5, 3, depth=2),
              "msvq": MultiScaleVQ(5, 3, scales=(1, 2, 4))}
for _q in QUANTIZERS.values():
    _q.eval()
FLOAT_DTYPES = ([torch.float32, torch.float64, torch.float16], [torch.long, torch.bool])
VALUE_KINDS = (["plain"], ["special"])


@fuzz(200)
@given(data=st.data())
def test_fuzz_quantizer_encode(data):
    clean = data.draw(st.booleans(), label="clean")
    name = data.draw(st.sampled_from(sorted(QUANTIZERS)), label="quantizer")
    q = QUANTIZERS[name]
    good = [(2, 3, 4, 4), (1, 3, 4, 4)] + ([(1, 3, 2, 3), (2, 3, 1, 1)] if name != "msvq" else [])
    shape = pick(data, clean, (good, [(1, 3, 2, 3), (0, 3, 4, 4), (1, 3, 0, 4), (1, 2, 4, 4), (3, 4, 4),
                                      (1, 1, 3, 4, 4)]), "shape")
    dtype = pick(data, clean, FLOAT_DTYPES, "dtype")
    z = _tensor(data, list(shape), pick(data, clean, VALUE_KINDS, "kind")).to(dtype)
    ok = (len(shape) == 4 and shape[1] == 3 and dtype.is_floating_point and z.numel() > 0
          and bool(torch.isfinite(z).all()) and (name != "msvq" or shape[2:] == (4, 4)))
    out = judge(f"{type(q).__name__}.encode", lambda: q.encode(z), [None if ok else "value"])
    if out is None:
        return
    B, _, h, w = shape
    maps = out if name == "msvq" else [out]
    expected = {"vq": [(B, h, w)], "rvq": [(B, 2, h, w)], "msvq": [(B, s, s) for s in (1, 2, 4)]}[name]
    assert [tuple(m.shape) for m in maps] == expected
    assert all(m.dtype == torch.long and bool(((m >= 0) & (m < 5)).all()) for m in maps)


@fuzz(200)
@given(data=st.data())
def test_fuzz_quantizer_decode(data):
    clean = data.draw(st.booleans(), label="clean")
    name = data.draw(st.sampled_from(sorted(QUANTIZERS)), label="quantizer")
    q = QUANTIZERS[name]
    B = pick(data, clean, ([1, 2], [0]), "B")
    if name == "msvq":
        n = data.draw(st.integers(1, 3) if clean else st.integers(0, 4), label="scales given")
        sides = [pick(data, clean, ([s], [s + 1]), "side") for s in (1, 2, 4, 8)[:n]]
        batches = [pick(data, clean, ([B], [B + 1]), "batch") for _ in sides]
        maps = [_ids(data, clean, (b, s, s), 5, f"map {k}") for k, (b, s) in enumerate(zip(batches, sides))]
        ok = 1 <= n <= 3 and B > 0 and sides == [1, 2, 4][:n] and len(set(batches)) == 1 and all(
            ids_problem(m, 5, tuple(m.shape), dtype=None) is None for m in maps)
        out = judge("MultiScaleVQ.decode", lambda: q.decode(maps), [None if ok else "value"])
        B = batches[0] if batches else B
    else:
        want = ("B", 2, "h", "w") if name == "rvq" else ("B", "h", "w")
        good = [(B, 2, 2, 3), (B, 2, 1, 1)] if name == "rvq" else [(B, 2, 3), (B, 2, 2)]
        shape = pick(data, clean, (good, [(B, 3, 2, 3), (B, 2), (B, 1, 2, 3, 1)]), "shape")
        indices = _ids(data, clean, shape, 5, "indices")
        if name == "rvq":
            depth = pick(data, clean, ([None, 1, 2, np.int64(1)], [0, 3, 1.0]), "depth")
            problems = [ids_problem(indices, 5, want, dtype=None),
                        None if depth is None else int_problem(depth, lo=1, hi=2)]
            out = judge("ResidualVQ.decode", lambda: q.decode(indices, depth), problems)
        else:
            problems = [ids_problem(indices, 5, want, dtype=None)]
            out = judge("VectorQuantizer.decode", lambda: q.decode(indices), problems)
    if out is not None:
        assert out.dtype == torch.float32 and out.ndim == 4 and out.shape[:2] == (B, 3)
        assert bool(torch.isfinite(out).all())


def _tiny_vqvae(quantizer: str) -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(image_size=8, downsample=2, width=4, latent_dim=3, num_codes=5, quantizer=quantizer,
                             scales=(1, 2, 4))).eval()


VQVAES = {"vq": _tiny_vqvae("vq"), "msvq": _tiny_vqvae("msvq")}


@fuzz(100)
@given(data=st.data())
def test_fuzz_vqvae_round_trip(data):
    clean = data.draw(st.booleans(), label="clean")
    name = data.draw(st.sampled_from(sorted(VQVAES)), label="tokenizer")
    model = VQVAES[name]
    shape = pick(data, clean, ([(2, 1, 8, 8), (1, 1, 8, 8)], [(0, 1, 8, 8), (1, 3, 8, 8), (1, 1, 8, 6), (1, 8, 8)]),
                 "shape")
    dtype = pick(data, clean, FLOAT_DTYPES, "dtype")
    x = _tensor(data, list(shape), pick(data, clean, VALUE_KINDS, "kind")).to(dtype)
    ok = (len(shape) == 4 and shape[0] > 0 and shape[1:] == (1, 8, 8) and dtype.is_floating_point
          and bool(torch.isfinite(x).all()) and -0.5 <= float(x.min()) and float(x.max()) <= 1.5)  # images in [0, 1]
    tokens = judge("VQVAE.encode_to_indices", lambda: model.encode_to_indices(x), [None if ok else "value"])
    if tokens is None:
        return
    images = judge("VQVAE.decode_from_indices", lambda: model.decode_from_indices(tokens), [])
    assert images.shape == (shape[0], 1, 8, 8) and images.dtype == torch.float32
    assert bool(((images >= 0) & (images <= 1)).all())


# -- VAR and raster sampling ---------------------------------------------------------------------------------

torch.manual_seed(0)
TINY_VAR = VAR(VARConfig(vocab_size=5, latent_dim=3, scales=(1, 2, 4), n_classes=3, n_layer=1, n_head=2,
                         n_embd=16)).eval()
TINY_RASTER = GPT(GPTConfig(vocab_size=5, block_size=7, n_layer=1, n_head=2, n_embd=16, n_classes=3)).eval()


def _draw_class_sampling(data) -> tuple:
    """(clean, B, classes, cfg, temperature, top_k, top_p) for the tiny VAR and raster models, and the problems."""
    clean = data.draw(st.booleans(), label="clean")
    B = pick(data, clean, ([1, 2], [0]), "B")
    classes = _ids(data, clean, pick(data, clean, ([(B,)], [(B, 1)]), "classes shape"), 4, "classes")
    cfg = pick(data, clean, ([0.0, 1.5, 0], [-1.0, NAN, INF, "1"]), "cfg")
    temperature, top_k, top_p = draw_sampling(data, clean)
    problems = [*sampling_problems(temperature, top_k, top_p), ids_problem(classes, 4, ("B",))]
    return clean, B, classes, cfg, temperature, top_k, top_p, problems


@fuzz(100)
@given(data=st.data())
def test_fuzz_var_sample_pyramid(data):
    clean, B, classes, cfg, temperature, top_k, top_p, problems = _draw_class_sampling(data)
    ramp = pick(data, clean, ([True, False], [1, None]), "ramp")
    problems += [number_problem(cfg), bool_problem(ramp)]
    known = known_mask = None
    if data.draw(st.booleans(), label="inpaint") and B > 0:
        known = [_ids(data, clean, (B, s, s), 5, f"known {s}") for s in (1, 2, 4)]
        known_mask = torch.rand(pick(data, clean, ([(B, 4, 4)], [(B, 2, 2)]), "mask shape")) < 0.5
        problems += [ids_problem(k, 5, tuple(k.shape), dtype=None) for k in known]
        problems.append(None if known_mask.shape == (B, 4, 4) else "value")
    out = judge("var.sample_pyramid", lambda: sample_pyramid(
        TINY_VAR, QUANTIZERS["msvq"], classes, sampling=config(temperature, top_k, top_p), cfg=cfg, ramp=ramp,
        generator=torch.Generator().manual_seed(0), known=known, known_mask=known_mask), problems)
    if out is not None:
        assert [tuple(m.shape) for m in out] == [(B, 1, 1), (B, 2, 2), (B, 4, 4)]
        assert all(m.dtype == torch.long and bool(((m >= 0) & (m < 5)).all()) for m in out)
        if known is not None:
            masks = var_ref.scale_masks(known_mask, (1, 2, 4))
            assert all(torch.equal(m[k], t[k]) for m, t, k in zip(out, known, masks))


@fuzz(100)
@given(data=st.data())
def test_fuzz_raster_generate_tokens(data):
    clean, B, classes, cfg, temperature, top_k, top_p, problems = _draw_class_sampling(data)
    grid = pick(data, clean, ([(2, 3), (1, 1), [3, 2]], [(3, 3), (0, 2), (2.0, 3), (2,)]), "grid")
    grid_problem = "type" if len(grid) != 2 or any(int_problem(g) for g in grid) else (
        "value" if min(grid) < 1 or grid[0] * grid[1] > 6 else None)
    problems += [number_problem(cfg), grid_problem]
    out = judge("raster.generate_tokens", lambda: raster.generate_tokens(
        TINY_RASTER, classes, grid, sampling=config(temperature, top_k, top_p), cfg=cfg,
        generator=torch.Generator().manual_seed(0)), problems)
    if out is not None:
        assert out.shape == (B, *grid) and out.dtype == torch.long and bool(((out >= 0) & (out < 5)).all())


# -- the full system -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen():
    return Generator.from_pretrained("mnist", device="cpu")


GOOD_CLASSES = [[0], [3, 9], [1, 2, 5], (4,), torch.tensor([6]), np.array([7, 1]), torch.tensor([8], dtype=torch.int32)]
BAD_CLASSES = [[], [10], [-1], [True], [1.0], [0, 1.5], [[1, 2]], torch.tensor([2.0]), np.array([True]), "3", None, 3]


def _generator_classes_problem(classes) -> str | None:
    if isinstance(classes, str) or classes is None:
        return "type"
    t = torch.as_tensor(classes)
    if t.ndim != 1 or t.numel() == 0 or t.is_floating_point() or t.dtype == torch.bool:
        return "value"
    if isinstance(classes, list) and any(isinstance(c, bool) for c in classes):
        return "value"
    return "value" if bool(((t < 0) | (t > 9)).any()) else None


@fuzz(100)
@given(data=st.data())
def test_fuzz_generator_generate(gen, data):
    clean = data.draw(st.booleans(), label="clean")
    classes = pick(data, clean, (GOOD_CLASSES, BAD_CLASSES), "classes")
    method = pick(data, clean, (["var", "var", "ar"], ["diffusion"]), "method")
    good_spec = [None, None, None, "draft", "jacobi"] if method == "ar" else [None]
    speculative = pick(data, clean, (good_spec, ["draft", "medusa"]), "speculative")
    good_delta = [0.0, 0, 0.2] if speculative == "jacobi" else [0.0, 0]
    temperature = pick(data, clean, ([1.0, 0, 0.7], [-0.1, NAN, INF, True]), "temperature")
    top_k = pick(data, clean, ([None, 4, 1, 300], [0, 2.5]), "top_k")
    top_p = pick(data, clean, ([None, 0.9, 1.0], [0, 1.2, NAN]), "top_p")
    kw = {
        "cfg": pick(data, clean, ([None, 0, 1.5, 3], [-1.0, NAN, INF, "2"]), "cfg"),
        "relaxed_delta": pick(data, clean, (good_delta, [0.2, -0.1, NAN]), "relaxed_delta"),
        "kernels": pick(data, clean, (["auto", "torch"], ["cuda"]), "kernels"),
        "batch_size": pick(data, clean, ([500, 1, 2], [0, 1.5]), "batch_size"),
        "seed": pick(data, clean, ([0, 7, None, -3], [2.5, "0"]), "seed"),
    }
    delta_problem = number_problem(kw["relaxed_delta"], lo=0)
    problems = [
        _generator_classes_problem(classes),
        None if method in ("var", "ar") else "value",
        None if speculative in (None, "draft", "jacobi") else "value",
        "value" if speculative in ("draft", "jacobi") and method != "ar" else None,
        None if kw["cfg"] is None else number_problem(kw["cfg"], lo=0),
        *sampling_problems(temperature, top_k, top_p),
        delta_problem or ("value" if float(kw["relaxed_delta"]) > 0 and speculative != "jacobi" else None),
        None if kw["kernels"] in ("auto", "torch") else "value",
        int_problem(kw["batch_size"], lo=1),
        None if kw["seed"] is None else int_problem(kw["seed"]),
    ]
    out = judge("Generator.generate", lambda: gen.generate(classes, method=method, speculative=speculative,
                                                           sampling=config(temperature, top_k, top_p), **kw),
                problems)
    models = (gen.var, gen.ar, gen.ar_draft)
    assert {m.attention for model in models for m in model.modules() if isinstance(m, SelfAttention)} == \
        {sdpa_attention}
    if out is not None:
        n = len(torch.as_tensor(classes))
        assert out.images.shape == (n, 1, 32, 32) and out.images.dtype == torch.float32
        assert bool(((out.images >= 0) & (out.images <= 1)).all())
        assert out.classes.tolist() == torch.as_tensor(classes).tolist() and out.stats.images == n
