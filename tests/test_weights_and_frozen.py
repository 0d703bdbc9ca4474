"""Per-token losses, row weights (masks) and frozen layers."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sibp_jax

from _models import MLP
from _models import classification
from _models import nnx_step
from _models import pure
from _models import step_inputs
from _models import xent


class TokenMLP(nnx.Module):
  """The same two-layer MLP applied at every position of ``(B, T, d)``."""

  def __init__(self):
    self.a = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
    self.b = nnx.Linear(6, 3, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.b(jax.nn.relu(self.a(x)))


def _tokens(batch=4, length=5):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, length, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=(batch, length)), jnp.int32)
  mask = jnp.asarray(rng.random((batch, length)) < 0.6, jnp.float32)
  return x, y, mask.at[0, 0].set(1.0)


def _directions(model, x, y, **kwargs):
  grads, params, problems = step_inputs(model, x, y, **kwargs)
  out = {}
  for name, tx in (('sibp', sibp_jax.scale_by_sibp(0.5)),
                   ('proxbp', sibp_jax.scale_by_proxbp(0.05))):
    out[name] = tx.update(grads, tx.init(params), params,
                          problems=problems)[0]
  return grads, out


def test_masked_tokens_are_the_kept_tokens_alone():
  """A per-token loss with 0/1 weights is the per-example problem of the
  kept tokens: the same mean loss, gradient and SIBP / ProxBP directions
  (a position-wise model, so dropping a token changes nothing else)."""
  x, y, mask = _tokens()
  grads, masked = _directions(TokenMLP(), x, y, weights=mask)
  keep = np.asarray(mask, bool)
  flat_grads, flat = _directions(TokenMLP(), x[keep], y[keep])
  chex.assert_trees_all_close(grads, flat_grads, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(masked, flat, rtol=2e-4, atol=1e-6)
  # Without the weights the padded tokens change the step.
  _, unmasked = _directions(TokenMLP(), x, y)
  assert not np.allclose(unmasked['sibp']['a']['kernel'],
                         flat['sibp']['a']['kernel'], atol=1e-3)


def test_per_token_loss_is_tokens_as_examples():
  x, y, _ = _tokens()
  grads, per_token = _directions(TokenMLP(), x, y)
  flat_grads, flat = _directions(TokenMLP(), x.reshape(-1, 4), y.reshape(-1))
  chex.assert_trees_all_close(grads, flat_grads, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(per_token, flat, rtol=2e-4, atol=1e-6)


def test_example_weights_drop_examples():
  x, y = classification()
  w = jnp.ones(x.shape[0]).at[jnp.array([1, 4])].set(0.0)
  grads, weighted = _directions(MLP((6, 8, 3)), x, y, weights=w)
  keep = np.asarray(w, bool)
  flat_grads, flat = _directions(MLP((6, 8, 3)), x[keep], y[keep])
  chex.assert_trees_all_close(grads, flat_grads, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(weighted, flat, rtol=2e-4, atol=1e-6)


def test_bad_weights_are_named():
  x, y = classification()
  with pytest.raises(ValueError, match='weights must be a real'):
    step_inputs(MLP((6, 8, 3)), x, y, weights=jnp.ones(3))
  with pytest.raises(ValueError, match=r'weights must be a real .*complex'):
    step_inputs(MLP((6, 8, 3)), x, y, weights=jnp.ones(x.shape[0], complex))
  x, y, _ = _tokens()
  with pytest.raises(ValueError, match=r'weights of shape \(4, 3\) do not '
                     r'fit rows of shape \(4, 5\)'):
    step_inputs(TokenMLP(), x, y, weights=jnp.ones((4, 3)))


def test_padding_labels_out_of_range_are_fine_where_weighted_zero():
  x, y, mask = _tokens()
  y = jnp.where(mask > 0, y, -1)  # padding label, as tokenizers write it
  mask = mask.astype(jnp.int32)  # integer masks, as tokenizers write them
  grads, params, problems = step_inputs(TokenMLP(), x, y, weights=mask)
  tx = sibp_jax.sibp(0.1)
  _, state = tx.update(grads, tx.init(params), params, problems=problems)
  assert bool(optax.tree_utils.tree_get(state, 'info').finite)


def _frozen_directions(frozen_path):
  """ProxBP's and SIBP's directions with the layer at ``frozen_path`` not
  in params, and without."""
  model = MLP((6, 8, 5, 3), seed=3)
  x, y = classification()
  grads, params, problems = step_inputs(model, x, y)
  drop = lambda tree: {'layers': {k: v for k, v in tree['layers'].items()
                                  if k != frozen_path}}
  out = {}
  for name, tx in (('sibp', sibp_jax.scale_by_sibp(0.5)),
                   ('proxbp', sibp_jax.scale_by_proxbp(0.05))):
    full = tx.update(grads, tx.init(params), params, problems=problems)[0]
    part = tx.update(drop(grads), tx.init(drop(params)), drop(params),
                     problems=problems)[0]
    out[name] = full, part
  return out


def test_frozen_layer_passes_the_error_through_its_weights():
  """ProxBP chains through the old weights anyway: freezing the middle
  layer changes nothing for the others. SIBP chains through the new
  weights: the layer above is unchanged, the one below differs."""
  out = _frozen_directions(1)
  full, part = out['proxbp']
  chex.assert_trees_all_close(part, {'layers': {
      k: v for k, v in full['layers'].items() if k != 1}}, rtol=1e-6)
  full, part = out['sibp']
  assert set(part['layers']) == {0, 2}
  chex.assert_trees_all_close(part['layers'][2], full['layers'][2])
  assert not np.allclose(part['layers'][0]['kernel'],
                         full['layers'][0]['kernel'])


def test_nnx_optimizer_wrt_filter_freezes_a_layer():
  model = MLP((6, 8, 3))
  x, y = classification()
  frozen = pure(nnx.state(model.layers[0], nnx.Param))
  trained = nnx.All(nnx.Param, nnx.PathContains(1))
  opt = nnx.Optimizer(model, sibp_jax.sibp(0.3), wrt=trained)
  step = nnx_step(xent)
  losses = [float(step(model, opt, x, y)) for _ in range(10)]
  assert losses[-1] < losses[0]
  chex.assert_trees_all_equal(pure(nnx.state(model.layers[0], nnx.Param)),
                              frozen)


def test_linen_multi_transform_freezes_a_layer():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name='head')(nn.relu(nn.Dense(8, name='body')(x)))

  x, y = classification()
  params = Net().init(jax.random.key(0), x)['params']
  tx = optax.multi_transform(
      {'train': sibp_jax.sibp(0.3), 'freeze': optax.set_to_zero()},
      {'body': jax.tree.map(lambda _: 'freeze', params['body']),
       'head': jax.tree.map(lambda _: 'train', params['head'])})
  state = tx.init(params)
  loss, grads, problems = sibp_jax.linen.value_grad_and_problems(
      Net(), params, x, y, loss_fn=xent)
  updates, state = tx.update(grads, state, params, problems=problems)
  chex.assert_trees_all_equal(updates['body'], jax.tree.map(
      jnp.zeros_like, params['body']))
  assert np.abs(updates['head']['kernel']).max() > 0
