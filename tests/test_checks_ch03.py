"""Chapter 03 checks: each accepts the reference (and a hand-written solution), reports a stub as not
attempted, and rejects plausible wrong answers."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from ar_course import metrics
from ar_course.sampling import SamplingConfig, sample
from ar_course.checks import ch03
from ar_course.checks.reference import ch03 as answers
from ar_course.raster import orders
from checks_helpers import assert_fails, assert_not_attempted, assert_passes, stub

REFERENCES = {
    "from_order": answers.from_order, "training_loss": answers.training_loss, "sample_tokens": answers.sample_tokens,
    "frechet_distance": metrics.frechet_distance_from_features, "precision_recall": metrics.precision_recall,
    "neighbour_schedule": lambda h, w: orders.schedule("neighbour", h, w),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_reference_passes_and_stub_not_attempted(name):
    check = getattr(ch03, name)
    assert_passes(check, REFERENCES[name])
    assert_not_attempted(check, stub)


def test_six_exercises_registered():
    assert sorted(ch03.chapter.exercises) == sorted(REFERENCES)


# 3.1 ----------------------------------------------------------------------------------------------------------


def test_from_order_hand_written_passes():
    assert_passes(ch03.from_order, lambda s, order, h, w: s[:, torch.argsort(order)].reshape(s.shape[0], h, w))


def test_from_order_rejects_the_order_applied_ignored_column_major_and_swapped_sides():
    assert_fails(ch03.from_order, lambda s, order, h, w: s[:, order].reshape(s.shape[0], h, w),
                 contains="the order applied a second time")
    assert_fails(ch03.from_order, lambda s, order, h, w: s.reshape(s.shape[0], h, w), contains="ignores the order")
    assert_fails(ch03.from_order, lambda s, order, h, w: answers.from_order(s, order, w, h).transpose(1, 2),
                 contains="column by column")
    assert_fails(ch03.from_order, lambda s, order, h, w: answers.from_order(s, order, w, h), contains="shape")


def test_from_order_rejects_writing_into_seq():
    def in_place(seq, order, h, w):  # the right map, but the caller's sequence is overwritten
        seq[:, order] = seq.clone()
        return seq.reshape(seq.shape[0], h, w)

    assert_fails(ch03.from_order, in_place, contains="changed its argument `seq` in place")
    assert_passes(ch03.from_order, lambda s, order, h, w: torch.zeros_like(s).scatter(1, order.expand_as(s), s)
                  .reshape(-1, h, w))


# 3.2 ----------------------------------------------------------------------------------------------------------


def make_loss(mistake: str | None = None):
    """A hand-written training loss; ``mistake`` names one wrong step (see the test below)."""

    def training_loss(model, maps, classes, *, p_uncond, generator=None):
        B = maps.shape[0]
        seq = (maps.transpose(1, 2) if mistake == "column_major" else maps).reshape(B, -1)  # (B, L)
        u = torch.rand(B) if mistake == "global_rng" else torch.rand(B, generator=generator)
        drop = u >= p_uncond if mistake == "upside_down" else u < p_uncond
        null = 0 if mistake == "zero" else model.null_class
        if mistake == "in_place":
            classes[drop] = null
            cls = classes
        else:
            cls = torch.where(drop, torch.full_like(classes, null), classes)
        if mistake == "no_dropout":
            cls = classes
        if mistake == "bernoulli":  # the same law of drops, drawn from the generator another way: right
            cls = torch.where(torch.bernoulli(torch.full((B,), p_uncond), generator=generator).bool(),
                              torch.full_like(classes, null), classes)
        if mistake == "text_shift":
            logits, _ = model(seq[:, :-1], classes=cls)  # (B, L, V)
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
        _, loss = model(seq[:, :-1], targets=seq, classes=cls)
        if mistake == "rewrapped":
            return torch.tensor(loss.item(), requires_grad=True)
        if mistake == "detached":
            return loss.detach().requires_grad_()
        return loss.item() if mistake == "float" else loss

    return training_loss


def test_hand_written_training_loss_passes():
    assert_passes(ch03.training_loss, make_loss())


def test_training_loss_names_column_major_and_text_shift():
    assert_fails(ch03.training_loss, make_loss("column_major"), contains="column by column")
    assert_fails(ch03.training_loss, make_loss("text_shift"), contains="text model's shift")
    assert_fails(ch03.training_loss, make_loss("float"), contains="autograd")


def test_training_loss_rejects_a_loss_cut_off_from_the_model():
    # both require grad, so loss.backward() runs, but it reaches none of the model's weights
    assert_fails(ch03.training_loss, make_loss("rewrapped"), contains="no gradient flows from your loss")
    assert_fails(ch03.training_loss, make_loss("detached"), contains="no gradient flows from your loss")
    assert_passes(ch03.training_loss, make_loss("bernoulli"))


def test_training_loss_rejects_wrong_dropout():
    assert_fails(ch03.training_loss, make_loss("upside_down"), contains="probability 1 - p")
    assert_fails(ch03.training_loss, make_loss("zero"), contains="null class")
    assert_fails(ch03.training_loss, make_loss("no_dropout"), contains="no class was dropped")
    assert_fails(ch03.training_loss, make_loss("in_place"), contains="changed its argument `classes` in place")
    assert_fails(ch03.training_loss, make_loss("global_rng"), contains="generator")


# 3.3 ----------------------------------------------------------------------------------------------------------


def make_sampler(mistake: str | None = None):
    """A hand-written sampling loop; ``mistake`` is "no_cache", "no_null", "unmixed" (each half sampled
    from its own logits, no guidance mix), "scale" (w read as the scale s = 1 + w), "swapped" (the halves
    mixed the wrong way round), "probabilities" (the probabilities mixed instead of the logits), "temperature_twice"
    (the logits divided by the temperature before ``sample``, which divides again) or "generate" (the library's
    loop)."""

    @torch.no_grad()
    def sample_tokens(model, classes, num_tokens, *, cfg=0.0, sampling=SamplingConfig(), generator=None):
        B = classes.shape[0]
        if mistake == "generate":
            start = torch.zeros(B, 0, dtype=torch.long)
            return model.generate(start, num_tokens, sampling=sampling, cfg=cfg, classes=classes, generator=generator)
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
                if mistake == "temperature_twice" and sampling.temperature > 0:
                    mixed = mixed / sampling.temperature
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


def test_sampler_rejects_the_library_loop_and_a_temperature_applied_twice():
    assert_fails(ch03.sample_tokens, make_sampler("generate"), contains="runs model.generate")
    assert_fails(ch03.sample_tokens, make_sampler("temperature_twice"), contains="temperature 0.6")


def test_sampler_names_swapped_halves_and_rejects_a_probability_mix():
    assert_fails(ch03.sample_tokens, make_sampler("swapped"), contains="halves are swapped")
    assert_fails(ch03.sample_tokens, make_sampler("probabilities"), contains="sampled tokens")


# 3.4 ----------------------------------------------------------------------------------------------------------


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


def test_frechet_rejects_centring_the_callers_features_in_place():
    def centred_in_place(feats_a, feats_b):
        a, b = feats_a.numpy(), feats_b.numpy()  # shares memory with the caller's tensors
        mu_a, mu_b = a.mean(0), b.mean(0)
        a -= mu_a
        b -= mu_b
        s_a, s_b = a.T @ a / (len(a) - 1), b.T @ b / (len(b) - 1)
        root = scipy.linalg.sqrtm(s_a @ s_b).real
        return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(root))

    assert_fails(ch03.frechet_distance, centred_in_place, contains="changed its argument `feats_a` in place")
    assert_passes(ch03.frechet_distance, lambda a, b: centred_in_place(a.clone(), b.clone()))


# 3.5 ----------------------------------------------------------------------------------------------------------


def precision_recall(real, fake, k=3, *, own=False, swap=False, strict=False, mean_radius=False):
    """Hand-written improved precision/recall; the keyword arguments switch on one wrong step each."""
    def radii(x):
        r = torch.cdist(x, x).kthvalue(k if own else k + 1, dim=1).values
        return r.mean().expand_as(r) if mean_radius else r

    def inside(query, support, r):
        d = torch.cdist(query, support)
        return float(((d < r) if strict else (d <= r)).any(dim=1).double().mean())

    p, r = inside(fake, real, radii(real)), inside(real, fake, radii(fake))
    return (r, p) if swap else (p, r)


def test_precision_recall_hand_written_passes_and_mistakes_fail():
    assert_passes(ch03.precision_recall, precision_recall)
    assert_fails(ch03.precision_recall, lambda a, b, k=3: precision_recall(a, b, k, own=True),
                 contains="its own nearest neighbour")
    assert_fails(ch03.precision_recall, lambda a, b, k=3: precision_recall(a, b, k, swap=True), contains="swapped")
    assert_fails(ch03.precision_recall, lambda a, b, k=3: precision_recall(a, b, k, mean_radius=True),
                 contains="(precision, recall)")


def test_precision_recall_rejects_a_strict_inequality_on_tied_points():
    # with "<" a point on the boundary of a ball is outside; on a grid with duplicates a radius can be 0
    msg = assert_fails(ch03.precision_recall, lambda a, b, k=3: precision_recall(a, b, k, strict=True))
    assert "(precision, recall)" in msg


# 3.6 ----------------------------------------------------------------------------------------------------------


def test_neighbour_schedule_hand_written_passes_in_any_order_within_a_step():
    def by_column(h, w):  # positions of a step listed by decreasing row: the order inside a step is free
        return [torch.tensor([(i, k - i) for i in reversed(range(h)) if 0 <= k - i < w]) for k in range(h + w - 1)]

    assert_passes(ch03.neighbour_schedule, by_column)


def test_neighbour_schedule_rejects_main_diagonals_raster_col_row_and_a_missing_step():
    def diagonals(h, w):
        return [torch.tensor([(i, j) for i in range(h) for j in range(w) if i - j == d])
                for d in range(-(w - 1), h)]

    def raster_steps(h, w):
        return [torch.tensor([[i, j]]) for i in range(h) for j in range(w)]

    def col_row(h, w):
        return [torch.tensor([(k - i, i) for i in range(h) if 0 <= k - i < w]) for k in range(h + w - 1)]

    def square_count(h, w):  # max(h, w) steps: the far corner of a non-square map is never generated
        return [torch.tensor([(i, j) for i in range(h) for j in range(w) if i + j == k]).reshape(-1, 2)
                for k in range(max(h, w))]

    assert_fails(ch03.neighbour_schedule, diagonals, contains="i - j = const")
    assert_fails(ch03.neighbour_schedule, raster_steps, contains="raster order")
    assert_fails(ch03.neighbour_schedule, col_row, contains="(col, row)")
    assert_fails(ch03.neighbour_schedule, square_count, contains="items")
