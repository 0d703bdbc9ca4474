"""The proximal output step of SIBP (``output_step='proximal'``)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sibp_jax
from sibp_jax._src import output

CE = optax.softmax_cross_entropy_with_integer_labels


def _squared(z, y):
  return jnp.sum(jnp.square(z - y), axis=-1)


def _logits(dtype=jnp.float32):
  z = 3.0 * jax.random.normal(jax.random.key(0), (16, 10), dtype)
  y = jax.random.randint(jax.random.key(1), (16,), 0, 10)
  return z, y


@pytest.mark.parametrize('eta', [1e-3, 0.1, 1.0, 1e2, 1e4, 1e6])
def test_satisfies_its_optimality_condition(eta):
  # t = z - η e' must satisfy ∇ℓ(t) + (t - z)/η = 0, i.e. e' = ∇ℓ(t), per
  # example. float64, so the residual is the iteration's, not round-off's;
  # relative to ‖∇ℓ(z)‖, which the explicit step uses.
  with jax.enable_x64(True):
    z, y = _logits(jnp.float64)
    err = output.proximal_error(CE, z, y, eta)
    t = z - eta * err
    grad_at_t = jax.grad(lambda t: jnp.sum(CE(t, y)))(t)
    e = jax.grad(lambda z: jnp.sum(CE(z, y)))(z)
    chex.assert_tree_all_finite(err)
    np.testing.assert_array_less(
        np.linalg.norm(err - grad_at_t, axis=-1),
        1e-7 * np.linalg.norm(e, axis=-1) + 1e-12)


def test_tends_to_the_explicit_step():
  # e' = ∇ℓ(z - η e') = e - η ∇²ℓ e + O(η²): relative gap O(η).
  with jax.enable_x64(True):
    z, y = _logits(jnp.float64)
    e = jax.grad(lambda z: jnp.sum(CE(z, y)))(z)
    gaps = [float(jnp.max(jnp.abs(output.proximal_error(CE, z, y, eta) - e)))
            for eta in (1e-2, 1e-3, 1e-4)]
  assert gaps[0] < 0.01 and gaps[1] < gaps[0] / 5 and gaps[2] < gaps[1] / 5


def test_closed_form_for_squared_error():
  z = jax.random.normal(jax.random.key(0), (8, 3))
  y = jax.random.normal(jax.random.key(1), (8, 3))
  for eta in (0.1, 1.0, 1e3):
    t = z - eta * output.proximal_error(_squared, z, y, eta)
    chex.assert_trees_all_close(t, (z + 2 * eta * y) / (1 + 2 * eta),
                                atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('eta', [1e2, 1e6])
def test_moves_cross_entropy_logits_by_log_eta(eta):
  # The explicit step moves logits by up to η‖e‖; the implicit one by
  # O(log η): finite in float32 and far below η.
  z, y = _logits()
  err = output.proximal_error(CE, z, y, eta)
  chex.assert_tree_all_finite(err)
  move = float(jnp.max(jnp.abs(eta * err)))
  assert move < 3 * np.log(eta) + 10


def _regression_run(output_step, eta=1.0, steps=12):
  model = nnx.Sequential(nnx.Linear(8, 32, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(32, 3, rngs=nnx.Rngs(1)))
  x = jax.random.normal(jax.random.key(2), (64, 8))
  y = jnp.sin(x[:, :3]) + x[:, 3:6]
  opt = nnx.Optimizer(model, sibp_jax.sibp(eta, output_step=output_step),
                      wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=_squared)
    opt.update(model, grads, problems=problems)
    return loss

  return [float(step(model, opt)) for _ in range(steps)]


def test_regression_at_unit_step():
  # Summed squared error at η = 1: the explicit target z - 2η(z - y)
  # overshoots y and the loss grows without bound; the proximal target
  # (z + 2ηy)/(1 + 2η) lies between z and y, and the loss goes down.
  explicit = _regression_run('explicit')
  proximal = _regression_run('proximal')
  assert not explicit[-1] < explicit[0]
  assert all(np.isfinite(proximal))
  assert proximal[-1] < 0.5 * proximal[0]


def test_flagged_batches_stay_flagged_and_bad_settings_are_refused():
  model = nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  tx = sibp_jax.sibp(1.0, output_step='proximal')
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  state = tx.init(params)
  x = jnp.ones((5, 4)).at[0, 0].set(jnp.nan)
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, jnp.zeros((5,), jnp.int32), loss_fn=CE)
  updates, state = tx.update(nnx.as_pure(grads), state, params,
                             problems=problems)
  assert not bool(optax.tree_utils.tree_get(state, 'info').finite)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
  with pytest.raises(ValueError, match='output_step'):
    sibp_jax.sibp(0.1, output_step='implicit')
  bare = sibp_jax.Problems(problems.layers, problems.output_error)
  with pytest.raises(ValueError, match='loss and labels'):
    tx.update(nnx.as_pure(grads), tx.init(params), params, problems=bare)
