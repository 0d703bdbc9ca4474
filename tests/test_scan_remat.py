"""Layers under scan and remat: solved as the unrolled model's layers.

A scan over layers (``nnx.scan`` over modules stacked by ``nnx.vmap``,
linen's ``nn.scan`` with ``variable_axes={'params': 0}``) is one layer per
step, each with its slice of the stacked kernel; a scan over time whose
body applies the same layer (an RNN cell) is that layer applied once per
step (shared weights); ``nnx.remat``, ``nn.remat`` and ``jax.checkpoint``
change nothing the sweep sees. Checked in float64: the scanned (and
rematerialised) model's update equals, slice by slice, the update of the
same model written as a Python loop, for SIBP (linearized and paper) and
ProxBP, in nnx and linen; ProxBP's small-τ direction tends to the gradient
for every stacked kernel of scanned blocks with dropout and LayerNorm
(linen) and of scanned, rematerialised attention blocks (nnx: the
attention's projections and the MLP per slice; the sweep sees the forward
pass's masks); a layer under a transformation
that cannot be unrolled (``jax.vmap``) is refused by name; a scan that
applies no layer stays a scan; SIBP trains a scanned model under
``nnx.jit``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sibp_jax

from _models import limit_updates
from _models import xent

DEPTH = 3


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _data(shape=(8, 4)):
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float64)
  return x, jnp.arange(shape[0]) % 3


class Block(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x):
    return jax.nn.relu(self.lin(x))


class Scanned(nnx.Module):
  """``DEPTH`` blocks stacked by ``nnx.vmap``, applied by ``nnx.scan``."""

  def __init__(self, remat=False):
    @nnx.split_rngs(splits=DEPTH)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)

    self.blocks = make(nnx.Rngs(0))
    self.head = nnx.Linear(4, 3, rngs=nnx.Rngs(1), param_dtype=jnp.float64)
    self.remat = remat

  def __call__(self, x):
    body = lambda h, block: block(h)
    if self.remat:
      body = nnx.remat(body)
    h = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
        x, self.blocks)
    return self.head(h)


class Unrolled(nnx.Module):
  """:class:`Scanned`'s weights as a Python loop of blocks."""

  def __init__(self, scanned):
    self.blocks = nnx.List([Block(nnx.Rngs(0)) for _ in range(DEPTH)])
    for i, block in enumerate(self.blocks):
      block.lin.kernel[...] = scanned.blocks.lin.kernel[...][i]
      block.lin.bias[...] = scanned.blocks.lin.bias[...][i]
    self.head = nnx.clone(scanned.head)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(x)


class LinenBlock(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return jax.nn.relu(nn.Dense(4, param_dtype=jnp.float64)(x)), None


class LinenScanned(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(LinenBlock) if self.remat else LinenBlock
    stack = nn.scan(block, variable_axes={'params': 0},
                    split_rngs={'params': True}, length=DEPTH)
    x, _ = stack(name='stack')(x, None)
    return nn.Dense(3, param_dtype=jnp.float64, name='head')(x)


class LinenUnrolled(nn.Module):

  @nn.compact
  def __call__(self, x):
    for i in range(DEPTH):
      x, _ = LinenBlock(name=f'block{i}')(x, None)
    return nn.Dense(3, param_dtype=jnp.float64, name='head')(x)


TRANSFORMS = {
    'linearized': lambda: sibp_jax.sibp(0.5),
    'paper': lambda: sibp_jax.sibp(0.5, variant='paper'),
    'proxbp': lambda: sibp_jax.scale_by_proxbp(0.3),
}


def _update(tx, grads, params, problems):
  return jax.jit(lambda g, p, pr: tx.update(g, tx.init(p), p, problems=pr))(
      grads, params, problems)[0]


@pytest.mark.parametrize('remat', [False, True])
@pytest.mark.parametrize('method', sorted(TRANSFORMS))
def test_nnx_scan_over_layers_equals_the_loop(x64, method, remat):
  x, y = _data()
  scanned = Scanned(remat)
  found = {}
  for name, model in (('scan', scanned), ('loop', Unrolled(scanned))):
    _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=xent)
    found[name] = (problems, nnx.as_pure(_update(
        TRANSFORMS[method](), nnx.as_pure(grads),
        nnx.as_pure(nnx.state(model, nnx.Param)), problems)))
  (problems, scan), (_, loop) = found['scan'], found['loop']
  assert [layer.name for layer in problems.layers] == [
      'blocks/lin[0]', 'blocks/lin[1]', 'blocks/lin[2]', 'head']
  for leaf in ('kernel', 'bias'):
    np.testing.assert_allclose(
        scan['blocks']['lin'][leaf],
        np.stack([loop['blocks'][i]['lin'][leaf] for i in range(DEPTH)]),
        rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(scan['head']['kernel'], loop['head']['kernel'],
                             rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('remat', [False, True])
@pytest.mark.parametrize('method', sorted(TRANSFORMS))
def test_linen_scan_over_layers_equals_the_loop(x64, method, remat):
  x, y = _data()
  params = LinenScanned(remat).init(jax.random.key(0), x)['params']
  loop_params = {'head': params['head'], **{
      f'block{i}': jax.tree.map(lambda a, i=i: a[i], params['stack'])
      for i in range(DEPTH)}}
  found = {}
  for name, module, p in (('scan', LinenScanned(remat), params),
                          ('loop', LinenUnrolled(), loop_params)):
    _, grads, problems = sibp_jax.linen.value_grad_and_problems(
        module, p, x, y, loss_fn=xent)
    found[name] = _update(TRANSFORMS[method](), grads, p, problems)
  assert [layer.name for layer in problems.layers] == [
      'block0/Dense_0', 'block1/Dense_0', 'block2/Dense_0', 'head']
  scan, loop = found['scan'], found['loop']
  for leaf in ('kernel', 'bias'):
    np.testing.assert_allclose(
        scan['stack']['Dense_0'][leaf],
        np.stack([loop[f'block{i}']['Dense_0'][leaf] for i in range(DEPTH)]),
        rtol=1e-12, atol=1e-14)


class LinenNormBlock(nn.Module):
  """Pre-norm residual block with dropout, as transformers stack them."""

  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm(param_dtype=jnp.float64)(x)
    h = nn.Dropout(0.3, deterministic=False)(nn.gelu(nn.Dense(
        8, param_dtype=jnp.float64)(h)))
    return x + nn.Dense(4, param_dtype=jnp.float64)(h), None


class LinenNormStack(nn.Module):

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(nn.remat(LinenNormBlock), variable_axes={'params': 0},
                    split_rngs={'params': True, 'dropout': True},
                    length=DEPTH)
    x, _ = stack(name='stack')(nn.Dense(4, param_dtype=jnp.float64)(x), None)
    return nn.Dense(3, param_dtype=jnp.float64, name='head')(x)


def _worst_kernel_error(problems, direction, grads, tau):
  """``max ‖direction/τ − ∇J‖ / ‖∇J‖`` over every layer's kernel, each
  scanned layer's slice on its own."""
  worst = 0.0
  for layer in problems.layers:
    d, g = direction, grads
    for key in layer.kernel_path:
      d, g = d[key], g[key]
    d, g = d[layer.index], g[layer.index]
    worst = max(worst, float(jnp.linalg.norm(d / tau - g) /
                             jnp.linalg.norm(g)))
  return worst


def test_scanned_blocks_with_dropout_meet_the_gradient(x64):
  """ProxBP's direction / τ tends to ∇J for every kernel, every slice of
  the stacked ones on its own: the sweep replays the scan's dropout
  masks."""
  x, y = _data()
  module = LinenNormStack()
  params = module.init(jax.random.key(0), x)['params']
  rngs = {'dropout': jax.random.key(5)}
  errors = []
  for tau in (1e-4, 1e-6):  # the error is O(τ)
    _, grads, problems = sibp_jax.linen.value_grad_and_problems(
        module, params, x, y, loss_fn=xent, rngs=rngs)
    tx = sibp_jax.scale_by_proxbp(tau)
    direction = _update(tx, grads, params, problems)
    errors.append(_worst_kernel_error(problems, direction, grads, tau))
  assert len(problems.layers) == 2 + 2 * DEPTH
  assert errors[1] < 1e-4 and errors[1] < errors[0] / 10, errors


class Recurrent(nnx.Module):
  """One cell applied at every time step, by ``nnx.scan`` or a loop."""

  def __init__(self, scan):
    self.cell = nnx.Linear(8, 4, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    self.head = nnx.Linear(4, 3, rngs=nnx.Rngs(1), param_dtype=jnp.float64)
    self.scan = scan

  def __call__(self, x):
    h = jnp.zeros((x.shape[0], 4), x.dtype)

    def step(cell, h, xt):
      return jnp.tanh(cell(jnp.concatenate([h, xt], -1))), None

    if self.scan:
      h, _ = nnx.scan(step, in_axes=(None, nnx.Carry, 1),
                      out_axes=(nnx.Carry, 0))(self.cell, h, x)
    else:
      for t in range(x.shape[1]):
        h, _ = step(self.cell, h, x[:, t])
    return self.head(h)


def test_scan_over_time_is_one_shared_layer(x64):
  x, y = _data((8, 5, 4))
  found = []
  for scan in (True, False):
    model = Recurrent(scan)
    _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=xent)
    assert [layer.name for layer in problems.layers] == ['cell'] * 5 + [
        'head']
    found.append(nnx.as_pure(_update(
        sibp_jax.sibp(0.5), nnx.as_pure(grads),
        nnx.as_pure(nnx.state(model, nnx.Param)), problems)))
  np.testing.assert_allclose(found[0]['cell']['kernel'],
                             found[1]['cell']['kernel'], rtol=1e-12)


class Checkpointed(nnx.Module):
  """Three layers, the first under ``nnx.remat``, the second under
  ``jax.checkpoint`` (or neither: the same weights)."""

  def __init__(self, wrap):
    kw = dict(param_dtype=jnp.float64)
    self.a = nnx.Linear(4, 6, rngs=nnx.Rngs(0), **kw)
    self.b = nnx.Linear(6, 6, rngs=nnx.Rngs(1), **kw)
    self.head = nnx.Linear(6, 3, rngs=nnx.Rngs(2), **kw)
    self.wrap = wrap

  def __call__(self, x):
    if self.wrap:
      h = jax.nn.relu(nnx.remat(lambda layer, h: layer(h))(self.a, x))
      h = jax.checkpoint(lambda h: jax.nn.relu(self.b(h)))(h)
    else:
      h = jax.nn.relu(self.b(jax.nn.relu(self.a(x))))
    return self.head(h)


def test_remat_and_checkpoint_of_one_layer_are_solved(x64):
  x, y = _data()
  found = []
  for wrap in (True, False):
    model = Checkpointed(wrap)
    _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=xent)
    assert [layer.name for layer in problems.layers] == ['a', 'b', 'head']
    found.append(nnx.as_pure(_update(
        sibp_jax.sibp(0.5), nnx.as_pure(grads),
        nnx.as_pure(nnx.state(model, nnx.Param)), problems)))
  for name in ('a', 'b', 'head'):
    np.testing.assert_allclose(found[0][name]['kernel'],
                               found[1][name]['kernel'], rtol=1e-12)


@pytest.mark.parametrize('also_direct', [False, True])
def test_a_layer_under_vmap_is_refused_by_name(also_direct):
  """Also when the layer is applied directly too: its vmapped use would be
  missing from its problem."""
  class Mapped(nnx.Module):
    def __init__(self):
      self.a = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
      self.head = nnx.Linear(4, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
      if also_direct:
        x = jnp.tanh(self.a(x))
      return self.head(jax.vmap(self.a)(x).mean(1))

  x = jnp.ones((6, 5, 4))
  with pytest.raises(ValueError, match=(
      "the linear layer 'a' is applied inside a JAX transformation")):
    sibp_jax.nnx.value_grad_and_problems(Mapped(), x, jnp.zeros(6, jnp.int32),
                                         loss_fn=xent)


def test_a_scan_without_layers_stays_a_scan():
  class Cumulative(nnx.Module):
    def __init__(self):
      self.a = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
      self.head = nnx.Linear(4, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
      _, h = jax.lax.scan(lambda c, r: (c + r, c + r), jnp.zeros_like(x[:, 0]),
                          jnp.swapaxes(self.a(x), 0, 1))
      return self.head(h.mean(0))

  graphdef, state = nnx.split(Cumulative())
  jaxpr = jax.make_jaxpr(lambda state, x: sibp_jax.nnx.value_grad_and_problems(
      nnx.merge(graphdef, state), x, jnp.zeros(6, jnp.int32),
      loss_fn=xent)[0])(state, jnp.ones((6, 5, 4)))
  assert 'scan' in str(jaxpr)


def test_sibp_trains_a_scanned_model_as_the_loop_under_jit(x64):
  x, y = _data((32, 4))
  scanned = Scanned(remat=True)
  losses = []
  for model in [Unrolled(scanned), scanned]:  # the copy before training
    optimizer = nnx.Optimizer(model, sibp_jax.sibp(1.0), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
      loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
          model, x, y, loss_fn=xent)
      optimizer.update(model, grads, problems=problems)
      return loss

    losses.append([float(step(model, optimizer, x, y)) for _ in range(6)])
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-10)
  assert losses[0][-1] < 0.9 * losses[0][0], losses


class AttentionBlock(nnx.Module):
  """Pre-norm attention and MLP with dropout, the usual transformer block."""

  def __init__(self, rngs):
    kw = dict(param_dtype=jnp.float64, dtype=jnp.float64)
    self.norm1 = nnx.LayerNorm(8, rngs=rngs, **kw)
    self.attention = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs,
                                            **kw)
    self.norm2 = nnx.LayerNorm(8, rngs=rngs, **kw)
    self.mlp = nnx.Linear(8, 8, rngs=rngs, **kw)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)

  def __call__(self, x):
    x = x + self.attention(self.norm1(x))
    return x + self.dropout(jax.nn.gelu(self.mlp(self.norm2(x))))


class ScannedTransformer(nnx.Module):
  """``DEPTH`` attention blocks stacked by ``nnx.vmap`` (their dropout
  streams too), applied by ``nnx.scan`` under ``nnx.remat``."""

  def __init__(self):
    kw = dict(param_dtype=jnp.float64, dtype=jnp.float64)
    self.embed = nnx.Linear(4, 8, rngs=nnx.Rngs(0), **kw)

    @nnx.split_rngs(splits=DEPTH)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return AttentionBlock(rngs)

    self.blocks = make(nnx.Rngs(1))
    self.head = nnx.Linear(8, 3, rngs=nnx.Rngs(2), **kw)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def body(h, block):
      return block(h)

    return self.head(body(self.embed(x), self.blocks).mean(1))


def test_nnx_scanned_transformer_meets_the_gradient(x64):
  """Every slice of the stacked attention projections and MLP kernels:
  ProxBP's direction / τ tends to ∇J (the sweep replays the scan's
  dropout masks)."""
  x, y = _data((6, 5, 4))
  graphdef, state = nnx.split(ScannedTransformer())
  errors = []
  for tau in (1e-4, 1e-6):  # the error is O(τ)
    problems, grads, (direction, _) = limit_updates(
        None, (graphdef, state), x, y, tau, 1.0)
    errors.append(_worst_kernel_error(problems, direction, grads, tau))
  assert [layer.name for layer in problems.layers[1:6]] == [
      'blocks/attention/query[0]', 'blocks/attention/key[0]',
      'blocks/attention/value[0]', 'blocks/attention/out[0]', 'blocks/mlp[0]']
  assert len(problems.layers) == 2 + 5 * DEPTH
  assert errors[1] < 1e-3 and errors[1] < errors[0] / 10, errors


def test_layers_stacked_along_another_axis_are_refused():
  """A scan over layers stacked along axis 1 slices a moved copy: each
  step's layer is not the slice [i] of the parameter, so it is refused
  rather than solved against the wrong slice (4 × 4 kernels, 4 layers:
  the shapes alone would not tell)."""
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return jax.nn.relu(nn.Dense(4)(x)), None

  class Stacked(nn.Module):
    @nn.compact
    def __call__(self, x):
      x, _ = nn.scan(Block, variable_axes={'params': 1},
                     split_rngs={'params': True}, length=4)()(x, None)
      return nn.Dense(3)(x)

  x, y = jnp.ones((6, 4)), jnp.zeros(6, jnp.int32)
  params = Stacked().init(jax.random.key(0), x)['params']
  assert params['ScanBlock_0']['Dense_0']['kernel'].shape == (4, 4, 4)
  with pytest.raises(ValueError, match=(
      "layer 'ScanBlock_0/Dense_0' is applied in a scan over layers whose "
      'stacked parameters are not sliced along their first axis')):
    sibp_jax.linen.value_grad_and_problems(Stacked(), params, x, y,
                                           loss_fn=xent)

  class NnxStacked(nnx.Module):
    def __init__(self):
      @nnx.split_rngs(splits=4)
      @nnx.vmap(in_axes=(0,), out_axes=1)
      def make(rngs):
        return nnx.Linear(4, 4, rngs=rngs)

      self.blocks = make(nnx.Rngs(0))
      self.head = nnx.Linear(4, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
      h = nnx.scan(lambda h, layer: jax.nn.relu(layer(h)),
                   in_axes=(nnx.Carry, 1), out_axes=nnx.Carry)(x, self.blocks)
      return self.head(h)

  with pytest.raises(ValueError, match=(
      'an nnx.Linear is applied in a scan over layers whose stacked')):
    sibp_jax.nnx.value_grad_and_problems(NnxStacked(), x, y, loss_fn=xent)
