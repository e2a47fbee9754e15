"""Bad input to speculative decoding's pieces and loops, its analytic model, and the sampling filters: a
one-line TypeError/ValueError naming the argument, never a gather/index error from inside torch or a silent
NaN; and the top-k / top-p filters work on integer logits (promoted to the default float dtype)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from ar_course import sampling
from ar_course.speculative import (
    acceptance_probability, accepted_prefix, codebook_neighbors, expected_speedup, jacobi_verify, relaxed_target,
    residual_distribution, sjd_generate, speculative_generate, speculative_round,
)
from ar_course.transformer import GPT, GPTConfig

V = 7
_g = torch.Generator().manual_seed(0)
P = torch.softmax(torch.randn(3, V, generator=_g), -1)  # (L + 1, V), L = 2
Q = torch.softmax(torch.randn(2, V, generator=_g), -1)  # (L, V)
D = torch.tensor([1, 2])
U = torch.tensor([0.1, 0.2])
NB = codebook_neighbors(torch.randn(V, 3, generator=_g), 2)  # (V, 2)
SELF = torch.arange(V)[:, None].repeat(1, 2)  # every token its own neighbour


def _gpt(causal: bool = True) -> GPT:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=1, n_embd=8, causal=causal)).eval()


# -- findings 15, 16: tokens, drafts and neighbours are checked at entry -----------------------------------

SPEC_CASES = [
    pytest.param(lambda: acceptance_probability(P[:2], Q, torch.tensor([1, 9])), ValueError,
                 r"tokens must lie in \[0, 6\], got 9", id="acceptance tokens out of range"),
    pytest.param(lambda: acceptance_probability(P[:2], Q, torch.tensor([1, -1])), ValueError,
                 r"tokens must lie in \[0, 6\], got -1", id="acceptance tokens negative"),
    pytest.param(lambda: acceptance_probability(P[:2], Q, torch.tensor([1.0, 2.0])), ValueError,
                 "tokens must be a .* long tensor, got .* torch.float32", id="acceptance tokens float"),
    pytest.param(lambda: acceptance_probability([[0.5, 0.5]], Q, D), TypeError, "p must be a torch.Tensor, got list",
                 id="acceptance p list"),
    pytest.param(lambda: accepted_prefix(P[None, :2], Q[None], torch.tensor([[1, 9]]), U[None]), ValueError,
                 "got 9", id="accepted_prefix drafts out of range"),
    pytest.param(lambda: speculative_round(P, Q, torch.tensor([1, 9]), U), ValueError,
                 r"draft must lie in \[0, 6\], got 9", id="round draft out of range"),
    pytest.param(lambda: speculative_round(P, Q, torch.tensor([1.0, 2.0]), U), ValueError,
                 "draft must be a .* long tensor", id="round draft float"),
    pytest.param(lambda: jacobi_verify(P, Q, torch.tensor([1, -1]), U), ValueError,
                 r"draft must lie in \[0, 6\], got -1", id="jacobi draft negative"),
    pytest.param(lambda: relaxed_target(P[:2], D, NB, float("nan")), ValueError,
                 "delta must be a finite number >= 0, got nan", id="relaxed delta nan"),
    pytest.param(lambda: relaxed_target(P[:2], D, NB, float("inf")), ValueError,
                 "delta must be a finite number >= 0, got inf", id="relaxed delta inf"),
    pytest.param(lambda: relaxed_target(P[:2], D, NB, "0.1"), TypeError, "delta must be a finite number",
                 id="relaxed delta string"),
    pytest.param(lambda: relaxed_target(P[:2], torch.tensor([1, 9]), NB, 0.1), ValueError,
                 r"tokens must lie in \[0, 6\], got 9", id="relaxed tokens out of range"),
    pytest.param(lambda: relaxed_target(P[:2], D, torch.full((V, 2), 9), 0.1), ValueError,
                 r"neighbors must lie in \[0, 6\], got 9", id="relaxed neighbors out of range"),
    pytest.param(lambda: relaxed_target(P[:2], D, NB.float(), 0.1), ValueError,
                 r"neighbors must be a \(7, k\) long tensor", id="relaxed neighbors float"),
    pytest.param(lambda: relaxed_target(P[:2], D, SELF, 0.1), ValueError, "cannot be its own neighbour",
                 id="relaxed neighbors contain the token"),
    pytest.param(lambda: sjd_generate(_gpt(), 3, prefix=torch.tensor([[1]]), delta=0.1, neighbors=SELF),
                 ValueError, "cannot be its own neighbour", id="sjd neighbors contain the token"),
    # finding 28 (part): a model that is not a GPT
    pytest.param(lambda: speculative_generate(_gpt(), "lm_draft", torch.tensor([[1]]), 3), TypeError,
                 "draft must be a GPT .*got str", id="speculative draft string"),
    pytest.param(lambda: speculative_generate(None, _gpt(), torch.tensor([[1]]), 3), TypeError,
                 "target must be a GPT .*got NoneType", id="speculative target None"),
    pytest.param(lambda: sjd_generate("m", 3, prefix=torch.tensor([[1]])), TypeError, "model must be a GPT .*got str",
                 id="sjd model string"),
    # a bidirectional GPT (a MaskGIT, a diffusion LM) cannot propose or verify left to right: it used to run
    pytest.param(lambda: speculative_generate(_gpt(), _gpt(causal=False), torch.tensor([[1]]), 3), ValueError,
                 "speculative decoding's draft needs a causal model .*; this one has "
                 "causal=False", id="speculative bidirectional draft"),
    pytest.param(lambda: speculative_generate(_gpt(causal=False), _gpt(), torch.tensor([[1]]), 3), ValueError,
                 "speculative decoding's target needs a causal model", id="speculative bidirectional target"),
    pytest.param(lambda: sjd_generate(_gpt(causal=False), 3, prefix=torch.tensor([[1]])), ValueError,
                 "speculative decoding's model needs a causal model", id="sjd bidirectional"),
    # findings 23-27: the analytic model and codebook_neighbors
    pytest.param(lambda: expected_speedup(0.8, 4, float("nan")), ValueError, "c must be a finite number >= 0",
                 id="speedup c nan"),
    pytest.param(lambda: expected_speedup(0.8, float("nan"), 0.1), TypeError, "gamma must be an integer",
                 id="speedup gamma nan"),
    pytest.param(lambda: expected_speedup(0.8, 2.5, 0.1), TypeError, "gamma must be an integer",
                 id="speedup gamma 2.5"),
    pytest.param(lambda: expected_speedup("0.5", 4, 0.1), TypeError, "alpha must be a finite number",
                 id="speedup alpha string"),
    pytest.param(lambda: expected_speedup(float("nan"), 4, 0.1), ValueError, r"alpha must be a finite number in",
                 id="speedup alpha nan"),
    pytest.param(lambda: codebook_neighbors(torch.randn(4, 2), 2.5), TypeError, "k must be an integer",
                 id="neighbors k 2.5"),
    pytest.param(lambda: codebook_neighbors(torch.randn(4, 2), True), TypeError, "k must be an integer",
                 id="neighbors k True"),
    pytest.param(lambda: codebook_neighbors(torch.full((4, 2), float("nan")), 2), ValueError,
                 "codebook must be finite", id="neighbors NaN codebook"),
    pytest.param(lambda: residual_distribution(P[:2], P[:2].tolist()), TypeError,
                 "^q must be a torch.Tensor, got list$", id="residual q a list"),
]


@pytest.mark.parametrize("call, error, match", SPEC_CASES)
def test_speculative_bad_input(call: Callable, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_speculative_valid_input_unchanged() -> None:
    p_x, q_x = P[:2].gather(-1, D[:, None])[:, 0], Q.gather(-1, D[:, None])[:, 0]
    assert torch.equal(acceptance_probability(P[:2], Q, D), torch.clamp(p_x / q_x, max=1.0))
    relaxed = relaxed_target(P[:2], D, NB, 0.1)
    assert torch.allclose(relaxed.sum(-1), torch.ones(2))
    assert torch.equal(relaxed_target(P[:2], D, NB, 0), P[:2])
    assert expected_speedup(1, 3, 0.5) == 4 / 2.5
    assert expected_speedup(0.8, 4, 0.1) == (1 - 0.8 ** 5) / (1 - 0.8) / 1.4


# -- finding 2: top-k / top-p on integer logits ----------------------------------------------------------------

INT_LOGITS = torch.tensor([[1, 5, 3], [2, 2, 0]])


def test_top_k_on_integer_logits() -> None:
    out = sampling.top_k_filter(INT_LOGITS, 1)
    assert out.dtype == torch.get_default_dtype()
    assert torch.equal(out, sampling.top_k_filter(INT_LOGITS.float(), 1))
    assert torch.equal(sampling.top_k_filter(INT_LOGITS, 5), INT_LOGITS.float())  # k >= V keeps all, as floats


def test_top_p_on_integer_logits() -> None:
    out = sampling.top_p_filter(INT_LOGITS, 0.5)
    assert out.dtype == torch.get_default_dtype()
    assert torch.equal(out, sampling.top_p_filter(INT_LOGITS.float(), 0.5))


def test_filters_keep_float_dtypes() -> None:
    half = torch.tensor([[1.0, 5.0, 3.0]], dtype=torch.float16)
    assert sampling.top_k_filter(half, 1).dtype == torch.float16
    assert sampling.top_p_filter(half.double(), 0.5).dtype == torch.float64
