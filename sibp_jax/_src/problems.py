"""The layer-wise problems that one forward pass hands to the backward sweep.

A network is read as a chain of parametric linear layers with parameter-free
maps (``segments``) between them::

    f_0 = x,   g_i = A_i(f_{i-1}; θ_i),   f_i = s_i(g_i),   z = g_L.

:class:`Problems` holds what the sweep needs from one forward pass: every
layer's input ``f_{i-1}`` and pre-activation ``g_i``, the parameter-free map
``s_i`` in a form that can be evaluated and differentiated, where the layer's
parameters live in the parameter tree, and the per-example output error
``e = ∂ℓ/∂z``. Nothing here imports Flax: the adapters in ``sibp_jax.nnx`` and
``sibp_jax.linen`` build these objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp

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

  def design(self, inputs, *, kernel: bool = True, bias: bool = True):
    """Design matrix of the least-squares fit, shape ``(rows, columns)``.

    Columns are the kernel's input features (if ``kernel``), then a column of
    ones for the bias (if ``bias``), so that ``design @ [W; b]`` gives the
    rows of ``apply``.
    """
    rows = inputs.reshape(-1, inputs.shape[-1])
    cols = []
    if kernel:
      cols.append(rows)
    if bias:
      cols.append(jnp.ones((rows.shape[0], 1), rows.dtype))
    return jnp.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]

  def output_rows(self, outputs):
    """Outputs as the ``(rows, d_out)`` right-hand side of ``design``."""
    return outputs.reshape(-1, outputs.shape[-1])

  def kernel_rows(self, kernel):
    """The kernel as the ``(columns, d_out)`` block that ``design`` uses."""
    return kernel.reshape(-1, kernel.shape[-1])

  def check(self, name: str, kernel_shape, bias_shape, inputs, outputs):
    """Raises ``ValueError`` if the recorded arrays do not fit the parameters."""
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
class LayerProblem:
  """One linear layer as seen by the sweep.

  Attributes:
    inputs: ``f_{i-1}``, the layer's input in the forward pass.
    outputs: ``g_i``, the layer's output (pre-activation) in the forward pass.
    segment: ``s_i``, the map from ``outputs`` to the next layer's input;
      ``None`` for the last layer, whose output is the logits.
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
    layers: the linear layers from input to output.
    output_error: ``e = ∂ℓ/∂z``, one row per example (not divided by the
      batch size): ``softmax(z) - onehot(y)`` for softmax cross-entropy.
  """

  layers: tuple[LayerProblem, ...]
  output_error: jax.Array

  @property
  def batch_size(self) -> int:
    return self.output_error.shape[0]


jax.tree_util.register_dataclass(
    Segment, data_fields=['data'], meta_fields=['fn'])
jax.tree_util.register_dataclass(
    LayerProblem, data_fields=['inputs', 'outputs', 'segment'],
    meta_fields=['kind', 'kernel_path', 'bias_path'])
jax.tree_util.register_dataclass(
    Problems, data_fields=['layers', 'output_error'], meta_fields=[])


def key_name(key) -> PathKey:
  """The plain name of one entry of a ``jax.tree_util`` key path."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def path_str(path: Path) -> str:
  return '/'.join(str(k) for k in path)
