"""Exact ridge solves from the layer's explicit design matrix."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sibp_jax._src import sharding
from sibp_jax._src.solvers import base
from sibp_jax._src.solvers import cholesky
from sibp_jax._src.solvers import conjugate_gradient

PRECISION = base.PRECISION
# Relative floor on the proximal weights of exact solves: ~10 float32 ulps.
_LAMBDA_FLOOR = 1e-6


def _diagonal(p: base.RidgeProblem) -> bool:
  """Whether the kind's ``FᵀF`` is diagonal (an embedding) and no bias."""
  return (hasattr(p.kind, 'gram_diagonal') and p.kernel_shape is not None
          and p.bias_shape is None)


def _diagonal_solve(p: base.RidgeProblem):
  """The closed-form solve of a kind whose ``FᵀF`` is diagonal.

  ``(FᵀWF + λ) ΔW = FᵀW R`` row by row of the kernel: ``FᵀW R`` is the
  transpose of the (weighted) map applied to the (weighted) residual, a
  scatter-add of its rows for an embedding; ``diag(FᵀWF)`` is the kind's
  :meth:`gram_diagonal`, each id's (weighted) count.
  """
  (rhs, _) = p.transpose(p.residual)
  dtype = rhs.dtype
  diagonal = p.kind.gram_diagonal(p.inputs, dtype, p.row_weights) + (
      jnp.asarray(p.lam_kernel, dtype))
  diagonal = diagonal.reshape(diagonal.shape + (1,) * (rhs.ndim - 1))
  dk = rhs / diagonal
  miss = diagonal * dk - rhs
  info = base.SolveInfo(
      jnp.zeros((), jnp.int32),
      base.ratio(jnp.linalg.norm(miss), jnp.linalg.norm(rhs)),
      base.status_of(True, dk))
  return (dk, None), info


def _probe(columns, dtype):
  """One fixed random ±1 combination of the output columns: the reported
  residual checks the factored system along it, at ``m²`` cost instead of
  ``m²·d_out`` for all right-hand sides (about 10% of a step)."""
  return jax.random.rademacher(jax.random.key(0), (columns,), dtype)


def _report(system, solution, rhs, x):
  probe = _probe(rhs.shape[-1], rhs.dtype)
  rhs_probe = jnp.matmul(rhs, probe, precision=PRECISION)
  miss = jnp.matmul(system, jnp.matmul(solution, probe, precision=PRECISION),
                    precision=PRECISION) - rhs_probe
  return base.SolveInfo(
      jnp.zeros((), jnp.int32),
      base.ratio(jnp.linalg.norm(miss), jnp.linalg.norm(rhs_probe)),
      base.status_of(True, x))


def _gram_solve(p: base.RidgeProblem, r):
  """The Cholesky solve from the kind's own Gram (a convolution's, formed
  without its patch matrix) and ``FᵀR`` as the layer's transpose (the
  kernel gradient, as backprop computes it)."""
  window = tuple(p.kernel_shape[:-2])
  gram, sums = p.kind.gram(p.inputs, window, p.row_weights)
  dtype = gram.dtype
  dk, db = p.transpose(p.residual)
  rhs = dk.reshape(-1, dk.shape[-1]).astype(dtype)
  lam = [jnp.full((gram.shape[0],), p.lam_kernel, dtype)]
  if p.bias_shape is not None:
    count = (r.shape[0] if p.row_weights is None else
             jnp.sum(p.row_weights.astype(dtype)))
    gram = jnp.block([[gram, sums[:, None]],
                      [sums[None, :], jnp.full((1, 1), count, dtype)]])
    rhs = jnp.concatenate([rhs, db.reshape(1, -1).astype(dtype)])
    lam.append(jnp.full((1,), p.lam_bias, dtype))
  m = gram.shape[0]
  # The floor of the design-matrix path below: trace(FᵀF)/m.
  floor = _LAMBDA_FLOOR * jnp.trace(gram) / m
  system = gram + jnp.diag(jnp.maximum(jnp.concatenate(lam), floor))
  x = cholesky.spd_solve(system, rhs)
  n_kernel = m - int(p.bias_shape is not None)
  delta = (x[:n_kernel].reshape(p.kernel_shape),
           None if p.bias_shape is None else x[n_kernel:].reshape(
               p.bias_shape))
  return delta, _report(system, x, rhs, x)


@dataclasses.dataclass(frozen=True)
class Ridge:
  """Exact ridge solve from the layer's explicit design matrix.

  With ``F`` the ``(n, m)`` design matrix (``n`` rows: examples, or examples
  times positions for a conv; ``m`` columns: input features plus one for the
  bias) the normal equations are ``(FᵀF + Λ) Δ = Fᵀ R``. When ``m ≤ n`` this
  factors the ``m × m`` matrix ``FᵀF + Λ`` by Cholesky; otherwise it solves in
  row space with the Woodbury identity::

      Δ = Λ⁻¹ Fᵀ (I_n + F Λ⁻¹ Fᵀ)⁻¹ R,

  factoring an ``n × n`` matrix instead, so the cost is
  ``O(min(n, m)³ + n·m·min(n, m))``. Both matrices are symmetric positive
  definite for ``λ > 0``; the condition number is at most
  ``1 + ‖F‖²/min(λ)``, which bounds the float32 error seen in
  :attr:`sibp_jax.SolveInfo.residual`.

  For a convolution the rows are examples times output positions and the
  columns the kernel's patch (im2col), so the factor is the small
  ``(k·k·c_in + 1)``-square patch Gram matrix, which the Cholesky path
  forms from the input without the patches (:meth:`sibp_jax.Conv.gram`),
  with ``FᵀR`` as the convolution's kernel gradient. When even the smaller
  factor would exceed ``max_factor`` on a side (a huge patch at a huge
  batch), the solve is handed to ``fallback``, matrix-free conjugate
  gradient through the layer and its transpose, chosen from the static
  shapes.

  **Status.** An exact solve reports ``CONVERGED``, or ``NONFINITE`` where
  its change is not finite. A solve handed to ``fallback`` reports
  ``FALLBACK`` when the fallback converged, else the fallback's own status
  (``MAX_ITERATIONS``, ``NONFINITE``): the most severe wins
  (:class:`sibp_jax.SolveStatus`); :meth:`path` says from the static shapes
  whether a problem goes to the fallback.

  **Data parallel.** With the batch sharded over devices, ``FᵀF`` and
  ``FᵀR`` are sums over the rows: every device multiplies its own rows and
  one all-reduce of the ``m × m`` and ``m × d_out`` results follows, traffic
  that does not grow with the batch. The batch-space matrix
  ``I_n + FΛ⁻¹Fᵀ`` pairs every example with every other, so forming it
  would gather the whole design matrix (``n × m``) onto every device.
  ``'auto'`` therefore takes Cholesky whenever the rows are sharded in the
  arrays' type, i.e. under explicit sharding (mesh axes of type
  ``jax.sharding.AxisType.Explicit``, the default of ``jax.make_mesh``),
  and falls back to CG only if ``m`` exceeds ``max_factor``. Under
  automatic (GSPMD) sharding a traced type does not say how the batch is
  split: pass ``Ridge('cholesky')`` there (and, for the paper variant,
  ``last_layer_solver=Ridge('cholesky')``). Each device then factors the
  ``m × m`` matrix, ``O(m³)``, where one device would have factored
  ``n × n``.

  Attributes:
    method: ``'auto'`` (by shape and sharding, as above), ``'cholesky'`` or
      ``'woodbury'``.
    max_factor: the largest factor side ``'auto'`` forms (default 8192, a
      256 MiB float32 matrix); ``None`` for no limit.
    fallback: the solver used beyond ``max_factor`` (default
      ``ConjugateGradient(10)``).
  """

  method: str = 'auto'
  max_factor: int | None = 8192
  fallback: base.RidgeSolver | None = None

  def __post_init__(self):
    if self.method not in ('auto', 'cholesky', 'woodbury'):
      raise ValueError("Ridge(method=...) must be 'auto', 'cholesky' or "
                       f"'woodbury', got {self.method!r}")
    if self.max_factor is not None and (
        not isinstance(self.max_factor, int) or self.max_factor < 1):
      raise ValueError('Ridge(max_factor=...) must be a positive int or None, '
                       f'got {self.max_factor!r}')

  def path(self, p: base.RidgeProblem) -> str:
    """Which solve :meth:`solve` takes for this problem, from static shapes.

    Args:
      p: the problem; only its shapes, and the sharding in its residual's
        type, are read (abstract values such as ``jax.ShapeDtypeStruct``
        serve too).

    Returns:
      ``'diagonal'`` (a kind whose ``FᵀF`` is diagonal, an embedding:
      closed form per kernel row), ``'cholesky'`` (the ``m × m`` factor of
      ``FᵀF + Λ``), ``'woodbury'``
      (the ``n × n`` factor of ``I + FΛ⁻¹Fᵀ``) or ``'fallback'`` (the
      iterative ``fallback``, reported as
      :attr:`sibp_jax.SolveStatus.FALLBACK`).

    Example:
      >>> import jax, jax.numpy as jnp, sibp_jax
      >>> p = sibp_jax.RidgeProblem(
      ...     sibp_jax.Dense(), jax.ShapeDtypeStruct((100, 784), jnp.float32),
      ...     jax.ShapeDtypeStruct((100, 500), jnp.float32), (784, 500),
      ...     (500,), 1.0, 1.0)
      >>> sibp_jax.Ridge().path(p), sibp_jax.Ridge(max_factor=64).path(p)
      ('woodbury', 'fallback')
    """
    if _diagonal(p):
      return 'diagonal'
    rows, columns = p.kind.sizes(p.kernel_shape, p.residual.shape)
    columns += int(p.bias_shape is not None)
    # A batch sharded over devices leaves only the m × m factor (see above).
    sharded = sharding.rows_sharded(p.residual)
    side = columns if sharded else min(rows, columns)
    if self.method == 'auto':
      if self.max_factor is not None and side > self.max_factor:
        return 'fallback'
      return 'cholesky' if columns <= rows or sharded else 'woodbury'
    return self.method

  def solve(self, p: base.RidgeProblem) -> tuple[base.Delta, base.SolveInfo]:
    """Returns ``((ΔW, Δb), SolveInfo)``; fixed blocks are ``None``."""
    fit_kernel, fit_bias = p.kernel_shape is not None, p.bias_shape is not None
    r = p.kind.output_rows(p.residual)
    path = self.path(p)
    if path == 'diagonal':
      return _diagonal_solve(p)
    if path == 'fallback':
      delta, info = (self.fallback or
                     conjugate_gradient.ConjugateGradient(10)).solve(p)
      status = jnp.maximum(jnp.asarray(info.status, jnp.int32),
                           base.SolveStatus.FALLBACK)
      return delta, info._replace(status=status)
    if path == 'cholesky' and fit_kernel and hasattr(p.kind, 'gram'):
      return _gram_solve(p, r)
    blocks = []
    if fit_kernel:
      blocks.append(p.kind.design(p.inputs, tuple(p.kernel_shape[:-2])))
    if fit_bias:
      blocks.append(jnp.ones_like(r[:, :1]))  # sharded like the rows
    f = jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
    if p.row_weights is not None:  # the rows of √w ⊙ F (see RidgeProblem)
      f = f * sharding.reshape_rows(
          jnp.sqrt(p.row_weights.astype(f.dtype)), (-1, 1))
    n, m = f.shape
    n_kernel = m - 1 if fit_bias else m
    use_cholesky = path == 'cholesky'
    # A proximal weight below float32's resolution of the factor's diagonal
    # (mean diagonal of FᵀF or FFᵀ) cannot be told from zero, and with
    # duplicated or all-zero rows the factor is then singular: floor λ
    # there. It changes nothing for ordinary settings and keeps the step
    # finite for tiny ones; the residual shows the accuracy reached.
    # (A sum, not vdot: explicit sharding refuses a sharded contraction.)
    floor = _LAMBDA_FLOOR * jnp.sum(jnp.square(f)) / (
        m if use_cholesky else n)
    lam = jnp.maximum(jnp.concatenate([
        jnp.full((n_kernel,), p.lam_kernel, f.dtype),
        jnp.full((m - n_kernel,), p.lam_bias, f.dtype)]), floor)
    if use_cholesky:
      rhs = sharding.contract_rows(f, r, PRECISION)
      gram = sharding.contract_rows(f, f, PRECISION) + jnp.diag(lam)
      x = cholesky.spd_solve(gram, rhs)
      system, solution = gram, x
    else:
      scaled = f / lam
      kernel = jnp.eye(n, dtype=f.dtype) + jnp.matmul(
          scaled, f.T, precision=PRECISION)
      y = cholesky.spd_solve(kernel, r)
      x = jnp.matmul(scaled.T, y, precision=PRECISION)
      # Since x = Λ⁻¹Fᵀy exactly, the normal equations' residual is
      # Fᵀ(K y - R): report the n × n system's own residual instead.
      system, solution, rhs = kernel, y, r
    dk = db = None
    if fit_kernel:
      dk = x[:n_kernel].reshape(p.kernel_shape)
    if fit_bias:
      db = x[n_kernel:].reshape(p.bias_shape)
    return (dk, db), _report(system, solution, rhs, x)

