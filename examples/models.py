r"""The networks of the SIBP and ProxBP papers' experiments, in ``flax.nnx``.

Every model but ``char_lm`` takes images ``(batch, height, width,
channels)`` (the MLPs: any array whose leading axis is the batch) and
returns logits ``(batch, classes)``; :func:`create_model` builds them by
name:

* ``paper_mlp``: the SIBP authors' network (:class:`PaperMLP`).
* ``proxprop_mlp``, ``proxprop_convnet``: the ProxBP authors' MLP and
  ConvNet (:class:`ProxPropMLP`, :class:`ProxPropConvNet`), with PyTorch's
  default initialisation as in their code: weights and biases uniform in
  ``±1/sqrt(fan_in)`` (``fan_in`` counts the kernel's window for a
  convolution).
* ``resnet20``: the CIFAR ResNet-20 of He et al. (2016) (:class:`ResNet20`).
* ``residual_mlp``, ``residual_mlp_16``: :class:`ResidualMLP` with 4 or 16
  blocks of width 256.
* ``vit``: a small vision transformer (:class:`ViT`): patches, learned
  positions from ``nnx.Embed``, pre-norm attention blocks.
* ``char_lm``: a small decoder-only character language model
  (:class:`CharLM`): causal attention blocks, the output tied to the
  token table;
  character ids ``(batch, tokens)`` in, next-character logits ``(batch,
  tokens, vocab)`` out.

The papers' models are chains of linear layers; the residual ones are not:
the sweep over the graph (sibp_jax's linearized SIBP and ProxBP) trains
them, and SIBP's paper variant (defined on chains) refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch's default for nn.Linear / nn.Conv2d weights: kaiming_uniform with
# a = sqrt(5), i.e. uniform in ±sqrt(6 / ((1 + 5) fan_in)) = ±1/sqrt(fan_in);
# variance_scaling's uniform bound is sqrt(3 scale / fan_in), so scale = 1/3.
_torch_kernel_init = nnx.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform')


def _torch_bias_init(fan_in: int) -> Callable:
  """PyTorch's default bias: uniform in ``±1/sqrt(fan_in)``."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


def _torch_linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, kernel_init=_torch_kernel_init,
                    bias_init=_torch_bias_init(d_in), rngs=rngs)


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


class PaperMLP(nnx.Module):
  """The SIBP authors' network: in-500-10, ReLU, all parameters N(0, 0.05²)."""

  def __init__(self, d_in: int = 784, hidden: int = 500, classes: int = 10,
               *, seed: int = 0):
    init = nnx.initializers.normal(0.05)
    rngs = nnx.Rngs(seed)
    self.hidden = nnx.Linear(d_in, hidden, kernel_init=init, bias_init=init,
                             rngs=rngs)
    self.out = nnx.Linear(hidden, classes, kernel_init=init, bias_init=init,
                          rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(_flatten(x))))


class ProxPropMLP(nnx.Module):
  """The ProxBP authors' MLP: in-4000-1000-4000-classes with ReLU."""

  def __init__(self, d_in: int = 3072,
               hidden: Sequence[int] = (4000, 1000, 4000),
               classes: int = 10, *, seed: int = 0):
    rngs = nnx.Rngs(seed)
    widths = [d_in, *hidden]
    self.hidden = nnx.List([
        _torch_linear(a, b, rngs)
        for a, b in zip(widths[:-1], widths[1:], strict=True)])
    self.out = _torch_linear(widths[-1], classes, rngs)

  def __call__(self, x):
    x = _flatten(x)
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return self.out(x)


def _max_pool(x: jax.Array) -> jax.Array:
  return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


class ProxPropConvNet(nnx.Module):
  """The ProxBP authors' ConvNet, adapted to the input's shape.

  ``conv5x5(16) → ReLU → pool → conv5x5(20) → ReLU → pool → conv5x5(20) →
  ReLU → Linear(20·(H/4)·(W/4) → classes)`` (CIFAR-10: ``20·8·8 → 10``),
  convolutions with zero padding 2 (``'SAME'`` size), 2×2 max-pools with
  stride 2 (odd sizes are floored).
  """

  def __init__(self, input_shape: Sequence[int] = (32, 32, 3),
               classes: int = 10, *, seed: int = 0):
    height, width, channels = input_shape
    rngs = nnx.Rngs(seed)
    self.convs = nnx.List([nnx.Conv(
        c_in, c_out, kernel_size=(5, 5), padding=((2, 2), (2, 2)),
        kernel_init=_torch_kernel_init, bias_init=_torch_bias_init(c_in * 25),
        rngs=rngs)
        for c_in, c_out in zip((channels, 16, 20), (16, 20, 20), strict=True)])
    features = 20 * (height // 2 // 2) * (width // 2 // 2)
    self.out = _torch_linear(features, classes, rngs)

  def __call__(self, x):
    x = _max_pool(jax.nn.relu(self.convs[0](x)))
    x = _max_pool(jax.nn.relu(self.convs[1](x)))
    x = jax.nn.relu(self.convs[2](x))
    return self.out(_flatten(x))


_he_init = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _batch_norm(channels: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # Running averages with PyTorch's default rate (its momentum 0.1 is
  # flax's 0.9), as in the usual CIFAR ResNet recipes.
  return nnx.BatchNorm(channels, momentum=0.9, rngs=rngs)


class _BasicBlock(nnx.Module):
  """He et al.'s basic block: two 3×3 convs with BatchNorm, and a shortcut:
  the identity, or where the stride or the width changes a projection (a
  1×1 convolution with BatchNorm)."""

  def __init__(self, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs):
    conv = lambda a, b, k, s: nnx.Conv(
        a, b, k, strides=s, padding='SAME' if k == (3, 3) else 'VALID',
        use_bias=False, kernel_init=_he_init, rngs=rngs)
    self.conv1, self.bn1 = conv(c_in, c_out, (3, 3), stride), _batch_norm(
        c_out, rngs)
    self.conv2, self.bn2 = conv(c_out, c_out, (3, 3), 1), _batch_norm(
        c_out, rngs)
    self.project = stride != 1 or c_in != c_out
    if self.project:
      self.proj = conv(c_in, c_out, (1, 1), stride)
      self.proj_bn = _batch_norm(c_out, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    shortcut = self.proj_bn(self.proj(x)) if self.project else x
    return jax.nn.relu(h + shortcut)


class ResNet20(nnx.Module):
  """The CIFAR ResNet-20 of He et al. (2016) for images of any size.

  A 3×3 conv with 16 channels and BatchNorm, then 3 stages of 3 basic blocks
  with 16, 32 and 64 channels (stride 2 at the first block of the second
  and third stage, with a projection shortcut there), global average
  pooling and ``Linear(64 → classes)``: 19 convolutions and a dense layer
  (plus 2 projections), the convolutions without bias (BatchNorm follows
  each) and with He-normal kernels. BatchNorm uses batch statistics in
  ``model.train()`` mode and the running averages after ``model.eval()``.
  """

  def __init__(self, channels: int, classes: int = 10, *, seed: int = 0,
               widths: Sequence[int] = (16, 32, 64), blocks: int = 3):
    rngs = nnx.Rngs(seed)
    self.stem = nnx.Conv(channels, widths[0], (3, 3), padding='SAME',
                         use_bias=False, kernel_init=_he_init, rngs=rngs)
    self.stem_bn = _batch_norm(widths[0], rngs)
    layers = []
    c_in = widths[0]
    for stage, width in enumerate(widths):
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        layers.append(_BasicBlock(c_in, width, stride, rngs))
        c_in = width
    self.blocks = nnx.List(layers)
    self.head = nnx.Linear(c_in, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


class ResidualMLP(nnx.Module):
  """A residual MLP: ``Linear(d_in → width)``, then ``blocks`` pre-norm
  blocks ``h ← h + Linear(relu(LayerNorm(h)))`` (``width → width``), then
  ``relu`` and ``Linear(width → classes)``. Flattens its input."""

  def __init__(self, d_in: int, classes: int = 10, *, blocks: int = 4,
               width: int = 256, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.stem = nnx.Linear(d_in, width, rngs=rngs)
    self.norms = nnx.List([nnx.LayerNorm(width, rngs=rngs)
                           for _ in range(blocks)])
    self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs)
                            for _ in range(blocks)])
    self.head = nnx.Linear(width, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.stem(_flatten(x))
    for norm, layer in zip(self.norms, self.layers):
      h = h + layer(jax.nn.relu(norm(h)))
    return self.head(jax.nn.relu(h))


def _positions(x: jax.Array) -> jax.Array:
  """The token positions ``(batch, tokens)`` of every example of ``x``."""
  b, tokens = x.shape[:2]
  return jnp.broadcast_to(jnp.arange(tokens), (b, tokens))


class _EncoderBlock(nnx.Module):
  """``h ← h + MHA(LN(h))``, then ``h ← h + MLP(LN(h))`` (GELU, 2× wide);
  the attention restricted by ``mask`` where one is given."""

  def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(heads, width, decode=False,
                                            rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.up = nnx.Linear(width, 2 * width, rngs=rngs)
    self.down = nnx.Linear(2 * width, width, rngs=rngs)

  def __call__(self, h: jax.Array, mask: jax.Array | None = None
               ) -> jax.Array:
    h = h + self.attention(self.norm1(h), mask=mask)
    return h + self.down(jax.nn.gelu(self.up(self.norm2(h))))


class ViT(nnx.Module):
  """A small vision transformer (Dosovitskiy et al., 2021), built from
  Flax's stock layers only.

  The image is cut into non-overlapping ``patch × patch`` squares, each
  projected by ``nnx.Linear`` to ``width`` features, plus a learned
  position from ``nnx.Embed`` (looked up for every example's positions, so
  that its rows are every token of the batch); then ``depth`` pre-norm
  blocks of ``nnx.MultiHeadAttention`` (``heads`` heads) and a GELU MLP,
  a final ``LayerNorm``, mean pooling over the tokens and
  ``Linear(width → classes)``. Every kernel is a layer that sibp_jax
  solves; the LayerNorm scales and biases take the gradient.
  """

  def __init__(self, image_shape: Sequence[int], classes: int = 10, *,
               patch: int = 7, width: int = 64, depth: int = 2,
               heads: int = 4, seed: int = 0):
    height, width_px, channels = image_shape
    if height % patch or width_px % patch:
      raise ValueError(f'ViT: images of {height}×{width_px} do not split '
                       f'into {patch}×{patch} patches')
    rngs = nnx.Rngs(seed)
    self.patch = patch
    self.tokens = (height // patch) * (width_px // patch)
    self.embed = nnx.Linear(patch * patch * channels, width, rngs=rngs)
    self.positions = nnx.Embed(self.tokens, width, rngs=rngs)
    self.blocks = nnx.List([_EncoderBlock(width, heads, rngs)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, channels = x.shape
    p = self.patch
    x = x.reshape(b, height // p, p, width // p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, self.tokens, -1)
    h = self.embed(x) + self.positions(_positions(x))
    for block in self.blocks:
      h = block(h)
    return self.head(jnp.mean(self.norm(h), axis=1))


class CharLM(nnx.Module):
  """A small decoder-only character language model, from Flax's stock
  layers only.

  Character ids ``(batch, tokens)`` are looked up in ``nnx.Embed(vocab,
  width)``, plus a learned position from a second ``nnx.Embed`` (looked up
  for every example's positions, as in :class:`ViT`); then ``depth``
  pre-norm blocks of causal ``nnx.MultiHeadAttention`` (``heads`` heads,
  each token attends to itself and the tokens before it) and a GELU MLP, a
  final ``LayerNorm`` and the output projection tied to the token table
  (``tokens.attend``): logits ``(batch, tokens, vocab)`` of every next
  character. sibp_jax solves the table from both of its uses at once.
  """

  def __init__(self, vocab: int, context: int, *, width: int = 64,
               depth: int = 2, heads: int = 4, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.context = context
    # Small, as GPT-2's: the table is also the output projection, whose
    # logits start near 0 (a loss near log(vocab)).
    self.tokens = nnx.Embed(vocab, width, rngs=rngs,
                            embedding_init=nnx.initializers.normal(0.02))
    self.positions = nnx.Embed(context, width, rngs=rngs)
    self.blocks = nnx.List([_EncoderBlock(width, heads, rngs)
                            for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    if ids.shape[1] > self.context:
      raise ValueError(f'CharLM: {ids.shape[1]} tokens, more than its '
                       f'context of {self.context}')
    h = self.tokens(ids) + self.positions(_positions(ids))
    mask = nnx.make_causal_mask(ids)
    for block in self.blocks:
      h = block(h, mask)
    return self.tokens.attend(self.norm(h))


MODELS = ('paper_mlp', 'proxprop_mlp', 'proxprop_convnet', 'resnet20',
          'residual_mlp', 'residual_mlp_16', 'vit', 'char_lm')
# Models of token sequences (the rest take images or feature vectors).
SEQUENCE_MODELS = ('char_lm',)


def create_model(name: str, input_shape: Sequence[int], classes: int, *,
                 seed: int = 0) -> nnx.Module:
  """One of :data:`MODELS` for examples of ``input_shape`` (images: ``(height,
  width, channels)``; the MLPs flatten them; ``char_lm``: ``(tokens,)``,
  its context), with ``classes`` logits (``char_lm``: the vocabulary) and
  the initial weights of ``seed``."""
  input_shape = tuple(int(d) for d in input_shape)
  d_in = math.prod(input_shape)
  if name in ('proxprop_convnet', 'resnet20', 'vit') and len(
      input_shape) != 3:
    raise ValueError(f'{name} needs images (height, width, channels), got '
                     f'examples of shape {input_shape}')
  if name == 'char_lm':
    if len(input_shape) != 1:
      raise ValueError(f'char_lm needs token sequences (tokens,), got '
                       f'examples of shape {input_shape}')
    return CharLM(classes, input_shape[0], seed=seed)
  if name == 'paper_mlp':
    return PaperMLP(d_in, classes=classes, seed=seed)
  if name == 'proxprop_mlp':
    return ProxPropMLP(d_in, classes=classes, seed=seed)
  if name == 'proxprop_convnet':
    return ProxPropConvNet(input_shape, classes, seed=seed)
  if name == 'resnet20':
    return ResNet20(input_shape[-1], classes, seed=seed)
  if name in ('residual_mlp', 'residual_mlp_16'):
    return ResidualMLP(d_in, classes, seed=seed,
                       blocks=16 if name.endswith('16') else 4)
  if name == 'vit':
    return ViT(input_shape, classes, seed=seed)
  raise ValueError(f'unknown model {name!r}; expected one of {MODELS}')
