"""Ranger: RAdam + Lookahead + gradient centralisation (the optimizer of pSp, Style Transformer, RefineStyle).

One step for a parameter x with gradient g (all moments in float32):

    g      <- g - mean of g over all but the first dimension      (gradient centralisation, ndim >= 2)
    m, v   <- Adam's first and second moments (betas), t = step count
    rho_t  =  rho_inf - 2 t b2^t / (1 - b2^t),   rho_inf = 2 / (1 - b2) - 1
    if rho_t > threshold (the variance of the adaptive rate is tractable):
        x  <- x - lr * r_t * m_hat / (sqrt(v_hat) + eps)          (RAdam's rectified step)
    else (the first few steps, t <= 5 for b2 = 0.999), by `warmup`:
        "normalized": x <- x - lr * r_0 * m_hat / rms(m_hat)       (default)
        "sgd":        x <- x - lr * m_hat                          (original RAdam/Ranger)
        "skip":       x unchanged
    every k steps (Lookahead): slow <- slow + alpha (x - slow);  x <- slow

Why the default warm-up differs from Ranger's: the original takes a plain SGD-with-momentum
step of size lr * |g| while the adaptive rate is not tractable. Its size depends on the
scale of the loss, so with steep losses (large gradients) the first steps overshoot and go
uphill, and with flat ones they do nothing. The "normalized" warm-up keeps the momentum's
direction (a descent direction) but sets its per-tensor RMS to lr * r_0, where r_0 is the
rectification factor of the first tractable step (about 0.026 for b2 = 0.999): the warm-up
steps are as small as the first rectified steps that follow them, whatever the loss scale.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

__all__ = ["Ranger"]

WARMUP_MODES = ("normalized", "sgd", "skip")


def _rho(step: int, beta2: float) -> float:
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = beta2**step
    return rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)


def _rectification(rho_t: float, beta2: float) -> float:
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


def _first_rectification(beta2: float, threshold: float) -> float:
    """r_t at the first step whose rho_t exceeds the threshold."""
    step = 1
    while _rho(step, beta2) <= threshold:
        step += 1
        if step > 100_000:  # only reachable with beta2 ~ 1 - 1e-5 or closer and a huge threshold
            raise ValueError(f"betas[1]={beta2} never makes the adaptive rate tractable for threshold {threshold}")
    return _rectification(_rho(step, beta2), beta2)


class Ranger(Optimizer):
    """RAdam with Lookahead and gradient centralisation.

    params: iterable of parameters or parameter-group dicts.
    lr: learning rate (the paper: 1e-4 one-stage, 1e-3 two-stage inverters).
    betas: Adam's (beta1, beta2); Ranger's defaults (0.95, 0.999).
    eps: added to sqrt(v_hat) (Ranger: 1e-5).
    weight_decay: decoupled weight decay, x <- x - lr * weight_decay * x each step.
    lookahead_steps, lookahead_alpha: Lookahead's k (6) and alpha (0.5).
    rectify_threshold: rho_t above which RAdam's rectified step is used (5).
    warmup: the step while rho_t <= threshold: "normalized" (default), "sgd" or "skip"
        (see the module docstring).
    use_gc: subtract the gradient's mean over all but the first dimension for parameters
        with at least `gc_min_ndim` dimensions (linear and conv weights; 2 by default).
    The state (moments, step counts, Lookahead's slow weights) lives in `state_dict()`, so
    a run resumes exactly. Sparse gradients are not supported.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        *,
        lookahead_steps: int = 6,
        lookahead_alpha: float = 0.5,
        rectify_threshold: float = 5.0,
        warmup: str = "normalized",
        use_gc: bool = True,
        gc_min_ndim: int = 2,
    ):
        if not lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 < betas[1] < 1.0):
            raise ValueError(f"betas: expected 0 <= beta1 < 1 and 0 < beta2 < 1, got {betas}")
        if not eps > 0:
            raise ValueError(f"eps: expected a positive value, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
        if not isinstance(lookahead_steps, int) or lookahead_steps < 1:
            raise ValueError(f"lookahead_steps: expected a positive integer, got {lookahead_steps!r}")
        if not 0.0 < lookahead_alpha <= 1.0:
            raise ValueError(f"lookahead_alpha: expected 0 < alpha <= 1, got {lookahead_alpha}")
        if warmup not in WARMUP_MODES:
            raise ValueError(f"warmup: expected one of {WARMUP_MODES}, got {warmup!r}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            lookahead_steps=lookahead_steps,
            lookahead_alpha=lookahead_alpha,
            rectify_threshold=rectify_threshold,
            warmup=warmup,
            use_gc=use_gc,
            gc_min_ndim=gc_min_ndim,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Take one optimisation step; `closure` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            first_rectification = _first_rectification(beta2, group["rectify_threshold"])
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("Ranger does not support sparse gradients")
                grad = param.grad.detach().float()
                if group["use_gc"] and grad.ndim >= group["gc_min_ndim"]:
                    grad = grad - grad.mean(dim=tuple(range(1, grad.ndim)), keepdim=True)

                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                    state["slow"] = param.detach().float().clone()
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

                value = param.detach().float()
                if group["weight_decay"]:
                    value.mul_(1 - lr * group["weight_decay"])
                momentum = exp_avg / (1 - beta1**step)
                rho_t = _rho(step, beta2)
                if rho_t > group["rectify_threshold"]:
                    denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
                    value.addcdiv_(momentum, denom, value=-lr * _rectification(rho_t, beta2))
                elif group["warmup"] == "sgd":
                    value.add_(momentum, alpha=-lr)
                elif group["warmup"] == "normalized":
                    rms = momentum.square().mean().sqrt()
                    if rms > 0:
                        value.add_(momentum / rms, alpha=-lr * first_rectification)
                # warmup == "skip": only the moments move.

                if step % group["lookahead_steps"] == 0:
                    slow = state["slow"]
                    slow.add_(value - slow, alpha=group["lookahead_alpha"])
                    value.copy_(slow)
                param.copy_(value)
        return loss
