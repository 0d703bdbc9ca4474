"""Symmetric positive definite solves by Cholesky, tuned for shared CPUs.

:func:`spd_solve` is the factorisation :class:`sibp_jax.Ridge` runs. On
CPU it factors small diagonal blocks (by LAPACK's ``potrf`` below the sizes
at which OpenBLAS starts threads, or by plain XLA under ``vmap``) and does
the rest by matrix products: a blocked Cholesky factor with its triangular
inverse, then one product per solve and one step of iterative refinement.
Accelerators keep their native solvers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sibp_jax._src.solvers import base

PRECISION = base.PRECISION


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


def spd_solve(a, b):
  """``a⁻¹ b`` for symmetric positive definite ``a``, ``b`` shaped ``(n, d)``.

  On CPU, factors up to ``_CPU_SOLVE_MAX`` (2048) on a side are solved by
  :func:`_blocked_spd_solve`, whose only LAPACK calls are Cholesky factors
  small enough for OpenBLAS to keep on one thread, and under ``vmap`` with
  no LAPACK call at all. jaxlib's own solve (:func:`_lapack_spd_solve`)
  makes triangular-solve calls that wake OpenBLAS's worker threads, which
  then spin-wait and slow every operation after them when the cores are
  shared (docs/performance.md, "Where the time goes"). Accelerators keep
  their native solvers.
  """
  if a.shape[0] > _CPU_SOLVE_MAX:
    return _lapack_spd_solve(a, b)
  return jax.lax.platform_dependent(a, b, cpu=_cpu_spd_solve,
                                    default=_lapack_spd_solve)
