"""What SIBP and ProxBP share as optax transformations: state and update.

Both transformations read the layer-wise problems of one forward pass from
the keyword argument ``problems=`` of ``update``, run the shared backward
sweep and return, for every parameter owned by a recognised linear layer,
the direction ``(X_old - X_new) / s`` (``s``: the learning rate for SIBP,
so that ``scale_by_learning_rate`` turns it back into the step; 1 for
ProxBP). Parameters that no recognised layer owns get the incoming
gradient unchanged.

A step whose direction is not finite (NaN or Inf in the batch, the loss or a
solve) returns zeros, sets ``state.info.finite`` to ``False`` and leaves
``state.count`` (and so a schedule on the step size) where it was, as
``optax.apply_if_finite`` leaves its inner state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sibp_jax._src import mismatch
from sibp_jax._src import problems as problems_lib
from sibp_jax._src import solvers
from sibp_jax._src import sweep


class LayerwiseInfo(NamedTuple):
  """Diagnostics of the last step of SIBP or ProxBP, returned, not raised.

  The per-layer fields are dicts keyed by the layer's name
  (:attr:`sibp_jax.LayerProblem.name`: the path of the module that holds
  the kernel, e.g. ``'layers/0'``; a layer applied several times, and the
  layers of a scan that own slices of one stacked kernel, have one entry,
  the worst of theirs). ``init`` finds the layers in the parameter tree
  (the parents of every parameter with two axes or more, as every kernel
  has) so that the state keeps one structure from the first step on; an
  entry no layer of ``problems`` names keeps its initial value (status
  ``CONVERGED``, no iterations).

  Attributes:
    finite: ``False`` if the step was skipped because something was not
      finite (the returned direction is then zero and ``count`` stays).
    status: ``{layer: code}``, the :class:`sibp_jax.SolveStatus` of each
      layer's solves (``int32``; for the paper variant's separate kernel
      and bias fits, the more severe). ``NONFINITE`` marks the layers
      whose change was not finite on a skipped step.
    iterations: ``{layer: count}``, inner iterations (CG steps, or
      objective evaluations of the nonlinear solver; 0 for exact solves).
    residual: ``{layer: r}``, the relative residual of each layer's
      solve (:attr:`sibp_jax.SolveInfo.residual`): round-off for exact
      solves, progress for iterative ones.
    grad_mismatch: ``‖g - ĝ‖ / ‖ĝ‖`` for the last layer's kernel, with
      ``g`` the incoming update and ``ĝ = f_{L-1}ᵀ e / N`` the mean loss's
      gradient that ``problems`` imply (one product, the one the backward
      pass already computed). Where the last layer is frozen, shared or a
      tied table (``Embed.attend``), the kernel checked is that of the
      last layer below it solved on its own, whose error is backprop's
      under every rule (the later layers pass it through their old
      weights). Round-off (about 1e-7 in float32) when the
      gradient and the problems come from the same forward pass; of order 1
      when a transformation before this one changed the gradient (clipping,
      scaling), the problems come from another batch, or a wrapper
      averaged the gradient over calls (``optax.MultiSteps``): the step
      still uses ``problems`` alone. Also nonzero when the loss holds more
      than the per-example term (a weight penalty on that kernel). Beyond
      1e-2 (1e-1 for 16-bit gradients) the transformation warns once, or
      raises, as its ``on_grad_mismatch`` says.
  """

  finite: jax.Array
  status: dict[str, jax.Array]
  iterations: dict[str, jax.Array]
  residual: dict[str, jax.Array]
  grad_mismatch: jax.Array

  def unconverged(self) -> jax.Array:
    """How many layers' solves did not converge in this step (``int32``).

    Layers whose status is ``MAX_ITERATIONS`` or ``NONFINITE``
    (:meth:`sibp_jax.SolveStatus.unconverged`); with leading axes (runs
    under ``vmap``), one count per run.
    """
    return sum((solvers.SolveStatus.unconverged(s).astype(jnp.int32)
                for s in self.status.values()), jnp.zeros((), jnp.int32))


class LayerwiseState(NamedTuple):
  """State of :func:`sibp_jax.scale_by_sibp` and
  :func:`sibp_jax.scale_by_proxbp`.

  Attributes:
    count: steps taken (skipped steps not counted); schedules read it.
    info: the last step's :class:`LayerwiseInfo`.
  """

  count: jax.Array
  info: LayerwiseInfo


def layer_names(params) -> list[str]:
  """The names of the layers a parameter tree may hold: the paths of the
  parents of its leaves with two axes or more (every layer's kernel has
  them, whatever its name; a vector does not), as
  :attr:`LayerProblem.name` spells them. A parent that holds no layer's
  kernel only adds an entry that keeps its initial value."""
  names = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = _param_path(path)
    if path and jnp.ndim(leaf) >= 2:
      name = problems_lib.path_str(path[:-1]) or '<root>'
      if name not in names:
        names.append(name)
  return names


def init_state(params) -> LayerwiseState:
  names = layer_names(params)
  zeros = lambda dtype: {n: jnp.zeros((), dtype) for n in names}
  return LayerwiseState(jnp.zeros((), jnp.int32), LayerwiseInfo(
      jnp.ones((), bool), zeros(jnp.int32), zeros(jnp.int32),
      zeros(jnp.float32), jnp.zeros((), jnp.float32)))


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
  if not any(layer.kernel_path in index for layer in problems.layers):
    known = ', '.join(problems_lib.path_str(p) for p in index)
    raise ValueError(
        f'{name}.update: problems name the layers '
        + ', '.join(layer.name for layer in problems.layers) + ', none of '
        'whose parameters is in params; were the problems built from '
        f'another model? params hold: {known}')
  located = []
  for layer in problems.layers:
    if layer.kernel_path not in index:
      # Frozen (an nnx.Optimizer's wrt filter, a multi_transform): held at
      # the forward pass's weights, the error passes through them.
      if layer.params is None:
        raise ValueError(
            f'{name}.update: the parameters of layer {layer.name} are not in '
            'params, and problems do not hold their values to pass the '
            'error through; build problems with value_grad_and_problems.')
      kernel, bias = layer.params
      shapes = (kernel.shape, None if bias is None else bias.shape)
      located.append((None, None))
    else:
      k = index[layer.kernel_path]
      b = None if layer.bias_path is None else index.get(layer.bias_path)
      if layer.bias_path is not None and b is None:
        raise ValueError(
            f'{name}.update: layer {layer.name} has its kernel in params but '
            f"not its bias '{problems_lib.path_str(layer.bias_path)}': "
            'train or freeze a layer whole.')
      cut = len(layer.index)  # a scanned layer's slice of stacked arrays
      shapes = (leaves[k].shape[cut:],
                None if b is None else leaves[b].shape[cut:])
      located.append((k, b))
    axis = layer.batch_axis
    if axis is not None and (axis >= layer.outputs.ndim or
                             layer.outputs.shape[axis] % batch):
      raise ValueError(
          f'{name}.update: layer {layer.name} holds outputs of shape '
          f'{layer.outputs.shape}, whose batch axis {axis} does not hold '
          f'the batch of {batch} examples; were the problems built from '
          'another batch?')
    layer.kind.check(layer.name, *shapes, layer.inputs, layer.outputs)
  last = problems.layers[-1]
  if problems.output_error.shape != last.outputs.shape:
    raise ValueError(
        f'{name}.update: the output error has shape '
        f'{problems.output_error.shape} but the last layer ({last.name}) '
        f'outputs {last.outputs.shape}; were the problems built from another '
        'batch or model?')
  return leaves, grad_leaves, treedef, located


def owned_mask(problems, params):
  """A tree like ``params``: ``True`` where a layer of ``problems`` owns the
  leaf (its kernel or bias), ``False`` for the rest (normalisation scales
  and biases, parameters let through with ``unsolved='gradient'``)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  owned = {p for layer in problems.layers
           for p in (layer.kernel_path, layer.bias_path) if p is not None}
  return jax.tree.unflatten(treedef, [_param_path(path) in owned
                                      for path, _ in flat])


def _per_layer(state_info, layers, new, layer_finite) -> tuple[dict, ...]:
  """The per-layer dicts: the state's entries, with this step's solves."""
  found = {}
  for layer, update, ok in zip(layers, new, layer_finite):
    info = update.info._replace(status=jnp.where(
        ok, jnp.asarray(update.info.status, jnp.int32),
        solvers.SolveStatus.NONFINITE))
    # One entry per kernel (as init_state names them): a kernel used by
    # two layer calls (shared weights), or the slices of a scan's stacked
    # kernel, combine theirs.
    name = layer.module_name
    found[name] = (solvers.combine(found[name], info) if name in found else
                   solvers.combine(info))
  status, iterations, residual = (dict(state_info.status),
                                  dict(state_info.iterations),
                                  dict(state_info.residual))
  for name, info in found.items():
    iterations[name] = info.iterations.astype(jnp.int32)
    residual[name] = info.residual.astype(jnp.float32)
    status[name] = info.status.astype(jnp.int32)
  return status, iterations, residual


def layerwise_update(name: str, make_rule: Callable, scale_of: Callable,
                     check: Callable):
  """Builds ``update`` for a transformation defined by a sweep rule.

  Args:
    name: the transformation's name, for error messages.
    make_rule: ``(count, loss_terms) -> rule``.
    scale_of: ``count -> s``; the direction is ``(X_old - X_new) / s``.
    check: ``(grad_mismatch, dtype) -> None``, from
      :func:`sibp_jax._src.mismatch.make_check`.
  """

  def update(updates, state, params=None, *, problems=None, **extra_args):
    del extra_args
    if problems is None:
      raise _missing_problems(name)
    leaves, grad_leaves, treedef, located = _locate(
        name, problems, updates, params)
    rule = make_rule(state.count, problems.terms)

    def compute_dtype(x):
      return x.astype(jnp.promote_types(x.dtype, jnp.float32))

    frozen = tuple(k is None for k, _ in located)
    compute = [
        tuple(None if x is None else compute_dtype(x) for x in (
            layer.params if k is None else
            (leaves[k][layer.index],
             None if b is None else leaves[b][layer.index])))
        for layer, (k, b) in zip(problems.layers, located)]
    checked = sweep.check_layer(problems, frozen)
    new, implied = sweep.sweep_and_report(problems, compute, rule,
                                          frozen=frozen, report=checked)
    scale = scale_of(state.count)
    zero_step = scale == 0  # e.g. the first step of a warm-up from η = 0

    def direction(change, like):
      # -change / scale, and no move at all for a step of size 0 (whatever
      # the solver made of its zero right-hand side).
      d = -change / jnp.where(zero_step, 1, scale)
      return jnp.where(zero_step, jnp.zeros_like(d), d).astype(like.dtype)

    out = list(grad_leaves)
    solved = [(pair, upd, layer) for pair, upd, layer in zip(
        located, new, problems.layers) if pair[0] is not None]
    layer_finite = []
    for (k, b), upd, layer in solved:
      moves = [(k, direction(upd.kernel, leaves[k]))]
      if b is not None:
        moves.append((b, direction(upd.bias, leaves[b])))
      layer_finite.append(solvers.all_finite([d for _, d in moves]))
      for i, d in moves:
        # A scanned layer fills its slice; the scan's layers fill them all.
        out[i] = out[i].at[layer.index].set(d) if layer.index else d
    owned = {i for (k, b), _, _ in solved for i in (k, b) if i is not None}
    finite = jnp.all(jnp.stack(layer_finite + [solvers.all_finite(
        [x for i, x in enumerate(out) if i not in owned])]))
    out = [jnp.where(finite, x, jnp.zeros_like(x)) for x in out]
    if checked is None:  # every layer frozen, shared or tied
      grad_mismatch = jnp.zeros((), jnp.float32)
    else:
      gradient = grad_leaves[located[checked][0]][
          problems.layers[checked].index]
      grad_mismatch = mismatch.grad_mismatch(implied, problems.terms,
                                             gradient)
      check(grad_mismatch, gradient.dtype)
    info = LayerwiseInfo(
        finite, *_per_layer(state.info, [layer for _, _, layer in solved],
                            [upd for _, upd, _ in solved], layer_finite),
        grad_mismatch)
    # A skipped step leaves the count, and so a schedule, where it was.
    count = jnp.where(finite, optax.safe_increment(state.count), state.count)
    return jax.tree.unflatten(treedef, out), LayerwiseState(count, info)

  return update
