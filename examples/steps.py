"""One train step for every example: a single run, or K runs under vmap.

The state is ``nnx.split((model, optimizer))[1]``: parameters and optimizer
state in one pytree, which ``jax.jit`` donates and orbax saves. The step
takes the layer-wise ``problems`` from ``sibp_jax.nnx.value_grad_and_problems``
when the optimizer needs them, and the plain gradient otherwise. A sweep
over learning rates is the same step under ``jax.vmap`` over states stacked
on a leading axis (:func:`stack_learning_rates`), the batch shared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sibp_jax

LOSS = optax.softmax_cross_entropy_with_integer_labels


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
  """``(graphdef, state)`` of the model and an optimizer over its params."""
  return nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))


def make_step(graphdef, needs_problems: bool) -> Callable:
  """The pure step ``(state, x, y) -> (state, stats)``, for :func:`jit`.

  ``stats`` holds the batch's ``loss`` and ``accuracy`` (before the
  update; per-token labels ``(batch, tokens)``: the means over every
  token), ``skipped``: whether SIBP / ProxBP flagged the step as not
  finite and left the parameters as they were (first-order methods: never),
  and ``unconverged``: how many layers' solves of the step ended
  unconverged (:meth:`sibp_jax.LayerwiseInfo.unconverged`).
  """

  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    skipped = jnp.zeros((), bool)
    unconverged = jnp.zeros((), jnp.int32)
    if needs_problems:
      loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
          model, x, y, loss_fn=LOSS)
      logits = problems.layers[-1].outputs  # the last layer's output
      optimizer.update(model, grads, problems=problems)
      info = optax.tree_utils.tree_get(nnx.as_pure(optimizer.opt_state),
                                       'info')
      skipped = ~info.finite
      unconverged = info.unconverged()
    else:
      def mean_loss(model):
        logits = model(x)
        return jnp.mean(LOSS(logits, y)), logits
      (loss, logits), grads = nnx.value_and_grad(mean_loss, has_aux=True)(
          model)
      optimizer.update(model, grads)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y)
    return nnx.state((model, optimizer)), {
        'loss': loss, 'accuracy': accuracy, 'skipped': skipped,
        'unconverged': unconverged}

  return step


def jit(step: Callable, runs: bool = False) -> Callable:
  """``step`` jitted with its state donated; with ``runs``, vmapped first."""
  if runs:
    step = jax.vmap(step, in_axes=(0, None, None))
  return jax.jit(step, donate_argnums=0)


def stack_learning_rates(state, rates: Sequence[float],
                         name: str = 'learning_rate'):
  """K copies of ``state`` (of an ``optax.inject_hyperparams`` optimizer) on
  a leading axis, run k with its hyperparameter ``name`` at ``rates[k]``."""
  stacked = jax.tree.map(
      lambda a: jnp.broadcast_to(a, (len(rates), *jnp.shape(a))), state)
  stacked[1]['opt_state']['hyperparams'][name].value = (
      jnp.asarray(rates, jnp.float32))
  return stacked


def _per_example(values: jax.Array) -> jax.Array:
  """``(n,)``: each example's mean of ``values`` over its other axes."""
  return jnp.mean(values.reshape(values.shape[0], -1), axis=1)


def make_evaluate(graphdef, batch_size: int, *, runs: bool = False,
                  eval_params: Callable | None = None) -> Callable:
  """``evaluate(state, x, y) -> [(mean loss, accuracy)]``, one per run.

  Every batch has ``batch_size`` rows (the last one padded, the padding
  weighted zero), so the evaluation compiles once. Per-token labels
  ``(n, tokens)`` (a language model) count each example by its mean over
  its tokens: with every example of the same length, the means over all
  tokens. With ``runs`` the state
  holds K stacked runs. ``eval_params(opt_state, params)`` gives the
  parameters to evaluate (schedule-free methods).
  """

  def sums(state, x, y, weight):
    model, optimizer = nnx.merge(graphdef, state)
    # Running BatchNorm averages and no dropout (and no statistics of the
    # zero padding): the model as it is used after training.
    model.eval()
    if eval_params is not None:
      nnx.update(model, eval_params(nnx.as_pure(optimizer.opt_state),
                                    nnx.as_pure(nnx.state(model, nnx.Param))))
    logits = model(x)
    return (jnp.sum(weight * _per_example(LOSS(logits, y))),
            jnp.sum(weight * _per_example(jnp.argmax(logits, axis=-1) == y)))

  sums = jax.jit(jax.vmap(sums, in_axes=(0, None, None, None)) if runs
                 else sums)

  def evaluate(state, x, y):
    total = 0.0
    for start in range(0, len(x), batch_size):
      xb, yb = x[start:start + batch_size], y[start:start + batch_size]
      pad = batch_size - len(xb)
      weight = jnp.concatenate([jnp.ones(len(xb)), jnp.zeros(pad)])
      xb = jnp.concatenate([xb, jnp.zeros((pad, *xb.shape[1:]), xb.dtype)])
      yb = jnp.concatenate([yb, jnp.zeros((pad, *yb.shape[1:]), yb.dtype)])
      total = total + np.stack(
          [np.asarray(s, np.float64) for s in sums(state, xb, yb, weight)],
          axis=-1)
    return [tuple(float(v) / len(x) for v in row)
            for row in np.reshape(total, (-1, 2))]

  return evaluate


def epoch_batches(num_examples: int, batch_size: int, seed: int,
                  epoch: int) -> np.ndarray:
  """Indices ``(num_examples // batch_size, batch_size)`` of one epoch's
  shuffled batches, a function of seed and epoch; the last partial batch is
  dropped, so every step has the same shape."""
  steps = num_examples // batch_size
  if steps == 0:
    raise ValueError(f'batch_size={batch_size} is larger than the training '
                     f'set ({num_examples} examples)')
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return perm[:steps * batch_size].reshape(steps, batch_size)


def compile_on_copy(step: Callable, state, x, y, times: int = 2) -> None:
  """Compiles ``step`` on a throwaway copy of ``state``, so that timed steps
  exclude compilation and the run starts untouched. Twice by default: the
  first step's output may differ from the initial state in weak types."""
  warm = jax.tree.map(jnp.copy, state)
  for _ in range(times):
    warm = step(warm, x, y)[0]
  jax.block_until_ready(warm)


def timed_step(step: Callable, state, x, y) -> tuple[Any, Any, float]:
  """One step; returns ``(state, stats, seconds)``, timed from the batch on
  the device to the new state ready."""
  x, y = jax.block_until_ready((x, y))
  start = time.perf_counter()
  state, stats = step(state, x, y)
  jax.block_until_ready(state)
  return state, stats, time.perf_counter() - start
