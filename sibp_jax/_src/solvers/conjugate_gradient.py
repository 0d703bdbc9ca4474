"""Matrix-free conjugate gradient on the ridge subproblem's normal equations."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sibp_jax._src import kinds
from sibp_jax._src.solvers import base


@dataclasses.dataclass(frozen=True)
class ConjugateGradient:
  r"""At most ``iterations`` conjugate-gradient steps, matrix-free.

  Runs CG on ``(AᵀA + Λ) Δ = AᵀR`` from ``Δ = 0``, i.e. warm-started at the
  old parameters (ProxBP's "prox_cgN"), applying ``A`` and ``Aᵀ`` through the
  layer's own map and its transpose, so no design matrix is formed. With as
  many steps as unknowns it reaches the exact solution in exact arithmetic;
  a few steps already capture the dominant directions.

  The defaults are the ProxBP authors' ``prox_cgN``. For a dense layer the
  normal equations split into one independent system per output unit (a
  column of ``[W; b]``), and their "matrix version" runs one CG per column
  in parallel, each with its own step and conjugation weights:

  .. math::

     α_j = \frac{‖r_j‖²}{p_jᵀ M p_j + ε},\qquad
     β_j = \frac{‖r_j^{new}‖²}{‖r_j‖² + ε},

  stopping early once ``max_j ‖r_j‖² < tol² · mean_j ‖r_j^{(0)}‖²`` (checked
  after each step but the last). A convolution's kernel mixes its output
  channels' systems in no way either, but the authors run one CG over the
  whole layer there (``blocks='layer'``), as does this solver by default.
  Their code starts the first direction on the residual's storage, so its
  in-place residual update also rewrites the direction in the first step
  and the second direction is ``(1 + β) r`` instead of a conjugate one; this
  solver takes the direction as a copy, as CG intends.

  Attributes:
    iterations: the most CG steps (static, ≥ 1).
    blocks: ``'auto'`` (default: per output unit for :class:`sibp_jax.Dense`,
      one for the whole layer otherwise, as the authors), ``'columns'`` or
      ``'layer'`` (static).
    eps: ``ε``, added to both denominators (default ``1e-6``, the
      authors'; 0 for textbook CG). It is absolute, in the units of
      ``pᵀ(AᵀA + Λ)p`` and ``‖r‖²``, i.e. of the data term summed over the
      batch.
    tol: relative tolerance of the early exit (default ``1e-2``, the
      authors'; 0 to always run ``iterations`` steps). The status is
      ``CONVERGED`` when the exit's test passed (or the residual vanished),
      else ``MAX_ITERATIONS``: the authors' ``prox_cg3`` usually stops at
      its limit (:class:`sibp_jax.SolveStatus`).

  Example:
    >>> import optax, sibp_jax
    >>> tx = sibp_jax.proxbp(1.0, solver=sibp_jax.ConjugateGradient(3))
  """

  iterations: int = 3
  blocks: str = 'auto'
  eps: float = 1e-6
  tol: float = 1e-2

  def __post_init__(self):
    if not isinstance(self.iterations, int) or self.iterations < 1:
      raise ValueError('ConjugateGradient(iterations=...) must be an int '
                       f'≥ 1, got {self.iterations!r}')
    if self.blocks not in ('auto', 'columns', 'layer'):
      raise ValueError("ConjugateGradient(blocks=...) must be 'auto', "
                       f"'columns' or 'layer', got {self.blocks!r}")
    for name in ('eps', 'tol'):
      v = getattr(self, name)
      if not (isinstance(v, (int, float)) and 0 <= v < float('inf')):
        raise ValueError(f'ConjugateGradient({name}=...) must be a finite '
                         f'number ≥ 0, got {v!r}')

  def columnwise(self, kind) -> bool:
    """Whether this solver runs one CG per output unit for a layer kind."""
    if self.blocks == 'auto':
      return isinstance(kind, kinds.Dense)
    return self.blocks == 'columns'

  def solve(self, p: base.RidgeProblem) -> tuple[base.Delta, base.SolveInfo]:
    """Returns ``((ΔW, Δb), SolveInfo)``; fixed blocks are ``None``."""
    def normal(d):
      return jax.tree.map(jnp.add, p.transpose(p.apply(d)), p.scale(d))

    if self.columnwise(p.kind):
      # Every leaf ends in the output axis: sum over the others.
      def dot(a, b):
        return sum(jnp.sum(x * y, axis=tuple(range(x.ndim - 1)))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                   strict=True))
    else:
      dot = base.tree_vdot

    def axpy(coef, a, b):  # coef * a + b, coef per column or scalar
      return jax.tree.map(lambda x, y: coef * x + y, a, b)

    rhs = p.transpose(p.residual)
    x = jax.tree.map(jnp.zeros_like, rhs)
    rr0 = dot(rhs, rhs)
    dtype = rr0.dtype
    eps = jnp.asarray(self.eps, dtype)
    # The authors' early exit, relative to the mean initial residual. (A zero
    # right-hand side never passes the strict test, and stays at Δ = 0.)
    threshold = jnp.asarray(self.tol, dtype) ** 2 * jnp.mean(rr0)

    def step(carry):
      k, x, r, d, rr, _ = carry
      nd = normal(d)
      curvature = dot(d, nd) + eps
      # With ε = 0 a vanished residual makes 0 / 0: stay put there.
      alpha = jnp.where(curvature > 0, rr / jnp.where(curvature > 0,
                                                      curvature, 1.0), 0.0)
      x = axpy(alpha, d, x)
      r = axpy(-alpha, nd, r)
      rr_new = dot(r, r)
      done = jnp.max(rr_new) < threshold
      den = rr + eps
      beta = jnp.where(den > 0, rr_new / jnp.where(den > 0, den, 1.0), 0.0)
      d = axpy(beta, d, r)
      return k + 1, x, r, d, rr_new, done

    carry = (jnp.zeros((), jnp.int32), x, rhs, rhs, rr0,
             jnp.zeros((), bool))
    if kinds.unroll_loops(p.kind):
      # XLA:CPU runs convolutions far slower inside a loop body (see
      # unroll_loops): unroll, freezing the state once the exit fires
      # (tol = 0 never exits: no freezing to compile).
      for _ in range(self.iterations):
        new = step(carry)
        carry = new if self.tol == 0 else jax.tree.map(
            lambda a, b, done=carry[-1]: jnp.where(done, a, b), carry, new)
    else:
      carry = jax.lax.while_loop(
          lambda c: (c[0] < self.iterations) & ~c[-1], step, carry)
    k, x, _, _, rr, done = carry
    # Converged: the early exit's test passed, or nothing was left to solve
    # (a zero right-hand side never passes the strict test).
    converged = done | (jnp.max(rr) <= 0)
    info = base.SolveInfo(k, base.ratio(jnp.sqrt(jnp.sum(rr)),
                                        jnp.sqrt(jnp.sum(rr0))),
                          base.status_of(converged, x))
    return x, info

