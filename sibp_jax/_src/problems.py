"""The layer-wise problems that one forward pass hands to the backward sweep.

A network is read as parametric linear layers, taken in call order, with
parameter-free code between them. In a chain that code is one map
(``segment``) from each layer to the next::

    f_0 = x,   g_i = A_i(f_{i-1}; θ_i),   f_i = s_i(g_i),   z = g_L.

In a general graph (residual connections, branches, concatenations) a layer's
input may depend on several earlier layers' outputs; the model is then kept
as a whole, as a function of all layers' outputs (:class:`Graph`), and the
sweep accumulates each layer's error over all its consumers by one reverse
pass through it (see docs/algorithms.md).

:class:`Problems` holds what the sweep needs from one forward pass: every
layer's input ``f_{i-1}`` and pre-activation ``g_i``, the parameter-free map
``s_i`` in a form that can be evaluated and differentiated, where the layer's
parameters live in the parameter tree, and the per-example output error
``e = ∂ℓ/∂z``. Nothing here imports Flax: the adapters in ``sibp_jax.nnx`` and
``sibp_jax.linen`` build these objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

from sibp_jax._src import kinds

PathKey = str | int
Path = tuple[PathKey, ...]
PRECISION = kinds.PRECISION


@dataclasses.dataclass(frozen=True)
class Segment:
  """A parameter-free map ``f_i = s_i(g_i)`` between two linear layers.

  ``fn(data, g)`` must be a pure function; ``fn`` is static (hashable, equal
  across traces so that jitted steps do not recompile) and ``data`` is a
  pytree of arrays it needs (for the Flax adapters: the model's variables).
  """

  fn: Callable[[Any, jax.Array], jax.Array]
  data: Any

  def __call__(self, g):
    return self.fn(self.data, g)

  def vjp(self, g, cotangent):
    """Returns ``(∂s/∂g at g)ᵀ cotangent``: ``s'(g) ⊙ cotangent`` for ReLU."""
    out, pullback = jax.vjp(self, g)
    return pullback(cotangent.astype(out.dtype))[0]


@dataclasses.dataclass(frozen=True)
class Graph:
  """The model's parameter-free code, as a function of its layers' outputs.

  ``fn(data, inputs, hook)`` replays the model on ``inputs`` (the forward
  pass's model input) with its variables ``data``; every recognised linear
  layer's call is replaced by ``hook(index, layer_input)``, whose value is
  used as that layer's output (``index`` counts the layers in call order).
  It returns the model's output. Normalisation layers see the forward
  pass's batch and dropout draws the forward pass's mask, because the
  replay starts from the variables (and random state) the forward pass
  started from; what the replay changes in them is discarded.

  ``fn`` is static (hashable, equal across traces); ``data`` and
  ``inputs`` are pytrees of arrays.
  """

  fn: Callable[[Any, Any, Callable], Any]
  data: Any
  inputs: Any

  def __call__(self, hook):
    return self.fn(self.data, self.inputs, hook)


@dataclasses.dataclass(frozen=True)
class LayerProblem:
  """One linear layer as seen by the sweep.

  Attributes:
    inputs: ``f_{i-1}``, the layer's input in the forward pass.
    outputs: ``g_i``, the layer's output (pre-activation) in the forward pass.
    segment: ``s_i``, the map from ``outputs`` to the next layer's input,
      when the next layer's input is a function of this layer's output
      alone (a chain link); ``None`` for the last layer, whose output is
      the logits, and for a layer of a general graph whose output reaches
      other layers or reaches them together with other inputs.
    kind: the static description of the linear map (:class:`Dense`, ...).
    kernel_path: where the kernel lives in the parameter tree.
    bias_path: where the bias lives, or ``None`` for a layer without one.
    params: ``(kernel, bias)`` as the forward pass used them (``bias``
      ``None`` for a layer without one): the weights a frozen layer (one
      whose parameters the transformation is not given) passes the error
      through.
    index: the slice of the stacked parameters at ``kernel_path`` and
      ``bias_path`` that this layer is (a layer of a scan over layers: one
      index per scan, outermost first), or ``()`` for the whole arrays.
    row_weights: how many times each row of the layer's regression
      counts, shaped like the output's row axes (the output's shape
      without its feature axes), or ``None`` for once each: the weight of
      the row's own loss term (``own`` of the weight rule in
      docs/algorithms.md, "Weights"). The sweep adds :attr:`row_fill` for
      the rows that carry error (:meth:`counted`).
    row_fill: what a row whose error is not zero adds to its count (the
      batch's largest weight, for a row whose own weight is 0), or
      ``None`` for nothing.
    batch_axis: the axis of ``outputs`` that holds the batch (examples, or
      examples times positions), or ``None`` for a layer applied to an
      input without one (positions looked up on ``arange(T)``), whose rows
      are shared by every example. Read from the computation by the
      adapters; 0 for problems built by hand.
  """

  inputs: jax.Array
  outputs: jax.Array
  segment: Segment | None
  kind: Hashable
  kernel_path: Path
  bias_path: Path | None
  params: tuple[jax.Array, jax.Array | None] | None = None
  row_weights: jax.Array | None = None
  index: tuple[int, ...] = ()
  row_fill: jax.Array | None = None
  batch_axis: int | None = 0

  def counted(self, error) -> LayerProblem:
    """The problem whose :attr:`row_weights` are the rows' counts given
    the layer's output error ``error`` (``e_g``): ``own + fill · [the row's
    error is not 0]``; :attr:`row_fill` is then ``None``."""
    if self.row_fill is None:
      return self
    rows = self.kind.row_shape(self.outputs.shape)
    carries = jnp.any(error.reshape(tuple(rows) + (-1,)) != 0, axis=-1)
    fill = self.row_fill * carries.astype(self.row_fill.dtype)
    weights = fill if self.row_weights is None else self.row_weights + fill
    return dataclasses.replace(self, row_weights=weights, row_fill=None)

  @property
  def module_name(self) -> str:
    """The path of the module holding the kernel (the slices of a scan's
    stacked kernel share it)."""
    return '/'.join(str(k) for k in self.kernel_path[:-1]) or '<root>'

  @property
  def name(self) -> str:
    """The layer's path (a scanned layer's with its slice: ``mlp[3]``)."""
    return self.module_name + ''.join(f'[{i}]' for i in self.index)

  @property
  def key(self) -> tuple[Path, tuple[int, ...]]:
    """Tells one layer from another: its kernel's path and slice."""
    return self.kernel_path, self.index


@dataclasses.dataclass(frozen=True)
class Problems:
  """Everything the backward sweep needs from one forward pass.

  Attributes:
    layers: the linear layers in call order (a topological order); the last
      one produces the logits.
    output_error: ``e = ∂ℓ/∂z``, one row per example (not divided by the
      batch size): ``softmax(z) - onehot(y)`` for softmax cross-entropy.
    graph: the model as a function of its layers' outputs, for the sweep
      over a general graph; ``None`` when only the chain's segments are
      known (then the layers must form a chain).
    loss_terms: the number of terms the mean loss ``J`` averages (the batch
      size for one loss per example, examples times positions for one per
      token, the sum of the weights with weights), so that ``∇_z J =
      output_error / loss_terms``; ``None`` for the batch size.
    batch: the number of examples of the forward pass (static), or
      ``None`` for the output error's leading axis.
  """

  layers: tuple[LayerProblem, ...]
  output_error: jax.Array
  graph: Graph | None = None
  loss_terms: jax.Array | None = None
  batch: int | None = None

  @property
  def batch_size(self) -> int:
    """The number of examples (:attr:`batch`, or the output error's
    leading axis for problems built without it)."""
    return self.output_error.shape[0] if self.batch is None else self.batch

  @property
  def terms(self):
    """:attr:`loss_terms`, or the batch size where it is ``None``."""
    return self.batch_size if self.loss_terms is None else self.loss_terms


jax.tree_util.register_dataclass(
    Segment, data_fields=['data'], meta_fields=['fn'])
jax.tree_util.register_dataclass(
    Graph, data_fields=['data', 'inputs'], meta_fields=['fn'])
jax.tree_util.register_dataclass(
    LayerProblem,
    data_fields=['inputs', 'outputs', 'segment', 'params', 'row_weights',
                 'row_fill'],
    meta_fields=['kind', 'kernel_path', 'bias_path', 'index', 'batch_axis'])
jax.tree_util.register_dataclass(
    Problems, data_fields=['layers', 'output_error', 'graph', 'loss_terms'],
    meta_fields=['batch'])


def key_name(key) -> PathKey:
  """The plain name of one entry of a ``jax.tree_util`` key path."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def path_str(path: Path) -> str:
  return '/'.join(str(k) for k in path)
