"""Layers applied more than once (shared and tied weights), solved as one.

A layer called k times in one forward pass is one ridge problem whose rows
are all of its applications' (inputs, and the error each application
received, stacked); the error passes every application through the old
weights. An embedding table also used as the output projection
(``Embed.attend``) is one problem with the rows of both uses, solved per
table row. Checked in float64 on a network reusing a hidden layer and on a
token model with tied input and output embeddings, in nnx and linen:
ProxBP's direction / τ and SIBP's direction · λ / rows tend to the
gradient (which sums over the uses) for every kernel and bias, the error
shrinking with τ and 1/λ; the tied solve equals a NumPy float64 solve of
the whole ridge problem written out; the two adapters agree; the paper
variant and applications of different shapes are refused by name; SIBP
trains both models under ``jit``.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sibp_jax
from sibp_jax._src import kinds
from sibp_jax._src import problems as problems_lib
from sibp_jax._src import rules
from sibp_jax._src import solvers

from _models import find_info
from _models import limit_updates
from _models import xent


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


class Reused(nnx.Module):
  """``h`` applied twice, the second time with a residual connection."""

  def __init__(self, dtype=jnp.float32):
    kw = dict(param_dtype=dtype, dtype=dtype)
    self.a = nnx.Linear(6, 8, rngs=nnx.Rngs(0), **kw)
    self.h = nnx.Linear(8, 8, rngs=nnx.Rngs(1), **kw)
    self.b = nnx.Linear(8, 3, rngs=nnx.Rngs(2), **kw)

  def __call__(self, x):
    z = jnp.tanh(self.a(x))
    z = jnp.tanh(self.h(z))
    return self.b(jnp.tanh(self.h(z)) + z)


class LinenReused(nn.Module):
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(param_dtype=self.dtype, dtype=self.dtype)
    self.a, self.h, self.b = nn.Dense(8, **kw), nn.Dense(8, **kw), nn.Dense(
        3, **kw)

  def __call__(self, x):
    z = jnp.tanh(self.a(x))
    z = jnp.tanh(self.h(z))
    return self.b(jnp.tanh(self.h(z)) + z)


def _data(dtype, batch=16):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(batch, 6)), dtype),
          jnp.asarray(rng.integers(0, 3, batch)))


def _linen_params(dtype):
  x, _ = _data(dtype)
  return LinenReused(dtype).init(jax.random.key(0), x)['params']


def _params(adapter):
  if adapter == 'nnx':
    graphdef, state = nnx.split(Reused(jnp.float64))
    return graphdef, nnx.as_pure(state)
  return _linen_params(jnp.float64)


def _relative_error(updates, grads, scale):
  """``max |scale · update − gradient|`` over every parameter, relative to
  the largest gradient entry."""
  pairs = list(zip(jax.tree.leaves(updates), jax.tree.leaves(grads),
                   strict=True))
  largest = max(float(jnp.abs(g).max()) for _, g in pairs)
  return max(float(jnp.abs(u * scale - g).max()) for u, g in pairs) / largest


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('adapter', ['nnx', 'linen'])
def test_shared_layer_tends_to_backprop(adapter):
  x, y = _data(jnp.float64)
  settings = ((1e-5, 1e4), (1e-6, 1e5))
  linen = None if adapter == 'nnx' else LinenReused(jnp.float64)
  runs = [limit_updates(linen, _params(adapter), x, y, jnp.float64(tau),
                        jnp.float64(lam))[1:] for tau, lam in settings]
  for which, scale_of in ((0, lambda tau, lam: 1 / tau),
                          (1, lambda tau, lam: lam / len(x))):
    errors = []
    for (tau, lam), (grads, updates) in zip(settings, runs):
      leaves = jax.tree_util.tree_leaves_with_path(grads)
      assert sum('h' in jax.tree_util.keystr(p) for p, _ in leaves) == 2
      errors.append(_relative_error(updates[which], grads,
                                    scale_of(tau, lam)))
    assert errors[1] < 1e-3, (which, errors)
    assert errors[1] < 0.2 * errors[0], (which, errors)


@pytest.mark.usefixtures('x64')
def test_nnx_and_linen_agree_on_a_shared_layer():
  x, y = _data(jnp.float64)
  graphdef, state = _params('nnx')
  linen_params = jax.tree.map(lambda v: v, {
      name: {'kernel': state[name]['kernel'], 'bias': state[name]['bias']}
      for name in ('a', 'h', 'b')})
  _, _, (nnx_prox, nnx_sibp) = limit_updates(
      None, (graphdef, state), x, y, jnp.float64(0.1), jnp.float64(1.0))
  _, _, (linen_prox, linen_sibp) = limit_updates(
      LinenReused(jnp.float64), linen_params, x, y, jnp.float64(0.1),
      jnp.float64(1.0))
  for ours, theirs in ((nnx_prox, linen_prox), (nnx_sibp, linen_sibp)):
    chex.assert_trees_all_close(
        {k: dict(v) for k, v in ours.items()}, theirs, rtol=1e-10)


def test_shared_layer_is_refused_by_the_paper_variant():
  x, y = _data(jnp.float32)
  model = Reused()
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=xent)
  assert [layer.name for layer in problems.layers] == ['a', 'h', 'h', 'b']
  tx = sibp_jax.sibp(0.1, variant='paper')
  params = nnx.state(model, nnx.Param)
  with pytest.raises(ValueError, match=r"layer 'h' is applied 2 times "
                     r"\(shared weights\): variant='paper'"):
    tx.update(grads, tx.init(params), params, problems=problems)


def _sibp_losses(model, x, y, steps=30):
  """The losses of ``steps`` jitted SIBP (η 0.3) steps on one batch; each
  step must be finite."""
  optimizer = nnx.Optimizer(model, sibp_jax.sibp(0.3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=xent)
    optimizer.update(model, grads, problems=problems)
    return loss, find_info(optimizer.opt_state).finite

  losses = []
  for _ in range(steps):
    loss, finite = step(model, optimizer)
    assert bool(finite)
    losses.append(float(loss))
  return losses


def test_sibp_trains_a_network_with_a_shared_layer():
  x, y = _data(jnp.float32, batch=64)
  losses = _sibp_losses(Reused(), x, y)
  assert np.isfinite(losses).all() and losses[-1] < 0.75 * losses[0], losses


class Tied(nnx.Module):
  """Token ids in, a distribution over the same vocabulary out, through
  the one table ``embed``: a lookup and the output projection."""

  def __init__(self, dtype=jnp.float32):
    kw = dict(param_dtype=dtype, dtype=dtype)
    self.embed = nnx.Embed(5, 4, rngs=nnx.Rngs(0), **kw)
    self.mix = nnx.Linear(4, 4, rngs=nnx.Rngs(1), **kw)

  def __call__(self, ids):
    return self.embed.attend(jnp.tanh(self.mix(self.embed(ids))))


class LinenTied(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids):
    kw = dict(param_dtype=self.dtype, dtype=self.dtype)
    embed = nn.Embed(5, 4, **kw)
    return embed.attend(jnp.tanh(nn.Dense(4, **kw)(embed(ids))))


def _tokens(batch=8, length=6):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.integers(0, 5, (batch, length))),
          jnp.asarray(rng.integers(0, 5, (batch, length))))


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('adapter', ['nnx', 'linen'])
def test_tied_embeddings_tend_to_backprop(adapter):
  """Per-token loss: the limits hold with the rows = tokens (48)."""
  ids, y = _tokens()
  if adapter == 'nnx':
    graphdef, state = nnx.split(Tied(jnp.float64))
    params = (graphdef, nnx.as_pure(state))
  else:
    params = LinenTied(jnp.float64).init(jax.random.key(0), ids)['params']
  settings = ((1e-5, 1e4), (1e-6, 1e5))
  linen = None if adapter == 'nnx' else LinenTied(jnp.float64)
  runs = [limit_updates(linen, params, ids, y, jnp.float64(tau),
                        jnp.float64(lam)) for tau, lam in settings]
  for which, scale_of in ((0, lambda tau, lam, n: 1 / tau),
                          (1, lambda tau, lam, n: lam / n)):
    errors = [_relative_error(updates[which], grads,
                              scale_of(tau, lam, float(problems.terms)))
              for (tau, lam), (problems, grads, updates) in zip(settings,
                                                                runs)]
    assert errors[1] < 1e-3, (which, errors)
    assert errors[1] < 0.2 * errors[0], (which, errors)


@pytest.mark.usefixtures('x64')
def test_tied_solve_matches_the_whole_ridge_problem_in_numpy():
  """Two lookups (one weighted) and two attends (one weighted) of a 7 × 3
  table against the ridge problem in all 21 unknowns, written out: the
  rows' counts ``ρ`` in ``FᵀρF``, the right-hand side ``Fᵀ R``."""
  rng = np.random.default_rng(3)
  v, d, eta, lam = 7, 3, 0.3, 0.8
  rule = rules.LinearizedRule(eta, lam, lam, solvers.Ridge())
  kernel = jnp.asarray(rng.normal(size=(v, d)))

  def layer(kind, inputs, width, weights=None):
    return problems_lib.LayerProblem(
        jnp.asarray(inputs), jnp.zeros(inputs.shape[:-1] + (width,))
        if kind == 'attend' else jnp.zeros(inputs.shape + (width,)), None,
        kinds.Attend(v) if kind == 'attend' else kinds.Embed(v),
        ('t', 'embedding'), None,
        row_weights=None if weights is None else jnp.asarray(weights))

  lookups = [(layer('lookup', rng.integers(0, v, (4, 5)), d),
              rng.normal(size=(4, 5, d))),
             (layer('lookup', rng.integers(0, v, (6,)), d,
                    rng.uniform(size=6)), rng.normal(size=(6, d)))]
  attends = [(layer('attend', rng.normal(size=(5, 2, d)), v),
              rng.normal(size=(5, 2, v))),
             (layer('attend', rng.normal(size=(9, d)), v,
                    rng.uniform(size=9)), rng.normal(size=(9, v)))]
  got = rules.tied_update(
      rule, [(lay, jnp.asarray(e)) for lay, e in lookups],
      [(lay, jnp.asarray(e)) for lay, e in attends], kernel).kernel

  rows, targets, weights = [], [], []
  for lay, e in lookups:  # Δ[id, j] ≈ -η e[j]
    w = (np.ones(lay.inputs.size) if lay.row_weights is None
         else np.asarray(lay.row_weights).reshape(-1))
    for i, r, wi in zip(np.asarray(lay.inputs).reshape(-1),
                        e.reshape(-1, d), w):
      for j in range(d):
        row = np.zeros(v * d)
        row[i * d + j] = 1.0
        rows.append(row), targets.append(-eta * r[j]), weights.append(wi)
  for lay, e in attends:  # Σ_j h_j Δ[u, j] ≈ -η e[u]
    h = np.asarray(lay.inputs).reshape(-1, d)
    w = (np.ones(len(h)) if lay.row_weights is None
         else np.asarray(lay.row_weights).reshape(-1))
    for hi, r, wi in zip(h, e.reshape(-1, v), w):
      for u in range(v):
        row = np.zeros(v * d)
        row[u * d:(u + 1) * d] = hi
        rows.append(row), targets.append(-eta * r[u]), weights.append(wi)
  f, t, w = np.array(rows), np.array(targets), np.array(weights)
  # The weights count the rows in the curvature alone: the residuals
  # carry them already (docs/algorithms.md, "Weights").
  want = np.linalg.solve(f.T @ (w[:, None] * f) + lam * np.eye(v * d),
                         f.T @ t).reshape(v, d)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)


def test_tied_embeddings_are_refused_by_the_paper_variant():
  ids, y = _tokens()
  model = Tied()
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, ids, y, loss_fn=xent)
  assert [type(layer.kind).__name__ for layer in problems.layers] == [
      'Embed', 'Dense', 'Attend']
  tx = sibp_jax.sibp(0.1, variant='paper')
  params = nnx.state(model, nnx.Param)
  with pytest.raises(ValueError, match=r"layer 'embed' is applied 2 times "
                     r'\(shared weights, as the output projection by '
                     r"attend\): variant='paper'"):
    tx.update(grads, tx.init(params), params, problems=problems)


def test_sibp_trains_tied_embeddings():
  ids, _ = _tokens(batch=32)
  y = (ids + 1) % 5  # the next id: learnable through the tied table
  losses = _sibp_losses(Tied(), ids, y)
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses


def test_a_table_read_outside_its_calls_is_refused_by_name():
  """Read directly besides its lookup and ``attend``, the table would get a
  step that misses that use (ProxBP's small-τ direction was 33% off the
  gradient before this check): refused, naming the parameter."""
  class Hidden(nnx.Module):
    def __init__(self):
      self.embed = nnx.Embed(5, 4, rngs=nnx.Rngs(0))
      self.mix = nnx.Linear(4, 4, rngs=nnx.Rngs(1))

    def __call__(self, ids):
      h = jnp.tanh(self.mix(self.embed(ids)))
      return self.embed.attend(h + self.embed.embedding[...].mean(axis=0))

  class LinenHidden(nn.Module):
    @nn.compact
    def __call__(self, ids):
      embed = nn.Embed(5, 4)
      h = jnp.tanh(nn.Dense(4)(embed(ids)))
      return embed.attend(h + embed.embedding.mean(axis=0))

  ids, y = _tokens()
  with pytest.raises(ValueError, match=r"parameter 'embed/embedding' of a "
                     'linear layer is also used outside'):
    sibp_jax.nnx.value_grad_and_problems(Hidden(), ids, y, loss_fn=xent)
  params = LinenHidden().init(jax.random.key(0), ids)['params']
  with pytest.raises(ValueError, match=r"parameter 'Embed_0/embedding' "
                     'of a linear layer is also used outside'):
    sibp_jax.linen.value_grad_and_problems(LinenHidden(), params, ids, y,
                                           loss_fn=xent)
