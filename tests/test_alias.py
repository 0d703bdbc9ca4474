"""The aliases' own settings: weight decay, and schedules under injection.

One step with ``weight_decay`` differs from the same step without it by
exactly the decay term the docstrings state, on a 6-8-3 MLP; a decay
chained after ``sibp`` grows the weights (what the docstring warns of);
under ``optax.inject_hyperparams`` the wrapper's count advances on a
skipped step while the alias's own count holds (what the README says).
"""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import sibp_jax

from _models import MLP
from _models import classification
from _models import find_info
from _models import step_inputs

WD = 0.01
LR = 0.1


@pytest.fixture(scope='module')
def inputs():
  return step_inputs(MLP((6, 8, 3)), *classification())


def _new_params(tx, inputs):
  grads, params, problems = inputs
  updates, _ = tx.update(grads, tx.init(params), params, problems=problems)
  return optax.apply_updates(params, updates)


# float32 round-off of parameters of order 1 after one step.
TOL = dict(rtol=0, atol=1e-6)


def test_sibp_weight_decay_is_decoupled(inputs):
  params = inputs[1]
  plain = _new_params(sibp_jax.sibp(LR), inputs)
  decayed = _new_params(sibp_jax.sibp(LR, weight_decay=WD), inputs)
  # θ ← θ^SIBP − η·wd·θ: the decay is scaled by the learning rate only.
  chex.assert_trees_all_close(
      decayed, jax.tree.map(lambda p, q: p - LR * WD * q, plain, params),
      **TOL)


def test_sibp_decay_chained_after_grows_the_weights(inputs):
  params = inputs[1]
  plain = _new_params(sibp_jax.sibp(LR), inputs)
  after = _new_params(
      optax.chain(sibp_jax.sibp(LR), optax.add_decayed_weights(WD)), inputs)
  chex.assert_trees_all_close(
      after, jax.tree.map(lambda p, q: p + WD * q, plain, params), **TOL)


def test_weight_decay_mask(inputs):
  params = inputs[1]
  plain = _new_params(sibp_jax.sibp(LR), inputs)
  kernels_only = lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, _: 'kernel' in jax.tree_util.keystr(path), tree)
  decayed = _new_params(sibp_jax.sibp(LR, weight_decay=WD,
                                      weight_decay_mask=kernels_only), inputs)
  expected = jax.tree_util.tree_map_with_path(
      lambda path, p, q: p - LR * WD * q
      if 'kernel' in jax.tree_util.keystr(path) else p, plain, params)
  chex.assert_trees_all_close(decayed, expected, **TOL)


@pytest.mark.parametrize('momentum', [None, 0.95])
def test_proxbp_weight_decay_is_coupled(inputs, momentum):
  params = inputs[1]
  plain = _new_params(sibp_jax.proxbp(LR, momentum=momentum), inputs)
  decayed = _new_params(
      sibp_jax.proxbp(LR, momentum=momentum, weight_decay=WD), inputs)
  # wd·θ joins the direction before the outer step; on the first step
  # Nesterov SGD scales its input by lr·(1 + momentum).
  scale = LR * (1 + (momentum or 0.0)) * WD
  chex.assert_trees_all_close(
      decayed, jax.tree.map(lambda p, q: p - scale * q, plain, params), **TOL)


def test_weight_decay_under_inject_hyperparams(inputs):
  direct = _new_params(sibp_jax.sibp(LR, weight_decay=WD), inputs)
  injected = _new_params(optax.inject_hyperparams(sibp_jax.sibp)(
      learning_rate=LR, weight_decay=WD), inputs)
  chex.assert_trees_all_close(injected, direct, **TOL)


def test_negative_weight_decay_is_refused():
  with pytest.raises(ValueError, match='weight_decay'):
    sibp_jax.sibp(LR, weight_decay=-1.0)
  with pytest.raises(ValueError, match='weight_decay'):
    sibp_jax.proxbp(LR, weight_decay=-1.0)


def test_inject_hyperparams_schedule_counts_skipped_steps():
  """As the README says: the wrapper's count advances on a skipped step
  (so does its schedule), the alias's own count does not."""
  model = MLP((6, 8, 3))
  x, y = classification()
  good = step_inputs(model, x, y)
  bad = step_inputs(model, x.at[0, 0].set(jnp.nan), y)
  schedule = optax.linear_schedule(0.1, 0.01, 10)
  params = good[1]
  tx = optax.inject_hyperparams(sibp_jax.sibp)(learning_rate=schedule)
  state = tx.init(params)
  for grads, _, problems in (good, bad):
    _, state = tx.update(grads, state, params, problems=problems)
  assert not bool(find_info(state).finite)
  assert int(state.count) == 2
  assert int(state.inner_state.inner.count) == 1
  # The step after the skipped one runs at schedule(2), not schedule(1).
  _, state = tx.update(good[0], state, params, problems=good[2])
  assert float(state.hyperparams['learning_rate']) == pytest.approx(
      float(schedule(2)))


def test_sibp_outer_gets_the_direction(inputs):
  """``outer`` sees ``D = (θ − θ^SIBP)/η``: SGD at ``α`` moves ``α/η`` of
  the SIBP step, Adam keeps its own moments, and the default is the plain
  SIBP step."""
  params = inputs[1]
  plain = _new_params(sibp_jax.sibp(LR), inputs)
  chex.assert_trees_all_close(_new_params(sibp_jax.sibp(
      LR, outer=optax.scale_by_learning_rate(LR)), inputs), plain, **TOL)
  alpha = 0.03
  sgd = _new_params(sibp_jax.sibp(LR, outer=optax.sgd(alpha)), inputs)
  chex.assert_trees_all_close(sgd, jax.tree.map(
      lambda p, q: q + alpha / LR * (p - q), plain, params), **TOL)
  state = sibp_jax.sibp(LR, outer=optax.adam(1e-3)).init(params)
  assert isinstance(state.outer[0], optax.ScaleByAdamState)
  assert sibp_jax.sibp(LR, outer=optax.adam(1e-3)).update(
      inputs[0], state, params, problems=inputs[2])[1].outer[0].count == 1


def test_sibp_step_of_size_zero_moves_nothing_and_counts():
  """A warm-up from η = 0: the first step moves nothing, is not flagged as
  a bad step, and advances the count, so the schedule goes on (0/0 in the
  direction used to skip every step for ever)."""
  model = MLP((6, 8, 3))
  grads, params, problems = step_inputs(model, *classification())
  tx = sibp_jax.sibp(optax.linear_schedule(0.0, 0.1, 5))
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, problems=problems)
  assert bool(find_info(state).finite)
  assert all(not jnp.any(u) for u in jax.tree.leaves(updates))
  assert int(state.inner.count) == 1
  updates, state = tx.update(grads, state, params, problems=problems)
  assert all(jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates))
  assert any(jnp.any(u) for u in jax.tree.leaves(updates))


def test_sibp_outer_must_be_a_transformation():
  with pytest.raises(TypeError, match='outer must be an optax'):
    sibp_jax.sibp(LR, outer=1e-3)


class Normed(nnx.Module):
  def __init__(self):
    self.a = nnx.Linear(6, 8, rngs=nnx.Rngs(0))
    self.norm = nnx.LayerNorm(8, rngs=nnx.Rngs(1))
    self.b = nnx.Linear(8, 3, rngs=nnx.Rngs(2))

  def __call__(self, x):
    return self.b(jax.nn.relu(self.norm(self.a(x))))


def test_sibp_others_default_is_adam_unless_outer_takes_them():
  """By default the LayerNorm's parameters take Adam's first step (1e-3
  against the gradient's sign); ``others=None`` gives them the plain
  gradient step of size η; with ``outer`` they take outer's step."""
  x, y = classification()
  grads, params, problems = step_inputs(Normed(), x, y)

  def step(tx):
    return tx.update(grads, tx.init(params), params, problems=problems)[0]

  default, plain = step(sibp_jax.sibp(LR)), step(sibp_jax.sibp(LR,
                                                              others=None))
  chex.assert_trees_all_close(default['norm'], jax.tree.map(
      lambda g: -1e-3 * jnp.sign(g), grads['norm']), rtol=1e-3, atol=1e-9)
  chex.assert_trees_all_close(
      plain['norm'], jax.tree.map(lambda g: -LR * g, grads['norm']), **TOL)
  for name in ('a', 'b'):
    chex.assert_trees_all_close(default[name], plain[name], **TOL)
  outer = step(sibp_jax.sibp(LR, outer=optax.sgd(0.5)))
  chex.assert_trees_all_close(
      outer['norm'], jax.tree.map(lambda g: -0.5 * g, grads['norm']), **TOL)
  with pytest.raises(ValueError, match="others must be 'adam'"):
    sibp_jax.sibp(LR, others='sgd')


def test_sibp_default_others_leaves_unowned_matrices_to_the_plain_step():
  """The default Adam keeps state for vectors alone (as Muon's fallback):
  a custom matrix let through by ``unsolved='gradient'`` takes the plain
  gradient step, a custom vector Adam's; an explicit ``others`` takes both."""
  class Custom(nnx.Module):
    def __init__(self):
      self.a = nnx.Linear(6, 8, rngs=nnx.Rngs(0))
      self.mix = nnx.Param(jnp.eye(8) + 0.1)
      self.gain = nnx.Param(jnp.full((8,), 1.5))
      self.b = nnx.Linear(8, 3, rngs=nnx.Rngs(2))

    def __call__(self, x):
      return self.b(jax.nn.relu(self.a(x)) @ self.mix[...] * self.gain[...])

  grads, params, problems = step_inputs(Custom(), *classification(),
                                        unsolved='gradient')
  tx = sibp_jax.sibp(LR)
  state = tx.init(params)
  assert not any(leaf.ndim > 1 for leaf in jax.tree.leaves(
      state.outer.others))
  step, _ = tx.update(grads, state, params, problems=problems)
  chex.assert_trees_all_close(step['mix'], -LR * grads['mix'], **TOL)
  chex.assert_trees_all_close(step['gain'], -1e-3 * jnp.sign(grads['gain']),
                              rtol=1e-3)
  tx = sibp_jax.sibp(LR, others=optax.sgd(0.5))
  step, _ = tx.update(grads, tx.init(params), params, problems=problems)
  for name in ('mix', 'gain'):
    chex.assert_trees_all_close(step[name], -0.5 * grads[name], **TOL)


def test_sibp_others_steps_the_parameters_no_layer_owns():
  """``others`` takes the LayerNorm's scale and bias (here SGD at 0.5 on
  their gradient); the layers' parameters take SIBP's step unchanged; a
  skipped step moves nothing and holds ``others``'s momentum."""
  x, y = classification()
  grads, params, problems = step_inputs(Normed(), x, y)
  plain, _ = sibp_jax.sibp(LR).update(
      grads, sibp_jax.sibp(LR).init(params), params, problems=problems)
  tx = sibp_jax.sibp(LR, others=optax.sgd(0.5, momentum=0.9))
  state = tx.init(params)
  routed, state = tx.update(grads, state, params, problems=problems)
  for name in ('a', 'b'):
    chex.assert_trees_all_close(routed[name], plain[name], **TOL)
  chex.assert_trees_all_close(
      routed['norm'], jax.tree.map(lambda g: -0.5 * g, grads['norm']), **TOL)
  momentum = state.outer.others[0].trace
  bad_grads, _, bad_problems = step_inputs(
      Normed(), x.at[0, 0].set(jnp.nan), y)
  skipped, held = tx.update(bad_grads, state, params, problems=bad_problems)
  assert not bool(find_info(held).finite)
  assert all(not jnp.any(u) for u in jax.tree.leaves(skipped))
  chex.assert_trees_all_equal(held.outer.others[0].trace, momentum)
