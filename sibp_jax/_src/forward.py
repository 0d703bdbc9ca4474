"""One recorded forward pass and its loss: what both Flax adapters share.

:class:`Forward` runs the model under an adapter's interception with a
recording :class:`~sibp_jax._src.capture.Tape`, computes the mean loss
(per example or per token, weighted by the user's ``weights``) and turns
the records into :class:`sibp_jax.Problems` with :func:`build_problems`,
which reads each layer's batch axis and row weights with ``rows``.
Nothing here imports Flax.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from sibp_jax._src import capture
from sibp_jax._src import problems as problems_lib
from sibp_jax._src import rows

Path = capture.Path


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
  if losses is not None and jnp.shape(losses)[:1] != (batch,):
    raise ValueError(
        f'loss_fn(logits, labels) must return one loss per example, shape '
        f'({batch},), or per position, shape ({batch}, ...); got '
        f'{jnp.shape(losses)}. Use an unreduced loss such as '
        'optax.softmax_cross_entropy_with_integer_labels.')


def output_error(loss_fn, logits, y, loss, weights=None):
  """``e = ∂ℓ/∂z`` per loss term (the gradient of the weighted sum ``Σ w ℓ``).

  The error is made NaN, so that the transformation flags and skips the
  step, when the batch cannot be trusted: the mean ``loss`` is not finite
  (an infinite loss can have a finite gradient), or integer labels with one
  axis fewer than the logits (class indices) fall outside
  ``[0, classes)`` where their weight is not 0, where optax's integer-label
  losses return a finite but meaningless value.
  """
  w = 1.0 if weights is None else weights
  e = jax.grad(lambda z: jnp.sum(w * loss_fn(z, y)))(logits)
  valid = jnp.isfinite(loss)
  if (jnp.issubdtype(jnp.result_type(y), jnp.integer) and
      jnp.ndim(logits) == jnp.ndim(y) + 1):
    valid &= jnp.all((y >= 0) & (y < jnp.shape(logits)[-1]) |
                     (jnp.asarray(w) == 0))
  return jnp.where(valid, e, jnp.nan)


class Forward:
  """One recorded forward pass, shared by the Flax adapters.

  ``loss(run)`` is the mean loss of the logits of ``run()`` (which applies
  the model to ``x`` under the adapter's interception and returns
  ``(logits, extra)``), returning the layers' inputs, outputs and
  parameters and ``extra`` (e.g. updated collections) as auxiliary values
  so that they leave the gradient transform as plain arrays;
  ``problems(...)`` then assembles :class:`Problems`.

  The mean loss is ``J = Σ w ℓ / Σ w`` over every loss term (one per
  example, or per position for a per-token loss), with ``w`` the
  ``weights`` (see :func:`row_weights`) or ones.
  """

  def __init__(self, x, y, loss_fn, weights=None):
    self.x, self.y, self.loss_fn = x, y, loss_fn
    check_batch(x, y)
    if weights is not None:
      weights = jnp.asarray(weights)
      if (weights.ndim == 0 or weights.shape[0] != x.shape[0] or
          jnp.issubdtype(weights.dtype, jnp.complexfloating) or not (
              jnp.issubdtype(weights.dtype, jnp.number) or
              weights.dtype == jnp.bool_)):
        raise ValueError(
            f'weights must be a real (or boolean) array with the batch '
            f'({x.shape[0]}) as its leading axis, got '
            f'{weights.dtype}{list(weights.shape)}')
      weights = weights.astype(jnp.result_type(float))
      if not isinstance(weights, jax.core.Tracer):
        known = np.asarray(weights)
        bad = ~(np.isfinite(known) & (known >= 0))
        if np.any(bad):
          raise ValueError(
              'weights must be finite and non-negative (a weight multiplies '
              f'its loss term), got values such as {known[bad].ravel()[:3]}.')
        if not np.any(known):
          raise ValueError(
              'weights: every weight is 0, so the batch has no loss term '
              '(the mean loss would be 0 / 0).')
    self.weights = weights
    self.records: list[capture.Record] = []
    self.modules: dict[Path, type] = {}  # see Tape.modules
    self.is_last = False
    self.loss_shape = ()

  def loss(self, run):
    tape = capture.Tape()
    with tape.active():
      logits, extra = run()
    tape.check_nested()
    losses = self.loss_fn(logits, self.y)
    check_batch(self.x, self.y, logits, losses)
    self.records = tape.records
    self.modules = {**self.modules, **tape.modules}
    self.is_last = bool(tape.records) and logits is tape.records[-1].outputs
    self.loss_shape = losses.shape
    if self.weights is None:
      terms = losses.size
      loss = jnp.mean(losses)
    else:
      w = rows.row_weights(self.weights, losses.shape, 'the loss')
      terms = jnp.sum(w)
      # 0 / 0 (every weight 0, known only at run time under jit) makes the
      # step NaN: it is flagged and skipped, and the host is told why.
      jax.lax.cond(terms == 0, lambda: jax.debug.callback(_no_terms),
                   lambda: None)
      loss = jnp.sum(w * losses) / terms
    return loss, ([r.inputs for r in tape.records],
                  [r.outputs for r in tape.records],
                  [r.params for r in tape.records], terms, extra)

  def owned(self) -> set[Path]:
    """The paths of the recorded layers' parameters (without a prefix)."""
    return {p for r in self.records for p in r.param_paths if p is not None}

  def problems(self, loss, aux, *, runner, data, prefix: Path = (),
               check: bool = True, resize=None):
    inputs, outputs, params, terms, _ = aux
    records = [dataclasses.replace(r, inputs=i, outputs=o, params=p)
               for r, i, o, p in zip(self.records, inputs, outputs, params)]
    logits = records[-1].outputs if records and self.is_last else None
    weights = None if self.weights is None else rows.row_weights(
        self.weights, self.loss_shape, 'the loss')
    error = (None if logits is None else
             output_error(self.loss_fn, logits, self.y, loss, weights))
    return build_problems(
        records, error, logits, runner=runner, data=data, x=self.x,
        prefix=prefix, check=check, weights=self.weights,
        loss_terms=jnp.asarray(terms, jnp.float32), resize=resize)


def _no_terms():
  warnings.warn(
      'weights: every weight of this batch is 0, so it has no loss term: '
      'the mean loss is NaN and SIBP / ProxBP skip the step '
      '(info.finite is False).', stacklevel=1)


def build_problems(records: list[capture.Record], output_error, logits, *,
                   runner, data, x, prefix: Path = (), check: bool = True,
                   weights=None, loss_terms=None, resize=None):
  """Turns the records of one forward pass into :class:`Problems`.

  Args:
    records: the linear layers in the order they were called.
    output_error: ``∂(Σ w ℓ)/∂z`` (per example, or per loss term).
    logits: the model's output, which must be the last layer's output.
    runner: hashable ``runner(data, x)`` that replays the model.
    data: the arrays ``runner`` needs (the model's variables, its random
      state as the forward pass started from it, call arguments).
    x: the model input of the forward pass.
    prefix: path of the module's variables inside the user's parameter tree.
    check: read the layers' graph off one traced replay (trace time only):
      refuse a layer whose output reaches no later layer, and define the
      segments ``s_i`` only for chain links. Without it every layer is
      taken to be a chain link.
    weights: the user's weights (per example, or per loss term), or
      ``None``; each layer's rows take theirs by the weight rule
      (:mod:`rows`).
    loss_terms: :attr:`Problems.loss_terms`.
    resize: see :func:`rows.batch_axes`.
  """
  if not records:
    raise ValueError('the model applied no recognised linear layer '
                     '(nnx.Linear, nnx.Conv, linen.Dense, linen.Conv).')
  graph = capture.GraphFn(runner, tuple(r.key for r in records))
  if logits is not records[-1].outputs:
    # A parameter read outside its layer's calls (a tied output written
    # as ``h @ table.T``) is the better explanation where there is one.
    capture.chain_links(graph, data, x, records)
    raise ValueError(
        "the model's output must be the output of its last linear layer "
        f"('{problems_lib.path_str(records[-1].path)}'), with nothing "
        'applied after it: put any final activation into loss_fn.')
  shared = capture.shared_layers(records)
  links = (capture.chain_links(graph, data, x, records) if check else
           [True] * (len(records) - 1))
  axes = rows.batch_axes(runner, data, x, records, resize)
  struct = jax.ShapeDtypeStruct(x.shape, x.dtype)
  batch = x.shape[0]
  layers = []
  for i, (rec, axis) in enumerate(zip(records, axes)):
    segment = None
    # A segment names its ends by path, which a shared layer does not fix.
    if (i + 1 < len(records) and links[i] and rec.key not in shared and
        records[i + 1].key not in shared):
      segment = problems_lib.Segment(
          capture.SegmentFn(runner, struct, rec.key, records[i + 1].key),
          data)
    own, fill = rows.layer_weights(
        weights, rec.kind.row_shape(rec.outputs.shape), axis, batch,
        capture.layer_str(*rec.key))
    layers.append(problems_lib.LayerProblem(
        inputs=rec.inputs, outputs=rec.outputs, segment=segment,
        kind=rec.kind, kernel_path=prefix + rec.param_paths[0],
        bias_path=(None if rec.names[1] is None else
                   prefix + rec.param_paths[1]),
        params=rec.params, index=rec.index, row_weights=own, row_fill=fill,
        batch_axis=axis))
  return problems_lib.Problems(
      tuple(layers), output_error, problems_lib.Graph(graph, data, x),
      loss_terms, batch)
