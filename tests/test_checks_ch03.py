"""Chapter 03 checks: each accepts the reference (and a hand-written solution), reports a stub as not
attempted, and rejects plausible wrong answers."""

import numpy as np
import pytest
import scipy.linalg
import torch

from ar_course import metrics
from ar_course.sampling import SamplingConfig, sample
from ar_course.checks import ch03
from ar_course.checks.reference import ch03 as answers
from ar_course.raster import functional as ref
from checks_helpers import assert_fails, assert_not_attempted, assert_passes, stub

REFERENCES = {
    "to_raster": ref.to_raster, "from_order": answers.from_order, "make_training_pairs": ref.make_training_pairs,
    "condition_dropout": ref.condition_dropout, "sample_tokens": answers.sample_tokens,
    "frechet_distance": metrics.frechet_distance_from_features,
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_reference_passes_and_stub_not_attempted(name):
    check = getattr(ch03, name)
    assert_passes(check, REFERENCES[name])
    assert_not_attempted(check, stub)


def test_six_exercises_registered():
    assert sorted(ch03.chapter.exercises) == sorted(REFERENCES)


# 3.1 / 3.2 ---------------------------------------------------------------------------------------------------


def test_to_raster_rejects_column_major_and_float():
    assert_fails(ch03.to_raster, lambda m: m.transpose(1, 2).reshape(m.shape[0], -1), contains="column by column")
    assert_fails(ch03.to_raster, lambda m: m.flatten(1).float(), contains="dtype")
    assert_fails(ch03.to_raster, lambda m: m.flatten(), contains="shape")


def test_from_order_hand_written_passes():
    assert_passes(ch03.from_order, lambda s, order, h, w: s[:, torch.argsort(order)].reshape(s.shape[0], h, w))


def test_from_order_rejects_the_order_applied_ignored_column_major_and_swapped_sides():
    assert_fails(ch03.from_order, lambda s, order, h, w: s[:, order].reshape(s.shape[0], h, w),
                 contains="the order applied a second time")
    assert_fails(ch03.from_order, lambda s, order, h, w: s.reshape(s.shape[0], h, w), contains="ignores the order")
    assert_fails(ch03.from_order, lambda s, order, h, w: answers.from_order(s, order, w, h).transpose(1, 2),
                 contains="column by column")
    assert_fails(ch03.from_order, lambda s, order, h, w: answers.from_order(s, order, w, h), contains="shape")


# 3.3 ----------------------------------------------------------------------------------------------------------


def test_training_pairs_rejects_text_lm_shift_no_shift_and_dropped_first_token():
    def text_lm_shift(t):  # the pairs of a model without a class position: token 0 is never a target
        return t[:, :-1], t[:, 1:]

    def no_shift(t):  # the last token is read, and every position predicts the token it reads
        return t, t

    def drops_first(t):  # inputs shifted the wrong way
        return t[:, 1:], t

    def rolled(t):  # inputs of the right length that wrap the last token round to the front
        return t.roll(1, dims=1)[:, :-1], t

    assert_fails(ch03.make_training_pairs, text_lm_shift, contains="text model's shift")
    assert_fails(ch03.make_training_pairs, no_shift, contains="output[0]")
    assert_fails(ch03.make_training_pairs, drops_first, contains="output[0]")
    assert_fails(ch03.make_training_pairs, rolled, contains="output[0]")


# 3.4 ----------------------------------------------------------------------------------------------------------


def test_condition_dropout_rejects_wrong_side_global_rng_in_place_and_zero():
    def keep_with_p(c, p, null, g):
        return torch.where(torch.rand(c.shape[0], generator=g) > p, torch.full_like(c, null), c)

    def global_rng(c, p, null, g):
        return torch.where(torch.rand(c.shape[0]) < p, torch.full_like(c, null), c)

    def in_place(c, p, null, g):
        c[torch.rand(c.shape[0], generator=g) < p] = null
        return c

    def zero_not_null(c, p, null, g):
        return torch.where(torch.rand(c.shape[0], generator=g) < p, torch.zeros_like(c), c)

    assert_fails(ch03.condition_dropout, keep_with_p, contains="with probability 1 - p")
    assert_fails(ch03.condition_dropout, global_rng, contains="differs")
    assert_fails(ch03.condition_dropout, in_place, contains="changed its input")
    assert_fails(ch03.condition_dropout, zero_not_null, contains="differs")


# 3.5 ----------------------------------------------------------------------------------------------------------


def make_sampler(mistake: str | None = None):
    """A hand-written sampling loop; ``mistake`` is "no_cache", "no_null", "unmixed" (each half sampled
    from its own logits, no guidance mix), "scale" (w read as the scale s = 1 + w), "swapped" (the halves
    mixed the wrong way round) or "probabilities" (the probabilities mixed instead of the logits)."""

    @torch.no_grad()
    def sample_tokens(model, classes, num_tokens, *, cfg=0.0, sampling=SamplingConfig(), generator=None):
        B = classes.shape[0]
        other = classes if mistake == "no_null" else torch.full_like(classes, model.null_class)
        cls = torch.cat([classes, other])  # (2B,)
        seq = torch.zeros(2 * B, 0, dtype=torch.long)  # (2B, 0)
        cache = None if mistake == "no_cache" else model.make_cache(2 * B)
        for t in range(num_tokens):
            if cache is None:
                logits, _ = model(seq, classes=cls)
            else:
                logits, _ = model(seq[:, -1:] if t else seq, classes=None if t else cls, cache=cache)
            logits = logits[:, -1]  # (2B, V)
            if mistake == "unmixed":
                nxt = sample(logits, sampling=sampling, generator=generator)  # (2B,)
            else:
                cond, uncond = logits[:B], logits[B:]  # (B, V) each
                if mistake == "scale":
                    mixed = uncond + cfg * (cond - uncond)
                elif mistake == "swapped":
                    mixed = (1 + cfg) * uncond - cfg * cond
                elif mistake == "probabilities":
                    mixed = ((1 + cfg) * cond.softmax(-1) - cfg * uncond.softmax(-1)).clamp_min(1e-30).log()
                else:
                    mixed = (1 + cfg) * cond - cfg * uncond
                nxt = sample(mixed, sampling=sampling, generator=generator).repeat(2)  # (2B,)
            seq = torch.cat([seq, nxt[:, None]], 1)
        return seq[:B]

    return sample_tokens


def test_hand_written_sampler_passes():
    assert_passes(ch03.sample_tokens, make_sampler())


def test_sampler_rejects_no_cache_no_null_unmixed_halves_and_the_scale_convention():
    assert_fails(ch03.sample_tokens, make_sampler("no_cache"), contains="KV cache")
    assert_fails(ch03.sample_tokens, make_sampler("no_null"), contains="sampled tokens")
    assert_fails(ch03.sample_tokens, make_sampler("unmixed"), contains="sampled tokens")
    assert_fails(ch03.sample_tokens, make_sampler("scale"), contains="the papers' scale")


def test_sampler_names_swapped_halves_and_rejects_a_probability_mix():
    assert_fails(ch03.sample_tokens, make_sampler("swapped"), contains="halves are swapped")
    assert_fails(ch03.sample_tokens, make_sampler("probabilities"), contains="sampled tokens")


# 3.6 ----------------------------------------------------------------------------------------------------------


def frechet(a, b, bias=False, mean_term=True, elementwise=False):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False, bias=bias), np.cov(b, rowvar=False, bias=bias)
    root = np.sqrt(np.abs(s_a * s_b)) if elementwise else scipy.linalg.sqrtm(s_a @ s_b).real
    d = ((mu_a - mu_b) ** 2).sum() if mean_term else 0.0
    return float(d + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root))


def test_frechet_hand_written_passes_and_mistakes_fail():
    assert_passes(ch03.frechet_distance, frechet)
    assert_fails(ch03.frechet_distance, lambda a, b: frechet(a, b, bias=True), contains="divide by N;")
    assert_fails(ch03.frechet_distance, lambda a, b: frechet(a, b, mean_term=False), contains="distance")
    assert_fails(ch03.frechet_distance, lambda a, b: frechet(a, b, elementwise=True), contains="distance")

    def root_of_each_entry(a, b):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        with np.errstate(invalid="ignore"):
            root = np.sqrt(s_a @ s_b)
        return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root))

    assert_fails(ch03.frechet_distance, root_of_each_entry, contains="matrix square root")
