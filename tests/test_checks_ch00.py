"""Chapter 00 checks: each accepts the reference, reports a stub as not attempted, and rejects plausible
wrong answers (no max-subtraction, wrong axis, temperature ignored or applied to probabilities, always
argmax, no log-sum-exp, ignored targets counted, a sum instead of a mean...)."""

import pytest
import torch

from ar_course.checks import ch00
from ar_course.checks.reference import ch00 as ref
from checks_helpers import assert_fails, assert_not_attempted, assert_passes, stub

# 0.1 ------------------------------------------------------------------------------------------------------


def softmax_naive(logits, dim=-1):
    e = torch.exp(logits)
    return e / e.sum(dim=dim, keepdim=True)


def softmax_last_axis_always(logits, dim=-1):
    return ref.stable_softmax(logits, dim=-1)


def softmax_nan_on_empty_rows(logits, dim=-1):
    e = torch.exp(logits - logits.amax(dim=dim, keepdim=True))
    return e / e.sum(dim=dim, keepdim=True)


def softmax_global_max(logits, dim=-1):
    """The maximum of the whole tensor subtracted, not each slice's: a slice far below it is 0 / 0."""
    e = torch.exp(logits - logits.max())
    return e / e.sum(dim=dim, keepdim=True)


def softmax_detached(logits, dim=-1):
    return ref.stable_softmax(logits.detach(), dim)


def softmax_float32_always(logits, dim=-1):
    return ref.stable_softmax(logits.float(), dim)


def softmax_where_nan_gradient(logits, dim=-1):
    """Right values; the all -inf slice divides 0 by 0 in the branch torch.where throws away."""
    top = logits.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(logits - top)
    total = e.sum(dim=dim, keepdim=True)
    return torch.where(total > 0, e / total, torch.zeros_like(e))


def softmax_nan_to_num(logits, dim=-1):
    return torch.nan_to_num(torch.softmax(logits, dim=dim), nan=0.0)


def softmax_fill_then_zero_right(logits, dim=-1):
    """A correct alternative: -inf replaced by a large negative number, fully masked slices zeroed after."""
    x = logits.masked_fill(torch.isinf(logits), -1e9)
    e = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return (e / e.sum(dim=dim, keepdim=True)).masked_fill(torch.isinf(logits).all(dim=dim, keepdim=True), 0.0)


# 0.2 ------------------------------------------------------------------------------------------------------


def sample_ignores_temperature(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)


def sample_divides_probabilities(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits, -1) / temperature
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(1)


def sample_multiplies_by_temperature(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits * temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample_always_argmax(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    return logits.argmax(-1)


def sample_multinomial_right(logits, temperature=1.0, generator=None):
    """A correct sampler that works differently from the reference (softmax + torch.multinomial)."""
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    probs = ref.stable_softmax(logits / temperature)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample_keeps_last_axis(logits, temperature=1.0, generator=None):
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)  # (B, 1)


def sample_global_rng(logits, temperature=1.0, generator=None):
    return ref.sample_categorical(logits, temperature, generator=None)


def sample_no_sign_check(logits, temperature=1.0, generator=None):
    return ref.sample_categorical(logits, abs(temperature), generator)


def sample_naive_softmax(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(softmax_naive(logits / temperature), 1, generator=generator).squeeze(1)


def sample_divides_in_place(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    logits /= temperature  # writes into the caller's tensor
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


def sample_squeezes_everything(logits, temperature=1.0, generator=None):
    """.squeeze() instead of .squeeze(-1): a batch of one comes back 0-d."""
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze()


def sample_reseeds_global_rng(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    torch.manual_seed(0)  # "reproducible", whatever generator the caller passes
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(-1)


def sample_own_generator(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    own = torch.Generator().manual_seed(1234)
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=own).squeeze(-1)


def sample_needs_a_generator(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, device=generator.device)  # fails for generator=None
    return (logits / temperature - torch.log(-torch.log(u))).argmax(-1)


def sample_inverse_cdf_right(logits, temperature=1.0, generator=None):
    """A correct sampler by inverse CDF: one uniform per row against the cumulative probabilities."""
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=generator)
    return (cdf < u).sum(-1).clamp_max(logits.shape[1] - 1)


def sample_drops_one_token(logits, temperature=1.0, generator=None):
    """Off by one: never draws the last token of the vocabulary."""
    if temperature < 0:
        raise ValueError("negative temperature")
    return ref.sample_categorical(logits[:, :-1], temperature, generator)


def sample_drops_rare_tokens(logits, temperature=1.0, generator=None):
    """Tokens under 0.1% are never drawn (an implicit cut-off)."""
    if temperature <= 0:
        return ref.sample_categorical(logits, temperature, generator)
    p = torch.softmax(logits / temperature, -1)
    p = torch.where(p < 1e-3, 0.0, p)
    return torch.multinomial(p, 1, generator=generator).squeeze(-1)


# 0.3 ------------------------------------------------------------------------------------------------------


def _counted(targets, ignore_index):
    return targets != ignore_index


def ce_no_logsumexp(logits, targets, ignore_index=-100):
    keep = _counted(targets, ignore_index)
    log_norm = torch.log(torch.exp(logits).sum(-1))
    picked = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return ((log_norm - picked) * keep).sum() / keep.sum()


def ce_mean_over_all_rows(logits, targets, ignore_index=-100):
    keep = _counted(targets, ignore_index)
    picked = logits.gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1)
    return ((torch.logsumexp(logits, -1) - picked) * keep).mean()


def ce_sum(logits, targets, ignore_index=-100):
    keep = _counted(targets, ignore_index)
    picked = logits.gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1)
    return ((torch.logsumexp(logits, -1) - picked) * keep).sum()


def ce_hard_coded_ignore(logits, targets, ignore_index=-100):
    return ref.cross_entropy_from_logits(logits, targets)


def ce_negated(logits, targets, ignore_index=-100):
    keep = _counted(targets, ignore_index)
    return torch.log_softmax(logits, -1).gather(1, torch.where(keep, targets, 0)[:, None]).squeeze(1)[keep].mean()


def ce_returns_float(logits, targets, ignore_index=-100):
    return ref.cross_entropy_from_logits(logits, targets, ignore_index).item()


def ce_detached(logits, targets, ignore_index=-100):
    return ref.cross_entropy_from_logits(logits.detach(), targets, ignore_index)


def ce_torch(logits, targets, ignore_index=-100):
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index)


def ce_zeroes_ignored_targets_in_place(logits, targets, ignore_index=-100):
    keep = targets != ignore_index
    targets[~keep] = 0  # the caller's padding becomes class 0
    return ref.cross_entropy_from_logits(logits, torch.where(keep, targets, ignore_index), ignore_index)


# tests ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("check, reference", [
    (ch00.stable_softmax, ref.stable_softmax),
    (ch00.sample_categorical, ref.sample_categorical),
    (ch00.cross_entropy_from_logits, ref.cross_entropy_from_logits),
])
def test_reference_passes_and_stub_is_not_attempted(check, reference):
    assert_passes(check, reference)
    assert_not_attempted(check, stub)


@pytest.mark.parametrize("wrong, contains", [
    (softmax_naive, "size ~1000"),
    (softmax_last_axis_always, "over the last axis whatever dim is given"),
    (lambda logits, dim=-1: torch.softmax(logits, 0), "over axis 0 whatever dim is given"),
    (softmax_global_max, "maximum of the whole tensor, not of each slice"),
    (softmax_nan_on_empty_rows, "all -inf"),
    (softmax_detached, "no gradient"),
    (softmax_float32_always, "dtype"),
    (softmax_where_nan_gradient, "gradient of the all -inf slice is NaN"),
    (softmax_nan_to_num, "gradient of the all -inf slice is NaN"),
])
def test_softmax_rejects(wrong, contains):
    assert_fails(ch00.stable_softmax, wrong, contains=contains)


def test_a_first_failure_nudges_without_giving_the_answer():
    msg = assert_fails(ch00.stable_softmax, softmax_naive, contains="Hint: softmax does not change")
    assert "amax" not in msg and "more: checks.ch00.hint('0.1')" in msg


@pytest.mark.parametrize("check, wrong, diagnosis", [
    (ch00.stable_softmax, softmax_naive, "without a shift: exp overflows"),
    (ch00.stable_softmax, softmax_nan_on_empty_rows, "all -inf came out NaN"),
    (ch00.cross_entropy_from_logits, ce_no_logsumexp, "without a shift: exp overflows"),
    (ch00.cross_entropy_from_logits, ce_mean_over_all_rows, "divides by every row"),
], ids=["softmax-overflow", "softmax-empty-slice", "ce-overflow", "ce-ignored-rows"])
def test_common_mistakes_get_their_own_diagnosis(check, wrong, diagnosis):
    assert_fails(check, wrong, contains=diagnosis)


def test_softmax_accepts_another_correct_masking():
    assert_passes(ch00.stable_softmax, softmax_fill_then_zero_right)


@pytest.mark.parametrize("right", [sample_multinomial_right, sample_inverse_cdf_right])
def test_sampling_accepts_another_correct_sampler(right):
    assert_passes(ch00.sample_categorical, right)


@pytest.mark.parametrize("wrong, contains", [
    (sample_ignores_temperature, "follow softmax(logits), as at temperature 1"),
    (sample_divides_probabilities, "follow softmax(logits), as at temperature 1"),
    (sample_multiplies_by_temperature, "logits were multiplied by the temperature"),
    (sample_always_argmax, "always picks the most likely token"),
    (sample_keeps_last_axis, "shape"),
    (sample_global_rng, "generator=generator"),
    (sample_no_sign_check, "ValueError"),
    (sample_naive_softmax, "around 400"),
    (sample_drops_one_token, "drew token 8 0.0%"),
    (sample_drops_one_token, "the last token of the vocabulary is never drawn"),
    (sample_divides_in_place, "changed its argument `logits` in place"),
    (sample_squeezes_everything, "'1x20 logits (a batch of one), temperature 1' has shape ()"),
    (sample_reseeds_global_rng, "not come from the generator you were given"),
    (sample_own_generator, "not come from the generator you were given"),
    (sample_needs_a_generator, "no generator (generator=None)"),
    (sample_drops_rare_tokens, "the unlikely tokens are never drawn"),
])
def test_sampling_rejects(wrong, contains):
    assert_fails(ch00.sample_categorical, wrong, contains=contains)


def test_distribution_test_is_seeded_and_leaves_the_global_rng_alone():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ch00._check_distribution(sample_global_rng, "4 tokens", logits, 0.8, seed=5)  # draws from the global RNG
    assert torch.equal(torch.rand(3), expected)


def test_cross_entropy_accepts_torch():
    assert_passes(ch00.cross_entropy_from_logits, ce_torch)


@pytest.mark.parametrize("wrong, contains", [
    (ce_no_logsumexp, "logits around 200"),
    (ce_mean_over_all_rows, "ignored"),
    (ce_sum, "sum of the rows' losses"),
    (ce_hard_coded_ignore, "not the ignore_index it is given"),
    (ce_negated, "without the minus sign"),
    (ce_returns_float, "torch.Tensor"),
    (ce_detached, "no gradient"),
    (ce_zeroes_ignored_targets_in_place, "changed its argument `targets` in place"),
])
def test_cross_entropy_rejects(wrong, contains):
    assert_fails(ch00.cross_entropy_from_logits, wrong, contains=contains)


def test_use_returns_the_learner_function_only_after_it_passed(capsys):
    def stable_softmax(logits, dim=-1):
        return ref.stable_softmax(logits, dim)

    assert ch00.use(stable_softmax) is ref.stable_softmax
    assert "has not passed" in capsys.readouterr().out
    ch00.stable_softmax(stable_softmax)
    assert ch00.use(stable_softmax) is stable_softmax


# third audit: more correct answers in other styles, and wrong answers of new kinds ------------------------


def softmax_float64_inside(logits, dim=-1):
    x = logits.double()
    m = x.max(dim=dim, keepdim=True).values
    e = torch.exp(x - m.masked_fill(m == float("-inf"), 0))
    s = e.sum(dim, keepdim=True)
    return (e / torch.where(s == 0, torch.ones_like(s), s)).to(logits.dtype)


def softmax_slice_loop(logits, dim=-1):
    x = logits.movedim(dim, -1)
    rows = []
    for row in x.reshape(-1, x.shape[-1]):
        m = row.max()
        e = torch.exp(row - m) if torch.isfinite(m) else row.nan_to_num(0.0) * 0  # a masked slice: zeros
        rows.append(e / e.sum().clamp_min(1e-30))
    return torch.stack(rows).reshape(x.shape).movedim(-1, dim)


def softmax_torch_with_empty_slices_filled(logits, dim=-1):
    empty = torch.isneginf(logits).all(dim, keepdim=True)
    return torch.softmax(logits.masked_fill(empty, 0.0), dim).masked_fill(empty, 0.0)


def softmax_log_softmax_exp(logits, dim=-1):
    empty = torch.isneginf(logits).all(dim, keepdim=True)
    return torch.log_softmax(logits.masked_fill(empty, 0.0), dim).exp().masked_fill(empty, 0.0)


def sample_row_loop(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    return torch.stack([torch.multinomial(torch.softmax(row / temperature, -1), 1, generator=generator)[0]
                        for row in logits])


def sample_exponential_race(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    return (probs / torch.empty_like(probs).exponential_(1.0, generator=generator)).argmax(-1)


def sample_searchsorted(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(logits.shape[1] - 1)


def sample_float64_gumbel(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device=logits.device)
    return (logits.double() / temperature - torch.log(-torch.log(u))).argmax(-1)


def sample_first_of_two_without_replacement(logits, temperature=1.0, generator=None):
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temperature, -1), 2, generator=generator)[:, 0]  # a view


def sample_fresh_generator_when_none(logits, temperature=1.0, generator=None):
    """generator=None gets a new unseeded torch.Generator(): every call then draws the same tokens."""
    if temperature < 0:
        raise ValueError("negative temperature")
    if temperature == 0:
        return logits.argmax(-1)
    g = generator if generator is not None else torch.Generator()
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g).squeeze(-1)


def ce_log_softmax_gather(logits, targets, ignore_index=-100):
    keep = targets != ignore_index
    picked = torch.log_softmax(logits, -1).gather(1, targets.masked_fill(~keep, 0).unsqueeze(1)).squeeze(1)
    return -picked[keep].mean()


def ce_row_loop(logits, targets, ignore_index=-100):
    total, n = 0.0, 0
    for row, t in zip(logits, targets):
        if int(t) != ignore_index:
            m = row.max()
            total, n = total + (m + torch.log(torch.exp(row - m).sum()) - row[t]), n + 1
    return total / n


def ce_boolean_rows_first(logits, targets, ignore_index=-100):
    keep = targets != ignore_index
    x, t = logits[keep], targets[keep]
    m = x.max(dim=1, keepdim=True).values
    return ((x - m).exp().sum(1).log() + m[:, 0] - x[torch.arange(len(t)), t]).mean()


def ce_one_hot(logits, targets, ignore_index=-100):
    keep = targets != ignore_index
    picked = (torch.nn.functional.one_hot(targets.clamp(0, logits.shape[1] - 1), logits.shape[1]) * logits).sum(1)
    m = logits.amax(1, keepdim=True)
    return ((m.squeeze(1) + (logits - m).exp().sum(1).log() - picked) * keep).sum() / keep.sum()


def ce_float64_inside(logits, targets, ignore_index=-100):
    keep = targets != ignore_index
    x = logits.double()
    picked = x.gather(1, torch.where(keep, targets, 0).unsqueeze(1)).squeeze(1)
    return ((torch.logsumexp(x, 1) - picked)[keep].sum() / keep.sum()).to(logits.dtype)


def ce_nll_loss(logits, targets, ignore_index=-100):
    return torch.nn.functional.nll_loss(torch.log_softmax(logits, -1), targets, ignore_index=ignore_index)


def ce_log_of_softmax(logits, targets, ignore_index=-100):
    keep = targets != ignore_index
    probs = torch.softmax(logits, -1)
    return -probs.log().gather(1, targets.masked_fill(~keep, 0)[:, None]).squeeze(1)[keep].mean()


@pytest.mark.parametrize("check, right", [
    (ch00.stable_softmax, softmax_float64_inside), (ch00.stable_softmax, softmax_slice_loop),
    (ch00.stable_softmax, softmax_torch_with_empty_slices_filled), (ch00.stable_softmax, softmax_log_softmax_exp),
    (ch00.sample_categorical, sample_row_loop), (ch00.sample_categorical, sample_exponential_race),
    (ch00.sample_categorical, sample_searchsorted), (ch00.sample_categorical, sample_float64_gumbel),
    (ch00.sample_categorical, sample_first_of_two_without_replacement),
    (ch00.cross_entropy_from_logits, ce_log_softmax_gather), (ch00.cross_entropy_from_logits, ce_row_loop),
    (ch00.cross_entropy_from_logits, ce_boolean_rows_first), (ch00.cross_entropy_from_logits, ce_one_hot),
    (ch00.cross_entropy_from_logits, ce_float64_inside), (ch00.cross_entropy_from_logits, ce_nll_loss),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_correct_answers_in_other_styles_pass(check, right):
    assert_passes(check, right)


@pytest.mark.parametrize("check, wrong, contains", [
    (ch00.sample_categorical, sample_fresh_generator_when_none, "must come from torch's global generator"),
    (ch00.cross_entropy_from_logits, ce_log_of_softmax, "log of a softmax"),
    (ch00.cross_entropy_from_logits, ce_no_logsumexp, "logits around 200"),
], ids=["sample-fresh-generator-when-none", "ce-log-of-softmax", "ce-overflow-named-before-underflow"])
def test_wrong_answers_of_new_kinds_fail(check, wrong, contains):
    assert_fails(check, wrong, contains=contains)
