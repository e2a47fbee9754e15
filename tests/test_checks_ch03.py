"""Chapter 03 checks: each accepts the reference (and a hand-written solution), reports a stub as not
attempted, and rejects plausible wrong answers."""

from typing import Callable

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from ar_course import metrics
from ar_course.sampling import SamplingConfig, cfg_mix, sample
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
        if mistake == "own_generator":  # a fixed seed of its own: the same drops whatever the caller passes
            u = torch.rand(B, generator=torch.Generator().manual_seed(0))
        drop = u >= p_uncond if mistake == "upside_down" else u < p_uncond
        drop = drop if mistake == "cpu_draws" else drop.to(classes.device)  # the draws are made on the CPU
        null = {"zero": 0, "last_real": model.null_class - 1, "two": 2}.get(mistake, model.null_class)
        if mistake == "in_place":
            classes[drop] = null
            cls = classes
        else:
            cls = torch.where(drop, torch.full_like(classes, null), classes)
        if mistake == "no_dropout":
            cls = classes
        if mistake == "bernoulli":  # the same law of drops, drawn from the generator another way: right
            drop = torch.bernoulli(torch.full((B,), p_uncond), generator=generator).bool().to(classes.device)
            cls = torch.where(drop, torch.full_like(classes, null), classes)
        if mistake == "text_shift":
            logits, _ = model(seq[:, :-1], classes=cls)  # (B, L, V)
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
        if mistake == "log_of_softmax":
            logits, _ = model(seq[:, :-1], classes=cls)  # (B, L, V)
            return -logits.softmax(-1).gather(-1, seq[..., None]).log().mean()
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
    assert_fails(ch03.training_loss, make_loss("log_of_softmax"), contains="never the log of a softmax")


def test_training_loss_rejects_a_loss_cut_off_from_the_model():
    # both require grad, so loss.backward() runs, but it reaches none of the model's weights
    assert_fails(ch03.training_loss, make_loss("rewrapped"), contains="no gradient flows from your loss")
    assert_fails(ch03.training_loss, make_loss("detached"), contains="no gradient flows from your loss")
    assert_passes(ch03.training_loss, make_loss("bernoulli"))


def test_training_loss_rejects_wrong_dropout():
    assert_fails(ch03.training_loss, make_loss("upside_down"), contains="probability 1 - p")
    assert_fails(ch03.training_loss, make_loss("zero"), contains="null class")
    for mistake, real in (("last_real", 4), ("two", 2)):  # another real class: named as itself, not as 0
        msg = assert_fails(ch03.training_loss, make_loss(mistake), contains=f"a dropped class became {real};")
        assert "became 0" not in msg
    assert_fails(ch03.training_loss, make_loss("no_dropout"), contains="no class was dropped")
    assert_fails(ch03.training_loss, make_loss("in_place"), contains="changed its argument `classes` in place")
    assert_fails(ch03.training_loss, make_loss("global_rng"), contains="identically seeded generators dropped")
    assert_fails(ch03.training_loss, make_loss("own_generator"), contains="generators seeded 7 and 8 dropped the same")
    assert_fails(ch03.training_loss, make_loss("cpu_draws"), contains="moved off the CPU")  # fails on a GPU


# 3.3 ----------------------------------------------------------------------------------------------------------


def make_sampler(mistake: str | None = None):
    """A hand-written sampling loop; ``mistake`` is "no_cache", "no_null", "scale" (w read as the scale s = 1 + w),
    "swapped" (the halves mixed the wrong way round) or "generate" (the library's loop). "unmixed" (each half
    sampled from its own logits), "probabilities" (the probabilities mixed instead of the logits) and
    "temperature_twice" (the logits divided by the temperature before ``sample``) are the check's own mistake
    loops. The check names "scale", "swapped" and "no_null" as the reference at another w: these loops show that
    a learner's way of writing them gives those tokens."""
    if mistake in ("unmixed", "probabilities", "temperature_twice"):
        return ch03._loop_with(mistake)

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
            cond, uncond = logits[:B, -1], logits[B:, -1]  # (B, V) each
            if mistake == "scale":
                mixed = uncond + cfg * (cond - uncond)
            elif mistake == "swapped":
                mixed = (1 + cfg) * uncond - cfg * cond
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
    assert_fails(ch03.sample_tokens, make_sampler("no_null"), contains="tokens of w = 0, with no guidance")
    assert_fails(ch03.sample_tokens, make_sampler("unmixed"), contains="each half was sampled from its own logits")
    assert_fails(ch03.sample_tokens, make_sampler("scale"), contains="LlamaGen's scale")


def test_sampler_rejects_the_library_loop_and_a_temperature_applied_twice():
    assert_fails(ch03.sample_tokens, make_sampler("generate"), contains="runs model.generate")
    assert_fails(ch03.sample_tokens, make_sampler("temperature_twice"), contains="divided by the temperature twice")


def test_sampler_names_swapped_halves_and_rejects_a_probability_mix():
    assert_fails(ch03.sample_tokens, make_sampler("swapped"), contains="halves are swapped")
    assert_fails(ch03.sample_tokens, make_sampler("probabilities"), contains="that mixes the probabilities")


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
    assert_fails(ch03.frechet_distance, lambda a, b: frechet(a, b, mean_term=False),
                 contains="||mu_a - mu_b||^2 is missing")
    assert_fails(ch03.frechet_distance, lambda a, b: frechet(a, b, elementwise=True),
                 contains="entrywise product s_a * s_b")

    def no_root(a, b):  # 2 tr(S_a S_b): can come out negative
        x, y = a.double().numpy(), b.double().numpy()
        s_a, s_b = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(s_a @ s_b))

    assert_fails(ch03.frechet_distance, no_root, contains="the square root is missing")

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
                 contains="every ball got the same radius")


def test_precision_recall_rejects_a_strict_inequality_on_tied_points():
    # with "<" a point on the boundary of a ball is outside; on a grid with duplicates a radius can be 0
    msg = assert_fails(ch03.precision_recall, lambda a, b, k=3: precision_recall(a, b, k, strict=True),
                       contains="exactly on a ball's boundary was left out")
    assert "precision (item 0 of the returned tuple)" in msg  # the item of (precision, recall) that differs


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


# correct answers in other styles (third audit): each must pass --------------------------------------------


def order_by_loop(seq: torch.Tensor, order: torch.Tensor, h: int, w: int) -> torch.Tensor:
    out = torch.zeros(seq.shape[0], h, w, dtype=seq.dtype)
    for k, p in enumerate(order.tolist()):
        out[:, p // w, p % w] = seq[:, k]
    return out


def order_by_gather(seq: torch.Tensor, order: torch.Tensor, h: int, w: int) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return seq.gather(1, inverse.expand(seq.shape[0], -1)).view(-1, h, w)


def order_by_row_col(seq: torch.Tensor, order: torch.Tensor, h: int, w: int) -> torch.Tensor:
    out = seq.new_zeros(seq.shape[0], h, w)
    out[:, order // w, order % w] = seq
    return out


def order_by_one_hot(seq: torch.Tensor, order: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return (seq @ F.one_hot(order, h * w)).reshape(-1, h, w)  # row k of the permutation matrix marks order[k]


def order_by_index_copy(seq: torch.Tensor, order: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return torch.empty_like(seq).index_copy(1, order, seq).unflatten(1, (h, w))


def loss_by_cross_entropy(model, maps: torch.Tensor, classes: torch.Tensor, *, p_uncond: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    seq = maps.flatten(1)
    drop = torch.rand(maps.shape[0], generator=generator) < p_uncond  # drawn on the CPU
    dropped = classes.masked_fill(drop.to(classes.device), model.null_class)
    logits, _ = model(seq[:, :-1], classes=dropped)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq.reshape(-1))


def loss_by_indexed_assignment(model, maps: torch.Tensor, classes: torch.Tensor, *, p_uncond: float,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    seq = maps.view(maps.shape[0], -1)
    dropped = classes.clone()
    dropped[torch.rand(maps.shape[0], generator=generator) < p_uncond] = model.null_class
    return model(seq[:, :-1], targets=seq, classes=dropped)[1]


def loss_by_float64_log_softmax(model, maps: torch.Tensor, classes: torch.Tensor, *, p_uncond: float,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    B = maps.shape[0]
    seq = maps.reshape(B, -1)
    u = torch.rand(B, generator=generator)
    null = torch.tensor(model.null_class, device=classes.device)
    dropped = torch.stack([null if u[i] < p_uncond else classes[i] for i in range(B)])
    logits, _ = model(seq[:, :-1], classes=dropped)
    log_p = torch.log_softmax(logits.double(), -1)
    return (-log_p.gather(-1, seq[..., None]).mean()).float()


def loss_with_bernoulli_draws(model, maps: torch.Tensor, classes: torch.Tensor, *, p_uncond: float,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """Other random draws than the spec's torch.rand: the check tests the rate and the generator, not the draws."""
    seq = maps.reshape(maps.shape[0], -1)
    drop = torch.bernoulli(torch.full((maps.shape[0],), float(p_uncond)), generator=generator).bool().to(classes.device)
    return model(seq[:, :-1], targets=seq, classes=torch.where(drop, model.null_class, classes))[1]


def loss_masked_fill_on_the_cpu(model, maps, classes, *, p_uncond, generator=None):
    """Right values on the CPU, but the mask stays there: masked_fill on a GPU tensor refuses it."""
    seq = maps.flatten(1)
    dropped = classes.masked_fill(torch.rand(maps.shape[0], generator=generator) < p_uncond, model.null_class)
    return model(seq[:, :-1], targets=seq, classes=dropped)[1]


def test_training_loss_draws_must_follow_the_classes_off_the_cpu():
    assert_fails(ch03.training_loss, loss_masked_fill_on_the_cpu, contains="would fail on a GPU")


def _guided_sampler(mix: str, skip_unguided: bool = False):
    """A hand-written 3.3 loop; ``mix`` names how the two halves are combined (all equivalent)."""
    @torch.no_grad()
    def sample_tokens(model, classes, num_tokens, *, cfg=0.0, sampling=SamplingConfig(), generator=None):
        B = classes.shape[0]
        guided = cfg != 0 or not skip_unguided
        rows = torch.cat([classes, torch.full_like(classes, model.null_class)]) if guided else classes
        cache = model.make_cache(rows.shape[0])
        x = torch.zeros(rows.shape[0], 0, dtype=torch.long)
        out = torch.empty(B, num_tokens, dtype=torch.long)
        for t in range(num_tokens):
            logits, _ = model(x, classes=rows if t == 0 else None, cache=cache)
            last = logits[:, -1]
            if not guided:
                mixed = last
            elif mix == "log_softmax":  # log-probabilities differ from logits by a per-row constant
                lp = torch.log_softmax(last.double(), -1)
                mixed = ((1 + cfg) * lp[:B] - cfg * lp[B:]).float()
            elif mix == "extrapolate":
                cond, uncond = last.chunk(2)
                mixed = cond + cfg * (cond - uncond)
            else:
                mixed = cfg_mix(last[:B], last[B:], cfg)
            out[:, t] = sample(mixed, sampling=sampling, generator=generator)
            x = out[:, t].repeat(rows.shape[0] // B)[:, None]
        return out

    return sample_tokens


def frechet_by_torch_cov(a: torch.Tensor, b: torch.Tensor) -> float:
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root = torch.from_numpy(scipy.linalg.sqrtm((s_a @ s_b).numpy()).real)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + torch.trace(s_a + s_b - 2 * root))


def frechet_by_eigenvalues(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tr sqrt(S_a S_b) is the sum of the square roots of its eigenvalues; returned as a 0-d tensor."""
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root_trace = torch.linalg.eigvals(s_a @ s_b).real.clamp(min=0).sqrt().sum()
    return (a.mean(0) - b.mean(0)).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * root_trace


def frechet_by_symmetric_root(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.numpy(), b.numpy()
    s_a = (x - x.mean(0)).T @ (x - x.mean(0)) / (len(x) - 1)
    s_b = (y - y.mean(0)).T @ (y - y.mean(0)) / (len(y) - 1)
    r_a = scipy.linalg.sqrtm(s_a).real
    middle = scipy.linalg.sqrtm(r_a @ s_b @ r_a).real
    return float(np.linalg.norm(x.mean(0) - y.mean(0)) ** 2 + np.trace(s_a + s_b - 2 * middle))


def _pr_with(distances: Callable, radius: Callable, inside_mean: Callable) -> Callable:
    def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
        def inside(query, support):
            return inside_mean(distances(query, support) <= radius(support, k))

        return inside(fake, real), inside(real, fake)

    return precision_recall


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a[:, None] - b[None]) ** 2).sum(-1).sqrt()


def _radius_without_self(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return d.kthvalue(k, 1).values


pr_by_topk = _pr_with(torch.cdist, lambda x, k: torch.cdist(x, x).topk(k + 1, 1, largest=False).values[:, -1],
                      lambda hit: hit.any(1).float().mean().item())
pr_by_broadcasting = _pr_with(_pairwise, lambda x, k: _pairwise(x, x).sort(1).values[:, k],
                              lambda hit: float(hit.any(1).sum()) / hit.shape[0])
pr_by_infinite_diagonal = _pr_with(torch.cdist, _radius_without_self, lambda hit: hit.any(1).double().mean().item())
pr_in_float64 = _pr_with(lambda a, b: torch.cdist(a.double(), b.double()),
                         lambda x, k: torch.cdist(x.double(), x.double()).kthvalue(k + 1, 1).values,
                         lambda hit: hit.any(1).double().mean().item())


def schedule_by_ranges(h: int, w: int) -> list[torch.Tensor]:
    return [torch.tensor([(i, d - i) for i in range(max(0, d - w + 1), min(h, d + 1))], dtype=torch.long)
            for d in range(h + w - 1)]


def schedule_by_nonzero(h: int, w: int) -> tuple[torch.Tensor, ...]:
    level = torch.arange(h)[:, None] + torch.arange(w)
    return tuple(torch.nonzero(level == k) for k in range(h + w - 1))


def schedule_by_simulation(h: int, w: int) -> list[torch.Tensor]:
    """Generate every position whose upper and left neighbours exist, until the map is full."""
    done, steps = torch.zeros(h, w, dtype=torch.bool), []
    while not bool(done.all()):
        up, left = torch.ones(h, w, dtype=torch.bool), torch.ones(h, w, dtype=torch.bool)
        up[1:], left[:, 1:] = done[:-1], done[:, :-1]
        ready = up & left & ~done
        steps.append(ready.nonzero())
        done = done | ready
    return steps


CORRECT_ALTERNATIVES = {
    "from_order": [order_by_loop, order_by_gather, order_by_row_col, order_by_one_hot, order_by_index_copy],
    "training_loss": [loss_by_cross_entropy, loss_by_indexed_assignment, loss_by_float64_log_softmax,
                      loss_with_bernoulli_draws],
    "sample_tokens": [_guided_sampler("extrapolate"), _guided_sampler("log_softmax"),
                      _guided_sampler("mix", skip_unguided=True)],
    "frechet_distance": [frechet_by_torch_cov, frechet_by_eigenvalues, frechet_by_symmetric_root],
    "precision_recall": [pr_by_topk, pr_by_broadcasting, pr_by_infinite_diagonal, pr_in_float64],
    "neighbour_schedule": [schedule_by_ranges, schedule_by_nonzero, schedule_by_simulation],
}


@pytest.mark.parametrize("name,index", [(n, i) for n, fns in CORRECT_ALTERNATIVES.items() for i in range(len(fns))])
def test_correct_answers_in_other_styles_pass(name, index):
    assert_passes(getattr(ch03, name), CORRECT_ALTERNATIVES[name][index])


# wrong answers of kinds the earlier audits did not try (third audit) ---------------------------------------


def test_sampler_that_ignores_the_generator_is_named():
    def global_random_state(model, classes, num_tokens, *, cfg=0.0, sampling=SamplingConfig(), generator=None):
        return _guided_sampler("extrapolate")(model, classes, num_tokens, cfg=cfg, sampling=sampling)

    assert_fails(ch03.sample_tokens, global_random_state, contains="identically seeded generators")


def test_frechet_names_the_product_of_two_square_roots():
    def two_roots(a, b):
        x, y = a.numpy(), b.numpy()
        s_a, s_b = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        root = scipy.linalg.sqrtm(s_a).real @ scipy.linalg.sqrtm(s_b).real
        return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s_a + s_b - 2 * root))

    assert_fails(ch03.frechet_distance, two_roots, contains="square roots of S_a and S_b")
