"""The flax.linen adapter: problems from one forward pass of a linen module."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from sibp_jax._src import capture
from sibp_jax._src import flax_layers
from sibp_jax._src import problems as problems_lib


def _interceptor(next_fun, args, kwargs, context):
  tape = capture.current_tape()
  module = context.module
  if (tape is None or context.method_name != '__call__' or
      not isinstance(module, flax_layers.DENSE + flax_layers.CONV)):
    return next_fun(*args, **kwargs)
  path = tuple(module.path)
  name = problems_lib.path_str(path)
  inputs = args[0]
  return tape.visit(
      path, inputs, lambda: next_fun(*args, **kwargs),
      flax_layers.has_bias(module),
      lambda: flax_layers.layer_kind(module, name, inputs.shape))


@dataclasses.dataclass(frozen=True)
class _Runner:
  """Replays a linen module from its variables."""

  module: nn.Module

  def __call__(self, variables, x):
    with nn.intercept_methods(_interceptor):
      return self.module.apply(variables, x)


def _is_variables(params) -> bool:
  return isinstance(params, Mapping) and 'params' in params


def value_grad_and_problems(module: nn.Module, params, x, y, *, loss_fn,
                            check_chain: bool = True):
  """Loss, gradient and layer-wise problems from one forward pass.

  Runs ``module.apply`` once, recording the input and output of every
  ``nn.Dense`` and ``nn.Conv`` it applies, and differentiates the mean loss
  ``J = mean_b loss_fn(logits, y)_b`` with respect to ``params``. The layers
  must be applied one after another with parameter-free code between them
  and the module's output must be the last layer's output; anything else is
  a ``ValueError`` naming the layer.

  Args:
    module: a ``flax.linen`` module built from ``nn.Dense`` / ``nn.Conv``
      layers.
    params: the ``'params'`` collection (as a ``TrainState`` holds it), or the
      whole variables dict ``{'params': ...}``; gradients come back in the
      same structure.
    x: the batch of inputs, leading axis the batch.
    y: the labels, with the same leading axis.
    loss_fn: ``loss_fn(logits, labels)`` returning one loss per example.
    check_chain: verify at trace time that the layers form a chain.

  Returns:
    ``(loss, grads, problems)``; pass ``problems=problems`` to the
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
  forward = capture.Forward(jnp.asarray(x), jnp.asarray(y), loss_fn)
  as_variables = _is_variables(params)

  def mean_loss(p):
    variables = p if as_variables else {'params': p}

    def run():
      with nn.intercept_methods(_interceptor):
        return module.apply(variables, forward.x)
    return forward.loss(run)

  (loss, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
  problems = forward.problems(
      loss, aux, runner=_Runner(module),
      data=params if as_variables else {'params': params},
      prefix=('params',) if as_variables else (), check=check_chain)
  return loss, grads, problems


class TrainState(train_state.TrainState):
  """A ``flax.training.train_state.TrainState`` that forwards extra arguments.

  Flax's own ``apply_gradients(grads=..., **kwargs)`` hands extra keyword
  arguments to ``.replace()``; this one hands them to the transformation's
  ``update``, so ``state.apply_gradients(grads=grads, problems=problems)``
  runs a SIBP or ProxBP step.

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

  def apply_gradients(self, *, grads, **kwargs: Any):
    """One update; ``kwargs`` (e.g. ``problems``) go to ``tx.update``."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        **kwargs)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)

