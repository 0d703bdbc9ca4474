"""What every subproblem solver shares: its problem, its report, its protocol.

The linear subproblems (SIBP linearized and ProxBP) share one form, written
in the increment ``Δ = X - X_old`` so that every solver starts from the old
parameters (warm start ``Δ = 0``)::

    minimize_Δ  ‖A(Δ) - R‖² + λ_W ‖ΔW‖² + λ_b ‖Δb‖²
    ⇔          (AᵀA + Λ) Δ = Aᵀ R,

where ``A(Δ) = apply(ΔW, Δb; f)`` is the layer's linear map with its input
fixed and ``R`` the target residual ``u - g`` (:class:`RidgeProblem`). A
solver reports a :class:`SolveInfo` with a :class:`SolveStatus` instead of
raising.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any
from typing import NamedTuple
from typing import Protocol

import jax
import jax.numpy as jnp

from sibp_jax._src import kinds

PRECISION = kinds.PRECISION


class SolveStatus(enum.IntEnum):
  """How a solve ended, as lineax's ``RESULTS``: a code with a message.

  :attr:`SolveInfo.status` holds the code as an ``int32`` array, so that it
  is returned from ``jit`` and ``vmap``. The codes are ordered by severity:
  a report that combines solves (a layer's kernel and bias fits, a solve
  handed on to a fallback) keeps the largest.

  ``SolveStatus(int(code)).message`` says what a code means, e.g.
  ``SolveStatus(2).message``.
  """

  CONVERGED = 0
  FALLBACK = 1
  MAX_ITERATIONS = 2
  NONFINITE = 3

  @property
  def message(self) -> str:
    return _MESSAGES[self]

  @classmethod
  def unconverged(cls, status: jax.typing.ArrayLike) -> jax.Array:
    """``True`` where a status says the solve did not converge.

    That is :attr:`MAX_ITERATIONS` or :attr:`NONFINITE`;
    :attr:`FALLBACK` is a solve whose fallback converged.
    """
    return jnp.asarray(status) >= cls.MAX_ITERATIONS


_MESSAGES = {
    SolveStatus.CONVERGED: (
        'converged: an exact solve, or an iterative one that met its '
        'tolerance'),
    SolveStatus.FALLBACK: (
        'fell back: the factor would have exceeded Ridge(max_factor=...), '
        'so the solve went to its iterative fallback, which converged'),
    SolveStatus.MAX_ITERATIONS: (
        'iteration limit reached: the iterative solver ran all its '
        'iterations without meeting its tolerance'),
    SolveStatus.NONFINITE: (
        'not finite: the solution holds NaN or Inf (a non-finite batch, '
        'loss or parameter, or an overflow in the solve)'),
}


class SolveInfo(NamedTuple):
  """What a solve reports.

  Attributes:
    iterations: iterations run (CG steps; for :class:`sibp_jax.NonlinearCG`,
      objective evaluations including rejected line-search trials; 0 for
      exact solves).
    residual: relative residual, 0 where the problem is already solved at the
      old parameters. :class:`sibp_jax.Ridge`: ``‖(M x - c) p‖ / ‖c p‖`` of
      the system it factored (``FᵀF + Λ`` or, in batch space,
      ``I + FΛ⁻¹Fᵀ``) along a fixed random ±1 vector ``p`` over the output
      columns, i.e. its round-off, estimated at ``O(n²)`` cost.
      :class:`sibp_jax.ConjugateGradient`: the normal equations' residual
      over its value at the old parameters. :class:`sibp_jax.NonlinearCG`:
      the gradient norm at the returned point over its value at the start.
    status: a :class:`SolveStatus` code (``int32``); ``CONVERGED`` by
      default, for solvers of users that do not report one.
  """

  iterations: jax.Array
  residual: jax.Array
  status: jax.typing.ArrayLike = SolveStatus.CONVERGED


def status_of(converged: jax.Array, delta: Any) -> jax.Array:
  """``CONVERGED`` or ``MAX_ITERATIONS`` by ``converged``; ``NONFINITE`` if
  any leaf of ``delta`` is not finite."""
  return jnp.where(
      all_finite(delta),
      jnp.where(converged, SolveStatus.CONVERGED, SolveStatus.MAX_ITERATIONS),
      SolveStatus.NONFINITE).astype(jnp.int32)


def all_finite(tree: Any) -> jax.Array:
  """Whether every leaf of ``tree`` (``None`` leaves skipped) is finite."""
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if (
      leaves) else jnp.ones((), bool)


def combine(*infos: SolveInfo) -> SolveInfo:
  """One report for solves run in turn: iterations summed, the largest
  residual, the most severe status."""
  return SolveInfo(
      sum(jnp.asarray(i.iterations, jnp.int32) for i in infos),
      jnp.max(jnp.stack([jnp.asarray(i.residual, jnp.float32)
                         for i in infos])),
      jnp.max(jnp.stack([jnp.asarray(i.status, jnp.int32) for i in infos])))


def tree_vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def ratio(num, den):
  """``num / den`` with ``0 / 0 = 0`` (a subproblem already at its optimum)."""
  safe = jnp.where(den > 0, den, 1.0)
  return jnp.where(den > 0, num / safe, jnp.where(num > 0, jnp.inf, 0.0))


@dataclasses.dataclass(frozen=True)
class RidgeProblem:
  """``minimize_Δ ‖A(Δ) - R‖² + λ_W‖ΔW‖² + λ_b‖Δb‖²`` for one layer.

  Attributes:
    kind: the layer's linear map (:class:`sibp_jax.Dense`, ...).
    inputs: the layer's input ``f``, fixed.
    residual: ``R``, shaped like the layer's output.
    kernel_shape: shape of the kernel, or ``None`` if the kernel is held
      fixed (the SIBP paper variant solves the bias on its own).
    bias_shape: shape of the bias, or ``None`` if it is held fixed or absent.
    lam_kernel, lam_bias: the proximal weights ``λ_W`` and ``λ_b`` (> 0).
    row_weights: ``None``, or how many times each row counts, ``ρ``,
      shaped like the output's row axes (:meth:`sibp_jax.Dense.row_shape`):
      the normal equations become ``(AᵀρA + Λ) Δ = Aᵀ R``, the weights
      entering the curvature only (the residual ``R`` already carries
      them through the error, docs/algorithms.md "Weights"). The problem
      then holds it as the unweighted one of ``√ρ ⊙ A`` and ``R / √ρ``:
      :meth:`apply` scales by ``√ρ`` and ``residual`` must be ``R / √ρ``
      (:meth:`weighted` builds it), so that a solver written for the
      unweighted problem solves the weighted one unchanged. A row of
      ``ρ = 0`` must have ``R = 0`` (it reaches no weighted term).
  """

  kind: Any
  inputs: jax.Array
  residual: jax.Array
  kernel_shape: tuple[int, ...] | None
  bias_shape: tuple[int, ...] | None
  lam_kernel: jax.Array
  lam_bias: jax.Array
  row_weights: jax.Array | None = None

  @classmethod
  def weighted(cls, kind, inputs, residual, kernel_shape, bias_shape,
               lam_kernel, lam_bias, row_weights=None):
    """The problem of residual ``R`` whose rows count ``row_weights``."""
    if row_weights is not None:
      root = _rows(jnp.sqrt(row_weights), residual)
      residual = jnp.where(root > 0, residual / jnp.where(root > 0, root, 1),
                           0)
    return cls(kind, inputs, residual, kernel_shape, bias_shape, lam_kernel,
               lam_bias, row_weights)

  def apply(self, delta):
    """``A(Δ)``: the change of the layer's output for a change ``Δ``
    (times ``√w`` with row weights)."""
    dk, db = delta
    out = 0.0
    if dk is not None:
      out = self.kind.apply(dk, None, self.inputs)
    if db is not None:
      # Broadcast against an array shaped and sharded like the residual: a
      # replicated broadcast_to would gather a batch sharded over devices.
      out = (jnp.zeros_like(self.residual) if dk is None else out) + db
    if self.row_weights is not None:
      out = out * _rows(jnp.sqrt(self.row_weights), out)
    return out

  def zeros(self):
    z = lambda s: None if s is None else jnp.zeros(s, self.residual.dtype)
    return (z(self.kernel_shape), z(self.bias_shape))

  def transpose(self, out):
    """``Aᵀ(out)``, by transposing ``apply`` (no materialised matrix)."""
    return jax.linear_transpose(self.apply, self.zeros())(out)[0]

  def scale(self, delta):
    """``Λ Δ``."""
    dk, db = delta
    return (None if dk is None else self.lam_kernel * dk,
            None if db is None else self.lam_bias * db)

  def gradient_norm(self, delta, rhs):
    """‖(AᵀA + Λ)Δ - AᵀR‖, computed matrix-free."""
    normal = jax.tree.map(jnp.add, self.transpose(self.apply(delta)),
                          self.scale(delta))
    diff = jax.tree.map(jnp.subtract, normal, rhs)
    return jnp.sqrt(tree_vdot(diff, diff))


def _rows(weights, like):
  """``weights`` (over the leading row axes) broadcastable against ``like``."""
  weights = weights.astype(like.dtype)
  return weights.reshape(weights.shape + (1,) * (like.ndim - weights.ndim))


jax.tree_util.register_dataclass(
    RidgeProblem,
    data_fields=['inputs', 'residual', 'lam_kernel', 'lam_bias',
                 'row_weights'],
    meta_fields=['kind', 'kernel_shape', 'bias_shape'])

Delta = tuple[jax.Array | None, jax.Array | None]


class RidgeSolver(Protocol):
  r"""What a solver of the linear subproblems provides: a ``solve`` method.

  ``solve(problem)`` receives a :class:`RidgeProblem`, the change
  ``Δ = (ΔW, Δb)`` of one layer's parameters to find,

  .. math::

     \min_Δ \|A(Δ) - R\|^2 + λ_W\|ΔW\|^2 + λ_b\|Δb\|^2
     \;⇔\; (AᵀA + Λ)Δ = AᵀR ,

  with ``problem.apply`` (``A``), ``problem.transpose`` (``Aᵀ``),
  ``problem.scale`` (``Λ``), ``problem.residual`` (``R``) and, for an
  explicit design matrix, ``problem.kind.design(problem.inputs, window)``.
  It returns ``((ΔW, Δb), info)``: the change (not the new parameters, so
  that a step tiny next to the weights loses nothing to cancellation),
  shaped ``problem.kernel_shape`` and ``problem.bias_shape``, with ``None``
  for a block whose shape is ``None`` (held fixed), in the residual's dtype;
  and a :class:`SolveInfo`, whose ``status`` says how the solve ended
  (:class:`SolveStatus`; a layer whose change is not finite is reported
  ``NONFINITE`` whatever its solver says). It runs under ``jit`` and
  ``vmap`` (static loop bounds, no Python branching on values), and
  reports rather than raises. Any object with such a method can be passed
  as ``solver=`` to :func:`sibp_jax.sibp` (linearized),
  :func:`sibp_jax.proxbp` and as ``last_layer_solver=``; a frozen
  dataclass keeps it hashable.

  Example:
    A solver that takes one gradient step of the subproblem from ``Δ = 0``
    (for ProxBP: plain backprop, docs/algorithms.md section 4):

    >>> import dataclasses, jax, jax.numpy as jnp, sibp_jax
    >>> @dataclasses.dataclass(frozen=True)
    ... class OneGradientStep:
    ...   step: float = 1e-3
    ...   def solve(self, problem):
    ...     rhs = problem.transpose(problem.residual)  # AᵀR: descent at Δ = 0
    ...     delta = jax.tree.map(lambda g: self.step * g, rhs)
    ...     info = sibp_jax.SolveInfo(
    ...         jnp.ones((), jnp.int32), jnp.ones((), jnp.float32),
    ...         jnp.asarray(sibp_jax.SolveStatus.MAX_ITERATIONS, jnp.int32))
    ...     return delta, info
    >>> tx = sibp_jax.proxbp(1.0, solver=OneGradientStep())
  """

  def solve(self, problem: RidgeProblem) -> tuple[Delta, SolveInfo]:
    ...
