"""Layers of any JAX model, tagged by the model's own code.

A model that is a plain function ``apply_fn(params, x)`` of a parameter
pytree (plain JAX, Equinox, Haiku's ``transform``ed functions) marks its
linear layers by computing them with the functions here instead of ``@``,
``lax.conv_general_dilated`` or ``table[ids]``. Each computes the same
value; while :func:`value_grad_and_problems` records or replays the model
it also hands the call to the active tape, as the Flax adapters do for
Flax's layers. The kernel (and bias) must be leaves of ``params`` as
given (a slice of a stacked leaf inside ``jax.lax.scan`` too), so that the
layer's direction lands on them; a transformed or computed kernel
(``w.T``, ``2 * w``) is refused by name. Nothing here imports Flax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sibp_jax._src import capture
from sibp_jax._src import forward as forward_lib
from sibp_jax._src import kinds
from sibp_jax._src import problems as problems_lib

Path = problems_lib.Path


def _record(kind, inputs, kernel, bias, compute: Callable[[], Any],
            what: str):
  """Computes the layer, through the active tape if there is one."""
  tape = capture.current_tape()
  if tape is None:
    return compute()
  paths = getattr(tape, 'leaf_paths', None)
  if paths is None or tape.dry:
    # A Flax adapter's tape (not a tagged model), or a shape-only trace of
    # a scan's body, whose slices are not known yet.
    return tape.other(compute)
  root, index = tape.origin(kernel)
  path = paths.get(id(root))
  if path is None:
    raise ValueError(
        f'sibp_jax.tag.{what}: its kernel of shape {jnp.shape(kernel)} is '
        'not a leaf of params (nor a slice of one taken by jax.lax.scan): '
        'pass the parameter itself, not a transformed or computed array '
        '(w.T, 2 * w), so that its direction lands on it.')
  names: tuple = (path, None)
  if bias is not None:
    bias_root, bias_index = tape.origin(bias)
    bias_path = paths.get(id(bias_root))
    if bias_path is None or bias_index != index:
      raise ValueError(
          f'sibp_jax.tag.{what}: the bias of the layer of kernel '
          f"'{problems_lib.path_str(path)}' is not a leaf of params"
          + ('' if bias_path is None else ' sliced as its kernel is')
          + ': pass the parameter itself.')
    names = (path, bias_path)
  # The layer is known by its kernel's path: a container may hold several.
  return tape.visit(path, inputs, compute, names, lambda: kind,
                    lambda: (kernel, bias), index)


def dense(x, kernel, bias=None):
  """``x @ kernel + bias``, recorded as a :class:`sibp_jax.Dense` layer.

  Args:
    x: the input, ``(..., d_in)`` (every leading axis a row).
    kernel: the ``(d_in, d_out)`` kernel, a leaf of the model's params.
    bias: ``None``, or the ``(d_out,)`` bias, a leaf of the params.

  Example:
    >>> import jax.numpy as jnp, sibp_jax
    >>> sibp_jax.tag.dense(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
    (2, 4)
  """
  kind = kinds.Dense()
  return _record(kind, x, kernel, bias,
                 lambda: kind.apply(kernel, bias, x), 'dense')


def dense_general(x, kernel, bias=None, *, axis: int | Sequence[int] = -1):
  """``dot_general`` of ``x``'s ``axis`` with the kernel's leading axes,
  recorded as a :class:`sibp_jax.DenseGeneral` layer (never the batch
  axis 0); the kernel's other axes are the output's features."""
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  axis = tuple(a % x.ndim for a in axis)
  if 0 in axis:
    raise ValueError('sibp_jax.tag.dense_general: contracting the batch '
                     'axis 0 mixes the examples.')
  kind = kinds.DenseGeneral(axis, kernel.ndim - len(axis))
  return _record(kind, x, kernel, bias,
                 lambda: kind.apply(kernel, bias, x), 'dense_general')


def _per_axis(value, nd):
  return (value,) * nd if isinstance(value, int) else tuple(value)


def conv(x, kernel, bias=None, *, strides: int | Sequence[int] = 1,
         padding: str | Sequence[tuple[int, int]] = 'SAME',
         dilation: int | Sequence[int] = 1):
  """A channels-last convolution ``conv(x, kernel) + bias``, recorded as
  a :class:`sibp_jax.Conv` layer.

  Args:
    x: ``(batch, spatial..., c_in)``, 1 to 3 spatial axes.
    kernel: ``(window..., c_in, c_out)``, a leaf of the model's params.
    bias: ``None``, or ``(c_out,)``, a leaf of the params.
    strides, dilation: per spatial axis, or one int for all.
    padding: ``'SAME'``, ``'VALID'`` or explicit ``(low, high)`` pairs.
  """
  nd = x.ndim - 2
  strides, dilation = _per_axis(strides, nd), _per_axis(dilation, nd)
  if isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:nd], dilation)]
    padding = jax.lax.padtype_to_pads(x.shape[1:-1], window, strides,
                                      padding.upper())
  kind = kinds.Conv(strides=strides,
                    padding=tuple((int(lo), int(hi)) for lo, hi in padding),
                    kernel_dilation=dilation)
  return _record(kind, x, kernel, bias,
                 lambda: kind.apply(kernel, bias, x), 'conv')


def embed(ids, table):
  """``table[ids]``, recorded as a :class:`sibp_jax.Embed` layer (ids out
  of range look up NaN, which flags the step)."""
  kind = kinds.Embed(table.shape[0])
  return _record(kind, ids, table, None,
                 lambda: kind.apply(table, None, ids), 'embed')


def attend(h, table):
  """``h @ tableᵀ``, recorded as a :class:`sibp_jax.Attend` layer: the
  table of :func:`embed` as the output projection (tied embeddings)."""
  kind = kinds.Attend(table.shape[0])
  return _record(kind, h, table, None,
                 lambda: kind.apply(table, None, h), 'attend')


@dataclasses.dataclass(frozen=True)
class _Runner:
  """Replays ``apply_fn(params, x)`` with the tape knowing the leaves."""

  apply_fn: Callable

  def __call__(self, params, x):
    tape = capture.current_tape()
    tape.leaf_paths = {
        id(leaf): tuple(problems_lib.key_name(k) for k in path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    tape.param_ids = set(tape.leaf_paths)
    return self.apply_fn(params, x)


def value_grad_and_problems(apply_fn: Callable, params, x, y, *, loss_fn,
                            check_chain: bool = True,
                            unsolved: str = 'raise', weights=None):
  """Loss, gradient and layer-wise problems of a tagged JAX model.

  Runs ``apply_fn(params, x)`` once, recording every layer the model
  computes with :func:`dense`, :func:`dense_general`, :func:`conv`,
  :func:`embed` or :func:`attend`, and differentiates the mean loss with
  respect to ``params``. Everything else is as for
  :func:`sibp_jax.nnx.value_grad_and_problems` (any parameter-free code
  between the layers, ``jax.lax.scan`` over stacked layers and
  ``jax.checkpoint``, weights, the checks); the model must be a pure
  function of ``params`` and ``x`` (draw dropout masks from a key in
  ``params``' companions outside, or pass none).

  Args:
    apply_fn: ``apply_fn(params, x) -> logits``, hashable (a function
      defined once, not a new lambda per step, or every jitted step
      traces anew).
    params: a pytree of arrays: every leaf is trained. An Equinox model
      gives it as ``eqx.partition(model, eqx.is_inexact_array)[0]``.
    x: the batch of inputs, leading axis the batch.
    y: the labels, with the same leading axis.
    loss_fn: ``loss_fn(logits, labels)`` returning unreduced losses.
    check_chain: as for the Flax adapters.
    unsolved: ``'raise'`` (default) refuses a leaf of ``params`` that no
      tagged layer owns, naming it; ``'gradient'`` lets it take the
      incoming gradient (``sibp``'s ``others`` optimizer).
    weights: as for the Flax adapters.

  Returns:
    ``(loss, grads, problems)``, ``grads`` shaped like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sibp_jax
    >>> def mlp(params, x):
    ...   h = jax.nn.relu(sibp_jax.tag.dense(x, params['w1'], params['b1']))
    ...   return sibp_jax.tag.dense(h, params['w2'], params['b2'])
    >>> params = {'w1': jnp.ones((4, 8)) / 4, 'b1': jnp.zeros(8),
    ...           'w2': jnp.ones((8, 3)) / 8, 'b2': jnp.zeros(3)}
    >>> loss, grads, problems = sibp_jax.tag.value_grad_and_problems(
    ...     mlp, params, jnp.ones((5, 4)), jnp.zeros((5,), jnp.int32),
    ...     loss_fn=optax.softmax_cross_entropy_with_integer_labels)
    >>> [layer.name for layer in problems.layers]
    ['<root>', '<root>']
  """
  if unsolved not in ('raise', 'gradient'):
    raise ValueError("unsolved must be one of ('raise', 'gradient'), got "
                     f'{unsolved!r}')
  forward = forward_lib.Forward(jnp.asarray(x), jnp.asarray(y), loss_fn,
                                weights)
  runner = _Runner(apply_fn)

  def mean_loss(p):
    return forward.loss(lambda: (runner(p, forward.x), None))

  (loss, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
  owned = forward.owned()
  loose = [problems_lib.path_str(tuple(problems_lib.key_name(k) for k in p))
           for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
           if tuple(problems_lib.key_name(k) for k in p) not in owned]
  if loose and unsolved == 'raise':
    raise ValueError(
        'these parameters belong to no layer tagged with sibp_jax.tag, so '
        'SIBP and ProxBP would only hand them the plain gradient: '
        + ', '.join(f"'{p}'" for p in loose) + ". Tag the layers that use "
        "them, or pass unsolved='gradient' (normalisation scales, for "
        "example: sibp's others optimizer takes them).")
  problems = forward.problems(loss, aux, runner=runner, data=params,
                              check=check_chain)
  return loss, grads, problems
