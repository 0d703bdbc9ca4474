"""Solvers for the per-layer proximal subproblems.

Each solver is a small immutable object that checks its settings when it is
built, runs under ``jit`` and ``vmap`` with static iteration counts, and
reports a :class:`SolveInfo` instead of raising.

The linear subproblems (SIBP linearized and ProxBP) share one form, written
in the increment ``Δ = X - X_old`` so that every solver starts from the old
parameters (warm start ``Δ = 0``)::

    minimize_Δ  ‖A(Δ) - R‖² + λ_W ‖ΔW‖² + λ_b ‖Δb‖²
    ⇔          (AᵀA + Λ) Δ = Aᵀ R,

where ``A(Δ) = apply(ΔW, Δb; f)`` is the layer's linear map with its input
fixed and ``R`` the target residual ``u - g``. :class:`Ridge` solves it
exactly; :class:`ConjugateGradient` runs a fixed number of matrix-free CG
steps. :class:`NonlinearCG` minimizes the SIBP paper variant's nonlinear fit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from typing import NamedTuple
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sibp_jax._src import problems as problems_lib
from sibp_jax._src import sharding

PRECISION = problems_lib.PRECISION
# Relative floor on the proximal weights of exact solves: ~10 float32 ulps.
_LAMBDA_FLOOR = 1e-6


class SolveInfo(NamedTuple):
  """What a solve reports.

  Attributes:
    iterations: iterations run (CG steps; for :class:`NonlinearCG`, objective
      evaluations including rejected line-search trials; 0 for exact solves).
    residual: relative residual, 0 where the problem is already solved at the
      old parameters. :class:`Ridge`: ``‖(M x - c) p‖ / ‖c p‖`` of the system
      it factored (``FᵀF + Λ`` or, in batch space, ``I + FΛ⁻¹Fᵀ``) along a
      fixed random ±1 vector ``p`` over the output columns, i.e. its
      round-off, estimated at ``O(n²)`` cost. :class:`ConjugateGradient`:
      the normal equations' residual over its value at the old parameters.
      :class:`NonlinearCG`: the gradient norm at the returned point over its
      value at the start.
    fallback: ``True`` where :class:`Ridge` handed the solve to its
      ``fallback`` (an iterative solver) because the factor would have
      exceeded ``max_factor``; ``False`` otherwise.
  """

  iterations: jax.Array
  residual: jax.Array
  fallback: Any = False


def _tree_vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _lapack_spd_solve(a, b):
  """``a⁻¹ b`` for symmetric positive definite ``a`` by its Cholesky factor.

  Solved as ``bᵀ a⁻¹ = ((bᵀ L⁻ᵀ) L⁻¹)`` with the factor on the right: ``b``
  is row-major ``(n, d)``, i.e. ``bᵀ`` in LAPACK's column-major order, so
  the two triangular solves run without transposed copies of ``b``
  (``jax.scipy.linalg.cho_solve`` takes ``b`` on the left, which on XLA:CPU
  adds transposed copies of ``b`` around each solve).
  """
  factor = jnp.linalg.cholesky(a)
  solve = functools.partial(jax.lax.linalg.triangular_solve, factor,
                            left_side=False, lower=True)
  return solve(solve(b.T, transpose_a=True)).T


# Diagonal blocks of the triangular inverse (and of the plain-XLA column
# loop): small enough that the doubling products stay cheap, large enough
# that few levels combine them.
_BLOCK = 32
# Largest factor of the CPU's blocked solves; wider ones go to LAPACK whole.
_CPU_SOLVE_MAX = 2048


def _single_threaded_potrf_max(dtype) -> int:
  """Largest side OpenBLAS's Cholesky factors on the calling thread.

  jaxlib's CPU LAPACK calls go to SciPy's OpenBLAS. Measured on OpenBLAS
  0.3.30 (``python examples/blas_threads.py``): ``potrf`` keeps float32
  sides below 256 and float64 sides below 128 on one thread (its
  triangular solves start threads at about a thousand right-hand-side
  entries); larger calls wake its worker threads, which spin-wait after
  the call and take a core from XLA's own threads. Another LAPACK with
  other thresholds changes the speed, not the result.
  """
  return 255 if jnp.dtype(dtype).itemsize <= 4 else 127


def _triangular_inverse(factor):
  """``L⁻¹`` of lower-triangular ``L`` by batched matrix products.

  ``L`` is padded with an identity to ``s·2ᵏ`` rows (``s ≤ _BLOCK``). Its
  ``2ᵏ`` diagonal blocks are inverted together: ``L = D (I - N)`` with
  ``N`` strictly lower triangular, so ``Nˢ = 0`` and ``(I - N)⁻¹ = (I + N)
  (I + N²)(I + N⁴)…``, ``⌈log₂ s⌉`` factors. Then ``k`` levels merge
  pairs, all pairs of a level in one batched product::

      [L₁₁ 0; L₂₁ L₂₂]⁻¹ = [L₁₁⁻¹ 0; -L₂₂⁻¹ L₂₁ L₁₁⁻¹  L₂₂⁻¹].
  """
  n = factor.shape[0]
  levels = max(0, int(np.ceil(np.log2(n / _BLOCK))))
  size = -(-n // 2**levels)
  padded = size * 2**levels
  if padded > n:
    factor = jnp.pad(factor, (0, padded - n)) + jnp.diag(
        (jnp.arange(padded) >= n).astype(factor.dtype))
  count = padded // size
  index = jnp.arange(count)
  blocks = factor.reshape(count, size, count, size)[index, :, index, :]
  diag = jnp.diagonal(blocks, axis1=1, axis2=2)
  eye = jnp.eye(size, dtype=factor.dtype)
  nil = eye - blocks / diag[:, :, None]

  def double(_, carry):  # square N first: (I + N²) is the next factor
    nil, inverse = carry
    nil = jnp.matmul(nil, nil, precision=PRECISION)
    return nil, inverse + jnp.matmul(inverse, nil, precision=PRECISION)

  _, inverse = jax.lax.fori_loop(
      0, max(0, int(np.ceil(np.log2(size))) - 1), double, (nil, eye + nil))
  inverse = inverse / diag[:, None, :]
  while size < padded:
    count = padded // size
    pairs = jnp.arange(0, count, 2)
    lower = factor.reshape(count, size, count, size)[pairs + 1, :, pairs, :]
    m11, m22 = inverse[0::2], inverse[1::2]
    m21 = -jnp.matmul(m22, jnp.matmul(lower, m11, precision=PRECISION),
                      precision=PRECISION)
    inverse = jnp.concatenate([
        jnp.concatenate([m11, jnp.zeros_like(m11)], axis=2),
        jnp.concatenate([m21, m22], axis=2)], axis=1)
    size *= 2
  return inverse[0, :n, :n]


def _column_cholesky(a):
  """Cholesky factor of a small SPD ``a`` by a loop over its columns."""
  index = jnp.arange(a.shape[0])

  def column(j, carry):
    rest, factor = carry
    col = jnp.where(index >= j, rest[:, j] / jnp.sqrt(rest[j, j]), 0.0)
    return rest - jnp.outer(col, col), factor.at[:, j].set(col)

  return jax.lax.fori_loop(0, a.shape[0], column,
                           (a, jnp.zeros_like(a)))[1]


def _cholesky_and_inverse(a, lapack: bool):
  """``(L, L⁻¹)`` of SPD ``a = L Lᵀ``, without LAPACK calls that spin.

  Recursive on 2 × 2 blocks, ``L₂₁ = A₂₁ L₁₁⁻ᵀ`` and the Schur complement
  ``A₂₂ - L₂₁ L₂₁ᵀ`` (SPD again), with ``L⁻¹``'s off-diagonal block
  ``-L₂₂⁻¹ L₂₁ L₁₁⁻¹``: matrix products. Diagonal blocks are factored by
  LAPACK's ``potrf`` up to :func:`_single_threaded_potrf_max` with
  ``lapack``, else by a column loop up to ``_BLOCK`` (plain XLA); their
  inverses by :func:`_triangular_inverse`.
  """
  n = a.shape[0]
  if n <= (_single_threaded_potrf_max(a.dtype) if lapack else _BLOCK):
    factor = jnp.linalg.cholesky(a) if lapack else _column_cholesky(a)
    return factor, _triangular_inverse(factor)
  h = n // 2
  l11, m11 = _cholesky_and_inverse(a[:h, :h], lapack)
  l21 = jnp.matmul(a[h:, :h], m11.T, precision=PRECISION)
  l22, m22 = _cholesky_and_inverse(
      a[h:, h:] - jnp.matmul(l21, l21.T, precision=PRECISION), lapack)
  m21 = -jnp.matmul(m22, jnp.matmul(l21, m11, precision=PRECISION),
                    precision=PRECISION)
  zero = jnp.zeros((h, n - h), a.dtype)
  return (jnp.block([[l11, zero], [l21, l22]]),
          jnp.block([[m11, zero], [m21, m22]]))


def _blocked_spd_solve(a, b, lapack: bool):
  """``a⁻¹ b`` through ``a⁻¹ = L⁻ᵀ L⁻¹`` from :func:`_cholesky_and_inverse`.

  Forming ``a⁻¹`` costs ``n³``, less than the ``n²·d`` products with ``b``
  for the wide right-hand sides here, and leaves one product per solve.
  Products with an explicit inverse are not backward stable as triangular
  solves are; one step of iterative refinement (two more products) brings
  the residual back to the triangular solves' level (seen: float32,
  condition number 2.6e4, ‖a x - b‖/‖b‖ 7e-4 by LAPACK's triangular
  solves, 4e-3 without refinement, 6e-4 with it).
  """
  _, inverse = _cholesky_and_inverse(a, lapack)
  inverse = jnp.matmul(inverse.T, inverse, precision=PRECISION)
  x = jnp.matmul(inverse, b, precision=PRECISION)
  residual = b - jnp.matmul(a, x, precision=PRECISION)
  return x + jnp.matmul(inverse, residual, precision=PRECISION)


@jax.custom_batching.custom_vmap
def _cpu_spd_solve(a, b):
  """The CPU's solve: small ``potrf`` calls, the rest matrix products."""
  return _blocked_spd_solve(a, b, lapack=True)


@_cpu_spd_solve.def_vmap
def _cpu_spd_solve_batched(axis_size, in_batched, a, b):
  """Under ``vmap``, plain XLA only: LAPACK calls in a vmapped training
  scan have hung XLA:CPU's runtime (docs/performance.md). A shared ``a``
  is factored once, for all right-hand sides side by side."""
  a_batched, b_batched = in_batched
  solve = functools.partial(_blocked_spd_solve, lapack=False)
  if not a_batched:
    n, d = b.shape[-2:]
    if not b_batched:
      b = jnp.broadcast_to(b, (axis_size, n, d))
    x = solve(a, jnp.moveaxis(b, 0, 1).reshape(n, axis_size * d))
    return jnp.moveaxis(x.reshape(n, axis_size, d), 1, 0), True
  if not b_batched:
    b = jnp.broadcast_to(b, (axis_size,) + b.shape)
  return jax.vmap(solve)(a, b), True


def _spd_solve(a, b):
  """``a⁻¹ b`` for symmetric positive definite ``a``, ``b`` shaped ``(n, d)``.

  On CPU, factors up to ``_CPU_SOLVE_MAX`` (2048) on a side are solved by
  :func:`_blocked_spd_solve`, whose only LAPACK calls are Cholesky factors
  small enough for OpenBLAS to keep on one thread, and under ``vmap`` with
  no LAPACK call at all. jaxlib's own solve (:func:`_lapack_spd_solve`)
  makes triangular-solve calls that wake OpenBLAS's worker threads, which
  then spin-wait and slow every operation after them when the cores are
  shared: a ``paper_mlp`` step of :func:`sibp_jax.sibp` took 1.51× Adam's
  time that way against 1.30× with ``OPENBLAS_NUM_THREADS=1``
  (``examples/benchmark.py --section step``). Accelerators keep their
  native solvers.
  """
  if a.shape[0] > _CPU_SOLVE_MAX:
    return _lapack_spd_solve(a, b)
  return jax.lax.platform_dependent(a, b, cpu=_cpu_spd_solve,
                                    default=_lapack_spd_solve)


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
  """

  kind: Any
  inputs: jax.Array
  residual: jax.Array
  kernel_shape: tuple[int, ...] | None
  bias_shape: tuple[int, ...] | None
  lam_kernel: jax.Array
  lam_bias: jax.Array

  def apply(self, delta):
    """``A(Δ)``: the change of the layer's output for a change ``Δ``."""
    dk, db = delta
    out = 0.0
    if dk is not None:
      out = self.kind.apply(dk, None, self.inputs)
    if db is not None:
      # Broadcast against an array shaped and sharded like the residual: a
      # replicated broadcast_to would gather a batch sharded over devices.
      out = (jnp.zeros_like(self.residual) if dk is None else out) + db
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
    return jnp.sqrt(_tree_vdot(diff, diff))


jax.tree_util.register_dataclass(
    RidgeProblem, data_fields=['inputs', 'residual', 'lam_kernel', 'lam_bias'],
    meta_fields=['kind', 'kernel_shape', 'bias_shape'])


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
  and a :class:`SolveInfo`. It runs under ``jit`` and ``vmap`` (static loop
  bounds, no Python branching on values), and reports rather than raises.
  Any object with such a method can be passed as ``solver=`` to
  :func:`sibp_jax.sibp` (linearized), :func:`sibp_jax.proxbp` and as
  ``last_layer_solver=``; a frozen dataclass keeps it hashable.

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
    ...     info = sibp_jax.SolveInfo(jnp.ones((), jnp.int32),
    ...                               jnp.ones((), jnp.float32))
    ...     return delta, info
    >>> tx = sibp_jax.proxbp(1.0, solver=OneGradientStep())
  """

  def solve(self, problem: RidgeProblem) -> tuple[
      tuple[jax.Array | None, jax.Array | None], SolveInfo]:
    ...


def _diagonal(p: RidgeProblem) -> bool:
  """Whether the kind's ``FᵀF`` is diagonal (an embedding) and no bias."""
  return (hasattr(p.kind, 'gram_diagonal') and p.kernel_shape is not None
          and p.bias_shape is None)


def _diagonal_solve(p: RidgeProblem):
  """The closed-form solve of a kind whose ``FᵀF`` is diagonal.

  ``(FᵀF + λ) ΔW = FᵀR`` row by row of the kernel: ``FᵀR`` is the
  transpose of the layer's map (a scatter-add of the residual's rows for an
  embedding), ``diag(FᵀF)`` the kind's :meth:`gram_diagonal`.
  """
  (rhs, _) = p.transpose(p.residual)
  dtype = rhs.dtype
  diagonal = p.kind.gram_diagonal(p.inputs, dtype) + jnp.asarray(
      p.lam_kernel, dtype)
  diagonal = diagonal.reshape(diagonal.shape + (1,) * (rhs.ndim - 1))
  dk = rhs / diagonal
  miss = diagonal * dk - rhs
  info = SolveInfo(jnp.zeros((), jnp.int32),
                   ratio(jnp.linalg.norm(miss), jnp.linalg.norm(rhs)),
                   jnp.zeros((), bool))
  return (dk, None), info


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
  :attr:`SolveInfo.residual`.

  For a convolution the rows are examples times output positions and the
  columns the kernel's patch (im2col), so the factor is the small
  ``(k·k·c_in + 1)``-square patch Gram matrix. When even the smaller factor
  would exceed ``max_factor`` on a side (a huge patch at a huge batch), the
  solve is handed to ``fallback``, matrix-free conjugate gradient through
  the layer and its transpose, chosen from the static shapes.

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
  fallback: Any = None

  def __post_init__(self):
    if self.method not in ('auto', 'cholesky', 'woodbury'):
      raise ValueError("Ridge(method=...) must be 'auto', 'cholesky' or "
                       f"'woodbury', got {self.method!r}")
    if self.max_factor is not None and (
        not isinstance(self.max_factor, int) or self.max_factor < 1):
      raise ValueError('Ridge(max_factor=...) must be a positive int or None, '
                       f'got {self.max_factor!r}')

  def path(self, p: RidgeProblem) -> str:
    """Which solve :meth:`solve` takes for this problem, from static shapes.

    Args:
      p: the problem; only its shapes, and the sharding in its residual's
        type, are read (abstract values such as ``jax.ShapeDtypeStruct``
        serve too).

    Returns:
      ``'diagonal'`` (a kind whose ``FᵀF`` is diagonal, an embedding:
      closed form per kernel row), ``'cholesky'`` (the ``m × m`` factor
      of ``FᵀF + Λ``), ``'woodbury'``
      (the ``n × n`` factor of ``I + FΛ⁻¹Fᵀ``) or ``'fallback'`` (the
      iterative ``fallback``, reported in :attr:`SolveInfo.fallback`).

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

  def solve(self, p: RidgeProblem):
    """Returns ``((ΔW, Δb), SolveInfo)``; fixed blocks are ``None``."""
    fit_kernel, fit_bias = p.kernel_shape is not None, p.bias_shape is not None
    r = p.kind.output_rows(p.residual)
    path = self.path(p)
    if path == 'diagonal':
      return _diagonal_solve(p)
    if path == 'fallback':
      delta, info = (self.fallback or ConjugateGradient(10)).solve(p)
      return delta, info._replace(fallback=jnp.ones((), bool))
    blocks = []
    if fit_kernel:
      blocks.append(p.kind.design(p.inputs, tuple(p.kernel_shape[:-2])))
    if fit_bias:
      blocks.append(jnp.ones_like(r[:, :1]))  # sharded like the rows
    f = jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
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
    # The reported residual is the factored system's, along one fixed random
    # ±1 combination of the output columns: an estimate at n² cost instead of
    # checking all d_out right-hand sides (n²·d_out, about 10% of a step).
    probe = jax.random.rademacher(jax.random.key(0), (r.shape[-1],), f.dtype)
    if use_cholesky:
      rhs = sharding.contract_rows(f, r, PRECISION)
      gram = sharding.contract_rows(f, f, PRECISION) + jnp.diag(lam)
      x = _spd_solve(gram, rhs)
      system, solution = gram, x
    else:
      scaled = f / lam
      kernel = jnp.eye(n, dtype=f.dtype) + jnp.matmul(
          scaled, f.T, precision=PRECISION)
      y = _spd_solve(kernel, r)
      x = jnp.matmul(scaled.T, y, precision=PRECISION)
      # Since x = Λ⁻¹Fᵀy exactly, the normal equations' residual is
      # Fᵀ(K y - R): report the n × n system's own residual instead.
      system, solution, rhs = kernel, y, r
    rhs_probe = jnp.matmul(rhs, probe, precision=PRECISION)
    miss = jnp.matmul(system, jnp.matmul(solution, probe, precision=PRECISION),
                      precision=PRECISION) - rhs_probe
    dk = db = None
    if fit_kernel:
      dk = x[:n_kernel].reshape(p.kernel_shape)
    if fit_bias:
      db = x[n_kernel:].reshape(p.bias_shape)
    info = SolveInfo(jnp.zeros((), jnp.int32),
                     ratio(jnp.linalg.norm(miss), jnp.linalg.norm(rhs_probe)),
                     jnp.zeros((), bool))
    return (dk, db), info


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
      authors'; 0 to always run ``iterations`` steps).

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
      return isinstance(kind, problems_lib.Dense)
    return self.blocks == 'columns'

  def solve(self, p: RidgeProblem):
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
      dot = _tree_vdot

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
    if problems_lib.unroll_loops(p.kind):
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
    k, x, _, _, rr, _ = carry
    info = SolveInfo(k, ratio(jnp.sqrt(jnp.sum(rr)),
                              jnp.sqrt(jnp.sum(rr0))), jnp.zeros((), bool))
    return x, info


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
        :func:`sibp_jax._src.problems.unroll_loops`).

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
    info = SolveInfo(evals, ratio(jnp.sqrt(jnp.maximum(gg, 0)),
                                  jnp.sqrt(jnp.maximum(gg0, 0))),
                     jnp.zeros((), bool))
    return x, y, info
