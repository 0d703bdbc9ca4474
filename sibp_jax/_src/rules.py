"""The per-layer rules of the backward sweep: what each algorithm solves.

A rule receives one layer (its forward-pass input and output), its
parameters and the error reaching it, and returns the layer's change as a
:class:`LayerUpdate`, with its solver's :class:`sibp_jax.SolveInfo`. The
rules are those of docs/algorithms.md: :class:`LinearizedRule` (section 2),
:class:`PaperRule` (section 1) and :class:`ProxRule` (section 3).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sibp_jax._src import kinds
from sibp_jax._src import sharding
from sibp_jax._src import solvers

PRECISION = kinds.PRECISION


class LayerUpdate(NamedTuple):
  """A layer's change ``X_new - X_old``, as the solvers compute it.

  Handing on the change rather than the new parameters keeps a step that is
  tiny next to the weights (ProxBP at small ``τ_prox``, SIBP at large ``λ``)
  free of the cancellation in ``X_old - X_new``.
  """

  kernel: jax.Array
  bias: jax.Array | None
  info: solvers.SolveInfo


def _ridge_update(solver: solvers.RidgeSolver, layer, kernel, bias,
                  residual, lam_kernel, lam_bias) -> LayerUpdate:
  """Kernel and bias jointly from the ridge problem with target ``g + R``."""
  (dk, db), info = solver.solve(solvers.RidgeProblem.weighted(
      layer.kind, layer.inputs, residual, kernel.shape,
      None if bias is None else bias.shape, lam_kernel, lam_bias,
      layer.row_weights))
  del kernel, bias
  return LayerUpdate(dk, db, info)


@dataclasses.dataclass(frozen=True)
class LinearizedRule:
  """SIBP with exact solves (docs/algorithms.md section 2).

  ``u - g = -η e_g``; ``X_new = X_old + (FᵀF + Λ)⁻¹ Fᵀ (u - g)`` with
  ``Λ = diag(λ_W, …, λ_W, λ_b)``; the error chains through the new weights.
  """

  learning_rate: jax.typing.ArrayLike
  lam_kernel: jax.typing.ArrayLike
  lam_bias: jax.typing.ArrayLike
  solver: solvers.RidgeSolver
  chain_new = True

  def __call__(self, layer, kernel, bias, e_f, e_g):
    del e_f
    return _ridge_update(self.solver, layer, kernel, bias,
                         self.residual(e_g), *self.lam)

  def residual(self, e_g):
    """The ridge problem's right-hand side ``u - g`` from ``e_g``."""
    return -self.learning_rate * e_g

  @property
  def lam(self):
    """``(λ_kernel, λ_bias)``."""
    return self.lam_kernel, self.lam_bias


@dataclasses.dataclass(frozen=True)
class ProxRule:
  """ProxBP (docs/algorithms.md section 3).

  ``τ - g = -δ = -e_g / N`` (the mean loss's backprop gradient, computed
  with the old weights because the error chains through them; ``N`` is
  the number of loss terms, :attr:`sibp_jax.Problems.loss_terms`: the
  batch size for one loss per example), and
  ``X_new = argmin ½‖F X - τ‖² + 1/(2τ_prox)‖X - X_old‖²``, i.e. the ridge
  problem with ``Λ = I / τ_prox``.
  """

  tau_prox: jax.typing.ArrayLike
  loss_terms: jax.typing.ArrayLike
  solver: solvers.RidgeSolver
  chain_new = False

  def __call__(self, layer, kernel, bias, e_f, e_g):
    del e_f
    lam = jnp.asarray(self.lam[0], e_g.dtype)
    return _ridge_update(self.solver, layer, kernel, bias,
                         self.residual(e_g), lam, lam)

  def residual(self, e_g):
    """The ridge problem's right-hand side ``τ - g`` from ``e_g``."""
    return -e_g / jnp.asarray(self.loss_terms, e_g.dtype)

  @property
  def lam(self):
    """``(λ_kernel, λ_bias)``, both ``1 / τ_prox``."""
    lam = 1.0 / jnp.asarray(self.tau_prox)
    return lam, lam


def tied_update(rule, lookups, attends, kernel) -> LayerUpdate:
  """One embedding table's change from its lookups and ``attend`` uses.

  ``lookups`` and ``attends`` are ``(layer, e_g)`` pairs of the table's
  applications as :class:`sibp_jax.Embed` and :class:`sibp_jax.Attend`. The
  ridge problem in the table's change ``Δ`` has the rows of both: a lookup
  row of id ``v`` asks ``Δ_v ≈ r``, an attend row with input ``h`` asks
  ``h Δᵀ ≈ R``. Its normal equations are separate per table row,

      (HᵀWH + (λ + c_v) I) Δ_vᵀ = Hᵀ R_{:, v} + s_v,

  with ``H``, ``R`` the attend rows (counts ``W``), ``c_v`` the weighted
  count of id ``v`` among the lookup rows and ``s_v`` their summed
  residual (the residuals carry the weights already, through the error:
  docs/algorithms.md, "Weights"). Each layer's ``row_weights`` must be
  its final counts (:meth:`sibp_jax.LayerProblem.counted`). One
  eigendecomposition ``HᵀWH = Q diag(μ) Qᵀ`` serves every ``v``:
  ``Δ_v = ((M_v Q) / (μ + λ + c_v)) Qᵀ`` with ``M_v`` the right-hand
  side; the cost is ``O(d³ + V d²)`` plus the products with ``H``, never a
  ``V × V`` matrix. The solve is exact whatever the rule's solver.
  """
  lam = jnp.asarray(rule.lam[0], kernel.dtype)
  n_rows, d = kernel.shape
  counts = jnp.zeros((n_rows,), kernel.dtype)
  rhs = jnp.zeros_like(kernel)
  for layer, e_g in lookups:
    kind = layer.kind
    w = (None if layer.row_weights is None
         else layer.row_weights.astype(kernel.dtype))
    counts = counts + kind.gram_diagonal(layer.inputs, kernel.dtype, w)
    r = kind.output_rows(rule.residual(e_g))
    # A sum over the rows: whole on every device when they are split.
    rhs = rhs.at[sharding.reshape_rows(layer.inputs, (-1,))].add(
        r, out_sharding=sharding.replicated(layer.inputs))
  gram = jnp.zeros((d, d), kernel.dtype)
  for layer, e_g in attends:
    h = layer.kind.design(layer.inputs)
    r = layer.kind.output_rows(rule.residual(e_g))
    hw = h if layer.row_weights is None else h * sharding.reshape_rows(
        layer.row_weights, (-1, 1)).astype(kernel.dtype)
    gram = gram + sharding.contract_rows(hw, h, PRECISION)
    rhs = rhs + sharding.contract_rows(r, h, PRECISION)
  mu, q = jnp.linalg.eigh(gram)
  rotated = jnp.matmul(rhs, q, precision=PRECISION)
  delta = jnp.matmul(rotated / (mu + lam + counts[:, None]), q.T,
                     precision=PRECISION)
  return LayerUpdate(delta, None, solvers.SolveInfo(
      jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
      jnp.asarray(solvers.SolveStatus.CONVERGED, jnp.int32)))


@dataclasses.dataclass(frozen=True)
class PaperRule:
  """SIBP as its authors run it (docs/algorithms.md section 1).

  The target on the layer's activation is ``t = f_i - η e_f``. Weights are
  solved first with the bias held at its old value, then the bias with the
  new weights::

      W ← argmin_W ‖s(A(f; W, b)) - t‖² + λ_W ‖W - W_old‖²
      b ← argmin_b ‖s(A(f; W_new, b)) - t‖² + λ_b ‖b - b_old‖²

  The last layer has no segment, so both are ridge problems, solved exactly
  by ``last_solver`` (which also sidesteps the reference code's slip of
  leaving the bias out of its first last-layer gradient). Hidden layers are
  fitted through the segment by ``inner`` (:class:`NonlinearCG`), one line
  search for the whole layer: the segment is an arbitrary parameter-free
  function (pooling and flatten mix positions), so separability over output
  units is not assumed. When the layer has fewer rows (examples, or
  examples times positions) than kernel inputs, as a dense layer at a batch
  smaller than its width, the kernel's iteration runs in row space
  (:meth:`NonlinearCG.minimize_in_row_space`): the same iterates, with
  ``B × B`` instead of ``B × d_in`` products, and the old pre-activation
  taken from the forward pass.
  """

  learning_rate: jax.typing.ArrayLike
  lam_kernel: jax.typing.ArrayLike
  lam_bias: jax.typing.ArrayLike
  inner: solvers.NonlinearCG
  last_solver: solvers.RidgeSolver
  chain_new = True

  def __call__(self, layer, kernel, bias, e_f, e_g):
    del e_g
    eta = self.learning_rate
    if layer.row_weights is not None:
      raise ValueError(
          f"variant='paper' fits layer '{layer.name}' through its activation "
          'unweighted, but its rows are weighted: weights= (masks) were '
          'given, or the layer is applied to an input without the batch '
          '(its rows count once per example); use '
          "variant='linearized'.")
    if layer.segment is None:
      residual = -eta * e_f
      (dk, _), info_k = self.last_solver.solve(solvers.RidgeProblem(
          layer.kind, layer.inputs, residual, kernel.shape, None,
          self.lam_kernel, self.lam_bias))
      if bias is None:
        return LayerUpdate(dk, None, info_k)
      residual = residual - layer.kind.apply(dk, None, layer.inputs)
      (_, db), info_b = self.last_solver.solve(solvers.RidgeProblem(
          layer.kind, layer.inputs, residual, None, bias.shape,
          self.lam_kernel, self.lam_bias))
      return LayerUpdate(dk, db, solvers.combine(info_k, info_b))

    activation = layer.segment(layer.outputs)
    target = activation - eta * e_f.astype(activation.dtype)

    def misfit(pre_activation):
      fit = layer.segment(pre_activation) - target
      # A sum, not vdot: with the batch sharded it is a local sum and one
      # scalar all-reduce (explicit sharding refuses a sharded contraction).
      return jnp.sum(jnp.square(fit))

    def proximal(delta, lam):
      return lam * jnp.vdot(delta, delta)

    def product(k):
      return layer.kind.apply(k, None, layer.inputs)

    # Both fits run in the change Δ from the old parameters (warm start
    # Δ = 0), so that a step tiny next to the weights is not lost to
    # cancellation in X_new - X_old.
    n, m = layer.kind.sizes(kernel.shape, layer.outputs.shape)
    if (n < m and self.inner.space == 'auto' and
        not sharding.rows_sharded(layer.outputs)):
      # Fewer rows than inputs (a dense layer at a batch smaller than its
      # width): run the same iteration in row space (see
      # NonlinearCG.minimize_in_row_space), where a step costs n × n
      # products instead of products with the n × m input. The old
      # pre-activation comes from the forward pass, not a second product.
      design = layer.kind.design(layer.inputs, tuple(kernel.shape[:-2]))
      gram = jnp.matmul(design, design.T, precision=PRECISION)
      def fit_rows(v):
        return misfit(layer.outputs + v.reshape(layer.outputs.shape))

      coef, image, info_k = self.inner.minimize_in_row_space(
          fit_rows, gram, self.lam_kernel,
          jnp.zeros((n, kernel.size // m), kernel.dtype))
      dk = jnp.matmul(design.T, coef,
                      precision=PRECISION).reshape(kernel.shape)
      image = image.reshape(layer.outputs.shape)
    else:
      # The kernel's fit sees it through the layer's linear map, which the
      # solver applies once per iteration (not once per line-search
      # trial); the bias's fit then reuses one product with the change.
      dk, info_k = self.inner.minimize(
          lambda y, d: misfit(layer.outputs + y) +
          proximal(d, self.lam_kernel), jnp.zeros_like(kernel),
          linear=product, unroll=kinds.unroll_loops(layer.kind))
      image = None if bias is None else product(dk)
    if bias is None:
      return LayerUpdate(dk, None, info_k)
    base = layer.outputs + image
    db, info_b = self.inner.minimize(
        lambda d: misfit(base + d) + proximal(d, self.lam_bias),
        jnp.zeros_like(bias))
    return LayerUpdate(dk, db, solvers.combine(info_k, info_b))
