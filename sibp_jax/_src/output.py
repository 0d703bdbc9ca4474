"""The step on the output neurons: explicit, or proximal (implicit).

SIBP moves the logits ``z`` of every example to a target ``t`` and fits the
layers to it. The paper's step is explicit, ``t = z - η e`` with
``e = ∂ℓ/∂z``: it moves the logits by up to ``η ‖e‖`` whatever the loss
does along the way, so for large ``η`` the targets overshoot (softmax
cross-entropy: overconfident logits; squared error: ``t = z - 2η(z - y)``
flips past ``y`` for ``η > 1/2``). The proximal step is the implicit one::

    t = argmin_t ℓ(t) + ‖t - z‖² / (2η)      ⇔     t = z - η ∇ℓ(t),

which never overshoots: for squared error ``t = (z + 2ηy) / (1 + 2η)``,
for softmax cross-entropy it moves the logits by ``O(log η)``. The sweep
takes the step through the equivalent output error ``e' = (z - t) / η``
(``t = z - η e'``), which tends to ``e`` as ``η → 0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Newton's method on the per-example prox objective: a few iterations for
# the usual step sizes (the first step is already exact for a quadratic
# loss), more for huge ones, where the damped steps cross the loss's flat
# region. The loop stops when every example has converged.
_MAX_NEWTON = 100
_MAX_HALVINGS = 40


def proximal_error(loss_fn, logits, labels, learning_rate):
  """The output error ``e' = (z - t) / η`` of the proximal output step.

  Args:
    loss_fn: ``loss_fn(logits, labels)``, one loss per example (the one
      given to ``value_grad_and_problems``); it must be twice
      differentiable in the logits.
    logits: ``z``, shape ``(B, C)`` (or ``(B, ..., C)``: every leading
      position is an example).
    labels: the labels of the batch, leading axis ``B``.
    learning_rate: ``η > 0`` (a scalar, traced or not).

  Returns:
    ``e'``, shaped like ``logits``, with ``t = z - η e'`` the minimizer of
    ``ℓ(t) + ‖t - z‖²/(2η)`` per example (to float round-off, by damped
    Newton steps from ``t = z``).
  """
  z = logits
  batch = z.shape[0]
  flat = z.reshape(batch, -1)
  dtype = flat.dtype
  eta = jnp.asarray(learning_rate, dtype)

  def loss_b(t, y):
    return loss_fn(t.reshape(z.shape[1:])[None], y[None])[0].astype(dtype)

  # In the step w = t - z, scaled by η so that huge η stays well conditioned:
  #   η·h(w) = η ℓ(z + w) + ½‖w‖²,  gradient η∇ℓ + w,  Hessian η∇²ℓ + I.
  def objective(w, zb, y):
    return eta * loss_b(zb + w, y) + 0.5 * jnp.vdot(w, w)

  grad = jax.grad(objective)
  hess = jax.hessian(objective)

  def newton(w, zb, y):
    g = grad(w, zb, y)
    d = jnp.linalg.solve(hess(w, zb, y), -g)
    slope = jnp.vdot(g, d)
    # A loss that is not convex there can make the Newton direction an
    # ascent one: take the (scaled) gradient step instead.
    d = jnp.where(slope < 0, d, -g)
    slope = jnp.where(slope < 0, slope, -jnp.vdot(g, g))
    h0 = objective(w, zb, y)

    def not_yet(c):
      alpha, k = c
      trial = objective(w + alpha * d, zb, y)
      ok = jnp.isfinite(trial) & (trial <= h0 + 1e-4 * alpha * slope)
      return (~ok) & (k < _MAX_HALVINGS)

    alpha, k = jax.lax.while_loop(
        not_yet, lambda c: (0.5 * c[0], c[1] + 1),
        (jnp.ones((), dtype), jnp.zeros((), jnp.int32)))
    alpha = jnp.where(k < _MAX_HALVINGS, alpha, 0.0)
    step = alpha * d
    small = jnp.linalg.norm(step) <= 1e-4 * (1.0 + jnp.linalg.norm(w))
    return w + step, small

  def cond(c):
    _, done, i = c
    return (~jnp.all(done)) & (i < _MAX_NEWTON)

  def body(c):
    w, done, i = c
    w_new, small = jax.vmap(newton)(w, flat, labels)
    # A converged example keeps its point: a further Newton step there is
    # round-off.
    w = jnp.where(done[:, None], w, w_new)
    return w, done | small, i + 1

  w, _, _ = jax.lax.while_loop(
      cond, body, (jnp.zeros_like(flat), jnp.zeros((batch,), bool),
                   jnp.zeros((), jnp.int32)))
  return (-w / eta).reshape(z.shape)
