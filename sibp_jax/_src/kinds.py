"""The kinds of linear layer: how each maps its input, as a regression.

A kind is a small static (hashable) description of one layer's linear map
``g = A(f; θ)``. It owns everything the sweep and the solvers need to know
about the map: how it applies (:meth:`apply`), the rows of its design
matrix (:meth:`design`, :meth:`output_rows`), the problem's size
(:meth:`sizes`) and the checks that the recorded arrays fit the parameters
(:meth:`check`). Nothing here imports Flax; ``flax_layers`` says which Flax
module is which kind.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp

from sibp_jax._src import conv_gram
from sibp_jax._src import sharding

# Matmuls that feed a solve run at full float32 precision: on accelerators
# the default may drop to bf16/tf32 passes, which the Gram matrices of the
# exact solves cannot tolerate.
PRECISION = jax.lax.Precision.HIGHEST


def _another_model(name, inputs, outputs, kernel_shape):
  return ValueError(
      f'layer {name}: problems hold inputs {inputs.shape} and outputs '
      f'{outputs.shape}, which do not fit a kernel of shape '
      f'{tuple(kernel_shape)}; were the problems built from another model?')


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

  def sizes(self, kernel_shape, output_shape) -> tuple[int, int]:
    """``(rows, columns)`` of the design matrix, bias column not counted.

    ``kernel_shape`` may be ``None`` (a kernel held fixed): no columns.
    """
    return (math.prod(output_shape[:-1]),
            0 if kernel_shape is None else math.prod(kernel_shape[:-1]))

  def row_shape(self, output_shape) -> tuple[int, ...]:
    """The output's row axes: its shape without the feature axes."""
    return tuple(output_shape[:-1])

  def check(self, name: str, kernel_shape, bias_shape, inputs, outputs):
    """Raises ``ValueError`` if the recorded arrays do not fit the params."""
    if len(kernel_shape) != 2:
      raise ValueError(f'layer {name}: a Dense kernel must be 2-D, got shape '
                       f'{tuple(kernel_shape)}')
    d_in, d_out = kernel_shape
    if inputs.shape[-1] != d_in or outputs.shape[-1] != d_out:
      raise _another_model(name, inputs, outputs, kernel_shape)
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
  The exact solves use :meth:`gram` instead, ``FᵀF`` without the patches.

  A transposed convolution (``nnx.ConvTranspose``, ``linen.ConvTranspose``)
  is the same map on the input dilated by its strides (``input_dilation``,
  ``s - 1`` zeros between neighbours) with window strides 1: its patches
  and Gram are those of the dilated input.

  Attributes:
    strides: the window strides, one per spatial axis.
    padding: explicit ``(low, high)`` zero padding per spatial axis.
    kernel_dilation: the kernel's dilation per spatial axis.
    input_dilation: the input's dilation per spatial axis (``None``: 1, a
      plain convolution).
  """

  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  kernel_dilation: tuple[int, ...]
  input_dilation: tuple[int, ...] | None = None

  def _specs(self):
    return _CONV_SPECS[len(self.strides)]

  def _dilated(self, inputs):
    """The input with ``input_dilation - 1`` zeros between neighbours."""
    if self.input_dilation is None or set(self.input_dilation) == {1}:
      return inputs
    pads = [(0, 0, 0)] + [(0, 0, d - 1) for d in self.input_dilation] + [
        (0, 0, 0)]
    return jax.lax.pad(inputs, jnp.zeros((), inputs.dtype), pads)

  def apply(self, kernel, bias, inputs):
    """Returns ``conv(inputs, kernel) + bias`` (``bias`` may be ``None``)."""
    out = jax.lax.conv_general_dilated(
        inputs, kernel, self.strides, self.padding,
        lhs_dilation=self.input_dilation,
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
    inputs = self._dilated(inputs)
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

  def gram(self, inputs, window, row_weights=None):
    """``FᵀWF`` and ``FᵀW1`` of :meth:`design` without forming it.

    Shapes ``(m, m)`` and ``(m,)`` with ``m = prod(window)·channels``;
    ``row_weights`` (``None``, or shaped like the output's rows) is ``W``.
    Stride-1 convolutions take the input's correlation with itself at the
    window's shifts, about ``k(2k-1)`` products of ``C × C`` per position for
    a ``k × k`` window instead of the ``k⁴`` of the patches' Gram; the others
    one product per pair of window offsets (``conv_gram`` says how).
    """
    return conv_gram.gram(self._dilated(inputs), window, self.strides,
                          self.padding, self.kernel_dilation, row_weights,
                          PRECISION)

  def output_rows(self, outputs):
    return sharding.reshape_rows(outputs, (-1, outputs.shape[-1]))

  sizes = Dense.sizes
  row_shape = Dense.row_shape

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
      raise _another_model(name, inputs, outputs, kernel_shape)
    if bias_shape is not None and tuple(bias_shape) != (kernel_shape[-1],):
      raise ValueError(f'layer {name}: bias of shape {tuple(bias_shape)} does '
                       f'not fit {kernel_shape[-1]} output channels')


@dataclasses.dataclass(frozen=True)
class DenseGeneral:
  """A dense map contracting several input axes into several output axes.

  ``g = dot_general(f, K) + b`` with ``K`` of shape ``(*contracted,
  *features)``: the input axes ``axis`` (never the batch axis 0) are summed
  against the kernel's leading axes, the other input axes stay in order and
  the kernel's ``features`` trailing axes follow them (as
  ``nnx.LinearGeneral`` / ``linen.DenseGeneral`` without batch axes).
  As a regression, every position of the remaining input axes of every
  example is a row (an attention projection of a ``(B, T, d)`` input has
  ``B·T`` rows), the contracted axes flattened are the columns and the
  feature axes flattened the right-hand sides: the kernel is the
  ``(prod(contracted), prod(features))`` matrix of a :class:`Dense` layer.

  Attributes:
    axis: the contracted input axes, non-negative, in the order of the
      kernel's leading axes.
    features: the number of the kernel's (and the output's) feature axes.
  """

  axis: tuple[int, ...]
  features: int

  def apply(self, kernel, bias, inputs):
    """Returns ``dot_general(inputs, kernel) + bias``."""
    n = len(self.axis)
    out = jax.lax.dot_general(
        inputs, kernel, ((self.axis, tuple(range(n))), ((), ())),
        precision=PRECISION)
    return out if bias is None else out + bias

  def design(self, inputs, window=()):
    """The ``(rows, prod(contracted))`` design matrix; ``window`` unused."""
    del window
    kept = [a for a in range(inputs.ndim) if a not in self.axis]
    moved = jnp.transpose(inputs, kept + list(self.axis))
    return sharding.reshape_rows(
        moved, (-1, math.prod(inputs.shape[a] for a in self.axis)))

  def output_rows(self, outputs):
    return sharding.reshape_rows(
        outputs, (-1, math.prod(outputs.shape[-self.features:])))

  def sizes(self, kernel_shape, output_shape) -> tuple[int, int]:
    return (math.prod(output_shape[:-self.features]),
            0 if kernel_shape is None else
            math.prod(kernel_shape[:len(self.axis)]))

  def row_shape(self, output_shape) -> tuple[int, ...]:
    return tuple(output_shape[:-self.features])

  def check(self, name: str, kernel_shape, bias_shape, inputs, outputs):
    n = len(self.axis)
    contracted = tuple(inputs.shape[a] for a in self.axis)
    kept = tuple(d for a, d in enumerate(inputs.shape) if a not in self.axis)
    features = tuple(kernel_shape[n:])
    if (len(features) != self.features or
        tuple(kernel_shape[:n]) != contracted or
        tuple(outputs.shape) != kept + features):
      raise _another_model(name, inputs, outputs, kernel_shape)
    if bias_shape is not None and tuple(bias_shape) != features:
      raise ValueError(f'layer {name}: bias of shape {tuple(bias_shape)} does '
                       f'not fit the output features {features}')


@dataclasses.dataclass(frozen=True)
class Embed:
  """A lookup table ``g = E[ids]``: the linear map of one-hot rows.

  Every integer of the input (every token of every example) is a row whose
  design is the one-hot vector of its id, so the kernel is the
  ``(num_embeddings, features)`` table itself and ``FᵀF`` is diagonal: how
  often each id occurs in the batch (:meth:`gram_diagonal`). The exact
  ridge solve is then closed form per table row, ``ΔE_v = (Σ_{rows of v}
  R) / (count_v + λ)``: a scatter-add, cost linear in the rows times the
  features, never a ``V × V`` or ``rows × V`` matrix. Ids outside
  ``[0, num_embeddings)`` look up NaN (as ``jnp.take`` does), which flags
  the step; the layer has no bias.

  Attributes:
    num_embeddings: ``V``, the number of table rows.
  """

  num_embeddings: int

  def apply(self, kernel, bias, inputs):
    """Returns ``kernel[inputs]`` (``+ bias``, which Flax's layers lack)."""
    # Ids sharded over devices in their type (explicit sharding) must say
    # how the looked-up rows are split: as the ids, features whole.
    out = kernel.at[inputs].get(
        mode='fill', fill_value=jnp.nan,
        out_sharding=sharding.rows_then(inputs, inputs.ndim + 1))
    return out if bias is None else out + bias

  def design(self, inputs, window=()):
    """The one-hot ``(rows, V)`` design matrix (for solvers that need it)."""
    del window
    return jax.nn.one_hot(sharding.reshape_rows(inputs, (-1,)),
                          self.num_embeddings)

  def output_rows(self, outputs):
    return sharding.reshape_rows(outputs, (-1, outputs.shape[-1]))

  def sizes(self, kernel_shape, output_shape) -> tuple[int, int]:
    return (math.prod(output_shape[:-1]),
            0 if kernel_shape is None else kernel_shape[0])

  row_shape = Dense.row_shape

  def gram_diagonal(self, inputs, dtype, row_weights=None):
    """``diag(FᵀWF)``: the count of each id among the rows (each row
    counting its weight), shape ``(V,)``."""
    w = 1 if row_weights is None else sharding.reshape_rows(
        row_weights, (-1,)).astype(dtype)
    ids = sharding.reshape_rows(inputs, (-1,))
    return jnp.zeros((self.num_embeddings,), dtype).at[ids].add(
        w, out_sharding=sharding.replicated(inputs))

  def check(self, name: str, kernel_shape, bias_shape, inputs, outputs):
    if (len(kernel_shape) != 2 or kernel_shape[0] != self.num_embeddings or
        not jnp.issubdtype(inputs.dtype, jnp.integer) or
        tuple(outputs.shape) != tuple(inputs.shape) + (kernel_shape[1],)):
      raise _another_model(name, inputs, outputs, kernel_shape)
    if bias_shape is not None and tuple(bias_shape) != (kernel_shape[1],):
      raise ValueError(f'layer {name}: bias of shape {tuple(bias_shape)} does '
                       f'not fit {kernel_shape[1]} features')


@dataclasses.dataclass(frozen=True)
class Attend:
  """An embedding table used as the output projection, ``g = h Eᵀ``.

  ``Embed.attend``: the kernel is the ``(V, features)`` table ``E`` of the
  lookup it ties to, so each output unit ``v`` is the dense map of ``h``
  with weights ``E_v``. The sweep solves every use of the table together
  (docs/algorithms.md, "Shared and tied weights"): per table row the
  system is ``(HᵀH + (λ + count_v) I)``, one eigendecomposition of the
  ``d × d`` matrix ``HᵀH`` for all ``V`` rows.

  Attributes:
    num_embeddings: ``V``, the number of table rows (output units).
  """

  num_embeddings: int

  def apply(self, kernel, bias, inputs):
    """Returns ``inputs @ kernelᵀ`` (``+ bias``, which Flax's lack)."""
    out = jnp.matmul(inputs, kernel.T, precision=PRECISION)
    return out if bias is None else out + bias

  def design(self, inputs, window=()):
    del window
    return sharding.reshape_rows(inputs, (-1, inputs.shape[-1]))

  output_rows = Dense.output_rows
  row_shape = Dense.row_shape

  def sizes(self, kernel_shape, output_shape) -> tuple[int, int]:
    return (math.prod(output_shape[:-1]),
            0 if kernel_shape is None else kernel_shape[-1])

  def check(self, name: str, kernel_shape, bias_shape, inputs, outputs):
    if (len(kernel_shape) != 2 or kernel_shape[0] != self.num_embeddings or
        inputs.shape[-1] != kernel_shape[1] or
        outputs.shape[-1] != kernel_shape[0]):
      raise _another_model(name, inputs, outputs, kernel_shape)
    if bias_shape is not None:
      raise ValueError(f'layer {name}: attend has no bias')


def unroll_loops(kind) -> bool:
  """Whether solver loops over this layer's map should be unrolled.

  True for convolutions: XLA:CPU runs the same convolutions far slower
  inside a loop body (the ProxBP-cg3 ConvNet step of
  ``examples/benchmark.py --section step``). Dense layers keep their
  loops, which compile faster. The iteration counts are static and small,
  and accelerators lose nothing.
  """
  return isinstance(kind, Conv)
