"""Chapter 05 checks: each accepts the reference, reports a stub as not attempted, and rejects plausible
wrong answers (drafts counted after a rejection, resampling from p instead of the residual, a forgotten bonus
token, an off-by-one rollback, a carry taken from the wrong rows, an uncapped relaxation...)."""

import pytest
import torch

from ar_course import sampling
from ar_course.checks import ch05
from ar_course.checks.reference import ch05 as answers
from ar_course.speculative import functional as F
from checks_helpers import assert_fails, assert_not_attempted, assert_passes, stub

# 5.1 ------------------------------------------------------------------------------------------------------


def prefix_loop(p, q, drafts, u):
    """A hand-written answer with loops: correct, just slower."""
    out = []
    for b in range(drafts.shape[0]):
        n = 0
        while n < drafts.shape[1] and u[b, n] < min(1.0, float(p[b, n, drafts[b, n]] / q[b, n, drafts[b, n]])):
            n += 1
        out.append(n)
    return torch.tensor(out)


def at(dist, tokens):
    return dist.gather(-1, tokens[..., None]).squeeze(-1)


def prefix_counts_all(p, q, drafts, u):
    return (u < (at(p, drafts) / at(q, drafts)).clamp(max=1)).long().sum(-1)


def prefix_q_over_p(p, q, drafts, u):
    return (u < (at(q, drafts) / at(p, drafts)).nan_to_num(1.0).clamp(max=1)).long().cumprod(-1).sum(-1)


def prefix_inverted(p, q, drafts, u):
    return (u >= (at(p, drafts) / at(q, drafts)).clamp(max=1)).long().cumprod(-1).sum(-1)


def prefix_index_of_rejection_plus_one(p, q, drafts, u):  # counts the rejected draft too
    return (F.accepted_prefix(p, q, drafts, u) + 1).clamp(max=drafts.shape[1])


def prefix_difference(p, q, drafts, u):  # accepts with probability 1 + p - q
    return (u < (1 + at(p, drafts) - at(q, drafts)).clamp(0, 1)).long().cumprod(-1).sum(-1)


def prefix_divides_u_in_place(p, q, drafts, u):  # right counts, but the caller's uniforms are overwritten
    u /= (at(p, drafts) / at(q, drafts)).clamp(max=1)
    return (u < 1).long().cumprod(dim=1).sum(dim=1)


def test_5_1():
    check = ch05.accepted_prefix
    assert_passes(check, F.accepted_prefix)
    assert_passes(check, prefix_loop)
    assert_not_attempted(check, stub)
    for wrong in (prefix_counts_all, prefix_q_over_p, prefix_inverted, prefix_index_of_rejection_plus_one,
                  prefix_difference):
        assert_fails(check, wrong)
    assert_fails(check, prefix_counts_all, contains="first rejection")
    assert_fails(check, prefix_q_over_p, contains="q/p")
    assert_fails(check, prefix_inverted, contains="u >= min(1, p/q)")
    assert_fails(check, prefix_index_of_rejection_plus_one, contains="the first rejected draft was counted too")
    assert_fails(check, prefix_difference, contains="1 - (q - p), a difference")
    assert_fails(check, prefix_divides_u_in_place, contains="changed its argument `u` in place")


# 5.2 ------------------------------------------------------------------------------------------------------


def residual_is_p(p, q):
    return p


def residual_unnormalised(p, q):
    return (p - q).clamp(min=0)


def residual_no_fallback(p, q):
    r = (p - q).clamp(min=0)
    return r / r.sum(-1, keepdim=True)


def residual_q_minus_p(p, q):
    return F.residual_distribution(q, p)


def residual_in_place(p, q):  # right rows, but p itself becomes the clamped difference
    original = p.clone()
    mass = p.sub_(q).clamp_(min=0).sum(-1, keepdim=True)
    return torch.where(mass > 0, p / mass.clamp_min(1e-30), original)


def test_5_2():
    check = ch05.residual_distribution
    assert_passes(check, F.residual_distribution)
    assert_not_attempted(check, stub)
    for wrong in (residual_is_p, residual_unnormalised, residual_no_fallback, residual_q_minus_p):
        assert_fails(check, wrong)
    assert_fails(check, residual_unnormalised, contains="normalise the clamped difference")
    assert_fails(check, residual_q_minus_p, contains="what q has more of than p")
    assert_fails(check, residual_is_p, contains="that is p itself")
    assert_fails(check, residual_no_fallback, contains="a row where p == q came out NaN")
    assert_fails(check, residual_in_place, contains="changed its argument `p` in place")


# 5.3 ------------------------------------------------------------------------------------------------------


def round_resample_from_p(p, q, draft, u, generator=None):
    a = F.acceptance_probability(p[:-1], q, draft)
    for i in range(len(draft)):
        if u[i] >= a[i]:
            return torch.cat([draft[:i], sampling.sample_from_probs(p[i], generator).view(1)])
    return torch.cat([draft, sampling.sample_from_probs(p[-1], generator).view(1)])


def round_no_bonus(p, q, draft, u, generator=None):
    out = F.speculative_round(p, q, draft, u, generator)
    return out[:-1] if len(out) == len(draft) + 1 else out


def round_keeps_going(p, q, draft, u, generator=None):
    """Accepts every draft that passes its own test, even after a rejection."""
    a = F.acceptance_probability(p[:-1], q, draft)
    keep = draft[u < a]
    return torch.cat([keep, sampling.sample_from_probs(p[-1], generator).view(1)])


def round_writes_into_draft(p, q, draft, u, generator=None):
    """The correction written over the rejected draft: the right tokens, but the caller's draft is changed."""
    out = F.speculative_round(p, q, draft.clone(), u, generator)
    if len(out) > len(draft):
        return out
    draft[len(out) - 1] = out[-1]
    return draft[:len(out)]


def test_5_3():
    check = ch05.speculative_round
    assert_passes(check, F.speculative_round)
    assert_not_attempted(check, stub)
    for wrong in (round_resample_from_p, round_no_bonus, round_keeps_going):
        assert_fails(check, wrong)
    assert_fails(check, round_resample_from_p, contains="the token after a rejection was drawn from p")
    assert_fails(check, round_keeps_going, contains="even after a rejection")
    assert_fails(check, round_no_bonus, contains="the bonus token is missing")
    assert_fails(check, round_writes_into_draft, contains="changed its argument `draft` in place")


# 5.4 ------------------------------------------------------------------------------------------------------


def rollback_to_seq_len_minus_one(caches, seq_len):
    for c in caches:
        c.rollback(seq_len - 1)


def rollback_off_by_one(caches, seq_len):
    for c in caches:
        c.rollback(min(c.length, seq_len))


def rollback_nothing(caches, seq_len):
    pass


def rollback_first_cache_only(caches, seq_len):
    for c in caches:
        c.rollback(min(c.length, seq_len - 1))
        return  # a return inside the loop: the later caches keep their rejected positions


def test_5_4():
    check = ch05.rollback_caches
    assert_passes(check, F.rollback_caches)
    assert_not_attempted(check, stub)
    assert_fails(check, rollback_to_seq_len_minus_one, contains="raised ValueError")
    for wrong, says in ((rollback_off_by_one, "that keeps seq_len positions"),
                        (rollback_nothing, "no cache was rolled back"),
                        (rollback_first_cache_only, "only the first cache was rolled back")):
        assert_fails(check, wrong, contains="cache lengths")
        assert_fails(check, wrong, contains=says)


# 5.5 ------------------------------------------------------------------------------------------------------


def _tokens(alpha, gamma):
    return gamma + 1 if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def best_loop(alpha, c, max_gamma):
    """A correct loop written as a learner would: strict > keeps the first (smallest) best gamma."""
    best, best_speedup = 0, 1.0
    for gamma in range(1, max_gamma + 1):
        speedup = _tokens(alpha, gamma) / (gamma * c + 1)
        if speedup > best_speedup:
            best, best_speedup = gamma, speedup
    return best, best_speedup


def best_drafts_only(alpha, c, max_gamma):
    """Counts the accepted drafts, not the target's own token."""
    best, best_speedup = 0, 1.0
    for gamma in range(1, max_gamma + 1):
        speedup = (_tokens(alpha, gamma) - 1) / (gamma * c + 1)
        if speedup > best_speedup:
            best, best_speedup = gamma, speedup
    return best, best_speedup


def best_series_off_by_one(alpha, c, max_gamma):
    best, best_speedup = 0, 1.0
    for gamma in range(1, max_gamma + 1):
        speedup = (gamma if alpha == 1 else (1 - alpha**gamma) / (1 - alpha)) / (gamma * c + 1)
        if speedup > best_speedup:
            best, best_speedup = gamma, speedup
    return best, best_speedup


def best_forgets_target_call(alpha, c, max_gamma):
    best, best_speedup = 0, 1.0
    for gamma in range(1, max_gamma + 1):
        speedup = _tokens(alpha, gamma) / (gamma * c)
        if speedup > best_speedup:
            best, best_speedup = gamma, speedup
    return best, best_speedup


def best_always_speculates(alpha, c, max_gamma):
    speedups = [_tokens(alpha, gamma) / (gamma * c + 1) for gamma in range(1, max_gamma + 1)]
    i = speedups.index(max(speedups))
    return i + 1, speedups[i]


def best_ties_to_longest(alpha, c, max_gamma):
    best, best_speedup = 0, 1.0
    for gamma in range(1, max_gamma + 1):
        speedup = _tokens(alpha, gamma) / (gamma * c + 1)
        if speedup >= best_speedup:
            best, best_speedup = gamma, speedup
    return best, best_speedup


def best_no_special_case(alpha, c, max_gamma):
    speedups = [(1 - alpha ** (g + 1)) / (1 - alpha) / (g * c + 1) for g in range(max_gamma + 1)]
    return speedups.index(max(speedups)), max(speedups)


def best_returns_speedup_only(alpha, c, max_gamma):
    return answers.best_draft_length(alpha, c, max_gamma)[1]


def test_5_5():
    check = ch05.best_draft_length
    assert_passes(check, answers.best_draft_length)
    assert_passes(check, best_loop)
    assert_not_attempted(check, stub)
    assert_fails(check, best_drafts_only, contains="accepted drafts only")
    assert_fails(check, best_series_off_by_one, contains="off by one")
    assert_fails(check, best_forgets_target_call, contains="gamma * c + 1 target calls")
    assert_fails(check, best_always_speculates, contains="always speculates")
    assert_fails(check, best_ties_to_longest, contains="on a tie")
    assert_fails(check, best_no_special_case, contains="ZeroDivisionError")
    assert_fails(check, best_returns_speedup_only, contains="return a pair")


# 5.6 ------------------------------------------------------------------------------------------------------


def jacobi_carry_off_by_one(p, q, draft, u, generator=None):
    acc = F.speculative_round(p, q, draft, u, generator)
    m = len(acc)
    cq = p[m - 1:] if m <= len(draft) else p[:0]
    return acc, (sampling.sample_from_probs(cq, generator) if len(cq) else draft[:0]), cq


def jacobi_carry_old_drafts(p, q, draft, u, generator=None):
    """Keeps the old draft tokens and distributions instead of re-sampling them from this pass's p."""
    acc = F.speculative_round(p, q, draft, u, generator)
    m = len(acc)
    return acc, draft[m:], q[m:]


def jacobi_no_carry(p, q, draft, u, generator=None):
    acc = F.speculative_round(p, q, draft, u, generator)
    return acc, draft[:0], p[:0]


def jacobi_with_in_place_round(p, q, draft, u, generator=None):
    acc = round_writes_into_draft(p, q, draft, u, generator)
    cq = p[len(acc):]
    return acc, (sampling.sample_from_probs(cq, generator) if len(cq) else draft[:0]), cq


def test_5_6():
    check = ch05.jacobi_verify
    assert_passes(check, F.jacobi_verify)
    assert_not_attempted(check, stub)
    for wrong in (jacobi_carry_off_by_one, jacobi_carry_old_drafts, jacobi_no_carry):
        assert_fails(check, wrong)
    assert_fails(check, jacobi_with_in_place_round, contains="changed its argument `draft` in place")


# 5.7 ------------------------------------------------------------------------------------------------------


def _gather(x, idx):
    return x.gather(-1, idx)


def _ratio(p, q, tokens, extra):
    """min(1, (p[x] + extra) / q[x])."""
    p_x, q_x = _gather(p, tokens[..., None]).squeeze(-1), _gather(q, tokens[..., None]).squeeze(-1)
    return ((p_x + extra) / q_x).clamp(max=1)


def relaxed_uncapped(p, q, tokens, neighbors, delta):
    """Adds all the neighbours' mass, ignoring delta (except delta = 0)."""
    extra = _gather(p, neighbors[tokens]).sum(-1) if delta > 0 else 0.0
    return _ratio(p, q, tokens, extra)


def relaxed_always_delta(p, q, tokens, neighbors, delta):
    """Adds delta even when the neighbours hold less."""
    return _ratio(p, q, tokens, delta)


def relaxed_neighbours_of_wrong_token(p, q, tokens, neighbors, delta):
    """Indexes neighbours by row number instead of by the drafted token."""
    rows = torch.arange(tokens.numel()).view(tokens.shape) % neighbors.shape[0]
    extra = _gather(p, neighbors[rows]).sum(-1).clamp(max=delta)
    return _ratio(p, q, tokens, extra)


def relaxed_draft_neighbour_mass(p, q, tokens, neighbors, delta):
    """Borrows the draft's neighbour mass instead of the target's."""
    extra = _gather(q, neighbors[tokens]).sum(-1).clamp(max=delta)
    return _ratio(p, q, tokens, extra)


def relaxed_one_batch_axis(p, q, tokens, neighbors, delta):
    """Indexes rows with arange: right for (N, V) inputs only, the spec allows any batch shape (..., V)."""
    rows = torch.arange(tokens.shape[0])
    extra = p[rows[:, None], neighbors[tokens]].sum(-1).clamp(max=delta)
    return ((p[rows, tokens] + extra) / q[rows, tokens]).clamp(max=1)


def relaxed_target_in_place(p, q, tokens, neighbors, delta):
    """Moves the borrowed mass onto the drafted token inside p itself."""
    extra = _gather(p, neighbors[tokens]).sum(-1).clamp(max=delta)
    p.scatter_add_(-1, tokens[..., None], extra[..., None])
    return _ratio(p, q, tokens, 0.0)


def test_5_7():
    check = ch05.relaxed_acceptance_probability
    assert_passes(check, answers.relaxed_acceptance_probability)
    assert_not_attempted(check, stub)
    for wrong in (relaxed_uncapped, relaxed_always_delta, relaxed_neighbours_of_wrong_token):
        assert_fails(check, wrong)
    assert_fails(check, relaxed_uncapped, contains="not capped at delta")
    assert_fails(check, relaxed_always_delta, contains="adds delta even")
    assert_fails(check, relaxed_draft_neighbour_mass, contains="read from the draft q")
    assert_fails(check, relaxed_neighbours_of_wrong_token, contains="looked up by row number")
    assert_fails(check, relaxed_one_batch_axis, contains="two batch axes")
    assert_fails(check, relaxed_target_in_place, contains="changed its argument `p` in place")


def test_use_falls_back_to_the_reference():
    def best_draft_length(alpha, c, max_gamma):
        return answers.best_draft_length(alpha, c, max_gamma)

    assert ch05.use(best_draft_length) is answers.best_draft_length
    assert_passes(ch05.best_draft_length, best_draft_length)
    assert ch05.use(best_draft_length) is best_draft_length


# correct answers in other styles (third audit): each must pass --------------------------------------------


def prefix_by_multiplication(p, q, drafts, u):  # u * q < p is u < p / q without the division (q > 0)
    return (u * at(q, drafts) < at(p, drafts)).cumprod(1).sum(1)


def prefix_by_first_rejection(p, q, drafts, u):
    rejected = u >= torch.minimum(at(p, drafts) / at(q, drafts), torch.tensor(1.0))
    first = rejected.int().argmax(1)
    return torch.where(rejected.any(1), first, torch.full_like(first, drafts.shape[1])).long()


def prefix_by_cummin_in_float64(p, q, drafts, u):
    a = (at(p.double(), drafts) / at(q.double(), drafts)).clamp(max=1)
    return (u.double() < a).int().cummin(1).values.sum(1).long()


def residual_by_minimum(p, q):
    r = p - torch.minimum(p, q)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass == 0, p, r / mass)


def residual_by_nan_replacement(p, q):
    r = (p - q).clamp_min(0)
    out = r / r.sum(-1, keepdim=True)
    return torch.where(torch.isnan(out), p, out)


def residual_by_rows(p, q):
    rows = []
    for a, b in zip(p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])):
        r = (a - b).clamp(min=0)
        rows.append(r / r.sum() if r.sum() > 0 else a)
    return torch.stack(rows).reshape(p.shape)


def residual_by_l1_normalize(p, q):
    r = (p - q).clamp(min=0)
    return torch.where(r.sum(-1, keepdim=True) > 0, torch.nn.functional.normalize(r, p=1, dim=-1), p)


def round_by_loop(p, q, draft, u, generator=None):
    out = []
    for i in range(len(draft)):
        x = draft[i]
        if u[i] * q[i, x] < p[i, x]:
            out.append(draft[i:i + 1])
        else:
            fix = sampling.sample_from_probs(F.residual_distribution(p[i], q[i]), generator)
            return torch.cat(out + [fix.reshape(1)])
    return torch.cat(out + [sampling.sample_from_probs(p[len(draft)], generator).view(1)])


def round_by_python_lists(p, q, draft, u, generator=None):
    L = draft.numel()
    a = (p[torch.arange(L), draft] / q[torch.arange(L), draft]).clamp(max=1)
    n = int((u < a).long().cumprod(0).sum())
    dist = p[L] if n == L else F.residual_distribution(p[n], q[n])
    return torch.tensor(draft[:n].tolist() + [int(sampling.sample_from_probs(dist, generator))])


def round_by_library_pieces(p, q, draft, u, generator=None):
    L = draft.shape[0]
    n = int(F.accepted_prefix(p[None, :L], q[None], draft[None], u[None]))
    dist = F.residual_distribution(p[n], q[n]) if n < L else p[L]
    return torch.cat([draft[:n], sampling.sample_from_probs(dist, generator).reshape(1)])


def rollback_by_map(caches, seq_len):
    list(map(lambda cache: cache.rollback(min(cache.length, seq_len - 1)), caches))


def rollback_when_longer(caches, seq_len):
    for cache in caches:
        keep = min(cache.length, seq_len - 1)
        if keep != cache.length:
            cache.rollback(keep)


def rollback_by_index_returning_caches(caches, seq_len):
    for i in range(len(caches)):
        caches[i].rollback(min(caches[i].length, seq_len - 1))
    return caches


def best_by_closed_form(alpha, c, max_gamma):
    def tokens(g):
        return g + 1 if alpha == 1 else (1 - alpha ** (g + 1)) / (1 - alpha)

    speedups = [tokens(g) / (g * c + 1) for g in range(max_gamma + 1)]
    best = max(range(len(speedups)), key=lambda g: (speedups[g], -g))
    return best, speedups[best]


def best_by_torch_argmax(alpha, c, max_gamma):
    gammas = torch.arange(max_gamma + 1, dtype=torch.float64)
    tokens = torch.stack([(alpha ** torch.arange(int(g) + 1, dtype=torch.float64)).sum() for g in gammas])
    speedups = tokens / (gammas * c + 1)
    best = int(torch.argmax(speedups))  # the first maximum
    return best, float(speedups[best])


def best_by_running_sum(alpha, c, max_gamma):
    best, best_speedup, tokens, term = 0, 1.0, 1.0, 1.0
    for gamma in range(1, max_gamma + 1):
        term *= alpha
        tokens += term
        if tokens / (gamma * c + 1) > best_speedup:
            best, best_speedup = gamma, tokens / (gamma * c + 1)
    return best, best_speedup


def jacobi_by_loop(p, q, draft, u, generator=None):
    accepted = round_by_loop(p, q, draft, u, generator)
    carry_q = p[accepted.numel():]
    carry = sampling.sample_from_probs(carry_q, generator) if carry_q.shape[0] else torch.empty(0, dtype=torch.long)
    return accepted, carry, carry_q


def jacobi_as_list(p, q, draft, u, generator=None):
    accepted = round_by_python_lists(p, q, draft, u, generator)
    m = len(accepted)
    if m > len(draft):
        return accepted, torch.tensor([], dtype=torch.long), p[m:]
    return [accepted, sampling.sample_from_probs(p[m:], generator), p[m:].clone()]


def jacobi_by_library_round(p, q, draft, u, generator=None):
    accepted = F.speculative_round(p, q, draft, u, generator)
    m = accepted.shape[0]
    if m == draft.shape[0] + 1:
        return accepted, draft[:0], p[m:]
    return accepted, sampling.sample_from_probs(p[m:], generator), p[m:]


def relaxed_by_loop(p, q, tokens, neighbors, delta):
    out = []
    for a, b, x in zip(p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1]), tokens.reshape(-1)):
        m = min(delta, float(a[neighbors[x]].sum()))
        out.append(min(1.0, (float(a[x]) + m) / float(b[x])))
    return torch.tensor(out, dtype=p.dtype).reshape(tokens.shape)


def relaxed_by_one_hot(p, q, tokens, neighbors, delta):
    V = p.shape[-1]
    near = torch.nn.functional.one_hot(neighbors[tokens], V).sum(-2).to(p.dtype)
    m = torch.minimum((p * near).sum(-1), torch.tensor(delta, dtype=p.dtype))
    own = torch.nn.functional.one_hot(tokens, V).to(p.dtype)
    return ((p * own).sum(-1) + m).div((q * own).sum(-1)).clamp(max=1)


def relaxed_by_library(p, q, tokens, neighbors, delta):
    return F.acceptance_probability(F.relaxed_target(p, tokens, neighbors, delta), q, tokens)


CORRECT_ALTERNATIVES = {
    "accepted_prefix": [prefix_by_multiplication, prefix_by_first_rejection, prefix_by_cummin_in_float64],
    "residual_distribution": [residual_by_minimum, residual_by_nan_replacement, residual_by_rows,
                              residual_by_l1_normalize],
    "speculative_round": [round_by_loop, round_by_python_lists, round_by_library_pieces],
    "rollback_caches": [rollback_when_longer, rollback_by_index_returning_caches, rollback_by_map],
    "best_draft_length": [best_by_closed_form, best_by_torch_argmax, best_by_running_sum],
    "jacobi_verify": [jacobi_by_loop, jacobi_as_list, jacobi_by_library_round],
    "relaxed_acceptance_probability": [relaxed_by_loop, relaxed_by_one_hot, relaxed_by_library],
}


@pytest.mark.parametrize("name,index", [(n, i) for n, fns in CORRECT_ALTERNATIVES.items() for i in range(len(fns))])
def test_correct_answers_in_other_styles_pass(name, index):
    assert_passes(getattr(ch05, name), CORRECT_ALTERNATIVES[name][index])


# wrong answers of kinds the earlier audits did not try (third audit) ---------------------------------------


def test_prefix_rejects_a_non_strict_test():
    def non_strict(p, q, drafts, u):  # at u = 0 it keeps a draft the target gives probability 0
        return (u <= (at(p, drafts) / at(q, drafts)).clamp(max=1)).long().cumprod(-1).sum(-1)

    assert_fails(ch05.accepted_prefix, non_strict, contains="the test is strict")
