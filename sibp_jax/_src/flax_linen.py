"""The flax.linen adapter: problems from one forward pass of a linen module."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from sibp_jax._src import capture
from sibp_jax._src import flax_layers
from sibp_jax._src import forward as forward_lib
from sibp_jax._src import problems as problems_lib


def _interceptor(next_fun, args, kwargs, context):
  tape = capture.current_tape()
  module = context.module
  if tape is None:
    return next_fun(*args, **kwargs)
  path = tuple(module.path)
  tape.modules.setdefault(path, type(module))
  entry = flax_layers.lookup(module)
  method = context.method_name
  if entry is None or (method != '__call__' and
                       method not in dict(entry.also)):
    return next_fun(*args, **kwargs)
  # Inside nn.scan over layers the kernel is a slice of the stacked one.
  index = tape.stacked_slice(module.get_variable('params', entry.kernel),
                             f"layer '{problems_lib.path_str(path)}'")
  name = capture.layer_str(path, index)
  if method == '__call__':
    entry.check_call(name, args[1:], kwargs)
  names, describe = entry.use(module, method)
  inputs = args[0]
  return tape.visit(
      path, inputs, lambda: next_fun(*args, **kwargs), names,
      lambda: describe(module, name, inputs.shape),
      lambda: tuple(None if n is None else module.get_variable('params', n)
                    for n in names), index)


def _apply(module, variables, *args, **kwargs):
  """``module.apply`` with the layers' calls intercepted, the parameters'
  arrays made known to the active tape (a scan over layers slices them)."""
  tape = capture.current_tape()
  if tape is not None:
    tape.param_ids = {id(a) for a in jax.tree.leaves(
        variables.get('params', {}))}
  with nn.intercept_methods(_interceptor):
    return module.apply(variables, *args, **kwargs)


def _is_variables(params) -> bool:
  return isinstance(params, Mapping) and 'params' in params


def _fresh(variables):
  """New containers for ``variables``: ``apply`` writes a mutable
  collection's new values into the dicts it was given."""
  return jax.tree.map(lambda a: a, variables)


def _is_array(leaf) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray))


@dataclasses.dataclass(frozen=True)
class _Runner:
  """Replays a linen module from its variables, random keys and arguments.

  ``data`` is ``(variables, rngs, arrays)``: the arrays among the extra
  call arguments; the other arguments (flags such as ``train=True``) are
  static, kept here with the arguments' structure. Collections the call
  would change (``mutable``) are taken as mutable and their new values
  discarded: the replay must not move the running statistics again.
  """

  module: nn.Module
  mutable: Any
  treedef: Any
  static: tuple

  def __call__(self, data, x):
    variables, rngs, arrays = data
    leaves, arrays = list(self.static), iter(arrays)
    leaves = [next(arrays) if leaf is _ARRAY else leaf for leaf in leaves]
    args, kwargs = jax.tree.unflatten(self.treedef, leaves)
    out = _apply(self.module, _fresh(variables), x, *args, rngs=rngs,
                 mutable=self.mutable, **kwargs)
    return out[0] if self.mutable else out


class _ArrayMarker:
  def __repr__(self):
    return '<array>'


_ARRAY = _ArrayMarker()


def _split_call_args(args, kwargs):
  """Arrays among the call arguments (data) and the rest (static)."""
  leaves, treedef = jax.tree.flatten((tuple(args), dict(kwargs)))
  static = tuple(_ARRAY if _is_array(leaf) else leaf for leaf in leaves)
  try:
    hash(static)
  except TypeError as err:
    raise ValueError(
        'the extra call arguments must be arrays or hashable values (flags, '
        f'numbers, strings): {err}') from None
  return treedef, static, [leaf for leaf in leaves if _is_array(leaf)]


def _resize_arguments(data, resize):
  """The runner's data with ``resize`` applied to the call arguments (for
  the batch-axis probe, :func:`sibp_jax._src.rows.batch_axes`)."""
  variables, rngs, arrays = data
  return variables, rngs, resize(arrays)


def _mutable_names(mutable, collections) -> tuple[str, ...]:
  if mutable is False or mutable is None:
    return ()
  if mutable is True:
    return tuple(collections)
  if isinstance(mutable, str):
    return (mutable,)
  return tuple(mutable)


def value_grad_and_problems(module: nn.Module, params, x, y, *args,
                            loss_fn, rngs=None, mutable=False,
                            model_state=None, check_chain: bool = True,
                            unsolved: str = 'raise', weights=None, **kwargs):
  """Loss, gradient and layer-wise problems from one forward pass.

  Runs ``module.apply(variables, x, *args, rngs=rngs, mutable=mutable,
  **kwargs)`` once, recording the input and output of every layer of the
  registry it applies (``nn.Dense``, ``nn.Conv``, ``nn.DenseGeneral``,
  ``nn.Embed``, ``nn.Einsum``: see the README's table), and
  differentiates the mean loss ``J`` with respect to the ``'params'``
  collection only.

  The recognised layers, in call order, may form any graph: between them
  runs any parameter-free code, including residual additions, branches,
  pooling, normalisation (``BatchNorm``, ``LayerNorm``, ``GroupNorm``:
  their scale and bias are held at their current values in the sweep and
  take the incoming gradient) and ``Dropout``. The sweep replays the module
  with the same ``rngs``, variables and arguments, so it sees the forward
  pass's dropout mask and batch statistics; the collections it would
  change are discarded. A layer applied several times (shared weights)
  and an ``Embed`` also used by ``attend`` (tied embeddings) are solved
  from all their uses. Layers under ``nn.scan`` and ``nn.remat`` (or
  ``jax.lax.scan``, ``jax.checkpoint``) are solved as in the same module
  written without them: a scan over layers (``variable_axes={'params':
  0}``) is one layer per step, each owning its slice of the stacked
  parameters (named ``stack/Dense_0[2]``); a scan over time that applies
  one layer at every step is that layer shared by the steps. The forward
  pass and the sweep run such scans as Python loops (a scan whose body
  applies no layer stays a scan), so their programs grow with the number
  of steps. Refused with a ``ValueError`` naming the layer: a
  layer applied twice to inputs of different shapes, a layer applied inside
  another transformation within the module (``nn.vmap``, ``jax.vmap``,
  ``lax.cond``), a layer whose output reaches no later layer, an unsupported
  convolution, a module whose output is not its last linear layer's output;
  and, naming the parameters, any parameter that no recorded layer owns and
  no normalisation layer holds (a custom module's ``self.param``), unless
  ``unsolved='gradient'``.

  Args:
    module: a ``flax.linen`` module built around ``nn.Dense`` / ``nn.Conv``
      layers.
    params: the ``'params'`` collection (as a ``TrainState`` holds it), or the
      whole variables dict ``{'params': ..., 'batch_stats': ...}``;
      gradients come back in the same structure (zero for every collection
      but ``'params'``, which are not trained by gradient).
    x: the batch of inputs, leading axis the batch.
    y: the labels, with the same leading axis.
    *args: further positional arguments of the module call.
    loss_fn: ``loss_fn(logits, labels)`` returning unreduced losses:
      one loss per example ``(B,)`` or per position ``(B, T, ...)``, e.g.
      ``optax.softmax_cross_entropy_with_integer_labels``. Every loss term
      is then an example of the sweep: ``J`` is their mean, the output
      error ``e = ∂ℓ/∂z`` is each term's own gradient (not divided by the
      number of terms), and ``η`` moves each token's logits as it moves an
      example's.
    rngs: the ``rngs`` of ``module.apply``, e.g. ``{'dropout': key}``.
    mutable: the ``mutable`` of ``module.apply``, e.g. ``['batch_stats']``
      for train-mode ``BatchNorm``. When set, the updated collections are
      returned as a fourth value, as ``module.apply`` returns them.
    model_state: the other collections, e.g. ``{'batch_stats': ...}``, when
      ``params`` is the ``'params'`` collection (as flax's ImageNet example
      keeps them in its train state).
    check_chain: read the layers' graph off one extra trace (default
      ``True``; nothing at run time): refuse layers that reach no output,
      and tell chain links (where the SIBP paper variant's segments are
      defined) from the rest. With ``False`` the module is taken to be a
      chain for the paper variant.
    unsolved: what to do with trainable parameters that no layer solves
      (normalisation scales and biases aside): ``'raise'`` (default)
      refuses the module with a ``ValueError`` naming them; ``'gradient'``
      lets the transformations hand them the incoming gradient (``sibp``:
      its ``others`` optimizer: by default Adam for vectors, a plain step
      of size ``learning_rate`` for matrices; ``proxbp``: its outer
      optimizer).
    weights: ``None``, or a weight per example ``(B,)`` or per position
      ``(B, T, ...)`` (padding, a prompt: 0 drops the term). The mean
      loss becomes ``J = Σ w ℓ / Σ w`` (per-position weights broadcast
      over a per-position loss; a per-example loss takes each example's
      largest weight). A weight multiplies its term once: the output error
      is ``w ⊙ ∂ℓ/∂z``, so every layer's error is that of ``Σ w ℓ``, and a
      row of a layer's regression counts as its own term's weight, as the
      batch's largest weight where it has none but carries error (a prompt
      token that later tokens attend to), and not at all where it reaches
      no weighted term (docs/algorithms.md, "Weights"). Which axis of
      each layer's input and output holds the batch is read from one more
      trace of the model, shapes only, at another batch size.
    **kwargs: further keyword arguments of the module call, e.g.
      ``train=True``.

  Returns:
    ``(loss, grads, problems)``, and with ``mutable`` set ``(loss, grads,
    problems, updated_collections)``; pass ``problems=problems`` to the
    transformation's ``update`` (or to :meth:`TrainState.apply_gradients`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sibp_jax
    >>> import flax.linen as nn
    >>> class MLP(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))
    >>> module = MLP()
    >>> x, y = jnp.ones((5, 4)), jnp.zeros((5,), jnp.int32)
    >>> params = module.init(jax.random.key(0), x)['params']
    >>> tx = sibp_jax.sibp(0.1)
    >>> opt_state = tx.init(params)
    >>> loss, grads, problems = sibp_jax.linen.value_grad_and_problems(
    ...     module, params, x, y,
    ...     loss_fn=optax.softmax_cross_entropy_with_integer_labels)
    >>> updates, opt_state = tx.update(grads, opt_state, params,
    ...                                problems=problems)
    >>> params = optax.apply_updates(params, updates)
  """
  flax_layers.check_unsolved(unsolved)
  forward = forward_lib.Forward(jnp.asarray(x), jnp.asarray(y), loss_fn,
                                weights)
  as_variables = _is_variables(params)
  if as_variables:
    state = {k: v for k, v in params.items() if k != 'params'}
    trainable = params['params']
  else:
    state, trainable = {}, params
  state = {**state, **dict(model_state or {})}
  mutable_names = _mutable_names(mutable, state)
  treedef, static, arrays = _split_call_args(args, kwargs)
  runner = _Runner(module, mutable_names or False, treedef, static)

  def mean_loss(p):
    variables = {**state, 'params': p}

    def run():
      out = _apply(module, _fresh(variables), forward.x, *args, rngs=rngs,
                   mutable=mutable_names or False, **kwargs)
      return out if mutable_names else (out, None)
    return forward.loss(run)

  (loss, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(
      trainable)
  flax_layers.check_parameters(
      [tuple(problems_lib.key_name(k) for k in path)
       for path, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]],
      forward.owned(), forward.modules, unsolved)
  if as_variables:
    grads = {k: (grads if k == 'params' else jax.tree.map(jnp.zeros_like, v))
             for k, v in params.items()}
  variables = {**state, 'params': trainable}
  problems = forward.problems(
      loss, aux, runner=runner, data=(variables, rngs, arrays),
      prefix=('params',) if as_variables else (), check=check_chain,
      resize=_resize_arguments)
  if mutable_names:
    return loss, grads, problems, aux[-1]
  return loss, grads, problems


class TrainState(train_state.TrainState):
  """A ``flax.training.train_state.TrainState`` that forwards extra arguments.

  Flax's own ``apply_gradients(grads=..., **kwargs)`` hands extra keyword
  arguments to ``.replace()``; this one hands those that name a field of
  the state (``batch_stats``, or fields of a subclass) to ``.replace()`` and
  the rest to the transformation's ``update``, so
  ``state.apply_gradients(grads=grads, problems=problems,
  batch_stats=updated['batch_stats'])`` runs a SIBP or ProxBP step and
  keeps the running statistics of ``BatchNorm``, as the train step of
  flax's ImageNet example does.

  Attributes:
    batch_stats: the ``'batch_stats'`` collection (``None`` for a model
      without ``BatchNorm``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, sibp_jax
    >>> import flax.linen as nn
    >>> module = nn.Dense(3)
    >>> x, y = jnp.ones((5, 4)), jnp.zeros((5,), jnp.int32)
    >>> state = sibp_jax.linen.TrainState.create(
    ...     apply_fn=module.apply,
    ...     params=module.init(jax.random.key(0), x)['params'],
    ...     tx=sibp_jax.sibp(0.1))
    >>> loss, grads, problems = sibp_jax.linen.value_grad_and_problems(
    ...     module, state.params, x, y,
    ...     loss_fn=optax.softmax_cross_entropy_with_integer_labels)
    >>> state = state.apply_gradients(grads=grads, problems=problems)
    >>> int(state.step)
    1
  """

  batch_stats: Any = None

  def apply_gradients(self, *, grads, **kwargs: Any):
    """One update; ``kwargs`` (e.g. ``problems``) go to ``tx.update``.

    Keyword arguments that name a field of the state (e.g.
    ``batch_stats``) replace that field instead.
    """
    names = {f.name for f in dataclasses.fields(self)}
    fields = {k: v for k, v in kwargs.items() if k in names}
    extra = {k: v for k, v in kwargs.items() if k not in names}
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        **extra)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **fields)
