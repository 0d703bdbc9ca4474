"""SIBP and ProxBP as optax gradient transformations.

Both transformations read the layer-wise problems of one forward pass from
the keyword argument ``problems=`` of ``update`` (see
``sibp_jax.nnx.value_grad_and_problems`` and
``sibp_jax.linen.value_grad_and_problems``), run the shared backward sweep
and return, for every parameter owned by a recognised linear layer, the
direction ``X_old - X_new`` (divided by the learning rate for SIBP, so that
``scale_by_learning_rate`` turns it back into the step). Parameters that no
recognised layer owns get the incoming gradient unchanged.

A step whose direction is not finite (NaN or Inf in the batch, the loss or a
solve) returns zeros, sets ``state.info.finite`` to ``False`` and leaves
``state.count`` (and so a schedule on the step size) where it was, as
``optax.apply_if_finite`` leaves its inner state.

The direction of a recognised layer comes from ``problems``, not from the
incoming updates: a transformation chained BEFORE these ones does not act on
those parameters. ``state.info.grad_mismatch`` compares the incoming
gradient of the last layer's kernel with the one ``problems`` imply, which
shows such a chain, or problems from another batch.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sibp_jax._src import problems as problems_lib
from sibp_jax._src import solvers
from sibp_jax._src import sweep

VARIANTS = ('linearized', 'paper')


class LayerwiseInfo(NamedTuple):
  """Diagnostics of the last step of SIBP or ProxBP, returned, not raised.

  Attributes:
    finite: ``False`` if the step was skipped because something was not
      finite (the returned direction is then zero and ``count`` stays).
    residual: the largest relative residual over the layers' subproblems
      (:attr:`sibp_jax.SolveInfo.residual`): round-off for exact solves,
      progress for iterative ones.
    iterations: inner iterations summed over layers (CG steps, or objective
      evaluations of the nonlinear solver).
    grad_mismatch: ``‖g - ĝ‖ / ‖ĝ‖`` for the last layer's kernel, with
      ``g`` the incoming update and ``ĝ = f_{L-1}ᵀ e / B`` the mean loss's
      gradient that ``problems`` imply (one product, the one the backward
      pass already computed). Round-off (about 1e-6 in float32) when the
      gradient and the problems come from the same forward pass; of order 1
      when a transformation before this one changed the gradient (clipping,
      scaling) or the problems come from another batch: the step still uses
      ``problems`` alone. Also nonzero when the loss holds more than the
      per-example term (a weight penalty on that kernel).
  """

  finite: jax.Array
  residual: jax.Array
  iterations: jax.Array
  grad_mismatch: jax.Array


# The name of earlier versions, for SIBP's state.
SIBPInfo = LayerwiseInfo


class ScaleBySIBPState(NamedTuple):
  """State of :func:`scale_by_sibp`."""

  count: jax.Array
  info: LayerwiseInfo


class ScaleByProxBPState(NamedTuple):
  """State of :func:`scale_by_proxbp`."""

  count: jax.Array
  info: LayerwiseInfo


class SkipOnBadStepState(NamedTuple):
  """State of an outer optimizer that is held still on flagged steps."""

  inner: Any
  outer: Any


def _empty_info() -> LayerwiseInfo:
  return LayerwiseInfo(jnp.ones((), bool), jnp.zeros((), jnp.float32),
                       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))


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


def ridge_solver(solver) -> Any:
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


def _missing_problems(name):
  return ValueError(
      f'{name}.update needs the keyword argument problems=..., the layer-wise '
      'problems of the forward pass that produced the gradients. Build both '
      'with sibp_jax.nnx.value_grad_and_problems(model, x, y, loss_fn=...) or '
      'sibp_jax.linen.value_grad_and_problems(module, params, x, y, '
      'loss_fn=...) and call update(grads, state, params, problems=problems). '
      'If you did pass problems= to apply_gradients of '
      'flax.training.train_state.TrainState: that class hands extra keyword '
      'arguments to .replace(), not to the optimizer; use '
      'sibp_jax.linen.TrainState, whose apply_gradients(grads=..., '
      'problems=...) passes them on.')


def _param_path(key_path):
  """A parameter's path, without the ``.value`` of a variable that holds it.

  An ``nnx.State`` of ``nnx.Variable``s flattens to paths ending in the
  attribute ``value``; a pure tree (``nnx.as_pure``) does not. Both name the
  parameter as ``problems`` do.
  """
  if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and (
      key_path[-1].name == 'value'):
    key_path = key_path[:-1]
  return tuple(problems_lib.key_name(k) for k in key_path)


def _locate(name, problems, grads, params):
  """Flattens the trees and finds each layer's kernel and bias leaves."""
  if params is None:
    raise ValueError(f'{name}.update needs params (the current parameters).')
  if not isinstance(problems, problems_lib.Problems):
    raise ValueError(
        f'{name}.update: problems= must be the sibp_jax.Problems returned by '
        f'value_grad_and_problems, got {type(problems).__name__}.')
  if not problems.layers:
    raise ValueError(f'{name}.update: problems hold no linear layer.')
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  grad_leaves, grad_def = jax.tree.flatten(grads)
  if grad_def != treedef:
    raise ValueError(f'{name}.update: the gradient tree does not match the '
                     f'parameter tree:\n{grad_def}\nvs\n{treedef}')
  index = {_param_path(path): i for i, (path, _) in enumerate(flat)}
  leaves = [leaf for _, leaf in flat]
  batch = problems.batch_size
  located = []
  for layer in problems.layers:
    found = []
    for path in (layer.kernel_path, layer.bias_path):
      if path is None:
        found.append(None)
        continue
      if path not in index:
        known = ', '.join(problems_lib.path_str(p) for p in index)
        raise ValueError(
            f'{name}.update: problems name the parameter '
            f"'{problems_lib.path_str(path)}' (layer {layer.name}), which is "
            'not in params; were the problems built from another model? '
            f'params hold: {known}')
      found.append(index[path])
    k, b = found
    if layer.inputs.shape[0] != batch or layer.outputs.shape[0] != batch:
      raise ValueError(
          f'{name}.update: layer {layer.name} holds inputs of batch '
          f'{layer.inputs.shape[0]} but the output error has batch {batch}.')
    layer.kind.check(layer.name, leaves[k].shape,
                     None if b is None else leaves[b].shape,
                     layer.inputs, layer.outputs)
    located.append((k, b))
  last = problems.layers[-1]
  if problems.output_error.shape != last.outputs.shape:
    raise ValueError(
        f'{name}.update: the output error has shape '
        f'{problems.output_error.shape} but the last layer ({last.name}) '
        f'outputs {last.outputs.shape}; were the problems built from another '
        'batch or model?')
  return leaves, grad_leaves, treedef, located


def _grad_mismatch(problems, grad, kernel):
  """``‖g - ĝ‖ / ‖ĝ‖`` for the last layer's kernel, ``ĝ = Aᵀ(e) / B``."""
  layer = problems.layers[-1]
  dtype = kernel.dtype
  inputs = layer.inputs.astype(dtype)
  error = problems.output_error.astype(dtype) / problems.batch_size
  # ĝ is the transpose of the layer's map applied to e / B: f_{L-1}ᵀ e / B
  # for a dense layer, one product.
  implied = jax.linear_transpose(
      lambda k: layer.kind.apply(k, None, inputs), kernel)(error)[0]
  diff = grad.astype(dtype) - implied
  return solvers.ratio(jnp.sqrt(jnp.sum(jnp.square(diff))),
                       jnp.sqrt(jnp.sum(jnp.square(implied)))).astype(
                           jnp.float32)


def _layerwise(name, make_rule, scale_of):
  """Builds ``update`` for a transformation defined by a sweep rule.

  Args:
    name: the transformation's name, for error messages.
    make_rule: ``(count, batch_size) -> rule``.
    scale_of: ``count -> s``; the direction is ``(X_old - X_new) / s``.
  """

  def update(updates, state, params=None, *, problems=None, **extra_args):
    del extra_args
    if problems is None:
      raise _missing_problems(name)
    leaves, grad_leaves, treedef, located = _locate(
        name, problems, updates, params)
    rule = make_rule(state.count, problems.batch_size)
    compute = [
        (leaves[k].astype(jnp.promote_types(leaves[k].dtype, jnp.float32)),
         None if b is None else leaves[b].astype(
             jnp.promote_types(leaves[k].dtype, jnp.float32)))
        for k, b in located]
    new = sweep.backward_sweep(problems, compute, rule)
    scale = scale_of(state.count)
    out = list(grad_leaves)
    for (k, b), upd in zip(located, new):
      out[k] = (-upd.kernel / scale).astype(leaves[k].dtype)
      if b is not None:
        out[b] = (-upd.bias / scale).astype(leaves[b].dtype)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in out]))
    out = [jnp.where(finite, x, jnp.zeros_like(x)) for x in out]
    info = LayerwiseInfo(
        finite,
        jnp.max(jnp.stack([u.info.residual for u in new])).astype(jnp.float32),
        sum(u.info.iterations for u in new).astype(jnp.int32),
        _grad_mismatch(problems, grad_leaves[located[-1][0]],
                       compute[-1][0]))
    # A skipped step leaves the count, and so a schedule, where it was.
    count = jnp.where(finite, optax.safe_increment(state.count), state.count)
    new_state = type(state)(count, info)
    return jax.tree.unflatten(treedef, out), new_state

  return update


def _value_at(value, count):
  return value(count) if callable(value) else value


def scale_by_sibp(
    learning_rate: optax.ScalarOrSchedule,
    *,
    variant: str = 'linearized',
    lambda_w: jax.typing.ArrayLike = 1.0,
    lambda_b: jax.typing.ArrayLike = 1.0,
    solver: Any = None,
    last_layer_solver: Any = None,
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
  variant is the default because it lowers the loss faster per epoch and
  per second: one epoch of Fashion-MNIST on the paper's 784-500-10 network
  at batch 100 took the training loss from 2.38 to 0.338 in 3.1 s of
  updates (linearized) against 0.371 in 6.7 s (paper), measured by
  ``OPENBLAS_NUM_THREADS=1 python examples/benchmark.py --section epoch``
  on 2 shared CPU cores.

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
    solver: the subproblem solver. For ``'linearized'``: ``'exact'``
      (default), ``'cg'`` or a :class:`sibp_jax.Ridge` /
      :class:`sibp_jax.ConjugateGradient`. For ``'paper'``: a
      :class:`sibp_jax.NonlinearCG` (default ``NonlinearCG(iterations=5)``).
    last_layer_solver: ``'paper'`` only: the exact solver of the last
      (linear) layer, a :class:`sibp_jax.Ridge` (default ``Ridge()``). Pass
      ``Ridge('cholesky')`` when the batch is sharded under automatic
      (GSPMD) sharding, see :class:`sibp_jax.Ridge` (and, as ``solver``,
      ``NonlinearCG(space='parameters')``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
    params, *, problems)`` needs ``params`` and the keyword ``problems``
    (other keyword arguments are ignored). The state is a
    :class:`ScaleBySIBPState` with a :class:`LayerwiseInfo`.

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
  if variant == 'linearized':
    solver = ridge_solver('exact' if solver is None else solver)
  else:
    solver = solvers.NonlinearCG() if solver is None else solver
    if not isinstance(solver, solvers.NonlinearCG):
      raise ValueError("variant='paper' fits through the activation and "
                       'needs solver=sibp_jax.NonlinearCG(...), got '
                       f'{solver!r}')
  if variant == 'paper':
    last_layer_solver = ridge_solver(
        'exact' if last_layer_solver is None else last_layer_solver)
  elif last_layer_solver is not None:
    raise ValueError("last_layer_solver is for variant='paper' only; the "
                     "linearized variant's solver= serves every layer.")

  def make_rule(count, batch_size):
    del batch_size
    eta = _value_at(learning_rate, count)
    if variant == 'linearized':
      return sweep.LinearizedRule(eta, lambda_w, lambda_b, solver)
    return sweep.PaperRule(eta, lambda_w, lambda_b, solver, last_layer_solver)

  def init(params):
    del params
    return ScaleBySIBPState(jnp.zeros((), jnp.int32), _empty_info())

  return optax.GradientTransformationExtraArgs(
      init, _layerwise('scale_by_sibp', make_rule,
                       lambda count: _value_at(learning_rate, count)))


def scale_by_proxbp(
    tau_prox: jax.typing.ArrayLike = 0.05,
    *,
    solver: Any = 'exact',
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

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
    params, *, problems)`` needs ``params`` and the keyword ``problems``.
    The state is a :class:`ScaleByProxBPState` with a :class:`LayerwiseInfo`.

  Example:
    >>> import optax, sibp_jax
    >>> tx = optax.chain(sibp_jax.scale_by_proxbp(0.05), optax.sgd(1.0))

  References:
    Frerix, Möllenhoff, Moeller & Cremers, `Proximal Backpropagation
    <https://arxiv.org/abs/1706.04638>`_, ICLR 2018.
  """
  check_positive('tau_prox', tau_prox)
  solver = ridge_solver(solver)

  def make_rule(count, batch_size):
    del count
    return sweep.ProxRule(tau_prox, batch_size, solver)

  def init(params):
    del params
    return ScaleByProxBPState(jnp.zeros((), jnp.int32), _empty_info())

  return optax.GradientTransformationExtraArgs(
      init, _layerwise('scale_by_proxbp', make_rule, lambda count: 1.0))


def skip_outer_on_bad_step(
    inner: optax.GradientTransformationExtraArgs,
    outer: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Chains ``inner`` then ``outer``, holding ``outer`` still on flagged steps.

  ``inner`` must keep a :class:`LayerwiseInfo` in ``state.info``. When its
  ``finite`` flag is ``False`` the update is zero and ``outer``'s state
  (momentum, moments, counters) is left as it was, so a bad batch moves no
  parameter even through momentum.
  """
  outer = optax.with_extra_args_support(outer)

  def init(params):
    return SkipOnBadStepState(inner.init(params), outer.init(params))

  def update(updates, state, params=None, **extra_args):
    direction, inner_state = inner.update(updates, state.inner, params,
                                          **extra_args)
    step, outer_state = outer.update(direction, state.outer, params,
                                     **extra_args)
    ok = inner_state.info.finite
    step = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), step)
    outer_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                               outer_state, state.outer)
    return step, SkipOnBadStepState(inner_state, outer_state)

  return optax.GradientTransformationExtraArgs(init, update)
