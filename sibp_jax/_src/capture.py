"""Recording a forward pass: the machinery shared by the Flax adapters.

The adapters intercept every recognised linear layer of a model and hand the
call to the active :class:`Tape`. A recording tape keeps each layer's input
and output. A segment tape replays the model with one layer's output replaced
by a given value and keeps the next layer's input: that is the parameter-free
map ``s_i`` between the two layers, as a function the sweep can evaluate and
differentiate. Nothing here imports Flax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp

from sibp_jax._src import problems as problems_lib

Path = problems_lib.Path
_ACTIVE = threading.local()


@dataclasses.dataclass
class Record:
  path: Path
  inputs: jax.Array
  outputs: jax.Array
  has_bias: bool
  kind: Hashable


class Tape:
  """Receives the calls of intercepted linear layers.

  Without ``source`` it records every call; with ``source`` it returns
  ``value`` in place of that layer's output and keeps the input of the layer
  at ``target`` in :attr:`captured`.
  """

  def __init__(self, source: Path | None = None, value=None,
               target: Path | None = None):
    self.source, self.value, self.target = source, value, target
    self.records: list[Record] = []
    self.captured = None

  def visit(self, path: Path, inputs, compute: Callable[[], Any],
            has_bias: bool, kind: Callable[[], Hashable]):
    """Handles one call of a linear layer; ``kind()`` describes it."""
    if self.source is None:
      if any(r.path == path for r in self.records):
        raise ValueError(
            f"the linear layer '{problems_lib.path_str(path)}' is applied "
            'more than once in one forward pass; SIBP and ProxBP need every '
            'linear layer once, in a chain.')
      # Describe the layer before running it, so that an unsupported one is
      # named by us rather than failing inside Flax in its own words.
      layer_kind = kind()
      outputs = compute()
      self.records.append(Record(path, inputs, outputs, has_bias, layer_kind))
      return outputs
    if path == self.target:
      self.captured = inputs
    if path == self.source:
      return self.value
    return compute()

  @contextlib.contextmanager
  def active(self):
    stack = getattr(_ACTIVE, 'stack', [])
    _ACTIVE.stack = stack + [self]
    try:
      yield self
    finally:
      _ACTIVE.stack = stack


def current_tape() -> Tape | None:
  stack = getattr(_ACTIVE, 'stack', [])
  return stack[-1] if stack else None


@dataclasses.dataclass(frozen=True)
class SegmentFn:
  """``s_i`` as a static function of ``(data, g)``, by replaying the model.

  ``runner(data, x)`` runs the model on ``x`` with interception on. The
  replay feeds zeros as the input: in a chain, the next layer's input does
  not depend on the model input once this layer's output is given (checked
  by :func:`check_chain`), and XLA removes the dead computation of the
  layers below and above.
  """

  runner: Hashable
  input_struct: jax.ShapeDtypeStruct
  source: Path
  target: Path

  def replay(self, data, x, g):
    tape = Tape(self.source, g, self.target)
    with tape.active():
      self.runner(data, x)
    if tape.captured is None:
      raise ValueError(
          f"replaying the model with the output of '"
          f"{problems_lib.path_str(self.source)}' given never reached "
          f"'{problems_lib.path_str(self.target)}': the model's layers are "
          'not a fixed chain.')
    return tape.captured

  def __call__(self, data, g):
    x = jnp.zeros(self.input_struct.shape, self.input_struct.dtype)
    return self.replay(data, x, g)


def _depends(jaxpr, sources) -> list[bool]:
  """Which outputs of ``jaxpr`` depend on the invars in ``sources``."""
  tainted = set(sources)
  for eqn in jaxpr.eqns:
    if any(isinstance(v, jex.Var) and v in tainted for v in eqn.invars):
      tainted.update(eqn.outvars)
  return [isinstance(v, jex.Var) and v in tainted for v in jaxpr.outvars]


def check_chain(segment: SegmentFn, data, x, g, records_in) -> None:
  """Raises ``ValueError`` unless the next layer's input is a function of
  this layer's output alone.

  A residual connection or a branch makes the next layer's input depend on
  the model input by another way than through this layer; a layer fed by
  something else does not depend on this layer's output at all. Both are
  read off the traced program, so the check costs nothing at run time.
  """
  closed = jax.make_jaxpr(lambda x, g: segment.replay(data, x, g))(x, g)
  jaxpr = closed.jaxpr
  n_x = len(jax.tree.leaves(x))
  on_x = _depends(jaxpr, jaxpr.invars[:n_x])
  on_g = _depends(jaxpr, jaxpr.invars[n_x:])
  src = problems_lib.path_str(segment.source)
  dst = problems_lib.path_str(segment.target)
  if any(on_x):
    raise ValueError(
        f"the input of layer '{dst}' depends on the model input other than "
        f"through layer '{src}' (a residual connection or a branch?): "
        'SIBP and ProxBP need the linear layers to form a chain with '
        'parameter-free code between them.')
  if not any(on_g):
    raise ValueError(
        f"the input of layer '{dst}' does not depend on the output of layer "
        f"'{src}': the linear layers do not form a chain.")
  shape = closed.out_avals[0].shape
  if shape != records_in.shape:
    raise ValueError(f"replaying layer '{dst}' gave an input of shape "
                     f'{shape}, but the forward pass had {records_in.shape}.')


def build_problems(records: list[Record], output_error, logits, *, runner,
                   data, x, prefix: Path = (), check: bool = True,
                   labels=None, loss_fn=None):
  """Turns the records of one forward pass into :class:`Problems`.

  Args:
    records: the linear layers in the order they were called.
    output_error: ``∂ℓ/∂z`` per example.
    logits: the model's output, which must be the last layer's output.
    runner: hashable ``runner(data, x)`` that replays the model.
    data: the arrays ``runner`` needs (the model's variables).
    x: the model input of the forward pass.
    prefix: path of the module's variables inside the user's parameter tree.
    check: verify that the layers form a chain (trace-time only).
    labels, loss_fn: the batch's labels and per-example loss, kept for
      steps that need the loss itself.
  """
  if not records:
    raise ValueError('the model applied no recognised linear layer '
                     '(nnx.Linear, nnx.Conv, linen.Dense, linen.Conv).')
  if logits is not records[-1].outputs:
    raise ValueError(
        "the model's output must be the output of its last linear layer "
        f"('{problems_lib.path_str(records[-1].path)}'), with nothing applied "
        'after it: put any final activation into loss_fn.')
  struct = jax.ShapeDtypeStruct(x.shape, x.dtype)
  layers = []
  for i, rec in enumerate(records):
    segment = None
    if i + 1 < len(records):
      fn = SegmentFn(runner, struct, rec.path, records[i + 1].path)
      if check:
        check_chain(fn, data, x, rec.outputs, records[i + 1].inputs)
      segment = problems_lib.Segment(fn, data)
    layers.append(problems_lib.LayerProblem(
        inputs=rec.inputs, outputs=rec.outputs, segment=segment,
        kind=rec.kind, kernel_path=prefix + rec.path + ('kernel',),
        bias_path=prefix + rec.path + ('bias',) if rec.has_bias else None))
  return problems_lib.Problems(tuple(layers), output_error, labels, loss_fn)


def check_batch(x, y, logits=None, losses=None) -> None:
  """Clear errors for inputs, labels and losses that do not line up."""
  if jnp.ndim(x) == 0:
    raise ValueError('x must have a leading batch axis, got a scalar.')
  batch = jnp.shape(x)[0]
  if batch == 0:
    raise ValueError('x holds an empty batch (leading axis 0).')
  if jnp.ndim(y) == 0 or jnp.shape(y)[0] != batch:
    raise ValueError(f'labels y have shape {jnp.shape(y)} but x has batch '
                     f'{batch}: the leading axes must agree.')
  if losses is not None and jnp.shape(losses) != (batch,):
    raise ValueError(
        f'loss_fn(logits, labels) must return one loss per example, shape '
        f'({batch},), got {jnp.shape(losses)}; use a per-example loss such as '
        'optax.softmax_cross_entropy_with_integer_labels.')


def output_error(loss_fn, logits, y, loss):
  """``e = ∂ℓ_b/∂z_b`` per example (the batch-summed loss's gradient).

  The error is made NaN, so that the transformation flags and skips the
  step, when the batch cannot be trusted: the mean ``loss`` is not finite
  (an infinite loss can have a finite gradient), or integer labels with one
  axis fewer than the logits (class indices) fall outside
  ``[0, classes)``, where optax's integer-label losses return a finite but
  meaningless value.
  """
  e = jax.grad(lambda z: jnp.sum(loss_fn(z, y)))(logits)
  valid = jnp.isfinite(loss)
  if (jnp.issubdtype(jnp.result_type(y), jnp.integer) and
      jnp.ndim(logits) == jnp.ndim(y) + 1):
    valid &= jnp.all((y >= 0) & (y < jnp.shape(logits)[-1]))
  return jnp.where(valid, e, jnp.nan)


class Forward:
  """One recorded forward pass, shared by the Flax adapters.

  ``loss(run)`` is the mean loss of ``run()`` (the model applied to ``x``
  under the adapter's interception), returning the layers' inputs and
  outputs as auxiliary values so that they leave the gradient transform as
  plain arrays; ``problems(...)`` then assembles :class:`Problems`.
  """

  def __init__(self, x, y, loss_fn):
    self.x, self.y, self.loss_fn = x, y, loss_fn
    check_batch(x, y)
    self.records: list[Record] = []
    self.is_last = False

  def loss(self, run):
    tape = Tape()
    with tape.active():
      logits = run()
    losses = self.loss_fn(logits, self.y)
    check_batch(self.x, self.y, logits, losses)
    self.records = tape.records
    self.is_last = bool(tape.records) and logits is tape.records[-1].outputs
    return jnp.mean(losses), ([r.inputs for r in tape.records],
                              [r.outputs for r in tape.records])

  def problems(self, loss, aux, *, runner, data, prefix: Path = (),
               check: bool = True):
    inputs, outputs = aux
    records = [dataclasses.replace(r, inputs=i, outputs=o)
               for r, i, o in zip(self.records, inputs, outputs)]
    logits = records[-1].outputs if records and self.is_last else None
    error = (None if logits is None else
             output_error(self.loss_fn, logits, self.y, loss))
    return build_problems(records, error, logits, runner=runner, data=data,
                          x=self.x, prefix=prefix, check=check, labels=self.y,
                          loss_fn=self.loss_fn)
