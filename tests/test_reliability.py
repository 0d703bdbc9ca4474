"""Bad input and hard numerics: a clear error, or a finite, flagged step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import sibp_jax

from _models import MLP
from _models import TRANSFORMS
from _models import classification
from _models import find_info
from _models import pure
from _models import step_inputs
from _models import xent

NAMES = sorted(TRANSFORMS)


def _one_step(name, model, x, y, loss_fn=xent, make=None):
  tx = (make or TRANSFORMS[name])()
  grads, params, problems = step_inputs(model, x, y, loss_fn=loss_fn)
  updates, state = jax.jit(
      lambda g, s, p, pr: tx.update(g, s, p, problems=pr))(
          grads, tx.init(params), params, problems)
  return updates, find_info(state)


# --- bad input -------------------------------------------------------------


@pytest.mark.parametrize('name', NAMES)
def test_labels_out_of_range_flag_and_skip_the_step(name):
  x, y = classification()
  updates, info = _one_step(name, MLP((6, 8, 3)), x, y.at[4].set(7))
  assert not bool(info.finite)
  for leaf in jax.tree.leaves(updates):
    assert float(jnp.abs(leaf).max()) == 0.0
  updates, info = _one_step(name, MLP((6, 8, 3)), x, y.at[4].set(-1))
  assert not bool(info.finite)


def test_float_labels_for_an_integer_loss_are_an_error():
  x, y = classification()
  with pytest.raises(TypeError, match='integer'):
    sibp_jax.nnx.value_grad_and_problems(MLP((6, 8, 3)), x,
                                         y.astype(jnp.float32), loss_fn=xent)


@pytest.mark.parametrize('name', NAMES)
def test_non_finite_loss_flags_the_step(name):
  x, y = classification()
  bad_loss = lambda z, y: xent(z, y) + jnp.where(y == 1, jnp.inf, 0.0)
  updates, info = _one_step(name, MLP((6, 8, 3)), x, y, loss_fn=bad_loss)
  assert not bool(info.finite)
  chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize('name', NAMES)
def test_batch_of_one(name):
  x, y = classification(batch=1)
  updates, info = _one_step(name, MLP((6, 8, 3)), x, y)
  assert bool(info.finite)
  chex.assert_tree_all_finite(updates)


def test_problems_from_another_batch_size_are_rejected():
  model = MLP((6, 8, 3))
  _, _, small = step_inputs(model, *classification(batch=8))
  grads, params, problems = step_inputs(model, *classification(batch=16))
  mixed = sibp_jax.Problems(problems.layers, small.output_error)
  tx = sibp_jax.sibp(0.1)
  with pytest.raises(ValueError, match='batch 16 but the output error has '
                                       'batch 8'):
    tx.update(grads, tx.init(params), params, problems=mixed)


def test_iteration_counts_are_checked_when_built():
  with pytest.raises(ValueError, match='iterations'):
    sibp_jax.sibp(0.1, solver=sibp_jax.ConjugateGradient(0))
  with pytest.raises(ValueError, match='iterations'):
    sibp_jax.sibp(0.1, variant='paper',
                  solver=sibp_jax.NonlinearCG(iterations=0))


# --- hard numerics ----------------------------------------------------------


def _hard_batches():
  x, y = classification(batch=12, seed=9)
  yield 'duplicated examples', jnp.concatenate([x[:6], x[:6]]), jnp.concatenate(
      [y[:6], y[:6]])
  yield 'all-zero inputs', jnp.zeros_like(x), y
  yield 'batch smaller than the width', x[:3], y[:3]
  yield 'one example repeated', jnp.tile(x[:1], (12, 1)), jnp.tile(y[:1], 12)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('case', list(range(4)))
def test_degenerate_batches_give_finite_steps(name, case):
  label, x, y = list(_hard_batches())[case]
  updates, info = _one_step(name, MLP((6, 8, 3)), x, y)
  assert bool(info.finite), label
  chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize('name', NAMES)
def test_dead_relu_units(name):
  model = MLP((6, 8, 3))
  # Kill half the hidden units: negative bias far below any input.
  model.layers[0].bias[...] = model.layers[0].bias[...].at[:4].set(-100.0)
  updates, info = _one_step(name, model, *classification())
  assert bool(info.finite)
  chex.assert_tree_all_finite(updates)
  # Dead units get no signal through the ReLU: their incoming weights stay
  # put (only the proximal pull, which is zero at the old value, acts).
  dead = np.asarray(updates['layers'][0]['kernel'])[:, :4]
  assert np.abs(dead).max() < 1e-6


@pytest.mark.parametrize('kwargs', [
    dict(learning_rate=1e3), dict(learning_rate=1e-6),
    dict(learning_rate=0.1, lambda_w=1e-12, lambda_b=1e-12),
    dict(learning_rate=0.1, lambda_w=1e8, lambda_b=1e8),
])
@pytest.mark.parametrize('variant', ['linearized', 'paper'])
@pytest.mark.parametrize('case', [0, 1])
def test_extreme_sibp_settings_stay_finite(kwargs, variant, case):
  label, x, y = list(_hard_batches())[case]
  updates, info = _one_step(
      None, MLP((6, 8, 3)), x, y,
      make=lambda: sibp_jax.sibp(variant=variant, **kwargs))
  assert bool(info.finite), (label, kwargs)
  chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize('tau', [1e-8, 1e6])
@pytest.mark.parametrize('case', [0, 1])
def test_extreme_proxbp_settings_stay_finite(tau, case):
  _, x, y = list(_hard_batches())[case]
  updates, info = _one_step(
      None, MLP((6, 8, 3)), x, y,
      make=lambda: sibp_jax.scale_by_proxbp(tau))
  assert bool(info.finite)
  chex.assert_tree_all_finite(updates)


def test_tiny_lambda_on_a_singular_gram_shows_in_the_residual():
  """Rank-deficient F with λ near zero: finite, and the residual says so."""
  p = sibp_jax.RidgeProblem(
      sibp_jax.Dense(), jnp.ones((20, 5)), jnp.ones((20, 2)), (5, 2), (2,),
      jnp.float32(1e-12), jnp.float32(1e-12))
  for method in ('cholesky', 'woodbury'):
    delta, info = sibp_jax.Ridge(method).solve(p)
    chex.assert_tree_all_finite(delta)
    assert np.isfinite(float(info.residual))


@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_solves_run_in_float32(name):
  model = MLP((6, 8, 3), dtype=jnp.bfloat16)
  x, y = classification()
  updates, info = _one_step(name, model, x.astype(jnp.bfloat16), y)
  assert bool(info.finite)
  chex.assert_trees_all_equal_dtypes(
      updates, pure(nnx.state(model, nnx.Param)))
  # Against the same step in float32 from the same (bf16-rounded) weights.
  model32 = MLP((6, 8, 3))
  nnx.update(model32, jax.tree.map(lambda a: a.astype(jnp.float32),
                                   pure(nnx.state(model, nnx.Param))))
  reference, _ = _one_step(name, model32,
                           x.astype(jnp.bfloat16).astype(jnp.float32), y)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(reference)):
    scale = float(jnp.abs(b).max()) + 1e-6
    # bf16 has 8 bits of mantissa: the forward pass alone is 2⁻⁸ relative.
    assert float(jnp.abs(a.astype(jnp.float32) - b).max()) < 0.05 * scale


# --- properties over random shapes -------------------------------------------


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 24), cols=st.integers(1, 24),
       d_out=st.integers(1, 4), log_lam=st.floats(-3, 2),
       seed=st.integers(0, 2**16))
def test_property_ridge_matches_numpy(rows, cols, d_out, log_lam, seed):
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(rows, cols)).astype(np.float32)
  r = rng.normal(size=(rows, d_out)).astype(np.float32)
  lam = 10.0 ** log_lam
  p = sibp_jax.RidgeProblem(sibp_jax.Dense(), jnp.asarray(f), jnp.asarray(r),
                            (cols, d_out), (d_out,), jnp.float32(lam),
                            jnp.float32(lam))
  design = np.concatenate([f, np.ones((rows, 1))], axis=1).astype(np.float64)
  gram = design.T @ design + lam * np.eye(cols + 1)
  ref = np.linalg.solve(gram, design.T @ r)
  scaled = design / np.r_[[lam] * (cols + 1)]
  # Each path's forward error follows the condition of the matrix it
  # factors: FᵀF + Λ, or I + FΛ⁻¹Fᵀ in batch space.
  cond = max(np.linalg.cond(gram),
             np.linalg.cond(np.eye(rows) + scaled @ design.T))
  for method in ('cholesky', 'woodbury'):
    (dk, db), _ = sibp_jax.Ridge(method).solve(p)
    got = np.concatenate([np.asarray(dk), np.asarray(db)[None]], axis=0)
    # Forward error of a float32 solve: about cond · 2⁻²⁴ relative.
    tol = 50 * cond * 6e-8 * np.abs(ref).max() + 1e-6
    np.testing.assert_allclose(got, ref, atol=tol)


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 6), sizes=st.lists(st.integers(1, 7), min_size=2,
                                               max_size=4),
       seed=st.integers(0, 2**16))
def test_property_cg_agrees_with_exact_on_random_stacks(batch, sizes, seed):
  """Random layer stacks: ProxBP with many CG steps equals the exact solve.

  Textbook CG (no early exit, ε = 0): the authors' ε = 1e-6 in the
  denominators is absolute and, on these tiny layers, not small next to
  ``pᵀ(AᵀA + Λ)p``.
  """
  model = MLP(tuple(sizes), seed=seed % 97)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, sizes[0])), jnp.float32)
  y = jnp.asarray(rng.integers(0, sizes[-1], batch), jnp.int32)
  exact, _ = _one_step(None, model, x, y,
                       make=lambda: sibp_jax.scale_by_proxbp(0.5))
  cg, _ = _one_step(None, model, x, y, make=lambda: sibp_jax.scale_by_proxbp(
      0.5, solver=sibp_jax.ConjugateGradient(2 * max(sizes) + 4, tol=0.0,
                                             eps=0.0)))
  for a, b in zip(jax.tree.leaves(cg), jax.tree.leaves(exact)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
