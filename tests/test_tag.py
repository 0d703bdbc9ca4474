"""Any JAX model whose layers are tagged: plain JAX and Equinox.

Each model is held to the ProxBP τ → 0 limit (direction / τ → ∇J, float64)
for every parameter, to the Flax model it spells (the same directions),
and to clear errors for the misuses a new user makes.
"""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sibp_jax

from _models import MLP
from _models import xent


def _data(batch=12, d=6, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(batch, d))),
          jnp.asarray(rng.integers(0, classes, batch), jnp.int32))


def mlp(params, x):
  for layer in params['hidden']:
    x = jnp.tanh(sibp_jax.tag.dense(x, layer['kernel'], layer['bias']))
  return sibp_jax.tag.dense(x, params['out']['kernel'], params['out']['bias'])


def _mlp_params(sizes=(6, 8, 5, 3), seed=0, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  layers = [{'kernel': jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a),
                                   dtype),
             'bias': jnp.asarray(rng.normal(size=b) * 0.1, dtype)}
            for a, b in zip(sizes[:-1], sizes[1:])]
  return {'hidden': layers[:-1], 'out': layers[-1]}


def _limit_errors(apply_fn, params, x, y, tau=1e-7):
  def loss(p):
    return jnp.mean(xent(apply_fn(p, x), y))

  reference = jax.grad(loss)(params)
  _, grads, problems = sibp_jax.tag.value_grad_and_problems(
      apply_fn, params, x, y, loss_fn=xent)
  chex.assert_trees_all_close(grads, reference, rtol=1e-12, atol=1e-14)
  tx = sibp_jax.scale_by_proxbp(tau)
  direction = tx.update(grads, tx.init(params), params,
                        problems=problems)[0]
  return problems, jax.tree.map(
      lambda d, g: float(np.linalg.norm(d / tau - g) / np.linalg.norm(g)),
      direction, reference)


@pytest.mark.usefixtures('x64')
def test_a_plain_jax_mlp_holds_the_backprop_limit():
  x, y = _data()
  problems, errors = _limit_errors(mlp, _mlp_params(), x, y)
  assert [layer.name for layer in problems.layers] == [
      'hidden/0', 'hidden/1', 'out']
  assert max(jax.tree.leaves(errors)) < 1e-5, errors
  # The state knows every tagged layer from init on (one structure).
  params = _mlp_params()
  tx = sibp_jax.sibp(0.1)
  state = tx.init(params)
  _, grads, problems = sibp_jax.tag.value_grad_and_problems(
      mlp, params, x, y, loss_fn=xent)
  _, new = tx.update(grads, state, params, problems=problems)
  assert jax.tree.structure(new) == jax.tree.structure(state)


@pytest.mark.usefixtures('x64')
def test_the_tagged_mlp_is_the_flax_mlp():
  """The same weights as an nnx MLP give the same SIBP direction."""
  x, y = _data()
  model = MLP((6, 8, 3), dtype=jnp.float64, activation=jnp.tanh)
  state = nnx.as_pure(nnx.state(model, nnx.Param))
  params = {'hidden': [dict(state['layers'][0])],
            'out': dict(state['layers'][1])}
  tx = sibp_jax.scale_by_sibp(0.5)
  _, grads, problems = sibp_jax.tag.value_grad_and_problems(
      mlp, params, x, y, loss_fn=xent)
  tagged = tx.update(grads, tx.init(params), params, problems=problems)[0]
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=xent)
  flax = tx.update(nnx.as_pure(grads), tx.init(state), state,
                   problems=problems)[0]
  chex.assert_trees_all_close(tagged['out'], dict(flax['layers'][1]),
                              rtol=1e-10, atol=1e-13)
  chex.assert_trees_all_close(tagged['hidden'][0], dict(flax['layers'][0]),
                              rtol=1e-10, atol=1e-13)


def scanned(params, x):
  """Three stacked tanh layers under jax.lax.scan, then a head."""
  def body(h, layer):
    return jnp.tanh(sibp_jax.tag.dense(h, layer['kernel'],
                                       layer['bias'])), None
  h, _ = jax.lax.scan(body, x, params['stack'])
  return sibp_jax.tag.dense(h, params['head'])


@pytest.mark.usefixtures('x64')
def test_a_scan_over_stacked_tagged_layers_holds_the_limit():
  rng = np.random.default_rng(1)
  params = {'stack': {'kernel': jnp.asarray(rng.normal(size=(3, 6, 6)) / 3),
                      'bias': jnp.asarray(rng.normal(size=(3, 6)) / 10)},
            'head': jnp.asarray(rng.normal(size=(6, 3)))}
  x, y = _data()
  problems, errors = _limit_errors(scanned, params, x, y)
  assert [layer.name for layer in problems.layers] == [
      'stack[0]', 'stack[1]', 'stack[2]', '<root>']
  assert max(jax.tree.leaves(errors)) < 1e-5, errors


class EqxMLP(eqx.Module):
  """An Equinox MLP written batch-first, its layers tagged."""

  hidden: eqx.nn.Linear
  out: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.hidden = eqx.nn.Linear(6, 8, key=k1, dtype=jnp.float64)
    self.out = eqx.nn.Linear(8, 3, key=k2, dtype=jnp.float64)

  def __call__(self, x):
    # Equinox keeps weights as (out, in): a tagged model keeps its kernels
    # as (in, out) so that the parameter itself is tagged.
    h = jnp.tanh(sibp_jax.tag.dense(x, self.hidden.weight, self.hidden.bias))
    return sibp_jax.tag.dense(h, self.out.weight, self.out.bias)


@pytest.mark.usefixtures('x64')
def test_an_equinox_model_holds_the_backprop_limit():
  model = EqxMLP(jax.random.key(0))
  # Kernels stored (in, out), as the tag expects.
  model = eqx.tree_at(lambda m: (m.hidden.weight, m.out.weight), model,
                      (model.hidden.weight.T, model.out.weight.T))
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def apply(p, x):
    return eqx.combine(p, static)(x)

  x, y = _data()
  problems, errors = _limit_errors(apply, params, x, y)
  assert [layer.name for layer in problems.layers] == ['hidden', 'out']
  assert max(jax.tree.leaves(errors)) < 1e-5, errors
  # And trains: SIBP steps under jit lower the loss.
  tx = sibp_jax.sibp(0.1)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads, problems = sibp_jax.tag.value_grad_and_problems(
        apply, params, x, y, loss_fn=xent)
    updates, state = tx.update(grads, state, params, problems=problems)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(5):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.all(np.diff(losses) < 0) and losses[-1] < 0.9 * losses[0], (
      losses)


def test_a_transformed_kernel_is_refused_by_name():
  params = _mlp_params(dtype=jnp.float32)

  def transposed(p, x):
    return sibp_jax.tag.dense(x, p['out']['kernel'].T.T * 1.0)

  with pytest.raises(ValueError, match='not a leaf of params'):
    sibp_jax.tag.value_grad_and_problems(
        transposed, params, jnp.ones((4, 5)), jnp.zeros(4, jnp.int32),
        loss_fn=xent)


def test_untagged_parameters_are_named():
  params = _mlp_params(dtype=jnp.float32)

  def partly(p, x):
    h = jnp.tanh(x @ p['hidden'][0]['kernel'] + p['hidden'][0]['bias'])
    h = jnp.tanh(sibp_jax.tag.dense(h, p['hidden'][1]['kernel'],
                                    p['hidden'][1]['bias']))
    return sibp_jax.tag.dense(h, p['out']['kernel'], p['out']['bias'])

  x, y = _data(d=6)
  with pytest.raises(ValueError, match="'hidden/0/bias', 'hidden/0/kernel'"):
    sibp_jax.tag.value_grad_and_problems(partly, params, x.astype(
        jnp.float32), y, loss_fn=xent)
  _, _, problems = sibp_jax.tag.value_grad_and_problems(
      partly, params, x.astype(jnp.float32), y, loss_fn=xent,
      unsolved='gradient')
  assert len(problems.layers) == 2


@pytest.mark.usefixtures('x64')
def test_kernels_and_biases_anywhere_in_the_tree():
  """Two top-level kernels are two layers; a bias kept elsewhere is found."""
  rng = np.random.default_rng(2)
  params = {'w1': jnp.asarray(rng.normal(size=(6, 8))),
            'w2': jnp.asarray(rng.normal(size=(8, 3))),
            'biases': {'b1': jnp.asarray(rng.normal(size=8))}}

  def model(p, x):
    h = jnp.tanh(sibp_jax.tag.dense(x, p['w1'], p['biases']['b1']))
    return sibp_jax.tag.dense(h, p['w2'])

  x, y = _data()
  problems, errors = _limit_errors(model, params, x, y)
  assert [(layer.kernel_path, layer.bias_path) for layer in
          problems.layers] == [(('w1',), ('biases', 'b1')), (('w2',), None)]
  assert max(jax.tree.leaves(errors)) < 1e-5, errors


def test_outside_a_recording_the_tags_are_the_plain_operations():
  x = jnp.arange(12.0).reshape(2, 6)
  w, b = jnp.ones((6, 3)), jnp.arange(3.0)
  np.testing.assert_allclose(sibp_jax.tag.dense(x, w, b), x @ w + b)
  table = jnp.arange(12.0).reshape(4, 3)
  ids = jnp.array([[0, 3]])
  np.testing.assert_allclose(sibp_jax.tag.embed(ids, table), table[ids])
  np.testing.assert_allclose(sibp_jax.tag.attend(x[:, :3], table),
                             x[:, :3] @ table.T)
