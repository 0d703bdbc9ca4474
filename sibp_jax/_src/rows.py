"""The rows of each layer's problem: where the batch is, and what each counts.

Two facts about a layer's regression come from the computation, not from
its shapes:

- **The batch axis** of every layer's input and output. The model is
  traced once more, shapes only, at another batch size
  (:func:`batch_axes`): the axis whose length follows the batch carries the
  examples (``B·k`` rows for a batch flattened with ``k`` positions per
  example), an array whose shape does not change has no batch axis (a
  position table looked up on ``arange(T)``, a learned query), and a layer
  whose output loses the batch axis its input had (it contracts the
  examples) is refused by name. ``B == T`` is then never ambiguous.

- **The weight of each row** (the weight rule, docs/algorithms.md
  "Weights"). A weight multiplies its loss term once: the error every layer
  receives is that of ``Σ w ℓ``, so a row that feeds weighted terms
  carries their error whatever its own weight (a prompt token that later
  tokens attend to). In the layer's regression, whose normal equations are
  ``(FᵀρF + Λ) Δ = Fᵀ R``, a row ``r`` counts ``ρ_r`` times:

      ρ_r = own_r + fill_r · [row r carries error]

  ``own_r`` is the weight of the row's own loss term (an integer weight
  ``k`` is the example repeated ``k`` times; a row of an example with
  per-position weights at the loss's positions takes its position's
  weight, any other row its example's largest), summed over the examples
  for a row without a batch axis (it is one row shared by every example,
  as in the model written with the ids broadcast over the batch). A row
  whose own weight is 0 but that carries error from other terms counts
  with the batch's largest weight (``fill_r``); a row that reaches no term
  of positive weight (right padding under a causal mask, an example of
  weight 0 in a model whose examples do not interact) adds nothing. The
  right-hand side ``Fᵀ R`` is never weighted again, so ProxBP's and SIBP's
  limits are backprop's for any ``ρ``.

Nothing here imports Flax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sibp_jax._src import capture


def row_weights(weights, shape, what: str, strict: bool = True):
  """``weights`` for an array whose leading (row) axes are ``shape``.

  The weights' first axis and ``shape``'s first axis are the batch. Where
  ``shape`` begins with the weights' shape (per-example weights, or
  per-position weights for rows at the same positions) they are broadcast
  over the remaining axes. Otherwise (a layer after pooling over
  positions, a per-example loss with per-position weights, rows at other
  positions) an example's weight is its largest; with ``strict`` (the
  loss itself) only where ``shape`` has fewer axes than the weights,
  anything else being a ``ValueError`` naming ``what``.
  """
  shape = tuple(shape)
  if not shape or shape[0] != weights.shape[0]:
    raise ValueError(
        f'{what}: weights of shape {weights.shape} do not fit rows of shape '
        f'{shape}: their leading axes must agree (the batch axis at least)')
  if shape[:weights.ndim] != weights.shape:
    if strict and len(shape) >= weights.ndim:
      raise ValueError(
          f'{what}: weights of shape {weights.shape} do not fit rows of shape '
          f'{shape}: their leading axes must agree (the batch axis at least)')
    weights = jnp.max(weights.reshape(weights.shape[0], -1), axis=1)
  weights = weights.reshape(weights.shape + (1,) * (len(shape) - weights.ndim))
  return jnp.broadcast_to(weights, shape)


def layer_weights(weights, rows: tuple[int, ...], axis: int | None,
                  batch: int, what: str):
  """``(own, fill)`` of a layer's rows (shape ``rows``, batch on ``axis``).

  ``weights`` are the user's (``None``: every term weighs 1). ``own`` and
  ``fill`` are shaped like ``rows`` (see the module's docstring); either
  is ``None`` where it is all ones, respectively all zeros.
  """
  if axis is None:  # one row shared by every example
    per = (jnp.ones((batch,) + rows) if weights is None else
           row_weights(weights, (batch,) + rows, what, strict=False))
    own = jnp.sum(per, axis=0)
    if weights is None:
      return own, None
    return own, jnp.max(weights) * jnp.sum(per == 0, axis=0).astype(
        own.dtype)
  if weights is None:
    return None, None
  moved = (rows[axis],) + rows[:axis] + rows[axis + 1:]
  per_example = moved[0] // batch
  # A batch flattened with its positions (B·k rows): batch-major.
  split = (batch, per_example) + moved[1:] if per_example > 1 else moved
  own = row_weights(weights, split, what, strict=False).reshape(moved)
  own = jnp.moveaxis(own, 0, axis)
  return own, jnp.max(weights) * (own == 0).astype(own.dtype)


def _axis(small, large, batch, other, what) -> int | None:
  """The batch axis of an array of shape ``small`` at batch ``batch`` and
  ``large`` at batch ``other``; ``None`` if its shape does not change."""
  moved = [i for i, (a, b) in enumerate(zip(small, large)) if a != b]
  if len(small) != len(large) or len(moved) > 1 or (moved and (
      small[moved[0]] % batch or small[moved[0]] // batch * other !=
      large[moved[0]])):
    raise ValueError(
        f'{what} has shape {tuple(small)} at batch {batch} and '
        f'{tuple(large)} at batch {other}: sibp_jax needs the batch in one '
        'axis of it (examples, or examples times positions) or in none, '
        'and this layer mixes the examples. Apply the layer to each '
        "example's own rows.")
  return moved[0] if moved else None


def _resized(tree, batch, other):
  """Abstract values of ``tree``'s arrays, those led by ``batch`` at
  ``other``."""
  def one(a):
    shape = tuple(np.shape(a))
    if shape and shape[0] == batch:
      shape = (other,) + shape[1:]
    return jax.ShapeDtypeStruct(shape, jnp.result_type(a))
  return jax.tree.map(one, tree)


def batch_axes(runner, data, x, records, resize=None) -> list[int | None]:
  """The batch axis of every recorded layer's output, from the computation.

  Replays ``runner(data, x)`` shapes only (``jax.eval_shape``, no run
  time) at another batch size and compares every layer's input and output
  shapes with the forward pass's. ``resize`` (optional) names the part of
  ``data`` whose arrays led by the batch are call arguments that follow
  it (a mask passed to a linen module): ``resize(data, fn)`` returns
  ``data`` with ``fn`` applied there; it is tried only if the model fails
  with ``x`` resized alone.

  Raises:
    ValueError: naming the layer, for a layer with the batch in several
      axes, or whose output lost the batch axis its input had (it contracts
      the examples), or a convolution whose batch is not its first axis;
      and for a model that cannot be traced at another batch size.
  """
  batch = x.shape[0]
  other = batch + 1 if batch > 1 else 3
  probe = jax.ShapeDtypeStruct((other,) + x.shape[1:], x.dtype)

  def run(data, x):
    tape = capture.Tape()
    with tape.active():
      runner(data, x)
    keys.append([r.key for r in tape.records])
    return [(r.inputs, r.outputs) for r in tape.records]

  tries = [data] + ([] if resize is None else [
      resize(data, lambda part: _resized(part, batch, other))])
  failure = None
  for attempt in tries:
    keys = []
    try:
      shapes = jax.eval_shape(run, attempt, probe)
      break
    except Exception as err:  # noqa: BLE001 -- reported below
      failure = failure or err
  else:
    raise ValueError(
        'sibp_jax reads which axis of each layer\'s input and output holds '
        f'the batch by tracing the model once more at batch {other} (shapes '
        f'only); the model failed at that batch: {failure}. A model must '
        'accept any batch size (no batch size written into it).') from failure
  if keys[-1] != [r.key for r in records]:
    raise ValueError(
        f'the model applied other layers at batch {other} than at batch '
        f'{batch}: it must apply the same layers whatever the batch size.')
  axes = []
  for rec, (f, g) in zip(records, shapes):
    name = f"layer '{capture.layer_str(*rec.key)}'"
    f_axis = _axis(rec.inputs.shape, f.shape, batch, other,
                   f'the input of {name}')
    g_axis = _axis(rec.outputs.shape, g.shape, batch, other,
                   f'the output of {name}')
    rows = len(rec.kind.row_shape(rec.outputs.shape))
    if (f_axis is None) != (g_axis is None) or (
        g_axis is not None and g_axis >= rows):
      raise ValueError(
          f'{name} contracts the batch axis (its input holds the batch in '
          f'axis {f_axis}, its rows in {g_axis}): it mixes the examples, and '
          'SIBP and ProxBP solve a map of each example. Move the batch out '
          "of the layer's contracted axes.")
    if getattr(rec.kind, 'batch_first', False) and f_axis not in (0, None):
      raise ValueError(
          f'{name} is a convolution whose input holds the batch in axis '
          f'{f_axis}: a convolution takes the batch as its first axis.')
    axes.append(g_axis)
  return axes

