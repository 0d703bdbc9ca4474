"""Small models and data shared by the tests."""

import collections
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sibp_jax

xent = optax.softmax_cross_entropy_with_integer_labels


def mse(logits, targets):
  return jnp.sum((logits - targets) ** 2, axis=-1)


class MLP(nnx.Module):
  """Linear layers with ReLU between them."""

  def __init__(self, sizes, *, seed=0, dtype=jnp.float32, use_bias=True,
               activation=jax.nn.relu):
    self.activation = activation
    rngs = nnx.Rngs(seed)
    self.layers = nnx.List([
        nnx.Linear(a, b, rngs=rngs, param_dtype=dtype, dtype=dtype,
                   use_bias=use_bias)
        for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = self.activation(layer(x))
    return self.layers[-1](x)


class ConvNet(nnx.Module):
  """conv, ReLU, max-pool, strided conv, ReLU, flatten, dense (8×8 inputs)."""

  def __init__(self, channels=2, out=3, *, seed=0, dtype=jnp.float32):
    rngs = nnx.Rngs(seed)
    kw = dict(rngs=rngs, param_dtype=dtype, dtype=dtype)
    self.conv1 = nnx.Conv(channels, 4, (3, 3), padding='SAME', **kw)
    self.conv2 = nnx.Conv(4, 5, (2, 2), strides=2, padding='VALID', **kw)
    self.dense = nnx.Linear(5 * 2 * 2, out, **kw)

  def __call__(self, x):
    x = jax.nn.relu(self.conv1(x))
    x = nnx.max_pool(x, (2, 2), (2, 2))
    x = jax.nn.relu(self.conv2(x))
    return self.dense(x.reshape(x.shape[0], -1))


def batch_norm(features, **kw):
  """nnx.BatchNorm with float64 running statistics in a float64 model.

  flax keeps them in float32 and computes them in at least float32; a
  float64 model's update of them would cast float64 to float32, which JAX
  is to refuse. (In a bfloat16 model they stay float32.)
  """
  bn = nnx.BatchNorm(features, **kw)
  dtype = jnp.promote_types(kw.get('param_dtype', jnp.float32), jnp.float32)
  bn.mean.set_value(bn.mean.get_value().astype(dtype))
  bn.var.set_value(bn.var.get_value().astype(dtype))
  return bn


class ResNet(nnx.Module):
  """A small conv ResNet on 8×8×2 inputs.

  Stem conv + BatchNorm; an identity block (4 channels); a block with a
  strided projection shortcut (1×1 conv, 4 → 6 channels, 8×8 → 4×4); global
  average pooling; a dense head. Seven linear layers, in call order: stem,
  block1/conv1, block1/conv2, block2/conv1, block2/conv2, block2/proj,
  head.
  """

  def __init__(self, channels=2, out=3, *, seed=0, dtype=jnp.float32,
               width=4):
    rngs = nnx.Rngs(seed)
    kw = dict(rngs=rngs, param_dtype=dtype, dtype=dtype)
    conv = lambda a, b, k=(3, 3), s=1: nnx.Conv(
        a, b, k, strides=s, padding='SAME', use_bias=False, **kw)
    bn = lambda c: batch_norm(c, momentum=0.9, **kw)
    w, w2 = width, width + 2
    self.stem, self.stem_bn = conv(channels, w), bn(w)
    self.b1_conv1, self.b1_bn1 = conv(w, w), bn(w)
    self.b1_conv2, self.b1_bn2 = conv(w, w), bn(w)
    self.b2_conv1, self.b2_bn1 = conv(w, w2, s=2), bn(w2)
    self.b2_conv2, self.b2_bn2 = conv(w2, w2), bn(w2)
    self.b2_proj, self.b2_bnp = conv(w, w2, (1, 1), 2), bn(w2)
    self.head = nnx.Linear(w2, out, **kw)

  def __call__(self, x):
    x = jax.nn.relu(self.stem_bn(self.stem(x)))
    h = jax.nn.relu(self.b1_bn1(self.b1_conv1(x)))
    x = jax.nn.relu(x + self.b1_bn2(self.b1_conv2(h)))
    h = jax.nn.relu(self.b2_bn1(self.b2_conv1(x)))
    h = self.b2_bn2(self.b2_conv2(h))
    x = jax.nn.relu(h + self.b2_bnp(self.b2_proj(x)))
    return self.head(x.mean(axis=(1, 2)))


class LinenResNet(nn.Module):
  """:class:`ResNet` in linen, with the same names; ``train`` selects batch
  statistics (and updates ``batch_stats``) or the running averages."""

  out: int = 3
  width: int = 4

  @nn.compact
  def __call__(self, x, train=True):
    conv = lambda b, name, k=(3, 3), s=1: nn.Conv(
        b, k, strides=s, padding='SAME', use_bias=False, name=name)
    bn = lambda name: nn.BatchNorm(use_running_average=not train,
                                   momentum=0.9, name=name)
    w, w2 = self.width, self.width + 2
    x = nn.relu(bn('stem_bn')(conv(w, 'stem')(x)))
    h = nn.relu(bn('b1_bn1')(conv(w, 'b1_conv1')(x)))
    x = nn.relu(x + bn('b1_bn2')(conv(w, 'b1_conv2')(h)))
    h = nn.relu(bn('b2_bn1')(conv(w2, 'b2_conv1', s=2)(x)))
    h = bn('b2_bn2')(conv(w2, 'b2_conv2')(h))
    x = nn.relu(h + bn('b2_bnp')(conv(w2, 'b2_proj', (1, 1), 2)(x)))
    return nn.Dense(self.out, name='head')(x.mean(axis=(1, 2)))


def positions(x):
  """Every example's token positions, ``(batch, tokens)``: the lookup's rows
  are every position of every example, as for any other layer."""
  return jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])


class Block(nnx.Module):
  """A pre-norm transformer block on patch tokens ``(batch, tokens, 6)``:
  patch Linear plus Embed positions, MultiHeadAttention, a GELU MLP, mean
  pooling and a linear head (9 layers, the 4 projections included)."""

  def __init__(self, dtype, d=8, heads=2, classes=3, tokens=5, seed=0):
    rngs = nnx.Rngs(seed)
    kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
    self.patch = nnx.Linear(6, d, **kw)
    self.positions = nnx.Embed(tokens, d, **kw)
    self.norm1 = nnx.LayerNorm(d, **kw)
    self.attention = nnx.MultiHeadAttention(heads, d, decode=False, **kw)
    self.norm2 = nnx.LayerNorm(d, **kw)
    self.up = nnx.Linear(d, 2 * d, **kw)
    self.down = nnx.Linear(2 * d, d, **kw)
    self.head = nnx.Linear(d, classes, **kw)

  def __call__(self, x):
    h = self.patch(x) + self.positions(positions(x))
    h = h + self.attention(self.norm1(h))
    h = h + self.down(jax.nn.gelu(self.up(self.norm2(h))))
    return self.head(h.mean(axis=1))


def linen_variables_from(model):
  """The linen variables dict holding an nnx model's values, by name."""
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  stats = nnx.as_pure(nnx.state(model, nnx.BatchStat))
  return {'params': jax.tree.map(jnp.asarray, dict(params)),
          'batch_stats': jax.tree.map(jnp.asarray, dict(stats))}


ARCHS = ('mlp', 'convnet', 'resnet')


def arch_model(arch, out=3, *, hidden=8, seed=0, dtype=jnp.float32):
  if arch == 'mlp':
    return MLP((6, hidden, out), seed=seed, dtype=dtype)
  if arch == 'resnet':
    return ResNet(out=out, seed=seed, dtype=dtype)
  return ConvNet(out=out, seed=seed, dtype=dtype)


def arch_data(arch, task='classification', batch=32, seed=0, out=3):
  make = classification if task == 'classification' else regression
  if arch == 'mlp':
    return make(batch=batch, d_in=6, seed=seed, **(
        {'classes': out} if task == 'classification' else {'d_out': out}))
  x, y = make(batch=batch, d_in=8 * 8 * 2, seed=seed, **(
      {'classes': out} if task == 'classification' else {'d_out': out}))
  return x.reshape(batch, 8, 8, 2), y


class LinenMLP(nn.Module):
  sizes: tuple

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.sizes[1:-1]):
      x = nn.relu(nn.Dense(width, name=f'dense_{i}')(x))
    return nn.Dense(self.sizes[-1], name='out')(x)


def classification(batch=32, d_in=6, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, d_in)).astype(np.float32)
  w = rng.normal(size=(d_in, classes))
  y = np.argmax(x @ w, axis=1).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def regression(batch=32, d_in=6, d_out=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, d_in)).astype(np.float32)
  y = np.tanh(x @ rng.normal(size=(d_in, d_out))).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


TRANSFORMS = {
    'sibp_linearized': lambda: sibp_jax.sibp(0.1),
    'sibp_linearized_cg': lambda: sibp_jax.sibp(
        0.1, solver=sibp_jax.ConjugateGradient(5)),
    'sibp_paper': lambda: sibp_jax.sibp(0.1, variant='paper'),
    'proxbp_exact': lambda: sibp_jax.proxbp(1.0, tau_prox=0.05),
    'proxbp_cg3': lambda: sibp_jax.proxbp(
        1.0, tau_prox=0.05, solver=sibp_jax.ConjugateGradient(3)),
}


# The transformations defined on any graph; the paper variant needs a chain.
GRAPH_TRANSFORMS = tuple(n for n in TRANSFORMS if n != 'sibp_paper')


def pure(tree):
  return nnx.as_pure(tree)


def step_inputs(model, x, y, loss_fn=xent, **kwargs):
  """(grads, params, problems) as plain pytrees for ``tx.update``."""
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=loss_fn, **kwargs)
  return pure(grads), pure(nnx.state(model, nnx.Param)), problems


def find_info(state):
  """The :class:`sibp_jax.LayerwiseInfo` inside any optax state."""
  return optax.tree_utils.tree_get(nnx.as_pure(state), 'info')


# Compiled programs shared by the tests. jax.jit and nnx.jit reuse a
# compiled program only for the same function object (and, under nnx.jit,
# the same graph definition, which holds an nnx.Optimizer's tx): the
# programs below are built once per key, with one tx object per
# transformation name, so that tests calling them with the same shapes
# share one compilation. TRACES counts the traces of each program by its
# key, for the tests that check that a step is not traced again.
TRACES = collections.Counter()
_PROGRAMS = {}
_TXS = {}


def transform(name):
  """The one ``TRANSFORMS[name]()`` object that the shared programs use."""
  if name not in _TXS:
    _TXS[name] = TRANSFORMS[name]()
  return _TXS[name]


def nnx_step(loss_fn=xent):
  """``step(model, opt, x, y) -> loss``: one nnx.jit train step per loss.

  The step of the README: ``value_grad_and_problems`` then
  ``opt.update(model, grads, problems=problems)``. ``model`` and ``opt``
  may also be dicts of models and of their optimizers, with the same keys:
  the step then trains each on the batch, in one program, and returns a
  dict of losses. Its traces are counted in ``TRACES['nnx_step', loss_fn]``.
  """
  key = ('nnx_step', loss_fn)
  if key not in _PROGRAMS:

    def one(model, opt, x, y):
      loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
          model, x, y, loss_fn=loss_fn)
      opt.update(model, grads, problems=problems)
      return loss

    @nnx.jit
    def step(model, opt, x, y):
      TRACES[key] += 1
      if isinstance(model, dict):
        return {k: one(model[k], opt[k], x, y) for k in model}
      return one(model, opt, x, y)

    _PROGRAMS[key] = step
  return _PROGRAMS[key]


def jit_step_inputs(model, x, y, loss_fn=xent):
  """``(loss, grads, params, problems)``: :func:`step_inputs` and the loss
  from one nnx.jit program per loss function (the model's BatchStat and
  random state advance as in an eager call)."""
  key = ('step_inputs', loss_fn)
  if key not in _PROGRAMS:

    @nnx.jit
    def run(model, x, y):
      TRACES[key] += 1
      loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
          model, x, y, loss_fn=loss_fn)
      return loss, pure(grads), pure(nnx.state(model, nnx.Param)), problems

    _PROGRAMS[key] = run
  return _PROGRAMS[key](model, x, y)


def jit_update(name):
  """``update(grads, state, params, problems) -> (updates, state)``: the
  update of ``transform(name)`` under one jax.jit per name. Traces are
  counted in ``TRACES['update', name]``."""
  key = ('update', name)
  if key not in _PROGRAMS:
    tx = transform(name)

    @jax.jit
    def update(grads, state, params, problems):
      TRACES[key] += 1
      return tx.update(grads, state, params, problems=problems)

    _PROGRAMS[key] = update
  return _PROGRAMS[key]


def jit_updates(names):
  """``updates(grads, params, problems) -> {name: (updates, state)}``: the
  first update (from the initial state) of ``transform(name)`` for each
  name, all in one jax.jit program per tuple of names (one program for
  several transformations compiles faster than one each)."""
  names = tuple(names)
  key = ('updates', names)
  if key not in _PROGRAMS:

    @jax.jit
    def updates(grads, params, problems):
      TRACES[key] += 1
      out = {}
      for name in names:
        tx = transform(name)
        out[name] = tx.update(grads, tx.init(params), params,
                              problems=problems)
      return out

    _PROGRAMS[key] = updates
  return _PROGRAMS[key]


@functools.partial(jax.jit, static_argnums=0)
def limit_updates(linen_module, params, x, y, tau, lam):
  """``(problems, gradient, (ProxBP's direction at τ, SIBP's at λ, η 0.5))``
  of one batch: nnx when ``linen_module`` is ``None`` (``params`` is then
  ``(graphdef, state)``), else linen with ``params``. The small-τ and
  large-λ limits of the tests compare these with the gradient."""
  if linen_module is None:
    model = nnx.merge(*params)
    _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=xent)
    grads = nnx.as_pure(grads)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
  else:
    _, grads, problems = sibp_jax.linen.value_grad_and_problems(
        linen_module, params, x, y, loss_fn=xent)

  def update(tx):
    return tx.update(grads, tx.init(params), params, problems=problems)[0]

  return problems, grads, (
      update(sibp_jax.scale_by_proxbp(tau)),
      update(sibp_jax.scale_by_sibp(0.5, lambda_w=lam, lambda_b=lam)))
