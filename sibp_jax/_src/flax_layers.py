"""Which Flax layers the sweep recognises, and their static descriptions."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
from flax import nnx

from sibp_jax._src import problems as problems_lib

# nnx.Linear / linen.Dense and nnx.Conv / linen.Conv share attribute names.
DENSE = (nnx.Linear, nn.Dense)
CONV = (nnx.Conv, nn.Conv)
# Layers with a kernel that the sweep does not read; named in errors.
UNRECOGNISED = (nnx.LinearGeneral, nnx.Einsum, nnx.ConvTranspose,
                nn.DenseGeneral, nn.Einsum, nn.ConvTranspose)


def _per_axis(value, nd: int, what: str, name: str) -> tuple[int, ...]:
  if value is None:
    value = 1
  if isinstance(value, int):
    return (value,) * nd
  value = tuple(value)
  if len(value) != nd:
    raise ValueError(f"layer '{name}': {what} {value} does not match a "
                     f'{nd}-D convolution')
  return value


def has_bias(module) -> bool:
  return bool(module.use_bias)


def layer_kind(module, name: str, input_shape: Sequence[int]):
  """The :class:`sibp_jax.Dense` / :class:`sibp_jax.Conv` for ``module``.

  Raises:
    ValueError: for convolution settings the sweep cannot treat as a plain
      linear map of its input (grouped, input-dilated, masked, or with
      circular/reflect/causal padding), naming the layer.
  """
  if isinstance(module, DENSE):
    return problems_lib.Dense()
  nd = len(input_shape) - 2
  if nd not in (1, 2, 3):
    raise ValueError(
        f"layer '{name}': a convolution needs inputs of shape (batch, "
        f'spatial..., channels) with 1 to 3 spatial axes, got {input_shape}')
  if module.feature_group_count != 1:
    raise ValueError(f"layer '{name}': grouped convolutions "
                     '(feature_group_count > 1) are not supported')
  if any(d != 1 for d in _per_axis(module.input_dilation, nd,
                                   'input_dilation', name)):
    raise ValueError(f"layer '{name}': input dilation is not supported")
  if module.mask is not None:
    raise ValueError(f"layer '{name}': masked kernels are not supported")
  window = _per_axis(module.kernel_size, nd, 'kernel_size', name)
  strides = _per_axis(module.strides, nd, 'strides', name)
  dilation = _per_axis(module.kernel_dilation, nd, 'kernel_dilation', name)
  padding = nn.linear.canonicalize_padding(module.padding, nd)
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      raise ValueError(f"layer '{name}': {padding} padding is not supported; "
                       "use 'SAME', 'VALID' or explicit zero padding")
    dilated = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    padding = jax.lax.padtype_to_pads(tuple(input_shape[1:-1]), dilated,
                                      strides, padding)
  return problems_lib.Conv(
      strides=strides,
      padding=tuple((int(lo), int(hi)) for lo, hi in padding),
      kernel_dilation=dilation)
