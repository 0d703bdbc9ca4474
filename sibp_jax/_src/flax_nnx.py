"""The flax.nnx adapter: problems from one forward pass of an nnx module."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sibp_jax._src import capture
from sibp_jax._src import problems as problems_lib

# The unpatched method, taken once: nested interception must never call an
# already-patched method (it would record a layer twice).
_LINEAR_CALL = nnx.Linear.__call__
_LOCK = threading.RLock()


def _linear_paths(model) -> dict[int, tuple]:
  return {id(m): (tuple(path), m.bias is not None)
          for path, m in nnx.iter_modules(model)
          if isinstance(m, nnx.Linear)}


@contextlib.contextmanager
def _intercept(model):
  """Routes the calls of ``model``'s ``nnx.Linear`` layers to the tape.

  nnx has no method interceptor, so ``nnx.Linear.__call__`` is swapped for
  the duration of the block (under a lock, restored on exit). Instances of
  other models are unaffected: only layers of ``model`` are looked up.
  """
  paths = _linear_paths(model)

  def call(self, inputs, *args, **kwargs):
    tape = capture.current_tape()
    found = paths.get(id(self))
    if tape is None or found is None:
      return _LINEAR_CALL(self, inputs, *args, **kwargs)
    path, has_bias = found
    return tape.visit(path, inputs,
                      lambda: _LINEAR_CALL(self, inputs, *args, **kwargs),
                      has_bias)

  with _LOCK:
    saved = nnx.Linear.__call__
    nnx.Linear.__call__ = call
    try:
      yield
    finally:
      nnx.Linear.__call__ = saved


@dataclasses.dataclass(frozen=True)
class _Runner:
  """Replays an nnx model from its graph definition and variables."""

  graphdef: Any

  def __call__(self, data, x):
    model = nnx.merge(self.graphdef, data)
    with _intercept(model):
      return model(x)


def _kind(record):
  del record
  return problems_lib.Dense()


def value_grad_and_problems(model: nnx.Module, x, y, *, loss_fn,
                            check_chain: bool = True):
  """Loss, gradient and layer-wise problems from one forward pass.

  Runs ``model(x)`` once, recording the input ``f_{i-1}`` and output
  ``g_i`` of every ``nnx.Linear`` it applies, and differentiates the mean
  loss ``J = mean_b loss_fn(model(x), y)_b`` with respect to the model's
  ``nnx.Param`` variables. The layers must be applied one after another
  with parameter-free code between them (elementwise activations,
  reshape/flatten) and the model's output must be the last layer's output;
  anything else is a ``ValueError`` naming the layer.

  Args:
    model: an ``nnx.Module`` built from ``nnx.Linear`` layers.
    x: the batch of inputs, leading axis the batch.
    y: the labels (any array with the same leading axis).
    loss_fn: ``loss_fn(logits, labels)`` returning one loss per example,
      e.g. ``optax.softmax_cross_entropy_with_integer_labels``.
    check_chain: verify at trace time that the layers form a chain (default
      ``True``; costs one extra trace per layer, nothing at run time).

  Returns:
    ``(loss, grads, problems)``: the mean loss, the gradient (the same
    ``nnx.State`` that ``nnx.grad`` gives) and the :class:`sibp_jax.Problems`
    to pass to ``optimizer.update(model, grads, problems=problems)``.

  Example:
    >>> import jax.numpy as jnp, optax, sibp_jax
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
    ...                        nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    >>> loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
    ...     model, jnp.ones((5, 4)), jnp.zeros((5,), jnp.int32),
    ...     loss_fn=optax.softmax_cross_entropy_with_integer_labels)
    >>> [layer.inputs.shape for layer in problems.layers]
    [(5, 4), (5, 8)]
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  capture.check_batch(x, y)
  found = {}

  def mean_loss(model):
    tape = capture.Tape()
    with tape.active(), _intercept(model):
      logits = model(x)
    losses = loss_fn(logits, y)
    capture.check_batch(x, y, logits, losses)
    found['records'] = tape.records
    found['is_last'] = bool(tape.records) and (
        logits is tape.records[-1].outputs)
    return jnp.mean(losses), ([r.inputs for r in tape.records],
                              [r.outputs for r in tape.records], logits)

  (loss, (inputs, outputs, logits)), grads = nnx.value_and_grad(
      mean_loss, has_aux=True)(model)
  records = [dataclasses.replace(r, inputs=i, outputs=o)
             for r, i, o in zip(found['records'], inputs, outputs)]
  if not found['is_last']:
    logits = None  # makes build_problems report what is wrong
  elif records:
    logits = records[-1].outputs
  graphdef, state = nnx.split(model)
  problems = capture.build_problems(
      records, capture.output_error(loss_fn, outputs[-1] if outputs else None,
                                    y) if records else None,
      logits, runner=_Runner(graphdef), data=nnx.as_pure(state), x=x,
      kind=_kind, check=check_chain)
  return loss, grads, problems
