"""Chapter 07 checks: each accepts the reference, reports a stub as not attempted, and rejects plausible wrong
answers (the guidance scale s = 1 + w passed as w, one image at a time, the simulator picked on a CPU,
torch.chunk instead of split, a batched pass counted per image, dominated rows kept, a floor met exactly
refused...)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ar_course import kernels, utils
from ar_course.checks import ch07
from ar_course.checks.reference import ch07 as ref
from ar_course.sampling import SamplingConfig
from ar_course.var import guidance_strength
from ar_course.var.model import sample_pyramid
from checks_helpers import assert_fails, assert_not_attempted, assert_passes, stub

REFERENCES = {
    "var_pipeline": ref.var_pipeline,
    "guidance_weights": ref.guidance_weights,
    "choose_backend": ref.choose_backend,
    "generate_in_batches": utils.generate_in_batches,
    "generation_accounting": ref.generation_accounting,
    "pareto_front": ref.pareto_front,
    "fastest_meeting": ref.fastest_meeting,
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_reference_passes_and_stub_is_not_attempted(name):
    check = getattr(ch07, name)
    assert_passes(check, REFERENCES[name])
    assert_not_attempted(check, stub)


def test_seven_exercises_registered():
    assert sorted(ch07.chapter.exercises) == sorted(REFERENCES)
    assert [e.number for e in ch07.chapter.exercises.values()] == ["7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "7.7"]


def test_use_falls_back_to_the_reference_until_passed():
    def fastest_meeting(rows, speed, quality, floor, higher_is_better=True):
        raise NotImplementedError

    assert ch07.use(fastest_meeting) is ref.fastest_meeting
    assert_passes(ch07.fastest_meeting, ref.fastest_meeting)
    assert ch07.use(ref.fastest_meeting) is ref.fastest_meeting


# 7.1 ------------------------------------------------------------------------------------------------------


def _decode(tokenizer, pyramid):
    return tokenizer.decode_from_indices(pyramid).float().cpu()


def pipe_scale_as_w(model, tokenizer, classes, *, cfg=0.0, generator=None):
    # the LlamaGen / CFG-paper scale s = 1 + w where the strength w belongs
    return _decode(tokenizer, sample_pyramid(model, tokenizer.quantizer, classes, cfg=1.0 + cfg, generator=generator))


def pipe_no_ramp(model, tokenizer, classes, *, cfg=0.0, generator=None):
    return _decode(tokenizer, sample_pyramid(model, tokenizer.quantizer, classes, cfg=cfg, generator=generator,
                                             ramp=False))


def pipe_ignores_generator(model, tokenizer, classes, *, cfg=0.0, generator=None):
    return _decode(tokenizer, sample_pyramid(model, tokenizer.quantizer, classes, cfg=cfg))


def pipe_one_image_at_a_time(model, tokenizer, classes, *, cfg=0.0, generator=None):
    return torch.cat([ref.var_pipeline(model, tokenizer, c, cfg=cfg, generator=generator)
                      for c in classes.split(1)])


def pipe_finest_scale_only(model, tokenizer, classes, *, cfg=0.0, generator=None):
    pyramid = sample_pyramid(model, tokenizer.quantizer, classes, cfg=cfg, generator=generator)
    return _decode(tokenizer, pyramid[-1:])


def pipe_one_scale_short(model, tokenizer, classes, *, cfg=0.0, generator=None):
    pyramid = sample_pyramid(model, tokenizer.quantizer, classes, cfg=cfg, generator=generator)
    return _decode(tokenizer, pyramid[:-1])  # an off-by-one slice: the finest scale is never decoded


def test_pipeline_rejects_wrong_answers():
    msg = assert_fails(ch07.var_pipeline, pipe_scale_as_w, contains="that samples with cfg + 1")
    assert "images" in msg
    msg = assert_fails(ch07.var_pipeline, pipe_no_ramp, contains="that turns VAR's ramp off")
    assert "images" in msg
    msg = assert_fails(ch07.var_pipeline, pipe_ignores_generator,
                       contains="two runs with identically seeded generators gave different images")
    assert "images" in msg
    assert_fails(ch07.var_pipeline, pipe_one_image_at_a_time, contains="scale steps")
    assert_fails(ch07.var_pipeline, pipe_finest_scale_only)
    msg = assert_fails(ch07.var_pipeline, pipe_one_scale_short, contains="without its finest scale")
    assert "images" in msg


# 7.2 ------------------------------------------------------------------------------------------------------


def weights_w_as_scale(w, method, num_steps, ramp=True):
    # reads w as the guidance scale s of the CFG paper: uncond + w (cond - uncond)
    if method == "ar":
        return [(w, 1 - w) for _ in range(num_steps)]
    return ref.guidance_weights(w, method, num_steps, ramp)


def weights_ramp_everywhere(w, method, num_steps, ramp=True):
    return ref.guidance_weights(w, "var" if method == "ar" else method, num_steps, ramp)


def weights_ramp_from_first_step(w, method, num_steps, ramp=True):
    if method != "var" or not ramp:
        return ref.guidance_weights(w, method, num_steps, ramp)
    return [(1 + w * (k + 1) / num_steps, -w * (k + 1) / num_steps) for k in range(num_steps)]


def weights_sign_error(w, method, num_steps, ramp=True):
    return [(a, -b) for a, b in ref.guidance_weights(w, method, num_steps, ramp)]


def weights_accept_any_method(w, method, num_steps, ramp=True):
    return ref.guidance_weights(w, "var" if method == "var" else "ar", num_steps, ramp)


def weights_ramp_over_s(w, method, num_steps, ramp=True):  # an off-by-one ramp: w * k / S never reaches w
    if method != "var" or not ramp or num_steps == 1:
        return ref.guidance_weights(w, method, num_steps, ramp)
    return [(1 + w * k / num_steps, -w * k / num_steps) for k in range(num_steps)]


def test_messages_show_no_object_address_and_no_negative_zero():
    msg = assert_fails(ch07.generate_in_batches, lambda fn, classes, bs: torch.cat(*[fn(c) for c in classes.split(bs)],
                                                                                   dim=0))
    assert "(arguments: generate_fn, Tensor(23,) int64 cpu, 5)" in msg and " at 0x" not in msg, msg
    msg = assert_fails(ch07.guidance_weights, weights_ramp_from_first_step)
    assert "-0)" not in msg and "expected (1, 0)" in msg, msg


def test_guidance_rejects_wrong_answers():
    msg = assert_fails(ch07.guidance_weights, weights_w_as_scale, contains="ar, 64 tokens")
    assert "a strength t is the scale s = 1 + t" in msg
    assert_fails(ch07.guidance_weights, weights_ramp_everywhere, contains="ramps the strength in raster order too")
    msg = assert_fails(ch07.guidance_weights, weights_ramp_from_first_step, contains="step 0")
    assert "the ramp w * (k + 1) / S starts above 0" in msg
    assert_fails(ch07.guidance_weights, weights_sign_error, contains="the unconditional weight has the wrong sign")
    assert_fails(ch07.guidance_weights, weights_ramp_over_s, contains="the ramp w * k / S never reaches w")
    assert_fails(ch07.guidance_weights, weights_accept_any_method, contains="ValueError")


# 7.3 ------------------------------------------------------------------------------------------------------


def backend_simulator_on_cpu(device_type, available, requested="auto"):
    if requested == "auto":
        return next((b for b in ("triton", "numba") if b in available), "torch")
    return ref.choose_backend(device_type, available, requested)


def backend_ignores_availability(device_type, available, requested="auto"):
    if requested == "auto" and device_type == "cuda":
        return "triton"
    return ref.choose_backend(device_type, available, requested)


def backend_prefers_numba(device_type, available, requested="auto"):
    if requested == "auto" and device_type == "cuda":
        return next((b for b in ("numba", "triton") if b in available), "torch")
    return ref.choose_backend(device_type, available, requested)


def backend_silent_fallback(device_type, available, requested="auto"):
    if requested in ("triton", "numba") and requested not in available:
        return "torch"
    return ref.choose_backend(device_type, available, requested)


def backend_ignores_request(device_type, available, requested="auto"):
    return ref.choose_backend(device_type, available, "auto")


def backend_clears_available(device_type, available, requested="auto"):
    choice = ref.choose_backend(device_type, available, requested)
    available.intersection_update({choice})  # keeps only what it chose, in the caller's set
    return choice


def _outcome(fn, *args):
    """What ``fn(*args)`` returns, or the type of the error it raises."""
    try:
        return fn(*args)
    except (RuntimeError, ValueError) as exc:
        return type(exc)


def test_backend_reference_is_the_library_choice_here():
    """Fed what this machine can run on its CPU, the reference decides as select_backend does."""
    cpu = torch.device("cpu")
    runs = {b: _outcome(kernels.select_backend, "flash_attention", cpu, b) == b for b in ("triton", "numba")}
    available = {b for b, ok in runs.items() if ok}
    for requested in ("auto", "torch", "triton", "numba", "numba_cpu", "flash"):
        assert _outcome(ref.choose_backend, "cpu", available, requested) == \
            _outcome(kernels.select_backend, "flash_attention", cpu, requested)


def backend_auto_never_a_kernel(device_type, available, requested="auto"):
    return "torch" if requested == "auto" else ref.choose_backend(device_type, available, requested)


def backend_auto_triton_or_torch(device_type, available, requested="auto"):
    if requested == "auto":
        return "triton" if device_type == "cuda" and "triton" in available else "torch"
    return ref.choose_backend(device_type, available, requested)


def test_backend_answered_as_a_numpy_string_is_one_line():
    import numpy as np

    assert_fails(ch07.choose_backend, lambda *args: np.array(ref.choose_backend(*args)),
                 contains="returned ndarray() <U")


def test_backend_rejects_wrong_answers():
    msg = assert_fails(ch07.choose_backend, backend_simulator_on_cpu, contains="pick triton or numba off cuda")
    assert "'cpu'" in msg
    msg = assert_fails(ch07.choose_backend, backend_ignores_availability, contains="without looking at available")
    assert "set()" in msg
    msg = assert_fails(ch07.choose_backend, backend_prefers_numba, contains="prefers numba to triton on cuda")
    assert "expected 'triton'" in msg
    assert_fails(ch07.choose_backend, backend_auto_never_a_kernel, contains="passed over numba although it is")
    assert_fails(ch07.choose_backend, backend_auto_triton_or_torch, contains="passed over numba although it is")
    assert_fails(ch07.choose_backend, backend_silent_fallback, contains="RuntimeError")
    assert_fails(ch07.choose_backend, backend_ignores_request)
    assert_fails(ch07.choose_backend, backend_clears_available, contains="changed its argument `available`")


# 7.4 ------------------------------------------------------------------------------------------------------


def batches_torch_chunk(generate_fn, classes, batch_size):
    return torch.cat([generate_fn(c) for c in torch.chunk(classes, batch_size)])


def batches_drop_ragged(generate_fn, classes, batch_size):
    n = classes.shape[0]
    return torch.cat([generate_fn(classes[i:i + batch_size]) for i in range(0, n - batch_size + 1, batch_size)])


def batches_off_by_one(generate_fn, classes, batch_size):
    return torch.cat([generate_fn(c) for c in classes.split(batch_size + 1)])


def batches_one_at_a_time(generate_fn, classes, batch_size):
    return torch.cat([generate_fn(c) for c in classes.split(1)])


def batches_reversed(generate_fn, classes, batch_size):
    return torch.cat([generate_fn(c) for c in classes.split(batch_size)][::-1])


def batches_no_check(generate_fn, classes, batch_size):
    return torch.cat([generate_fn(c) for c in classes.split(max(batch_size, 1))])


def batches_refuses_zero_only(generate_fn, classes, batch_size):
    if batch_size == 0:
        raise ValueError("batch_size must be >= 1")
    return torch.cat([generate_fn(c) for c in classes.split(max(batch_size, 1))])


def test_batches_reject_wrong_answers():
    assert_fails(ch07.generate_in_batches, batches_refuses_zero_only, contains="ValueError for batch_size -1")
    assert_fails(ch07.generate_in_batches, batches_torch_chunk, contains="that is torch.chunk")
    assert_fails(ch07.generate_in_batches, batches_drop_ragged, contains="in order")
    assert_fails(ch07.generate_in_batches, batches_off_by_one, contains="more than batch_size")
    assert_fails(ch07.generate_in_batches, batches_one_at_a_time, contains="full chunks")
    msg = assert_fails(ch07.generate_in_batches, batches_reversed, contains="put together in reverse order")
    assert "images" in msg
    assert_fails(ch07.generate_in_batches, batches_no_check, contains="ValueError")


# 7.5 ------------------------------------------------------------------------------------------------------


def accounting_shared_passes(chunk_images, chunk_passes, chunk_seconds):
    out = ref.generation_accounting(chunk_images, chunk_passes, chunk_seconds)
    return {**out, "passes_per_image": sum(chunk_passes) / sum(chunk_images)}


def accounting_mean_over_chunks(chunk_images, chunk_passes, chunk_seconds):
    out = ref.generation_accounting(chunk_images, chunk_passes, chunk_seconds)
    return {**out, "passes_per_image": sum(chunk_passes) / len(chunk_passes)}


def accounting_mean_rate(chunk_images, chunk_passes, chunk_seconds):
    out = ref.generation_accounting(chunk_images, chunk_passes, chunk_seconds)
    rates = [n / s for n, s in zip(chunk_images, chunk_seconds)]
    return {**out, "images_per_second": sum(rates) / len(rates)}


def accounting_passes_per_image_counted(chunk_images, chunk_passes, chunk_seconds):
    out = ref.generation_accounting(chunk_images, chunk_passes, chunk_seconds)
    return {**out, "forward_passes": sum(p * n for p, n in zip(chunk_passes, chunk_images))}


def accounting_pops_the_lists(chunk_images, chunk_passes, chunk_seconds):
    images = passes = waited = 0
    seconds = 0.0
    while chunk_images:  # empties the caller's lists
        n, p = chunk_images.pop(), chunk_passes.pop()
        images, passes, waited, seconds = images + n, passes + p, waited + p * n, seconds + chunk_seconds.pop()
    return {"images": images, "forward_passes": passes, "passes_per_image": waited / images,
            "images_per_second": images / seconds}


def accounting_seconds_per_image(chunk_images, chunk_passes, chunk_seconds):
    out = ref.generation_accounting(chunk_images, chunk_passes, chunk_seconds)
    return {**out, "images_per_second": sum(chunk_seconds) / sum(chunk_images)}


def test_accounting_rejects_wrong_answers():
    msg = assert_fails(ch07.generation_accounting, accounting_shared_passes, contains="as if each pass made one image")
    assert "passes_per_image" in msg
    msg = assert_fails(ch07.generation_accounting, accounting_mean_over_chunks,
                       contains="the mean of the chunks' pass counts")
    assert "passes_per_image" in msg
    msg = assert_fails(ch07.generation_accounting, accounting_mean_rate, contains="the mean of the per-chunk rates")
    assert "images_per_second" in msg
    msg = assert_fails(ch07.generation_accounting, accounting_passes_per_image_counted,
                       contains="counts each batched pass once per image")
    assert "forward_passes" in msg
    assert_fails(ch07.generation_accounting, accounting_seconds_per_image, contains="that is seconds per image")
    assert_fails(ch07.generation_accounting, accounting_pops_the_lists, contains="changed its argument `chunk_images`")


# 7.6 ------------------------------------------------------------------------------------------------------


def _better(a, b, objectives):
    return [(a[k] >= b[k]) if s == "max" else (a[k] <= b[k]) for k, s in objectives.items()], \
           [(a[k] > b[k]) if s == "max" else (a[k] < b[k]) for k, s in objectives.items()]


def front_drops_ties(rows, objectives):
    out = []
    for i, b in enumerate(rows):
        if not any(all(_better(a, b, objectives)[0]) for j, a in enumerate(rows) if j != i):
            out.append(b)
    return out


def front_ignores_min(rows, objectives):
    return ref.pareto_front(rows, {k: "max" for k in objectives})


def front_strict_in_all(rows, objectives):
    return [b for b in rows if not any(all(_better(a, b, objectives)[1]) for a in rows)]


def front_sweep_first_objective(rows, objectives):
    (k0, s0), *rest = objectives.items()
    order = sorted(rows, key=lambda r: -r[k0] if s0 == "max" else r[k0])
    out, best = [], None
    for r in order:  # keep rows that improve the remaining objectives' sum
        score = sum(r[k] if s == "max" else -r[k] for k, s in rest)
        if best is None or score > best:
            out.append(r)
            best = score
    return [r for r in rows if any(r is o for o in out)]


def front_deduplicated(rows, objectives):  # keeps the first of equal rows only
    front = []
    for b in ref.pareto_front(rows, objectives):
        if not any(all(b[k] == f[k] for k in objectives) for f in front):
            front.append(b)
    return front


def front_sorted(rows, objectives):
    k0, s0 = next(iter(objectives.items()))
    return sorted(ref.pareto_front(rows, objectives), key=lambda r: -r[k0] if s0 == "max" else r[k0])


def front_removes_from_rows(rows, objectives):
    for b in list(rows):
        if any(all(_better(a, b, objectives)[0]) and any(_better(a, b, objectives)[1]) for a in rows):
            rows.remove(b)  # the caller's table loses its dominated rows
    return rows


def front_sweep_in_input_order_right(rows, objectives):
    """A correct alternative: sort by all objectives, sweep against the front so far, report in input order."""
    sign = {k: 1 if s == "max" else -1 for k, s in objectives.items()}
    order = sorted(rows, key=lambda r: tuple(-sign[k] * r[k] for k in objectives))
    front = []
    for r in order:
        if not any(all(_better(f, r, objectives)[0]) and any(_better(f, r, objectives)[1]) for f in front):
            front.append(r)
    return [r for r in rows if any(r is f for f in front)]


def test_front_accepts_another_correct_answer():
    assert_passes(ch07.pareto_front, front_sweep_in_input_order_right)


def test_front_rejects_wrong_answers():
    msg = assert_fails(ch07.pareto_front, front_drops_ties, contains="dropped")
    assert "equal rows knock each other out" in msg
    assert_fails(ch07.pareto_front, front_ignores_min, contains="treats every objective as 'max'")
    msg = assert_fails(ch07.pareto_front, front_strict_in_all, contains="kept the dominated")
    assert "only when another is strictly better on every objective" in msg
    assert_fails(ch07.pareto_front, front_sweep_first_objective, contains="a sum of objectives is not dominance")
    assert_fails(ch07.pareto_front, front_sorted, contains="order")
    msg = assert_fails(ch07.pareto_front, front_deduplicated, contains="keeps only the first of rows equal")
    assert "a sum of objectives" not in msg  # not blamed on the sweep, which gives the same front on that case
    assert_fails(ch07.pareto_front, front_removes_from_rows, contains="changed its argument `rows`")


# 7.7 ------------------------------------------------------------------------------------------------------


def fastest_strict_floor(rows, speed, quality, floor, higher_is_better=True):
    ok = [r for r in rows if (r[quality] > floor if higher_is_better else r[quality] < floor)]
    return max(ok, key=lambda r: r[speed]) if ok else None


def fastest_ignores_direction(rows, speed, quality, floor, higher_is_better=True):
    return ref.fastest_meeting(rows, speed, quality, floor, True)


def fastest_best_quality(rows, speed, quality, floor, higher_is_better=True):
    ok = [r for r in rows if (r[quality] >= floor if higher_is_better else r[quality] <= floor)]
    sign = 1 if higher_is_better else -1
    return max(ok, key=lambda r: sign * r[quality]) if ok else None


def fastest_first_meeting(rows, speed, quality, floor, higher_is_better=True):
    return next((r for r in rows if (r[quality] >= floor if higher_is_better else r[quality] <= floor)), None)


def fastest_last_on_tie(rows, speed, quality, floor, higher_is_better=True):
    best = None
    for r in rows:
        if (r[quality] >= floor if higher_is_better else r[quality] <= floor) and (
                best is None or r[speed] >= best[speed]):
            best = r
    return best


def fastest_sorts_rows_in_place(rows, speed, quality, floor, higher_is_better=True):
    rows.sort(key=lambda r: r[speed], reverse=True)  # reorders the caller's table
    return next((r for r in rows if (r[quality] >= floor if higher_is_better else r[quality] <= floor)), None)


def test_fastest_rejects_wrong_answers():
    msg = assert_fails(ch07.fastest_meeting, fastest_strict_floor, contains="met exactly")
    assert "a row exactly at the floor was refused" in msg
    msg = assert_fails(ch07.fastest_meeting, fastest_ignores_direction, contains="lower is better")
    assert "treats the floor as a minimum" in msg
    assert_fails(ch07.fastest_meeting, fastest_best_quality, contains="the row of best quality among those meeting")
    assert_fails(ch07.fastest_meeting, fastest_first_meeting, contains="the first row in table order")
    assert_fails(ch07.fastest_meeting, fastest_last_on_tie, contains="the earlier row wins a tie")
    assert_fails(ch07.fastest_meeting, fastest_sorts_rows_in_place, contains="changed its argument `rows`")


# correct answers in other styles (third audit): each must pass --------------------------------------------


def pipeline_clamped(model, tokenizer, classes, *, cfg=0.0, generator=None):
    with torch.no_grad():
        pyramid = sample_pyramid(model, tokenizer.quantizer, classes, sampling=SamplingConfig(), cfg=cfg, ramp=True,
                                 generator=generator)
        return tokenizer.decode_from_indices(pyramid).clamp(0, 1).to(torch.float32).to("cpu")


def pipeline_without_no_grad(model, tokenizer, classes, *, cfg=0.0, generator=None):
    pyramid = sample_pyramid(model, tokenizer.quantizer, classes, cfg=cfg, generator=generator)
    return tokenizer.decode_from_indices(pyramid).detach().cpu().float()


def pipeline_in_inference_mode(model, tokenizer, classes, *, cfg=0.0, generator=None):
    device = next(model.parameters()).device
    with torch.inference_mode():
        pyramid = sample_pyramid(model, tokenizer.quantizer, classes.to(device), cfg=cfg, generator=generator)
        images = tokenizer.decode_from_indices(pyramid)
    return images.to(device="cpu", dtype=torch.float32)


def guidance_by_linspace(w, method, num_steps, ramp=True):
    if method not in ("ar", "var"):
        raise ValueError(f"unknown method {method!r}")
    ramped = method == "var" and ramp and num_steps > 1
    t = np.linspace(0, w, num_steps) if ramped else np.full(num_steps, float(w))
    return [(1 + x, -x) for x in t]


def guidance_as_tensor(w, method, num_steps, ramp=True):
    if method not in {"ar", "var"}:
        raise ValueError("method must be 'ar' or 'var'")
    k = torch.arange(num_steps, dtype=torch.float64)
    if method == "var" and ramp and num_steps > 1:
        t = w * k / (num_steps - 1)
    else:
        t = torch.full((num_steps,), float(w), dtype=torch.float64)
    return torch.stack([1 + t, -t], 1)


def guidance_by_float32_linspace(w, method, num_steps, ramp=True):
    """float32 strengths (torch.linspace's default dtype): right to float32 precision."""
    if method not in ("ar", "var"):
        raise ValueError(f"unknown method {method!r}")
    t = torch.linspace(0, w, num_steps) if method == "var" and ramp and num_steps > 1 else torch.full((num_steps,), w)
    return [(1 + x, -x) for x in t]


def guidance_by_library_strength(w, method, num_steps, ramp=True):
    if method == "ar":
        return [(1 + w, -w)] * num_steps
    if method == "var":
        return [(1 + t, -t) for t in (guidance_strength(w, k, num_steps, ramp=ramp) for k in range(num_steps))]
    raise ValueError(method)


def backend_by_branches(device_type, available, requested="auto"):
    if requested == "auto":
        if device_type != "cuda":
            return "torch"
        return "triton" if "triton" in available else "numba" if "numba" in available else "torch"
    if requested == "torch":
        return "torch"
    if requested in ("triton", "numba"):
        if requested in available:
            return requested
        raise RuntimeError(f"{requested} is not available")
    raise ValueError(f"unknown request {requested!r}")


def backend_by_preference_list(device_type, available, requested="auto"):
    preference = {"cuda": ["triton", "numba", "torch"]}.get(device_type, ["torch"])
    if requested == "auto":
        return next(b for b in preference if b == "torch" or b in available)
    if requested not in ("torch", "triton", "numba"):
        raise ValueError(requested)
    if requested != "torch" and requested not in sorted(available):
        raise RuntimeError(requested)
    return requested


def backend_by_table(device_type, available, requested="auto"):
    if requested not in {"auto", "torch", "triton", "numba"}:
        raise ValueError(f"unknown backend request {requested!r}")
    usable = {"torch"} | set(available)
    if requested != "auto":
        if requested not in usable:
            raise RuntimeError(f"{requested} cannot run on {device_type}")
        return requested
    ranking = ("triton", "numba", "torch") if device_type == "cuda" else ("torch",)
    return min((b for b in ranking if b in usable), key=ranking.index)


def batches_by_split(generate_fn, classes, batch_size):
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    return torch.cat([generate_fn(chunk) for chunk in classes.split(batch_size)])


def batches_by_while(generate_fn, classes, batch_size):
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    out, i = [], 0
    while i < len(classes):
        out.append(generate_fn(classes[i:i + batch_size]))
        i += batch_size
    return torch.cat(out, 0)


def batches_by_tensor_split(generate_fn, classes, batch_size):
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    cuts = list(range(batch_size, len(classes), batch_size))
    return torch.cat([generate_fn(chunk) for chunk in torch.tensor_split(classes, cuts)])


def batches_preallocated(generate_fn, classes, batch_size):
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    out = None
    for begin in range(0, classes.numel(), batch_size):
        images = generate_fn(classes[begin:begin + batch_size])
        if out is None:
            out = images.new_empty((classes.numel(), *images.shape[1:]))
        out[begin:begin + images.shape[0]] = images
    return out


def accounting_by_numpy(chunk_images, chunk_passes, chunk_seconds):
    n, p, s = np.array(chunk_images), np.array(chunk_passes), np.array(chunk_seconds)
    return {"images": int(n.sum()), "forward_passes": int(p.sum()),
            "passes_per_image": float(np.average(p, weights=n)), "images_per_second": float(n.sum() / s.sum())}


def accounting_by_float64_tensors(chunk_images, chunk_passes, chunk_seconds):
    n, p, s = (torch.tensor(v, dtype=torch.float64) for v in (chunk_images, chunk_passes, chunk_seconds))
    return {"images": n.sum(), "forward_passes": p.sum(), "passes_per_image": (n * p).sum() / n.sum(),
            "images_per_second": n.sum() / s.sum()}


def accounting_by_running_totals(chunk_images, chunk_passes, chunk_seconds):
    totals = {"images": 0, "forward_passes": 0}
    weighted, seconds = 0, 0.0
    for n, p, s in zip(chunk_images, chunk_passes, chunk_seconds):
        totals["images"] += n
        totals["forward_passes"] += p
        weighted += n * p
        seconds += s
    return {**totals, "passes_per_image": weighted / totals["images"], "images_per_second": totals["images"] / seconds}


def front_by_signs(rows, objectives):
    sign = {k: 1 if v == "max" else -1 for k, v in objectives.items()}

    def dominates(a, b):
        return all(sign[k] * a[k] >= sign[k] * b[k] for k in sign) and any(sign[k] * a[k] > sign[k] * b[k]
                                                                           for k in sign)

    return [b for b in rows if not any(dominates(a, b) for a in rows if a is not b)]


def front_by_matrices(rows, objectives):
    if not rows:
        return []
    m = np.array([[r[k] * (1 if s == "max" else -1) for k, s in objectives.items()] for r in rows])
    dominated = ((m[:, None] >= m[None]).all(-1) & (m[:, None] > m[None]).any(-1)).any(0)
    return [r for r, d in zip(rows, dominated) if not d]


def front_of_copies_as_tuple(rows, objectives):
    out = []
    for i, b in enumerate(rows):
        beaten = False
        for j, a in enumerate(rows):
            better = [(a[k] > b[k]) if s == "max" else (a[k] < b[k]) for k, s in objectives.items()]
            worse = [(a[k] < b[k]) if s == "max" else (a[k] > b[k]) for k, s in objectives.items()]
            beaten = beaten or (i != j and any(better) and not any(worse))
        if not beaten:
            out.append(dict(b))
    return tuple(out)


def fastest_by_max_default(rows, speed, quality, floor, higher_is_better=True):
    ok = [r for r in rows if (r[quality] >= floor if higher_is_better else r[quality] <= floor)]
    return max(ok, key=lambda r: r[speed], default=None)


def fastest_by_stable_sort(rows, speed, quality, floor, higher_is_better=True):
    sign = 1 if higher_is_better else -1
    ok = sorted((r for r in rows if sign * (r[quality] - floor) >= 0), key=lambda r: -r[speed])
    return ok[0] if ok else None


def fastest_by_min_of_tuples(rows, speed, quality, floor, higher_is_better=True):
    sign = 1 if higher_is_better else -1
    ok = [(-r[speed], i, r) for i, r in enumerate(rows) if sign * r[quality] >= sign * floor]
    return min(ok)[2] if ok else None


CORRECT_ALTERNATIVES = {
    "var_pipeline": [pipeline_clamped, pipeline_without_no_grad, pipeline_in_inference_mode],
    "guidance_weights": [guidance_by_linspace, guidance_as_tensor, guidance_by_float32_linspace,
                         guidance_by_library_strength],
    "choose_backend": [backend_by_branches, backend_by_preference_list, backend_by_table],
    "generate_in_batches": [batches_by_split, batches_by_while, batches_by_tensor_split, batches_preallocated],
    "generation_accounting": [accounting_by_numpy, accounting_by_float64_tensors, accounting_by_running_totals],
    "pareto_front": [front_by_signs, front_by_matrices, front_of_copies_as_tuple],
    "fastest_meeting": [fastest_by_max_default, fastest_by_stable_sort, fastest_by_min_of_tuples],
}


@pytest.mark.parametrize("name,index", [(n, i) for n, fns in CORRECT_ALTERNATIVES.items() for i in range(len(fns))])
def test_correct_answers_in_other_styles_pass(name, index):
    assert_passes(getattr(ch07, name), CORRECT_ALTERNATIVES[name][index])


# wrong answers of kinds the earlier audits did not try (third audit) ---------------------------------------


def test_fastest_rejects_a_strict_floor_only_when_lower_is_better():
    def strict_when_lower(rows, speed, quality, floor, higher_is_better=True):
        ok = [r for r in rows if (r[quality] >= floor if higher_is_better else r[quality] < floor)]
        return max(ok, key=lambda r: r[speed], default=None)

    msg = assert_fails(ch07.fastest_meeting, strict_when_lower, contains="Frechet <= 2.4 (met exactly)")
    assert "a row exactly at the floor was refused" in msg  # not the best quality, which is the same row here
