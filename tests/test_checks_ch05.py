"""Chapter 05 checks: each accepts the reference, reports a stub as not attempted, and rejects plausible
wrong answers (drafts counted after a rejection, resampling from p instead of the residual, a forgotten bonus
token, an off-by-one rollback, a carry taken from the wrong rows, an uncapped relaxation...)."""

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
    for wrong in (rollback_off_by_one, rollback_nothing, rollback_first_cache_only):
        assert_fails(check, wrong, contains="cache lengths")


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
    assert_fails(check, relaxed_one_batch_axis, contains="two batch axes")
    assert_fails(check, relaxed_target_in_place, contains="changed its argument `p` in place")


def test_use_falls_back_to_the_reference():
    def best_draft_length(alpha, c, max_gamma):
        return answers.best_draft_length(alpha, c, max_gamma)

    assert ch05.use(best_draft_length) is answers.best_draft_length
    assert_passes(ch05.best_draft_length, best_draft_length)
    assert ch05.use(best_draft_length) is best_draft_length
