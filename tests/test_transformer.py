"""Attention and general dense layers: the solve, and the backprop limits."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sibp_jax

from _models import Block
from _models import limit_updates
from _models import nnx_step
from _models import positions
from _models import xent


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _ridge_numpy(design, residual, lam_kernel, lam_bias):
  """``(FᵀF + Λ)⁻¹ FᵀR`` with ``F = [design, 1]``, in float64 NumPy."""
  f = np.concatenate([design, np.ones((design.shape[0], 1))], axis=1)
  lam = np.r_[np.full(design.shape[1], lam_kernel), lam_bias]
  return np.linalg.solve(f.T @ f + np.diag(lam), f.T @ residual)


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('batch', [7, 2])  # Cholesky, then Woodbury
def test_dense_general_solve_matches_numpy(batch):
  # Input (batch, 3, 4, 5), contracted axes (3, 2) in the kernel's order,
  # two feature axes (2, 3): kernel (5, 4, 2, 3), rows batch·3.
  rng = np.random.default_rng(0)
  kind = sibp_jax.DenseGeneral(axis=(3, 2), features=2)
  inputs = rng.normal(size=(batch, 3, 4, 5))
  residual = rng.normal(size=(batch, 3, 2, 3))
  problem = sibp_jax.RidgeProblem(kind, jnp.asarray(inputs),
                                  jnp.asarray(residual), (5, 4, 2, 3), (2, 3),
                                  jnp.float64(0.7), jnp.float64(0.3))
  assert sibp_jax.Ridge().path(problem) == (
      'cholesky' if batch == 7 else 'woodbury')
  (dk, db), _ = jax.jit(sibp_jax.Ridge().solve)(problem)
  design = np.transpose(inputs, (0, 1, 3, 2)).reshape(batch * 3, 20)
  expected = _ridge_numpy(design, residual.reshape(batch * 3, 6), 0.7, 0.3)
  np.testing.assert_allclose(dk, expected[:20].reshape(5, 4, 2, 3),
                             rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(db, expected[20].reshape(2, 3), rtol=1e-10,
                             atol=1e-12)
  # The map itself is the design matrix's: F K + b, row by row.
  kernel = rng.normal(size=(5, 4, 2, 3))
  np.testing.assert_allclose(
      kind.apply(jnp.asarray(kernel), jnp.ones((2, 3)), jnp.asarray(inputs)),
      (design @ kernel.reshape(20, 6) + 1).reshape(batch, 3, 2, 3),
      rtol=1e-12)
  (ck, cb), _ = jax.jit(sibp_jax.ConjugateGradient(60, eps=0.0, tol=0.0).solve)(
      problem)
  chex.assert_trees_all_close((ck, cb), (dk, db), rtol=1e-7, atol=1e-9)


class LinenBlock(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(param_dtype=self.dtype, dtype=self.dtype)
    h = nn.Dense(8, **kw)(x) + nn.Embed(x.shape[1], 8, **kw)(positions(x))
    h = h + nn.MultiHeadDotProductAttention(2, **kw)(nn.LayerNorm(**kw)(h))
    h = h + nn.Dense(8, **kw)(jax.nn.gelu(nn.Dense(16, **kw)(
        nn.LayerNorm(**kw)(h))))
    return nn.Dense(3, **kw)(h.mean(axis=1))


ATTENTION = ('query', 'key', 'value', 'out')


def _tokens(dtype, batch=6):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(batch, 5, 6)), dtype)
  return x, jnp.arange(batch) % 3


@functools.cache
def _limits(adapter):
  x, y = _tokens(jnp.float64)
  if adapter == 'nnx':
    graphdef, state = nnx.split(Block(jnp.float64))
    params = (graphdef, nnx.as_pure(state))
  else:
    params = LinenBlock(jnp.float64).init(jax.random.key(0), x)['params']
  linen = None if adapter == 'nnx' else LinenBlock(jnp.float64)
  return [limit_updates(linen, params, x, y, jnp.float64(tau),
                        jnp.float64(lam))
          for tau, lam in ((1e-5, 1e4), (1e-6, 1e5))]


def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return np.asarray(tree)


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('adapter', ['nnx', 'linen'])
def test_every_attention_kernel_is_solved_and_tends_to_backprop(adapter):
  """ProxBP: direction / τ → ∇J; SIBP: direction · λ / B → ∇J.

  For every kernel and bias of the block, the attention projections (two
  contracted axes in the output projection) included. The error is first
  order in τ and 1/λ, so it must shrink about tenfold between the two
  settings.
  """
  runs = _limits(adapter)
  layers = runs[0][0].layers
  paths = [layer.kernel_path for layer in layers] + [
      layer.bias_path for layer in layers]
  names = {'/'.join(map(str, p[:-1])) for p in paths if p is not None}
  assert sum(any(n.endswith(a) for n in names) for a in ATTENTION) == 4
  assert len(names) == 9 and any(n.endswith('Embed_0') or
                                 n.endswith('positions') for n in names)
  paths = [p for p in paths if p is not None]
  for which, scale_of in ((0, lambda tau, lam, b: 1 / tau),
                          (1, lambda tau, lam, b: lam / b)):
    errors = []
    for (tau, lam), (problems, grads, updates) in zip(
        ((1e-5, 1e4), (1e-6, 1e5)), runs, strict=True):
      scale = scale_of(tau, lam, problems.batch_size)
      # Relative to the largest gradient: the key's bias has none (softmax
      # is blind to a shift of every score of a query).
      largest = max(np.abs(_leaf(grads, p)).max() for p in paths)
      errors.append(max(
          np.abs(_leaf(updates[which], p) * scale - _leaf(grads, p)).max()
          for p in paths) / largest)
    assert errors[1] < 1e-3, (which, errors)
    assert errors[1] < 0.2 * errors[0], (which, errors)


def test_transformer_block_trains_with_sibp():
  model = Block(jnp.float32)
  x, y = _tokens(jnp.float32, batch=12)
  opt = nnx.Optimizer(model, sibp_jax.sibp(0.3), wrt=nnx.Param)
  step = nnx_step(xent)
  losses = [float(step(model, opt, x, y)) for _ in range(15)]
  assert losses[-1] < 0.5 * losses[0], losses
  info = optax.tree_utils.tree_get(nnx.as_pure(opt.opt_state), 'info')
  assert bool(info.finite)


def test_general_dense_maps_of_the_batch_axis_are_refused():
  x, y = jnp.ones((5, 4, 6)), jnp.zeros((5,), jnp.int32)

  class Mixing(nn.Module):
    batch_dims: tuple = ()
    axis: tuple = (-1,)

    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral(3, axis=self.axis, batch_dims=self.batch_dims)(x)
      return nn.Dense(3)(h.reshape(h.shape[0], -1))

  for module, match in ((Mixing(axis=(0,)), 'contracting the batch axis'),
                        (Mixing(batch_dims=(0,)), 'batch axes shared')):
    params = module.init(jax.random.key(0), x)['params']
    with pytest.raises(ValueError, match=f"'DenseGeneral_0': {match}"):
      sibp_jax.linen.value_grad_and_problems(module, params, x, y,
                                             loss_fn=xent)


@pytest.mark.usefixtures('x64')
def test_embedding_solve_matches_numpy_row_by_row():
  # ids (batch, tokens) over V = 7 rows, one of them never looked up.
  rng = np.random.default_rng(3)
  ids = rng.integers(0, 6, size=(4, 5))
  residual = rng.normal(size=(4, 5, 3))
  kind = sibp_jax.Embed(7)
  problem = sibp_jax.RidgeProblem(kind, jnp.asarray(ids),
                                  jnp.asarray(residual), (7, 3), None,
                                  jnp.float64(0.5), jnp.float64(1.0))
  assert sibp_jax.Ridge().path(problem) == 'diagonal'
  (dk, db), info = jax.jit(sibp_jax.Ridge().solve)(problem)
  assert db is None and float(info.residual) < 1e-14
  expected = np.zeros((7, 3))
  for v in range(7):
    rows = residual[ids == v]
    expected[v] = rows.sum(axis=0) / (len(rows) + 0.5)
  np.testing.assert_allclose(dk, expected, rtol=1e-12, atol=1e-15)
  assert not expected[6].any()
  # The one-hot design matrix and CG through the lookup agree with it.
  onehot = np.asarray(kind.design(jnp.asarray(ids)))
  np.testing.assert_allclose(
      np.linalg.solve(onehot.T @ onehot + 0.5 * np.eye(7),
                      onehot.T @ residual.reshape(20, 3)), expected,
      rtol=1e-12, atol=1e-15)
  (ck, _), _ = jax.jit(sibp_jax.ConjugateGradient(10, eps=0.0, tol=0.0).solve)(
      problem)
  np.testing.assert_allclose(ck, expected, rtol=1e-9, atol=1e-12)


def test_the_state_knows_every_layer_from_init():
  # The transformations' state keeps one entry per layer from init on
  # (the parents of every parameter of two axes or more): a layer missing
  # there would change the state's structure at the first step (one more
  # compile, and a scan over steps would refuse the new carry).
  model = Block(jnp.float32)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = sibp_jax.scale_by_sibp(0.1)
  state = tx.init(params)
  x, y = _tokens(jnp.float32)
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=xent)
  _, new = tx.update(nnx.as_pure(grads), state, params, problems=problems)
  assert jax.tree.structure(new) == jax.tree.structure(state)
  assert {layer.module_name for layer in problems.layers} <= set(
      state.info.status)


def test_vmap_over_seeds_equals_separate_runs():
  """Two initialisations of the block trained in one vmapped program with
  SIBP equal the two runs one at a time (test_vmap's tolerance)."""
  from test_vmap import _assert_same_runs  # noqa: PLC0415
  from test_vmap import train  # noqa: PLC0415
  x, y = _tokens(jnp.float32, batch=12)
  xs, ys = jnp.stack([x, x[::-1]]), jnp.stack([y, y[::-1]])
  splits = [nnx.split(Block(jnp.float32, seed=s)) for s in (0, 1)]
  graphdef = splits[0][0]
  params = [nnx.as_pure(state) for _, state in splits]
  tx = sibp_jax.sibp(0.1)
  run = jax.jit(lambda p: train(tx, graphdef, p, xs, ys))
  batched = jax.jit(jax.vmap(run))(jax.tree.map(
      lambda *a: jnp.stack(a), *params))
  _assert_same_runs(batched, [run(p) for p in params])


@pytest.mark.usefixtures('x64')
def test_einsum_is_the_general_dense_layer_it_spells():
  """An nnx.Einsum 'btd,dnh->btnh' (with bias) is solved as the
  LinearGeneral with the same kernel: the same problems and directions;
  einsums that are no dense map of their input, or a call that passes its
  own einsum_str, are refused by name."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(6, 5, 4)))
  y = jnp.arange(6) % 3

  class Heads(nnx.Module):
    def __init__(self, einsum):
      kw = dict(param_dtype=jnp.float64, rngs=nnx.Rngs(0))
      if einsum:
        self.proj = nnx.Einsum('btd,dnh->btnh', (4, 2, 3), (2, 3), **kw)
      else:
        self.proj = nnx.LinearGeneral(4, (2, 3), **kw)
      self.head = nnx.Linear(6, 3, param_dtype=jnp.float64,
                             rngs=nnx.Rngs(1))

    def __call__(self, x):
      h = jax.nn.relu(self.proj(x)).mean(axis=1)
      return self.head(h.reshape(h.shape[0], -1))

  kernel = jnp.asarray(rng.normal(size=(4, 2, 3)))
  out = []
  for einsum in (True, False):
    model = Heads(einsum)
    model.proj.kernel[...] = kernel
    out.append(_directions_of(model, x, y))
  chex.assert_trees_all_close(out[0], out[1], rtol=1e-10, atol=1e-12)

  for spec in ('btd,ndh->btnh', 'btd,dnh->bnh', 'btd,bdh->bth'):
    model = Heads(True)
    model.proj.einsum_str = spec
    with pytest.raises(ValueError, match=f"einsum '{spec}' is not a dense"):
      _directions_of(model, x, y)

  class OwnString(Heads):
    def __call__(self, x):
      h = jax.nn.relu(self.proj(x, einsum_str='btd,dnh->btnh'))
      return self.head(h.mean(axis=1).reshape(x.shape[0], -1))

  with pytest.raises(ValueError, match="'proj': called with einsum_str"):
    _directions_of(OwnString(True), x, y)


def _directions_of(model, x, y):
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=xent)
  grads = nnx.as_pure(grads)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  tx = sibp_jax.scale_by_sibp(0.5)
  return tx.update(grads, tx.init(params), params, problems=problems)[0]


# The nnx Block's layers by the names linen gives LinenBlock's (linen
# numbers its Dense layers in construction order: the MLP's outer
# ``Dense(8)`` is built before the inner ``Dense(16)``).
LINEN_NAMES = {'patch': 'Dense_0', 'positions': 'Embed_0',
               'norm1': 'LayerNorm_0',
               'attention': 'MultiHeadDotProductAttention_0',
               'norm2': 'LayerNorm_1', 'up': 'Dense_2', 'down': 'Dense_1',
               'head': 'Dense_3'}


@functools.partial(jax.jit, static_argnums=0)
def _adapter_updates(adapter, linen_params, x, y):
  """Loss and the first update of SIBP and ProxBP, through one adapter."""
  if adapter == 'nnx':
    model = Block(jnp.float32)
    nnx.update(model, {k: linen_params[v] for k, v in LINEN_NAMES.items()})
    loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=xent)
    grads = nnx.as_pure(grads)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
  else:
    loss, grads, problems = sibp_jax.linen.value_grad_and_problems(
        LinenBlock(jnp.float32), linen_params, x, y, loss_fn=xent)
    params = linen_params

  def update(tx):
    return tx.update(grads, tx.init(params), params, problems=problems)[0]

  out = grads, {'sibp': update(sibp_jax.sibp(0.1)),
                'proxbp': update(sibp_jax.proxbp(1.0, tau_prox=0.05))}
  # Plain dicts by the nnx names, to compare leaf by leaf.
  if adapter == 'linen':
    out = jax.tree.map(lambda t: {k: t[v] for k, v in LINEN_NAMES.items()},
                       out, is_leaf=lambda t: 'Dense_0' in t)
  else:
    out = jax.tree.map(lambda t: t.to_pure_dict(), out,
                       is_leaf=lambda t: isinstance(t, nnx.State))
  return loss, *out


def test_nnx_and_linen_give_the_same_step_for_the_same_vit_block():
  """The Block in nnx and in linen, with the same weights, get the same
  gradient and the same SIBP and ProxBP updates.

  The two adapters read their layers from different module trees (nnx's
  MultiHeadAttention, linen's MultiHeadDotProductAttention with
  DenseGeneral projections), and must still pose the same problems.
  Tolerance: float32, relative to the largest leaf of each tree. Both
  adapters trace the same math, but through different module code (nnx's
  and linen's attention, the layers' inputs captured by different
  interceptors), so a backend may order or fuse the ops differently: a
  few ulps (1.2e-7) in the forward pass, which the ridge solves amplify
  by their condition number (tens here: λ = 1 against Gram matrices of 30
  rows of O(1) features). Observed on CPU: bitwise equal.
  """
  x, y = _tokens(jnp.float32)
  params = LinenBlock(jnp.float32).init(jax.random.key(0), x)['params']
  # LayerNorm scale 1, bias 0 at init would hide a swapped or dropped
  # LayerNorm parameter: move them off those values.
  rng = np.random.default_rng(5)
  params = jax.tree.map(
      lambda a: a + jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype),
      params)
  loss_n, grads_n, updates_n = _adapter_updates('nnx', params, x, y)
  loss_l, grads_l, updates_l = _adapter_updates('linen', params, x, y)
  np.testing.assert_allclose(loss_n, loss_l, rtol=1e-6)
  for a, b in ((grads_n, grads_l), (updates_n['sibp'], updates_l['sibp']),
               (updates_n['proxbp'], updates_l['proxbp'])):
    a, b = jax.tree.map(np.asarray, (a, b))
    chex.assert_trees_all_equal_structs(a, b)
    scale = max(np.abs(v).max() for v in jax.tree.leaves(b))
    chex.assert_trees_all_close(a, b, rtol=0, atol=1e-5 * scale)
    assert scale > 0
