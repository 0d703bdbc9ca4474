"""Fletcher–Reeves nonlinear conjugate gradient, the SIBP paper's solver."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sibp_jax._src.solvers import base

PRECISION = base.PRECISION


@dataclasses.dataclass(frozen=True)
class NonlinearCG:
  r"""Fletcher–Reeves nonlinear conjugate gradient with Armijo backtracking.

  Minimizes a smooth objective ``φ ≥ 0`` (a least-squares fit plus a
  proximal term) from a warm start ``x₀`` in a fixed number of iterations.
  Each iteration takes the direction ``d = -∇φ + β d_prev`` with
  ``β = ‖∇φ‖² / ‖∇φ_prev‖²`` and backtracks over powers of ``ρ``: it accepts
  the first ``α = ρ^m``, ``m = m₀, m₀ + 1, …`` with

  .. math::

     φ(x + α d) < φ(x) + σ α ∇φ·d ,\qquad
     m₀ = \max\Big(\Big\lfloor \frac{\log(c\, φ(x) / (σ |∇φ·d|))}
                              {\log ρ} \Big\rfloor, 0\Big),

  i.e. the first trial ``α₀ = ρ^{m₀}`` is the largest power of ``ρ``, at
  most 1, whose sufficient-decrease term ``σ α₀ |∇φ·d|`` is at least
  ``c = initial_decrease`` times ``φ(x)`` (its predicted decrease
  ``α₀ |∇φ·d|`` is then about ``c/σ = 10%`` of ``φ``). If no trial is
  accepted the point is kept, so the objective never increases.

  These are the SIBP authors' settings and rule for the hidden layers (their
  ``FR3``; docs/algorithms.md section 1), with their code's two slips in it
  fixed as the rule intends: a trial accepted at ``m = 0`` is taken (their
  code only moves for ``m > 0``), and the trials run ``m₀, m₀ + 1, …`` in
  order (their code first evaluates ``α = 1`` and, depending on it, takes
  ``ρ^{m₀}`` unchecked or skips ``m₀``). Their last layer (``FR4``) runs the
  same iteration with ``m₀ = 0``; :func:`sibp_jax.sibp` solves that linear
  layer exactly instead (``last_layer_solver``).

  Two deviations, both documented choices: when ``d`` is not a descent
  direction (``∇φ·d ≥ 0``, possible for Fletcher–Reeves with an inexact
  line search) this restarts from ``d = -∇φ`` where the authors' code would
  search along an ascent direction; and at most ``max_shrinks`` shrinks
  follow the first trial, where the authors bound the exponent itself
  (``m < 50``). The two bounds differ only when more than ``50 - m₀`` trials
  in a row fail, i.e. for steps below ``ρ^50 ≈ 8e-12``.

  Attributes:
    iterations: outer iterations ``K`` (static, ≥ 1; default 5).
    shrink: backtracking factor ``ρ`` in (0, 1) (default 0.6).
    sufficient_decrease: Armijo constant ``σ`` in (0, 1) (default 0.1).
    max_shrinks: most backtracking steps after the first trial (static;
      default 50).
    initial_decrease: ``c`` above, the first trial's sufficient-decrease
      term as a fraction of the objective (default 0.01, the authors').
    space: where the SIBP paper variant runs a hidden layer's kernel fit
      (static): ``'auto'`` (default) takes row space
      (:meth:`minimize_in_row_space`) when the layer has fewer rows than
      kernel inputs and the rows are not sharded in the arrays' type, else
      the kernel's own space; ``'parameters'`` always the latter. Row space
      pairs every example with every other (``F Fᵀ``), so under automatic
      (GSPMD) sharding of the batch, whose traced types do not show it,
      pass ``'parameters'`` (as ``Ridge('cholesky')`` for the exact
      solves).
    tol: the relative gradient norm ``‖∇φ‖ / ‖∇φ(x₀)‖`` at or below which
      the status is ``CONVERGED`` (default ``1e-2``); above it,
      ``MAX_ITERATIONS``. It only classifies the result: the solver always
      runs its ``iterations`` (the authors' rule), so the paper variant's
      five iterations on a hidden layer usually end at the limit.

  Example:
    >>> import jax.numpy as jnp, sibp_jax
    >>> objective = lambda x: jnp.sum((x - 3.0) ** 2)
    >>> x, info = sibp_jax.NonlinearCG().minimize(objective, jnp.zeros(4))
    >>> bool(objective(x) < objective(jnp.zeros(4)))
    True
    >>> int(info.iterations)  # evaluations: start, trials, end points
    11
  """

  iterations: int = 5
  shrink: float = 0.6
  sufficient_decrease: float = 0.1
  max_shrinks: int = 50
  initial_decrease: float = 0.01
  space: str = 'auto'
  tol: float = 1e-2

  def __post_init__(self):
    if not isinstance(self.iterations, int) or self.iterations < 1:
      raise ValueError('NonlinearCG(iterations=...) must be an int ≥ 1, got '
                       f'{self.iterations!r}')
    if not isinstance(self.max_shrinks, int) or self.max_shrinks < 0:
      raise ValueError('NonlinearCG(max_shrinks=...) must be an int ≥ 0, got '
                       f'{self.max_shrinks!r}')
    for name in ('shrink', 'sufficient_decrease'):
      v = getattr(self, name)
      if not 0.0 < v < 1.0:
        raise ValueError(f'NonlinearCG({name}=...) must lie in (0, 1), got '
                         f'{v!r}')
    if not self.initial_decrease > 0.0:
      raise ValueError('NonlinearCG(initial_decrease=...) must be > 0, got '
                       f'{self.initial_decrease!r}')
    if not (isinstance(self.tol, (int, float)) and
            0 <= self.tol < float('inf')):
      raise ValueError('NonlinearCG(tol=...) must be a finite number ≥ 0, '
                       f'got {self.tol!r}')
    if self.space not in ('auto', 'parameters'):
      raise ValueError("NonlinearCG(space=...) must be 'auto' or "
                       f"'parameters', got {self.space!r}")

  def minimize(self, fun, x0, linear=None, unroll=False):
    """Minimizes ``fun(x)``, or ``fun(linear(x), x)`` given a linear map.

    Args:
      fun: the scalar objective; with ``linear``, a function of
        ``(linear(x), x)``.
      x0: the warm start.
      linear: optional linear map of ``x`` through which ``fun`` sees most
        of ``x`` (a layer's kernel acting on its fixed input). The line
        search then moves along ``linear(d)``, computed once per
        iteration, so its trial points cost no further products: two
        applications of the map (forward and transpose) per iteration
        instead of one per trial plus two for the gradient.
      unroll: unroll the (static) iterations; for a ``linear`` that is a
        convolution, which XLA:CPU runs far slower inside a loop body (see
        :func:`sibp_jax._src.kinds.unroll_loops`).

    Returns:
      ``(x, SolveInfo)``.
    """
    if linear is None:
      linear, outer = (lambda x: x), (lambda y, x: fun(y))
    else:
      outer = fun
    transpose = jax.linear_transpose(linear, x0)
    outer_value_and_grad = jax.value_and_grad(outer, argnums=(0, 1))

    def value_and_grad(y, x):
      f, (gy, gx) = outer_value_and_grad(y, x)
      g = transpose(gy)[0] + gx
      return f, g, g

    x, _, info = self._iterate(outer, value_and_grad, linear, x0, unroll)
    return x, info

  def minimize_in_row_space(self, fun, gram, lam, c0):
    """Minimizes ``fun(F Δ) + lam ‖Δ‖²`` over ``Δ = Fᵀ c``, knowing only ``G``.

    ``F`` is an ``(n, m)`` matrix with fewer rows than columns (a dense
    layer's input batch, ``n`` examples of ``m`` features) and
    ``G = F Fᵀ`` its ``n × n`` Gram matrix. Started from ``Δ = 0``, every
    gradient of ``φ(Δ) = fun(FΔ) + λ‖Δ‖²`` is ``Fᵀ(∇fun(FΔ) + 2λc)``, so the
    iterates of :meth:`minimize` never leave the row space of ``F``. This
    runs that same iteration in the coefficients ``c`` (``Δ = Fᵀc``), with
    ``⟨Fᵀa, Fᵀb⟩ = ⟨a, G b⟩``, ``FΔ = G c`` and ``‖Δ‖² = ⟨c, G c⟩``: the
    trial points, Armijo tests, ``β`` and accepted steps are those of
    :meth:`minimize` on ``φ`` in exact arithmetic, while each iteration
    costs two ``n × n`` by ``n × d`` products instead of two
    ``n × m`` by ``m × d`` ones. The caller forms ``Δ = Fᵀc`` once.

    Args:
      fun: a scalar function of the row image ``FΔ``, shape ``(n, d)``.
      gram: ``G = F Fᵀ``, shape ``(n, n)``.
      lam: the proximal weight ``λ ≥ 0``.
      c0: zeros of shape ``(n, d)`` (the start ``Δ = 0``).

    Returns:
      ``(c, G c, SolveInfo)``; the info's residual is the ratio of gradient
      norms ``‖∇φ‖`` as in :meth:`minimize`.
    """
    lam = jnp.asarray(lam, c0.dtype)

    def linear(c):
      return jnp.matmul(gram, c, precision=PRECISION)

    def outer(v, c):
      return fun(v) + lam * jnp.vdot(c, v)

    outer_grad = jax.value_and_grad(outer)

    def value_and_grad(v, c):
      # ∂outer/∂v = ∇fun + λc; the gradient in the metric G is
      # ∇fun + 2λc, since ‖Δ‖² = ⟨c, G c⟩ contributes 2λc there.
      f, gv = outer_grad(v, c)
      g = gv + lam * c
      return f, g, linear(g)

    return self._iterate(outer, value_and_grad, linear, c0, False)

  def _iterate(self, outer, value_and_grad, linear, x0, unroll):
    """Fletcher–Reeves with Armijo backtracking in a metric ``M``.

    ``value_and_grad(y, x)`` returns ``(φ, g, M g)`` with ``g`` the gradient
    in the metric (``M = I``: the ordinary gradient), ``y = linear(x)``.
    """
    y0 = linear(x0)
    f0, g0, mg0 = value_and_grad(y0, x0)
    gg0 = jnp.vdot(g0, mg0)
    dtype = f0.dtype

    def iteration(_, carry):
      x, y, f, g, mg, gg, d, evals = carry
      slope = jnp.vdot(mg, d)
      descent = slope < 0
      d = jnp.where(descent, d, -g)
      slope = jnp.where(descent, slope, -gg)
      # The first trial ρ^m₀ (see the class docstring). slope == 0 only at
      # a stationary point: then α₀ = 0 and the point stays; ratio == 0
      # (φ = 0, a least-squares fit at its minimum) would make m₀ infinite.
      fraction = self.initial_decrease * jnp.abs(f) / (
          self.sufficient_decrease * jnp.where(slope < 0, -slope, 1.0))
      m0 = jnp.floor(jnp.log(jnp.where(fraction > 0, fraction, 1.0)) /
                     jnp.log(jnp.asarray(self.shrink, dtype)))
      m0 = jnp.where(fraction > 0, jnp.maximum(m0, 0.0), 0.0)
      alpha0 = jnp.where((slope < 0) & (fraction > 0),
                         jnp.asarray(self.shrink, dtype) ** m0, 0.0)
      yd = linear(d)

      def untried(c):
        j, accepted, _ = c
        return (~accepted) & (j <= self.max_shrinks)

      def trial(c):
        j, _, _ = c
        alpha = alpha0 * jnp.asarray(self.shrink, dtype) ** j
        f_trial = outer(y + alpha * yd, x + alpha * d)
        ok = f_trial < f + self.sufficient_decrease * alpha * slope
        return j + 1, ok & jnp.isfinite(f_trial), alpha

      j, accepted, alpha = jax.lax.while_loop(
          untried, trial, (jnp.zeros((), jnp.int32), jnp.zeros((), bool),
                           jnp.zeros((), dtype)))
      alpha = jnp.where(accepted, alpha, 0.0)
      x_new, y_new = x + alpha * d, y + alpha * yd
      f_new, g_new, mg_new = value_and_grad(y_new, x_new)
      gg_new = jnp.vdot(g_new, mg_new)
      beta = jnp.where(gg > 0, gg_new / jnp.where(gg > 0, gg, 1.0), 0.0)
      d_new = jnp.where(accepted, -g_new + beta * d, -g_new)
      # A rejected step keeps x; take the recomputed value only when moved so
      # that round-off can never report an increase.
      f_new = jnp.where(accepted, f_new, f)
      return (x_new, y_new, f_new, g_new, mg_new, gg_new, d_new,
              evals + j + 1)

    x, y, _, _, _, gg, _, evals = jax.lax.fori_loop(
        0, self.iterations, iteration,
        (x0, y0, f0, g0, mg0, gg0, -g0, jnp.ones((), jnp.int32)),
        unroll=unroll)
    # ‖g‖_M is the norm of the parameter-space gradient in both uses.
    residual = base.ratio(jnp.sqrt(jnp.maximum(gg, 0)),
                          jnp.sqrt(jnp.maximum(gg0, 0)))
    status = base.status_of(residual <= self.tol, (x, gg))
    return x, y, base.SolveInfo(evals, residual, status)
