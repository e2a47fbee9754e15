"""Checks for chapter 04, next-scale prediction: ``checks.ch04.block_causal_mask(block_causal_mask)`` etc.

References live in :mod:`ar_course.var.functional` and :mod:`ar_course.var.model`. The checks that need a
tokenizer or a transformer build tiny seeded ones (a :class:`~ar_course.tokenizers.MultiScaleVQ` with
random codes and a :class:`~ar_course.var.VAR` with randomised adaptive norms), on schedules that are not
the chapter's, so an answer that hard-codes ``(1, 2, 3, 4, 6, 8)`` is caught. The sampling check compares the
learner's tokens with the reference under the same generator seed and records every forward pass (and whether
it runs inside the library's own loop, ``ar_course.var.sample_pyramid``).
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Callable, Iterator

import torch

from ar_course.checks.core import (Case, Chapter, CheckFailure, Mistake, call, check_draws_follow_generator,
                                   check_unchanged, clone_args, compare, compare_cases, explain, running)
from ar_course.sampling import SamplingConfig
from ar_course.tokenizers import MultiScaleVQ
from ar_course.var import functional as ref
from ar_course.var import model as var_model
from ar_course.var.model import VAR, VARConfig

chapter = Chapter(4, "Next-scale prediction")
use = chapter.use
hint = chapter.hint

SCHEDULES = [(1, 2, 3, 4, 6, 8), (1, 3), (2,), (1, 2, 4, 5)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _vq(scales: tuple[int, ...], dim: int = 5, vocab: int = 19, seed: int = 0) -> MultiScaleVQ:
    """A small multi-scale quantizer with random (not tiny) codes and random refinements."""
    torch.manual_seed(seed)
    vq = MultiScaleVQ(vocab, dim, scales=scales, num_phi=2).eval()
    with torch.no_grad():
        vq.quantizer.codebook.normal_()
    return vq


def _pyramid(scales: tuple[int, ...], B: int, vocab: int = 19, seed: int = 1) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randint(0, vocab, (B, s, s), generator=g) for s in scales]


# --------------------------------------------------------------------------------------------------------
# 4.1 the block-causal mask


MASK_MISTAKES = [
    Mistake(lambda scales: ~ref.block_causal_mask(scales),
            "the mask is inverted: here True must mean 'may attend' (nn.MultiheadAttention's attn_mask uses True "
            "for 'blocked'; this course's masks do not)"),
    Mistake(lambda scales: ref.block_causal_mask(scales).T,
            "the mask is transposed: its rows are the queries and its columns the keys, so entry [i, j] says "
            "whether query i may see key j"),
    Mistake(lambda scales: torch.ones(sum(s * s for s in scales), sum(s * s for s in scales), dtype=torch.bool).tril(),
            "that is the token-by-token causal mask (tril); the tokens of one scale are predicted together, so "
            "each sees every token of its own scale, the later ones too"),
]


@chapter.exercise("4.1", reference=ref.block_causal_mask, hints=(
    "all tokens of a scale are predicted together, from the scales before it; decide which scales a token may "
    "look at, then turn that into a mask over positions",
    "give every position its scale index (scale k repeated s_k^2 times); a query may attend to every key of "
    "its own scale and of earlier scales, and to nothing of later ones",
    "lvl = torch.repeat_interleave(torch.arange(S), torch.tensor([s * s for s in scales])); return "
    "lvl[:, None] >= lvl[None, :]",
))
def block_causal_mask(fn: Callable, ref_fn: Callable) -> None:
    for scales in SCHEDULES:
        where = f"scales {scales}"
        got = call(fn, scales, where=where)
        expected = ref_fn(scales)
        if isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == torch.bool:
            lvl = ref.level_ids(scales)
            leak = got & ~expected
            if bool(leak.any()):
                i, j = leak.nonzero()[0].tolist()
                raise explain(CheckFailure(f"on {where}, a query of scale {int(lvl[i])} may attend to a key of the "
                                           f"later scale {int(lvl[j])} (position {i} -> {j}): that leaks the future"),
                              MASK_MISTAKES, Case(where, (scales,)), got)
            missing = expected & ~got
            if bool(missing.any()):
                i, j = missing.nonzero()[0].tolist()
                raise explain(CheckFailure(f"on {where}, a query of scale {int(lvl[i])} cannot attend to position "
                                           f"{j} of scale {int(lvl[j])} (query position {i}); tokens of the same "
                                           "scale and of earlier scales must all be visible"),
                              MASK_MISTAKES, Case(where, (scales,)), got)
        compare(got, expected, where=where)


# --------------------------------------------------------------------------------------------------------
# 4.2 level and position embeddings


def _embed_cases() -> Iterator[Case]:
    g = _gen(2)
    for scales, start, T in [((1, 2, 3, 4, 6, 8), 0, 130), ((1, 2, 3, 4, 6, 8), 14, 16), ((1, 3, 4), 1, 9),
                             ((2, 3), 4, 9)]:
        L = sum(s * s for s in scales)
        C = 7
        yield Case(f"scales {scales}, positions {start}..{start + T - 1}",
                   (torch.randn(3, T, C, generator=g), torch.randn(len(scales), C, generator=g),
                    torch.randn(L, C, generator=g), scales, start))


def _embed_from_zero(x: torch.Tensor, level_table: torch.Tensor, pos_table: torch.Tensor, scales: tuple[int, ...],
                     start: int = 0, *, levels_too: bool = True) -> torch.Tensor:
    lvl = ref.level_ids(scales)
    first = 0 if levels_too else start
    return x + level_table[lvl[first:first + x.shape[1]]] + pos_table[:x.shape[1]]


def _embed_level_by_position(x: torch.Tensor, level_table: torch.Tensor, pos_table: torch.Tensor,
                             scales: tuple[int, ...], start: int = 0) -> torch.Tensor:
    p = torch.arange(start, start + x.shape[1])
    return x + level_table[p.clamp(max=level_table.shape[0] - 1)] + pos_table[p]


FROM_ZERO = "the positions are counted from 0; they start at `start` (a generation step embeds one scale of a longer " \
            "sequence)"
EMBED_MISTAKES = [
    Mistake(_embed_from_zero, FROM_ZERO),
    Mistake(lambda *args: _embed_from_zero(*args, levels_too=False), FROM_ZERO),
    Mistake(_embed_level_by_position, "the level table is indexed by the position; it is indexed by the scale the "
            "position belongs to"),
    Mistake(lambda x, level_table, pos_table, scales, start=0: x + pos_table[start:start + x.shape[1]],
            "the level embedding is missing: each position also gets the row of level_table of the scale it "
            "belongs to"),
    Mistake(lambda x, level_table, pos_table, scales, start=0:
            x + level_table[ref.level_ids(scales)[start:start + x.shape[1]]],
            "the position embedding is missing: each position also gets its own row of pos_table"),
]


@chapter.exercise("4.2", reference=ref.embed_levels_positions, hints=(
    "every position gets two embeddings added to it: one for where it is in the whole sequence, one for the "
    "scale it belongs to",
    "position p (counting from start) gets pos_table[p] and level_table[scale index of p]; the scale index is k "
    "for all s_k^2 positions of scale k, not the side s_k",
    "p = torch.arange(start, start + T, device=x.device); return x + pos_table[p] + "
    "level_table[var.level_ids(scales, x.device)[p]] (var.level_ids: the scale index of every position, as in 4.1)",
))
def embed_levels_positions(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _embed_cases(), mistakes=EMBED_MISTAKES, off_cpu=True)


# --------------------------------------------------------------------------------------------------------
# 4.3 one scale step of the canvas


def _scale_step_cases() -> Iterator[tuple[str, MultiScaleVQ, list[torch.Tensor]]]:
    for scales, B in [((1, 2, 3, 4, 6, 8), 2), ((1, 3, 4), 3), ((2, 5), 1)]:
        yield f"scales {scales}, batch {B}", _vq(scales), _pyramid(scales, B)


def _step_with(vq: MultiScaleVQ, f_hat: torch.Tensor | None, k: int, tokens: torch.Tensor, *, own_codes: bool = False,
               reshaped: bool = False, column_major: bool = False, fresh_canvas: bool = False,
               nearest: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`ref.scale_step` with one slip switched on: the next input from this scale's codes alone
    (``own_codes``), the map reshaped to ``(B, s'^2, D)`` without moving the channels last (``reshaped``), the
    tokens read into the map column by column (``column_major``), a canvas that drops ``f_hat``
    (``fresh_canvas``), or the canvas resized by ``F.interpolate``'s default nearest mode (``nearest``)."""
    s, B = vq.scales[k], tokens.shape[0]
    idx = tokens.view(B, s, s)
    h = vq.accumulate(None, k, idx.transpose(1, 2) if column_major else idx)
    f_new = h if f_hat is None or fresh_canvas else f_hat + h
    if k == len(vq.scales) - 1:
        return f_new, None
    src = h if own_codes else f_new
    if nearest:
        nxt = torch.nn.functional.interpolate(src, size=vq.scales[k + 1])
    else:
        nxt = vq.next_input(src, k)  # (B, D, s', s')
    if reshaped:
        return f_new, nxt.reshape(B, -1, nxt.shape[1])
    return f_new, nxt.flatten(2).transpose(1, 2)


STEP_MISTAKES = [
    Mistake(partial(_step_with, own_codes=True),
            "the next input is made from this scale's codes alone; it is the whole canvas (every scale so far) "
            "resized to the next scale"),
    Mistake(partial(_step_with, reshaped=True),
            "that reshapes the (B, D, s', s') map straight to (B, s'^2, D), which mixes channels and positions; "
            "each row must hold the D channels of one position"),
    Mistake(partial(_step_with, column_major=True),
            "the tokens are read into the s x s map column by column (transposed); they come row-major, row by "
            "row"),
    Mistake(partial(_step_with, fresh_canvas=True),
            "the canvas holds this scale's codes only; each step adds them to the canvas f_hat it is given"),
    Mistake(partial(_step_with, nearest=True),
            "that resizes the canvas with F.interpolate's default (nearest) mode, which keeps single pixels; the "
            "next input averages each area (vq.next_input)"),
]


@chapter.exercise("4.3", reference=ref.scale_step, hints=(
    "one step does two things: add scale k's codes to the canvas, then prepare what the transformer reads to "
    "predict scale k + 1",
    "reshape the tokens to (B, s_k, s_k) and add them with vq.accumulate; the next input is the whole canvas "
    "resized by vq.next_input(f_hat, k) to (B, D, s', s'), flattened row-major to (B, s'^2, D); after the last "
    "scale it is None",
    "s, S = vq.scales[k], len(vq.scales); f_hat = vq.accumulate(f_hat, k, tokens.view(B, s, s)); return f_hat, "
    "(None if k == S - 1 else vq.next_input(f_hat, k).flatten(2).transpose(1, 2))",
))
def scale_step(fn: Callable, ref_fn: Callable) -> None:
    for name, vq, pyr in _scale_step_cases():
        f_ref = f_fn = None
        with torch.no_grad():
            for k, idx in enumerate(pyr):
                where = f"{name}, scale {k}"
                tokens = idx.flatten(1)
                f_exp, nxt_exp = ref_fn(vq, f_ref, k, tokens)
                f_in = None if f_fn is None else f_fn.clone()
                got = call(fn, vq, f_in, k, tokens.clone(), where=where)
                check_unchanged(("f_hat",), (f_fn,), (f_in,), where,
                                why="and one that keeps the canvas of every scale would see them all change")
                if not isinstance(got, (tuple, list)) or len(got) != 2:
                    raise CheckFailure(f"on {where}, return a pair (f_hat, next_input), got {type(got).__name__}")
                try:
                    compare(got[0], f_exp, where=where, name="f_hat (the canvas)")
                    if nxt_exp is not None:
                        compare(got[1], nxt_exp, where=where, name="next_input")
                except CheckFailure as exc:
                    raise explain(exc, STEP_MISTAKES, Case(where, (vq, f_fn, k, tokens)), got) from None
                if nxt_exp is None and got[1] is not None:
                    raise CheckFailure(f"on {where} (the last scale) the next input should be None")
                f_ref, f_fn = f_exp, got[0]
                if k == 0:
                    first = f_exp
            if len(pyr) > 1:  # scale 1 once more, from the canvas after scale 0: the answer depends on f_hat only
                _scale_step_again(fn, ref_fn, vq, first, pyr[1].flatten(1), f"{name}, scale 1 again")


def _scale_step_again(fn: Callable, ref_fn: Callable, vq: MultiScaleVQ, f_hat: torch.Tensor, tokens: torch.Tensor,
                      where: str) -> None:
    """Call scale step 1 again, on the canvas after scale 0, once the whole pyramid has run: a function that
    keeps its own canvas between calls instead of reading ``f_hat`` gives another answer."""
    f_exp, nxt_exp = ref_fn(vq, f_hat.clone(), 1, tokens)
    got = call(fn, vq, f_hat.clone(), 1, tokens.clone(), where=where)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise CheckFailure(f"on {where}, return a pair (f_hat, next_input), got {type(got).__name__}")
    try:
        compare(got[0], f_exp, where=where, name="f_hat (the canvas)")
        compare(got[1], nxt_exp, where=where, name="next_input")
    except CheckFailure as exc:
        raise CheckFailure(f"{exc}; called once more for scale 1 with the canvas after scale 0, your function "
                           "answered otherwise than the first time: compute from the f_hat it is given, not from a "
                           "canvas kept between calls") from None


# --------------------------------------------------------------------------------------------------------
# 4.4 the teacher-forcing sequence


def _tf_own_canvas(vq: MultiScaleVQ, indices: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of scale k made from the canvas after scale k itself (resized to s_k): it holds the answer."""
    f_hat, inputs = None, []
    for k, idx in enumerate(indices):
        f_hat = vq.accumulate(f_hat, k, idx)
        if k >= 1:
            inputs.append(vq.next_input(f_hat, k - 1).flatten(2).transpose(1, 2))
    return torch.cat(inputs, 1), torch.cat([i.flatten(1) for i in indices], 1)


def _tf_previous_codes_only(vq: MultiScaleVQ, indices: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of scale k made from scale k - 1's codes alone, not the canvas of every scale before it."""
    inputs = [vq.next_input(vq.accumulate(None, k, idx), k).flatten(2).transpose(1, 2)
              for k, idx in enumerate(indices[:-1])]
    return torch.cat(inputs, 1), torch.cat([i.flatten(1) for i in indices], 1)


TF_MISTAKES = [
    Mistake(_tf_own_canvas, "the input for scale k is made from the canvas that already holds scale k's own "
                            "tokens, which gives the answer away; it comes from the scales before it"),
    Mistake(_tf_previous_codes_only, "each input is made from the previous scale's codes alone; it is the whole "
                                     "canvas of every scale before it"),
    Mistake(lambda vq, indices: (ref.teacher_forcing_sequence(vq, indices)[0],
                                 torch.cat([i.flatten(1) for i in reversed(indices)], 1)),
            "the targets run from the finest scale to the coarsest; they run coarse to fine, the order in which "
            "the scales are predicted"),
]


@chapter.exercise("4.4", reference=ref.teacher_forcing_sequence, hints=(
    "teacher forcing feeds the ground-truth scales: run your scale step over them and collect what the "
    "transformer would read before each scale after the first",
    "the inputs are the next inputs of scales 0 .. S-2 concatenated along the sequence (S - 1 of them: the first "
    "scale is predicted from the start token); the targets are every map flattened row-major and "
    "concatenated, coarse to fine",
    "for k, idx in enumerate(indices): f_hat, nxt = step_fn(vq, f_hat, k, idx.flatten(1)); collect nxt when "
    "not None; return torch.cat(inputs, 1), torch.cat([i.flatten(1) for i in indices], 1)",
))
def teacher_forcing_sequence(fn: Callable, ref_fn: Callable) -> None:
    for name, vq, pyr in _scale_step_cases():
        with torch.no_grad():
            expected = ref_fn(vq, pyr)
            got = call(fn, vq, [p.clone() for p in pyr], where=name)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailure(f"on {name}, return a pair (inputs, targets), got {type(got).__name__}")
        try:
            compare(got[0], expected[0], where=name, name="inputs")
            compare(got[1], expected[1], where=name, name="targets")
        except CheckFailure as exc:
            with torch.no_grad():
                raise explain(exc, TF_MISTAKES, Case(name, (vq, pyr)), got) from None


# --------------------------------------------------------------------------------------------------------
# 4.5 the loss over all scales


def _loss_cases() -> Iterator[Case]:
    g = _gen(5)
    for scales, B, V in [((1, 2, 3, 4, 6, 8), 3, 17), ((1, 3), 2, 5), ((2, 3, 5), 1, 11)]:
        L = sum(s * s for s in scales)
        logits = torch.randn(B, L, V, generator=g) * 2
        logits[:, :1] += 3 * torch.randn(B, 1, V, generator=g)  # make the first scale's loss stand out
        yield Case(f"scales {scales}, batch {B}, vocab {V}",
                   (logits, torch.randint(0, V, (B, L), generator=g), scales))
    # a confident model: many target probabilities are below float32's smallest number
    yield Case("scales (1, 2, 3), batch 2, vocab 7, logits far apart (+-200)",
               (torch.randn(2, 14, 7, generator=g) * 80, torch.randint(0, 7, (2, 14), generator=g), (1, 2, 3)))


def _loss_of_softmax_log(logits: torch.Tensor, targets: torch.Tensor, scales: tuple[int, ...], *, eps: float = 0.0,
                         clamp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The mistake: the log of softmax probabilities, -inf wherever a probability underflows to 0; patched with
    ``eps`` (log(max(p, eps)) with ``clamp``, else log(p + eps)) it caps every token's loss at -log(eps)."""
    p = logits.softmax(-1).gather(-1, targets[..., None]).squeeze(-1)  # (B, L)
    nll = -(p.clamp_min(eps) if clamp else p + eps).log()
    bounds = torch.tensor([0] + [s * s for s in scales]).cumsum(0).tolist()
    return nll.mean(), torch.stack([nll[:, b:e].mean() for b, e in zip(bounds, bounds[1:])])


# the eps a learner is likely to pick: powers of ten, and float32's smallest normal number and machine epsilon
_LOG_EPS = (1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-12, 1e-20, torch.finfo(torch.float32).tiny,
            torch.finfo(torch.float32).eps)


def _loss_off_by_one(logits: torch.Tensor, targets: torch.Tensor,
                     scales: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scale's mean taken over one token too many (``begin : end + 1``, the next scale's first token)."""
    total, _ = ref.var_loss(logits, targets, scales)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                            reduction="none").view(targets.shape)  # (B, L)
    bounds = torch.tensor([0] + [s * s for s in scales]).cumsum(0).tolist()
    return total, torch.stack([nll[:, b:e + 1].mean() for b, e in zip(bounds, bounds[1:])])


def _loss_of_softmax_log_fitted(fn: Callable, logits: torch.Tensor, targets: torch.Tensor, scales: tuple[int, ...],
                                *, clamp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_loss_of_softmax_log` with the eps (any, not only one of :data:`_LOG_EPS`) that gives the total of
    the learner's ``fn`` on this input: it matches ``fn`` only when the per-scale losses agree as well."""
    target = float(call(fn, logits.clone(), targets.clone(), scales)[0])
    p = logits.softmax(-1).gather(-1, targets[..., None]).squeeze(-1).double()  # (B, L)

    def total(log_eps: float) -> float:  # decreases as eps grows
        eps = 10.0 ** log_eps
        return float(-(p.clamp_min(eps) if clamp else p + eps).log().mean())

    lo, hi = -46.0, 0.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) > target else (lo, mid)
    return _loss_of_softmax_log(logits, targets, scales, eps=10.0 ** hi, clamp=clamp)


def _loss_mean_of_means(logits: torch.Tensor, targets: torch.Tensor,
                        scales: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    per_scale = ref.var_loss(logits, targets, scales)[1]
    return per_scale.mean(), per_scale


@chapter.exercise("4.5", reference=ref.var_loss, hints=(
    "every token of every scale is one prediction; the total and the per-scale numbers are averages of the same "
    "per-token cross-entropies over different sets of tokens",
    "the total is the mean over all B * L tokens, so a scale with more tokens weighs more (not the mean of the "
    "per-scale means); scale k's number averages its own positions begin_k .. end_k - 1",
    "nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction='none').view(B, L); return "
    "nll.mean(), torch.stack([nll[:, b:e].mean() for b, e in var.scale_bounds(scales)]) (the (begin_k, end_k) "
    "pairs)",
))
def var_loss(fn: Callable, ref_fn: Callable) -> None:
    compare_cases(fn, ref_fn, _loss_cases(), atol=1e-5, rtol=1e-4, grad_wrt=(0,), off_cpu=True, mistakes=[
        Mistake(_loss_mean_of_means, "the total is the mean of the per-scale means; it is the mean over all "
                "tokens, so each token counts once"),
        Mistake(lambda logits, targets, scales: (ref.var_loss(logits, targets, scales)[0] * targets.numel(),
                                                 ref.var_loss(logits, targets, scales)[1]),
                "the total is the sum of the token losses; it is their mean, so it does not grow with the batch or "
                "the number of tokens"),
        Mistake(_loss_off_by_one, "off by one: each scale's slice took one token of the next scale too (begin : "
                "end + 1); scale k's tokens are positions begin_k .. end_k - 1"),
        Mistake(_loss_of_softmax_log, "that is the log of softmax probabilities: with logits far apart a probability "
                "rounds to 0 in float32 and minus its log is inf, while the cross-entropy itself is finite"),
        *[Mistake(partial(_loss_of_softmax_log, eps=eps, clamp=clamp),
                  f"that is the log of softmax probabilities with an eps ({eps:.3g}) to keep it finite: it caps each "
                  f"token's loss at -log(eps) = {-math.log(eps):.1f}, while a confident model's wrong tokens cost "
                  "far more")
          for eps in _LOG_EPS for clamp in (True, False)],
        *[Mistake(partial(_loss_of_softmax_log_fitted, fn, clamp=clamp),
                  "that is the log of softmax probabilities with an eps to keep it finite: it caps each token's loss "
                  "at -log(eps), while a confident model's wrong tokens cost far more") for clamp in (True, False)]])


# --------------------------------------------------------------------------------------------------------
# 4.6 the K-step sampling loop


def _tiny_var(scales: tuple[int, ...], seed: int = 0) -> VAR:
    torch.manual_seed(seed)
    model = VAR(VARConfig(vocab_size=19, latent_dim=5, scales=scales, n_classes=3, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():  # adaptive norms start at zero; randomise them so the class and guidance matter
        for name, p in model.named_parameters():
            if "ada" in name:
                p.normal_(std=0.5)
        model.head.weight.mul_(40)  # peaked distributions: a wrong guidance mix changes the samples
    return model.eval()


_LIBRARY_LOOP = inspect.unwrap(var_model.sample_pyramid).__code__


def _sampling_cases() -> Iterator[tuple[str, dict]]:
    yield "cfg 0 (conditional), temperature 1", dict(cfg=0.0)
    yield "cfg 3 with the ramp", dict(cfg=3.0, ramp=True)
    yield "cfg 2 without the ramp, top_k 5", dict(cfg=2.0, ramp=False, sampling=SamplingConfig(top_k=5))
    yield "cfg 1.5 with the ramp, temperature 0.7, top_p 0.9", dict(
        cfg=1.5, sampling=SamplingConfig(temperature=0.7, top_p=0.9))
    yield "cfg -1 (guided away from the class) without the ramp", dict(cfg=-1.0, ramp=False)  # cfg != 0, not > 0


def _loop_with(model: VAR, vq: MultiScaleVQ, classes: torch.Tensor, *, cfg: float = 0.0,
               sampling: SamplingConfig = SamplingConfig(), ramp: bool = True, generator=None,
               strength: Callable | None = None, mix: Callable | None = None,
               per_position: bool = False) -> list[torch.Tensor]:
    """The sampling loop with one slip: another guidance strength per scale (``strength(cfg, k, S, ramp)``),
    another mix of the halves (``mix(cond, uncond, t)``), or each position of a scale drawn by its own call
    (``per_position``). It draws from its own generator, seeded as the check's (``generator`` is ignored)."""
    from ar_course.sampling import cfg_mix, sample

    generator, c, B = _gen(11), model.config, classes.shape[0]
    guided = cfg != 0
    cls = torch.cat([classes, torch.full_like(classes, model.null_class)]) if guided else classes
    cache = model.make_cache(cls.shape[0])
    f_hat, x, out = None, None, []
    for k, s in enumerate(c.scales):
        logits = model.step(k, x, cls, cache)
        if guided:
            t = (strength or ref.guidance_strength)(cfg, k, c.num_scales, ramp=ramp)
            logits = (mix or cfg_mix)(logits[:B], logits[B:], t)
        if per_position:
            tokens = torch.stack([sample(logits[:, i], sampling=sampling, generator=generator) for i in range(s * s)],
                                 dim=1)
        else:
            tokens = sample(logits, sampling=sampling, generator=generator)
        out.append(tokens.view(B, s, s))
        f_hat, x = ref.scale_step(vq, f_hat, k, tokens)
        if guided and x is not None:
            x = torch.cat([x, x])
    return out


SAMPLING_MISTAKES = [
    Mistake(lambda *args, **kwargs: _loop_with(*args, **{**kwargs, "ramp": False}),
            "that guides every scale with the full cfg; with the ramp the strength grows from 0 at the first scale "
            "to cfg at the last"),
    Mistake(partial(_loop_with, mix=lambda cond, uncond, t: uncond + t * (cond - uncond)),
            "that mixes uncond + t * (cond - uncond), reading the strength t as LlamaGen's scale s; strength t "
            "gives (1 + t) * cond - t * uncond, so t = 0 is the conditional model"),
    Mistake(partial(_loop_with, mix=lambda cond, uncond, t: (1 + t) * uncond - t * cond),
            "the halves are swapped: rows 0..B-1 carry the classes (cond), rows B..2B-1 the null class (uncond)"),
    Mistake(partial(_loop_with, strength=lambda w, k, S, ramp=True: w * k / S if ramp and S > 1 else w),
            "the ramp cfg * k / S never reaches cfg: it runs from 0 at the first scale to cfg at the last"),
    Mistake(partial(_loop_with, per_position=True),
            "that draws a scale's tokens one position at a time, which takes the generator's random numbers in "
            "another order than one draw for all s*s tokens together"),
]


@chapter.exercise("4.6", reference=var_model.sample_pyramid, hints=(
    "one forward pass per scale, with one KV cache for the whole pyramid: each scale's tokens are drawn "
    "together, added to the canvas, and the canvas gives the next scale's input",
    "with cfg != 0 run classes and the null class in one doubled batch (and double each next input); mix the "
    "halves with a guidance strength that ramps from 0 at the first scale to cfg at the last (cfg throughout "
    "without the ramp); draw all s*s tokens of a scale with one sample(...) call and the given generator",
    "per scale k: logits = model.step(k, x, cls, cache); if cfg != 0: t = var.guidance_strength(cfg, k, S, "
    "ramp=ramp) (cfg * k / (S - 1) with the ramp); logits = (1 + t) * logits[:B] - t * logits[B:]; tokens = "
    "sample(logits, sampling=sampling, generator=generator) (the function `sample`: the name `sampling` is the "
    "SamplingConfig argument); f_hat, x = step_fn(vq, f_hat, k, tokens), x doubled (torch.cat([x, x])) when "
    "cfg != 0 and x is not None",
))
def sample_pyramid(fn: Callable, ref_fn: Callable) -> None:
    for scales in [(1, 2, 3, 5), (1, 3, 4)]:
        vq, model = _vq(scales), _tiny_var(scales)
        classes = torch.tensor([0, 1, 2, 1])
        for name, kwargs in _sampling_cases():
            where = f"scales {scales}, {name}"
            expected = ref_fn(model, vq, classes, generator=_gen(11), **kwargs)
            calls: list[str] = []
            library = [False]  # whether a step ran inside the library's loop
            step, forward = model.step, model.forward

            def counted_step(k, *args, **kw):
                calls.append(f"step {k}")
                library[0] = library[0] or running(_LIBRARY_LOOP)
                return step(k, *args, **kw)

            def counted_forward(*args, **kw):
                calls.append("forward")
                return forward(*args, **kw)

            model.step, model.forward = counted_step, counted_forward  # type: ignore[method-assign]
            try:
                with torch.no_grad():
                    got = call(fn, model, vq, *clone_args((classes,)), generator=_gen(11), where=where, **kwargs)
            finally:
                del model.step, model.forward
            if library[0] and fn is not ref_fn:  # the answer key is that loop
                raise CheckFailure(f"on {where}, your function runs ar_course.var.sample_pyramid (directly or through "
                                   "model.generate), the library's version of this loop: the exercise is to write it")
            if calls != [f"step {k}" for k in range(len(scales))]:
                raise CheckFailure(f"on {where}, expected one model.step per scale ({len(scales)} passes), "
                                   f"got the calls {calls[:8]}{' ...' if len(calls) > 8 else ''}")
            try:
                compare(got, expected, where=where, name="pyramid")
            except CheckFailure as exc:
                with torch.no_grad():
                    again = call(fn, model, vq, *clone_args((classes,)), generator=_gen(11), where=where, **kwargs)
                check_draws_follow_generator(exc, got, again)
                with torch.no_grad():
                    raise explain(exc, SAMPLING_MISTAKES, Case(where, (model, vq, classes.clone()), kwargs),
                                  got) from None

