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
import itertools
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

from sibp_jax._src import sharding

PathKey = str | int
Path = tuple[PathKey, ...]

# Matmuls that feed a solve run at full float32 precision: on accelerators
# the default may drop to bf16/tf32 passes, which the Gram matrices of the
# exact solves cannot tolerate.
PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Dense:
  """A dense layer ``g = f W + b`` acting on the last axis of ``f``.

  Leading axes other than the last are all treated as examples of the
  regression: an input of shape ``(B, T, d_in)`` gives ``B·T`` rows.
  """

  def apply(self, kernel, bias, inputs):
    """Returns ``inputs @ kernel + bias`` (``bias`` may be ``None``)."""
    out = jnp.matmul(inputs, kernel, precision=PRECISION)
    return out if bias is None else out + bias

  def design(self, inputs, window=()):
    """The kernel's block of the design matrix, shape ``(rows, d_in)``.

    With a column of ones appended for the bias, ``[design, 1] @ [W; b]``
    gives the rows of ``apply``. ``window`` (the kernel's spatial shape,
    empty for a dense layer) is unused.
    """
    del window
    return sharding.reshape_rows(inputs, (-1, inputs.shape[-1]))

  def output_rows(self, outputs):
    """Outputs as the ``(rows, d_out)`` right-hand side of ``design``."""
    return sharding.reshape_rows(outputs, (-1, outputs.shape[-1]))

  def check(self, name: str, kernel_shape, bias_shape, inputs, outputs):
    """Raises ``ValueError`` if the recorded arrays do not fit the params."""
    if len(kernel_shape) != 2:
      raise ValueError(f'layer {name}: a Dense kernel must be 2-D, got shape '
                       f'{tuple(kernel_shape)}')
    d_in, d_out = kernel_shape
    if inputs.shape[-1] != d_in or outputs.shape[-1] != d_out:
      raise ValueError(
          f'layer {name}: problems hold inputs {inputs.shape} and outputs '
          f'{outputs.shape}, which do not fit a kernel of shape '
          f'{tuple(kernel_shape)}; were the problems built from another '
          'model?')
    if bias_shape is not None and tuple(bias_shape) != (d_out,):
      raise ValueError(f'layer {name}: bias of shape {tuple(bias_shape)} does '
                       f'not fit {d_out} outputs')


_CONV_SPECS = {1: ('NWC', 'WIO', 'NWC'), 2: ('NHWC', 'HWIO', 'NHWC'),
               3: ('NDHWC', 'DHWIO', 'NDHWC')}


@dataclasses.dataclass(frozen=True)
class Conv:
  """A channels-last convolution ``g = conv(f, K) + b`` (1-, 2- or 3-D).

  As a regression, every output position of every example is a row: the
  design matrix holds the input patch under the kernel at that position
  (im2col), ordered like the kernel's ``(spatial..., in)`` axes, so
  ``design(f, window) @ K.reshape(-1, out)`` equals the convolution's rows.

  Attributes:
    strides: the window strides, one per spatial axis.
    padding: explicit ``(low, high)`` zero padding per spatial axis.
    kernel_dilation: the kernel's dilation per spatial axis.
  """

  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  kernel_dilation: tuple[int, ...]

  def _specs(self):
    return _CONV_SPECS[len(self.strides)]

  def apply(self, kernel, bias, inputs):
    """Returns ``conv(inputs, kernel) + bias`` (``bias`` may be ``None``)."""
    out = jax.lax.conv_general_dilated(
        inputs, kernel, self.strides, self.padding,
        rhs_dilation=self.kernel_dilation, dimension_numbers=self._specs(),
        precision=PRECISION)
    return out if bias is None else out + bias

  def design(self, inputs, window):
    """im2col: the kernel's block of the design matrix.

    Shape ``(rows, prod(window)·channels)``, one row per example and output
    position, columns ordered like ``kernel.reshape(-1, out)``. Built from
    one strided slice of the padded input per kernel offset: pure data
    movement, where ``lax.conv_general_dilated_patches`` runs a convolution
    with an identity kernel (``k²·c`` output channels, as many
    multiply-adds as the patch Gram matrix itself).
    """
    pads = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in self.padding] + [
        (0, 0, 0)]
    padded = jax.lax.pad(inputs, jnp.zeros((), inputs.dtype), pads)
    out_size = [
        (n - d * (k - 1) - 1) // s + 1 for n, d, k, s in zip(
            padded.shape[1:-1], self.kernel_dilation, window, self.strides,
            strict=True)]
    columns = []
    for offset in itertools.product(*[range(k) for k in window]):
      where = tuple(
          slice(d * o, d * o + s * (m - 1) + 1, s) for o, d, s, m in zip(
              offset, self.kernel_dilation, self.strides, out_size,
              strict=True))
      columns.append(padded[(slice(None), *where)])
    # (batch, *out, offsets, channels): offsets spatial-major, then channels,
    # the order of kernel.reshape(-1, out).
    patches = jnp.stack(columns, axis=-2)
    return sharding.reshape_rows(
        patches, (-1, len(columns) * inputs.shape[-1]))

  def output_rows(self, outputs):
    return sharding.reshape_rows(outputs, (-1, outputs.shape[-1]))

  def check(self, name: str, kernel_shape, bias_shape, inputs, outputs):
    nd = len(self.strides)
    if len(kernel_shape) != nd + 2:
      raise ValueError(f'layer {name}: a {nd}-D conv kernel must have '
                       f'{nd + 2} axes, got shape {tuple(kernel_shape)}')
    if inputs.ndim != nd + 2 or outputs.ndim != nd + 2:
      raise ValueError(
          f'layer {name}: a {nd}-D conv needs inputs and outputs of rank '
          f'{nd + 2} (batch, spatial..., channels), got {inputs.shape} and '
          f'{outputs.shape}')
    if (inputs.shape[-1] != kernel_shape[-2] or
        outputs.shape[-1] != kernel_shape[-1]):
      raise ValueError(
          f'layer {name}: problems hold inputs {inputs.shape} and outputs '
          f'{outputs.shape}, which do not fit a kernel of shape '
          f'{tuple(kernel_shape)}; were the problems built from another '
          'model?')
    if bias_shape is not None and tuple(bias_shape) != (kernel_shape[-1],):
      raise ValueError(f'layer {name}: bias of shape {tuple(bias_shape)} does '
                       f'not fit {kernel_shape[-1]} output channels')


def unroll_loops(kind) -> bool:
  """Whether solver loops over this layer's map should be unrolled.

  True for convolutions: XLA:CPU runs the same convolutions far slower
  inside a loop body (the ProxBP-cg3 ConvNet step of
  ``examples/benchmark.py --section step``: 65× Adam's time looped, 2.3×
  unrolled). Dense layers keep their loops, which compile faster. The
  iteration counts are static and small, and accelerators lose nothing.
  """
  return isinstance(kind, Conv)


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
  """

  inputs: jax.Array
  outputs: jax.Array
  segment: Segment | None
  kind: Hashable
  kernel_path: Path
  bias_path: Path | None

  @property
  def name(self) -> str:
    return '/'.join(str(k) for k in self.kernel_path[:-1]) or '<root>'


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
  """

  layers: tuple[LayerProblem, ...]
  output_error: jax.Array
  graph: Graph | None = None

  @property
  def batch_size(self) -> int:
    return self.output_error.shape[0]


jax.tree_util.register_dataclass(
    Segment, data_fields=['data'], meta_fields=['fn'])
jax.tree_util.register_dataclass(
    Graph, data_fields=['data', 'inputs'], meta_fields=['fn'])
jax.tree_util.register_dataclass(
    LayerProblem, data_fields=['inputs', 'outputs', 'segment'],
    meta_fields=['kind', 'kernel_path', 'bias_path'])
jax.tree_util.register_dataclass(
    Problems, data_fields=['layers', 'output_error', 'graph'],
    meta_fields=[])


def key_name(key) -> PathKey:
  """The plain name of one entry of a ``jax.tree_util`` key path."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def path_str(path: Path) -> str:
  return '/'.join(str(k) for k in path)
