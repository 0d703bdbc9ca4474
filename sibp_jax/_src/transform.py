"""SIBP and ProxBP as optax gradient transformations.

Both read the layer-wise problems of one forward pass from the keyword
argument ``problems=`` of ``update`` (see
``sibp_jax.nnx.value_grad_and_problems`` and
``sibp_jax.linen.value_grad_and_problems``); their shared state, update and
diagnostics live in ``layerwise.py``, the check of ``problems`` against the
incoming gradient in ``mismatch.py``.

The direction of a recognised layer comes from ``problems``, not from the
incoming updates: a transformation chained BEFORE these ones does not act on
those parameters. ``state.info.grad_mismatch`` compares the incoming
gradient of the last layer's kernel with the one ``problems`` imply, and
the transformation warns (once) when they disagree.
"""

from __future__ import annotations

import warnings
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sibp_jax._src import layerwise
from sibp_jax._src import mismatch
from sibp_jax._src import rules
from sibp_jax._src import solvers

VARIANTS = ('linearized', 'paper')


class SkipOnBadStepState(NamedTuple):
  """State of an outer optimizer that is held still on flagged steps.

  Attributes:
    inner: the inner transformation's state.
    outer: the outer optimizer's state, as it was after the last good step.
    notfinite_count: skipped steps in a row, up to this one (0 after a good
      step), as ``optax.apply_if_finite`` counts them.
    total_notfinite: skipped steps in all.
  """

  inner: optax.OptState
  outer: optax.OptState
  notfinite_count: jax.Array
  total_notfinite: jax.Array


def check_positive(name: str, value) -> None:
  """Rejects a concrete value ≤ 0 or not finite; schedules and tracers pass."""
  if callable(value):
    return
  try:
    v = np.asarray(value, dtype=np.float64)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError, TypeError):
    return
  if v.shape != () or not np.isfinite(v) or v <= 0:
    raise ValueError(f'{name} must be a positive finite scalar, got {value!r}')


def ridge_solver(solver: str | solvers.RidgeSolver) -> solvers.RidgeSolver:
  """``'exact'``, ``'cg'`` or a solver object to a solver object.

  Any object with a ``solve`` method serves (the
  :class:`sibp_jax.RidgeSolver` protocol), a user's own included.
  """
  if isinstance(solver, str):
    if solver == 'exact':
      return solvers.Ridge()
    if solver == 'cg':
      return solvers.ConjugateGradient()
  elif callable(getattr(solver, 'solve', None)):
    return solver
  raise ValueError("solver must be 'exact', 'cg' or an object with a "
                   'solve(problem) method (sibp_jax.Ridge(...), '
                   'sibp_jax.ConjugateGradient(...) or your own, see '
                   f'sibp_jax.RidgeSolver), got {solver!r}')


def _value_at(value, count):
  return value(count) if callable(value) else value


def scale_by_sibp(
    learning_rate: optax.ScalarOrSchedule,
    *,
    variant: str = 'linearized',
    lambda_w: jax.typing.ArrayLike = 1.0,
    lambda_b: jax.typing.ArrayLike = 1.0,
    solver: str | solvers.RidgeSolver | None = None,
    nonlinear_solver: solvers.NonlinearCG | None = None,
    last_layer_solver: str | solvers.RidgeSolver | None = None,
    on_grad_mismatch: str = 'warn',
) -> optax.GradientTransformationExtraArgs:
  r"""The semi-implicit back propagation direction (Liu & Zhang, 2020).

  From the output error ``e = ∂ℓ/∂z`` of one forward pass, SIBP moves the
  neurons by an explicit step ``t = f - η e`` and fits each layer's
  parameters to the moved neurons by a proximal (implicit) step, from the top
  layer down, chaining the error through the *updated* weights:

  .. math::

     θ_i^{new} = \arg\min_θ \|s_i(A_i(f_{i-1}; θ)) - t_i\|^2
                 + λ_W \|W - W_i\|^2 + λ_b \|b - b_i\|^2,\qquad
     e \leftarrow (s_i'(g_i) ⊙ e)\, W_i^{new\,⊤}.

  Data terms are sums over the batch and ``λ`` is absolute, the units of the
  paper's settings (η = 0.1, λ_W = λ_b = 1).

  ``variant='linearized'`` (default) pulls the target back through the
  activation's linearization, ``u = g - η s'(g) ⊙ e``, which makes each
  subproblem a ridge regression in ``X = [W; b]`` solved exactly:
  ``X_new = X_old + (FᵀF + Λ)⁻¹ Fᵀ (u - g)`` with ``F = [f, 1]`` (Cholesky or
  batch-space Woodbury by shape, see :class:`sibp_jax.Ridge`).
  ``variant='paper'`` fits through the activation as the authors do: weights
  then bias, each by 5 iterations of Fletcher–Reeves nonlinear CG with Armijo
  backtracking over powers of ``ρ`` from the authors' first trial
  (:class:`sibp_jax.NonlinearCG`, docs/algorithms.md section 1). The last
  layer, being linear, is solved exactly by default, where the authors run
  the same 5 iterations from a first trial ``α₀ = 1``. The linearized
  variant is the default: it lowers the loss faster per epoch and per
  second (the one-epoch table of docs/performance.md). :func:`sibp_jax.sibp`
  is this direction scaled by the learning rate, and its docstring the
  place for usage.

  The returned direction is ``(X_old - X_new) / η`` for every parameter of a
  recognised linear layer, so that scaling by ``-η`` gives the SIBP step; all
  other parameters get the incoming gradient unchanged.

  Args:
    learning_rate: ``η``, the step on the neurons (> 0; a scalar or an optax
      schedule of the step count). The paper uses 0.1.
    variant: ``'linearized'`` or ``'paper'`` (static).
    lambda_w: ``λ_W``, proximal weight of the kernels (> 0, absolute;
      default 1).
    lambda_b: ``λ_b``, proximal weight of the biases (> 0, absolute;
      default 1).
    solver: ``'linearized'`` only: the ridge solver of every layer,
      ``'exact'`` (default), ``'cg'``, a :class:`sibp_jax.Ridge` /
      :class:`sibp_jax.ConjugateGradient` or any
      :class:`sibp_jax.RidgeSolver`. (``solver=NonlinearCG(...)`` with
      ``variant='paper'``, the earlier spelling, still works and warns a
      ``DeprecationWarning``.)
    nonlinear_solver: ``'paper'`` only: the fit of the hidden layers
      through their activation, a :class:`sibp_jax.NonlinearCG` (default
      ``NonlinearCG()``, the authors' 5 iterations).
    last_layer_solver: ``'paper'`` only: the exact solver of the last
      (linear) layer, a :class:`sibp_jax.Ridge` (default ``Ridge()``). Pass
      ``Ridge('cholesky')`` when the batch is sharded under automatic
      (GSPMD) sharding, see :class:`sibp_jax.Ridge` (and, as
      ``nonlinear_solver``, ``NonlinearCG(space='parameters')``).
    on_grad_mismatch: what to do when the incoming gradient disagrees with
      ``problems`` (:attr:`LayerwiseInfo.grad_mismatch` above 1e-2, 1e-1
      for 16-bit gradients: stale problems, a transformation chained
      before this one, or ``optax.MultiSteps``, whose final micro-step
      hands on the averaged gradient with the last micro-batch's
      problems): ``'warn'`` (default; a
      ``sibp_jax.GradMismatchWarning``, once per transformation object),
      ``'raise'`` (``sibp_jax.GradMismatchError``, which under ``jit``
      surfaces as the runtime error of the step) or ``'ignore'`` (static).
      The check is a host callback (``jax.debug.callback``) in the
      compiled step; JAX's persistent compilation cache does not store
      programs with one, so ``'ignore'`` is the setting for runs that
      rely on that cache.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
    params, *, problems)`` needs ``params`` and the keyword ``problems``
    (other keyword arguments are ignored). The state is a
    :class:`LayerwiseState` with a :class:`LayerwiseInfo`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sibp_jax
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
    ...                        nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    >>> tx = optax.chain(sibp_jax.scale_by_sibp(0.1),
    ...                  optax.scale_by_learning_rate(0.1))
    >>> opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> x, y = jnp.ones((16, 4)), jnp.zeros((16,), jnp.int32)
    >>> loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
    ...     model, x, y,
    ...     loss_fn=optax.softmax_cross_entropy_with_integer_labels)
    >>> _ = opt.update(model, grads, problems=problems)
    >>> bool(opt.opt_state[0].info.finite[...])
    True

  References:
    Liu & Zhang, `Semi-Implicit Back Propagation
    <https://arxiv.org/abs/2002.03516>`_, 2020.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  check_positive('learning_rate', learning_rate)
  check_positive('lambda_w', lambda_w)
  check_positive('lambda_b', lambda_b)
  if variant == 'paper':
    if isinstance(solver, solvers.NonlinearCG) and nonlinear_solver is None:
      warnings.warn(
          "scale_by_sibp(variant='paper', solver=NonlinearCG(...)) is "
          'deprecated: pass nonlinear_solver=NonlinearCG(...).',
          DeprecationWarning, stacklevel=3)
      solver, nonlinear_solver = None, solver
    if solver is not None:
      raise ValueError(
          "variant='paper' fits the hidden layers through the activation "
          'with nonlinear_solver=sibp_jax.NonlinearCG(...) and the last '
          'layer with last_layer_solver=...; solver= is for '
          f"variant='linearized', got solver={solver!r}")
    nonlinear_solver = (solvers.NonlinearCG() if nonlinear_solver is None
                        else nonlinear_solver)
    if not isinstance(nonlinear_solver, solvers.NonlinearCG):
      raise ValueError('nonlinear_solver must be a sibp_jax.NonlinearCG, '
                       f'got {nonlinear_solver!r}')
    last_layer_solver = ridge_solver(
        'exact' if last_layer_solver is None else last_layer_solver)
  else:
    solver = ridge_solver('exact' if solver is None else solver)
    for name, value in (('nonlinear_solver', nonlinear_solver),
                        ('last_layer_solver', last_layer_solver)):
      if value is not None:
        raise ValueError(f"{name} is for variant='paper' only; the "
                         "linearized variant's solver= serves every layer.")
  check = mismatch.make_check('scale_by_sibp', on_grad_mismatch)

  def make_rule(count, loss_terms):
    del loss_terms
    eta = _value_at(learning_rate, count)
    if variant == 'linearized':
      return rules.LinearizedRule(eta, lambda_w, lambda_b, solver)
    return rules.PaperRule(eta, lambda_w, lambda_b, nonlinear_solver,
                           last_layer_solver)

  return optax.GradientTransformationExtraArgs(
      layerwise.init_state, layerwise.layerwise_update(
          'scale_by_sibp', make_rule,
          lambda count: _value_at(learning_rate, count), check))


def scale_by_proxbp(
    tau_prox: jax.typing.ArrayLike = 0.05,
    *,
    solver: str | solvers.RidgeSolver = 'exact',
    on_grad_mismatch: str = 'warn',
) -> optax.GradientTransformationExtraArgs:
  r"""The proximal backpropagation direction (Frerix et al., 2018).

  Backpropagates the mean loss's gradient ``δ_i = ∂J/∂g_i`` with the old
  weights, and replaces each linear layer's gradient step by a proximal step
  towards the target ``τ_i = g_i - δ_i``:

  .. math::

     X^{new} = \arg\min_X \tfrac12 \|F X - τ_i\|^2
               + \tfrac{1}{2 τ_{prox}} \|X - X_{old}\|^2 ,

  with ``F = [f_{i-1}, 1]`` and the data term summed over the batch. The
  direction ``X_old - X_new`` (to first order ``τ_prox ∇J`` for small
  ``τ_prox``) is handed on to an outer optimizer; parameters no recognised
  linear layer owns get their plain gradient. Unlike the authors' models,
  every recognised layer (the last one too) takes the proximal step.

  Args:
    tau_prox: ``τ_prox``, the proximal step (> 0; default 0.05, the authors'
      MLP setting).
    solver: ``'exact'`` (default), ``'cg'`` or a :class:`sibp_jax.Ridge` /
      :class:`sibp_jax.ConjugateGradient`; ``ConjugateGradient(3)`` is the
      authors' "prox_cg3".
    on_grad_mismatch: ``'warn'`` (default), ``'raise'`` or ``'ignore'``,
      see :func:`scale_by_sibp`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
    params, *, problems)`` needs ``params`` and the keyword ``problems``.
    The state is a :class:`LayerwiseState` with a :class:`LayerwiseInfo`.

  Example:
    >>> import optax, sibp_jax
    >>> tx = optax.chain(sibp_jax.scale_by_proxbp(0.05), optax.sgd(1.0))

  References:
    Frerix, Möllenhoff, Moeller & Cremers, `Proximal Backpropagation
    <https://arxiv.org/abs/1706.04638>`_, ICLR 2018.
  """
  check_positive('tau_prox', tau_prox)
  solver = ridge_solver(solver)
  check = mismatch.make_check('scale_by_proxbp', on_grad_mismatch)

  def make_rule(count, loss_terms):
    del count
    return rules.ProxRule(tau_prox, loss_terms, solver)

  return optax.GradientTransformationExtraArgs(
      layerwise.init_state, layerwise.layerwise_update(
          'scale_by_proxbp', make_rule, lambda count: 1.0, check))


class OthersState(NamedTuple):
  """The state of :func:`with_others`: the main transformation's and the
  state of the one for parameters no layer owns."""

  main: Any
  others: Any


def with_others(main: optax.GradientTransformation,
                others: optax.GradientTransformation,
                vectors_only: bool = False,
                ) -> optax.GradientTransformationExtraArgs:
  """``main`` for the parameters a layer owns, ``others`` for the rest.

  Which leaves a layer owns is read off the keyword ``problems`` at every
  update (``layerwise.owned_mask``, fixed when the step is traced):
  normalisation scales and biases, and parameters let through with
  ``unsolved='gradient'``, get ``others``'s step on their incoming update
  instead of ``main``'s. Where every leaf is owned ``others`` does not run.
  With ``vectors_only``, ``others`` keeps state for, and runs on, the
  leaves of at most one axis alone (as Muon hands its non-matrix
  parameters to Adam): an unowned matrix takes ``main``'s step. Meant as
  the outer transformation of :func:`skip_outer_on_bad_step`, which holds
  both states still on a flagged step.
  """
  main = optax.with_extra_args_support(main)
  if vectors_only:
    others = optax.masked(others, lambda params: jax.tree.map(
        lambda p: jnp.ndim(p) <= 1, params))
  others = optax.with_extra_args_support(others)

  def init(params):
    return OthersState(main.init(params), others.init(params))

  def update(updates, state, params=None, **extra_args):
    step, main_state = main.update(updates, state.main, params,
                                   **extra_args)
    mask = layerwise.owned_mask(extra_args['problems'], params)
    if vectors_only:
      mask = jax.tree.map(lambda m, p: m or jnp.ndim(p) > 1, mask, params)
    if all(jax.tree.leaves(mask)):
      return step, OthersState(main_state, state.others)
    other_step, others_state = others.update(updates, state.others, params)
    step = jax.tree.map(lambda m, a, b: a if m else b, mask, step, other_step)
    return step, OthersState(main_state, others_state)

  return optax.GradientTransformationExtraArgs(init, update)


def skip_outer_on_bad_step(
    inner: optax.GradientTransformationExtraArgs,
    outer: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Chains ``inner`` then ``outer``, holding ``outer`` still on flagged steps.

  ``inner`` must keep a :class:`LayerwiseInfo` in ``state.info``. When its
  ``finite`` flag is ``False`` the update is zero and ``outer``'s state
  (momentum, moments, counters) is left as it was, so a bad batch moves no
  parameter even through momentum. The state counts the skipped steps, in
  a row (``notfinite_count``) and in all (``total_notfinite``), as
  ``optax.apply_if_finite`` does.
  """
  outer = optax.with_extra_args_support(outer)

  def init(params):
    # Two arrays, not one twice: a donated state must not hold one buffer
    # in two places.
    return SkipOnBadStepState(inner.init(params), outer.init(params),
                              jnp.zeros((), jnp.int32),
                              jnp.zeros((), jnp.int32))

  def update(updates, state, params=None, **extra_args):
    direction, inner_state = inner.update(updates, state.inner, params,
                                          **extra_args)
    step, outer_state = outer.update(direction, state.outer, params,
                                     **extra_args)
    ok = inner_state.info.finite
    step = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), step)
    outer_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                               outer_state, state.outer)
    skipped = (~ok).astype(jnp.int32)
    return step, SkipOnBadStepState(
        inner_state, outer_state,
        jnp.where(ok, 0, state.notfinite_count + 1).astype(jnp.int32),
        state.total_notfinite + skipped)

  return optax.GradientTransformationExtraArgs(init, update)
