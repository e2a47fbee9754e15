"""The plain pieces of a flow-matching head (rectified flow, "Flow Straight and Fast" / "Flow Matching for
Generative Modeling"), as NextStep-1 and FlowAR put one on top of an autoregressive transformer; chapter 10's
exercises are checked against them.

Convention: time runs from noise to data. ``x0`` is noise, ``x1`` the data, ``x_t = (1 - t) x0 + t x1`` and the
velocity to learn is ``d x_t / dt = x1 - x0``. Sampling integrates ``dx/dt = v(x, t)`` from ``t = 0`` (noise) to
``t = 1`` (a sample).
"""

from __future__ import annotations

from typing import Callable

import torch

from ar_course.sampling import cfg_mix, check_generator
from ar_course.utils import check_int


def _check_pair(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> None:
    if not all(isinstance(a, torch.Tensor) for a in (x0, x1, t)):
        raise TypeError("x0, x1 and t must be tensors")
    if x0.shape != x1.shape or x1.ndim != 2:
        raise ValueError(f"x0 and x1 must be (N, D) of one shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    if t.shape != x1.shape[:1]:
        raise ValueError(f"t must be (N,) = ({x1.shape[0]},), got {tuple(t.shape)}")
    for name, value in (("x0", x0), ("x1", x1), ("t", t)):
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")


def _check_velocity(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v``, what a velocity function returned, if it is a tensor of ``like``'s shape (no broadcasting)."""
    if not isinstance(v, torch.Tensor) or v.shape != like.shape:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"velocity must return a {tuple(like.shape)} tensor, got {got}")
    return v


def flow_matching_pair(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rectified-flow training pair of noise ``x0`` ``(N, D)``, data ``x1`` ``(N, D)`` and times ``t`` ``(N,)``
    in [0, 1]: ``(x_t, target)`` with ``x_t = (1 - t) x0 + t x1`` and the velocity ``target = x1 - x0``, each
    ``(N, D)``."""
    _check_pair(x0, x1, t)
    tt = t[:, None]  # (N, 1), broadcast over the channels
    return (1 - tt) * x0 + tt * x1, x1 - x0


def flow_matching_loss(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x1: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean squared error between ``velocity(x_t, t)`` ``(N, D)`` and ``x1 - x0`` for data ``x1`` ``(N, D)``, with
    noise ``x0 ~ N(0, I)`` and ``t ~ U[0, 1)`` drawn from ``generator`` (torch's global one when ``None``), or
    given as ``noise = (x0 (N, D), t (N,))``.

    Raises:
        TypeError: ``x1`` is not a tensor, or ``noise`` not ``None`` nor a pair of tensors.
        ValueError: ``x1`` not a non-empty float ``(N, D)`` tensor, ``noise`` of other shapes, or ``velocity``
            returning a tensor that is not ``(N, D)`` (it would broadcast into a wrong loss).
    """
    if not isinstance(x1, torch.Tensor):
        raise TypeError(f"x1 must be a (N, D) tensor, got {type(x1).__name__}")
    if x1.ndim != 2 or not x1.is_floating_point() or x1.numel() == 0:
        raise ValueError(f"x1 must be a non-empty float (N, D) tensor, got {tuple(x1.shape)} {x1.dtype}")
    check_generator(generator)
    if noise is None:
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)  # (N, D)
        t = torch.rand(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)  # (N,)
    else:
        if not isinstance(noise, (tuple, list)) or len(noise) != 2 \
                or not all(isinstance(a, torch.Tensor) for a in noise):
            got = ("(" + ", ".join(type(a).__name__ for a in noise) + ("," if len(noise) == 1 else "") + ")"
                   if isinstance(noise, (tuple, list)) else type(noise).__name__)
            raise TypeError(f"noise must be None or a pair of tensors (x0 {tuple(x1.shape)}, t {tuple(x1.shape[:1])}), "
                            f"got {got}")
        x0, t = noise
        if x0.shape != x1.shape or t.shape != x1.shape[:1]:
            raise ValueError(f"noise must be (x0 {tuple(x1.shape)}, t {tuple(x1.shape[:1])}), got "
                             f"({tuple(x0.shape)}, {tuple(t.shape)})")
    x_t, target = flow_matching_pair(x0, x1, t)
    return (_check_velocity(velocity(x_t, t), target) - target).pow(2).mean()


def euler_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` from ``x0`` ``(N, D)`` at ``t = 0`` to ``t = 1`` in ``steps`` Euler steps
    of size ``1 / steps``: step ``i`` evaluates the velocity at ``t = i / steps`` (a ``(N,)`` tensor) and moves
    ``x`` by ``velocity / steps``. Returns ``(N, D)``. ``ValueError`` for ``steps < 1`` or a velocity that is not
    ``x0``'s shape or an ``x0`` that is not a float ``(N, D)`` tensor."""
    if not isinstance(x0, torch.Tensor) or x0.ndim != 2 or not x0.is_floating_point():
        got = f"{tuple(x0.shape)} {x0.dtype}" if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a float (N, D) tensor, got {got}")
    steps = check_int("steps", steps, lo=1)
    x = x0
    for i in range(steps):
        t = torch.full((x.shape[0],), i / steps, device=x.device, dtype=x.dtype)  # (N,)
        x = x + _check_velocity(velocity(x, t), x) / steps
    return x


def guided_velocity(
    head: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    w: float,
) -> torch.Tensor:
    """Classifier-free guidance on velocities: ``(1 + w) * head(x, t, cond) - w * head(x, t, uncond)``, ``(N, D)``.

    ``x`` ``(N, D)``, ``t`` ``(N,)``, ``cond`` / ``uncond`` ``(N, C)`` (the conditions of the class and of the null
    class); the head runs once on the doubled batch. ``w = 0`` is the conditional velocity
    (:func:`~ar_course.sampling.cfg_mix`, which mixes half precision in float32); returned in the head's dtype,
    so that a bfloat16 model's next Euler step feeds it bfloat16 again."""
    v = head(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]))  # (2N, D)
    v_cond, v_uncond = v.chunk(2)  # 2 x (N, D)
    return cfg_mix(v_cond, v_uncond, w).to(v.dtype)
