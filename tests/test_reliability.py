"""Bad input and hard numerics: a clear error, or a finite, flagged step."""

import functools

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
from _models import xent

NAMES = sorted(TRANSFORMS)

# The batch of the plain cases: that of the hard batches below, so that both
# run through the same compiled step.
BATCH = 12


@functools.partial(jax.jit, static_argnames=('makes',))
def _jit_steps(makes, hypers, graphdef, state, x, y, penalty):
  """One forward pass, its problems and one update by each of ``makes``.

  ``make(*hypers)`` builds a transformation (``hypers`` traced, so that
  settings share the program); ``penalty`` is added to the loss of every
  example of class 1 (0 for the plain loss, inf for a loss that is not
  finite, in the same program). Module level, so that the programs are
  shared across tests: one per group of transformations, shape and dtype.
  Returns ``[(updates, info), ...]`` in the order of ``makes``.
  """
  model = nnx.merge(graphdef, state)
  loss_fn = lambda z, y: xent(z, y) + jnp.where(
      y == 1, penalty, 0.0).astype(z.dtype)
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=loss_fn)
  grads, params = pure(grads), pure(nnx.state(model, nnx.Param))
  out = []
  for make in makes:
    tx = make(*hypers)
    updates, state = tx.update(grads, tx.init(params), params,
                               problems=problems)
    out.append((updates, find_info(state)))
  return out


def _steps(makes, model, x, y, penalty=0.0, hypers=()):
  graphdef, state = nnx.split(model)
  return _jit_steps(tuple(makes), tuple(map(jnp.float32, hypers)), graphdef,
                    pure(state), x, y, jnp.float32(penalty))


def _one_step(name, model, x, y, penalty=0.0):
  """``(updates, info)`` of ``TRANSFORMS[name]``.

  All of ``TRANSFORMS`` run in one program (compiled once per shape and
  dtype for the tests of every name, faster than one program each).
  """
  steps = _steps([TRANSFORMS[n] for n in NAMES], model, x, y, penalty)
  return steps[NAMES.index(name)]


@jax.jit
def _step_inputs(graphdef, state, x, y):
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      nnx.merge(graphdef, state), x, y, loss_fn=xent)
  return pure(grads), state, problems


# --- bad input -------------------------------------------------------------


@pytest.mark.parametrize('name', NAMES)
def test_labels_out_of_range_flag_and_skip_the_step(name):
  x, y = classification(batch=BATCH)
  updates, info = _one_step(name, MLP((6, 8, 3)), x, y.at[4].set(7))
  assert not bool(info.finite)
  for leaf in jax.tree.leaves(updates):
    assert float(jnp.abs(leaf).max()) == 0.0
  updates, info = _one_step(name, MLP((6, 8, 3)), x, y.at[4].set(-1))
  assert not bool(info.finite)


def test_float_labels_for_an_integer_loss_are_an_error():
  x, y = classification()
  graphdef, state = nnx.split(MLP((6, 8, 3)))
  # Raised while tracing, as in an eager call (where it costs a forward pass).
  with pytest.raises(TypeError, match='integer'):
    jax.eval_shape(_step_inputs, graphdef, pure(state), x,
                   y.astype(jnp.float32))


@pytest.mark.parametrize('name', NAMES)
def test_non_finite_loss_flags_the_step(name):
  x, y = classification(batch=BATCH)
  assert bool(jnp.any(y == 1))
  # The loss xent + inf on the examples of class 1.
  updates, info = _one_step(name, MLP((6, 8, 3)), x, y, penalty=jnp.inf)
  assert not bool(info.finite)
  chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize('name', NAMES)
def test_batch_of_one(name):
  """Also the degenerate batch smaller than the width: FᵀF is singular."""
  x, y = classification(batch=1)
  updates, info = _one_step(name, MLP((6, 8, 3)), x, y)
  assert bool(info.finite)
  chex.assert_tree_all_finite(updates)


def test_problems_from_another_batch_size_are_rejected():
  graphdef, state = nnx.split(MLP((6, 8, 3)))
  state = pure(state)
  # The check is on shapes: abstract values are enough, and the update is
  # traced as in an eager call, where the error is raised.
  _, _, small = jax.eval_shape(_step_inputs, graphdef, state,
                               *classification(batch=8))
  grads, params, problems = jax.eval_shape(_step_inputs, graphdef, state,
                                           *classification(batch=16))
  mixed = sibp_jax.Problems(problems.layers, small.output_error)
  tx = sibp_jax.sibp(0.1)
  with pytest.raises(ValueError, match=r'output error has shape \(8, 3\) '
                                       r'but the last layer'):
    jax.eval_shape(lambda g, p, pr: tx.update(g, tx.init(p), p, problems=pr),
                   grads, params, mixed)


def test_iteration_counts_are_checked_when_built():
  with pytest.raises(ValueError, match='iterations'):
    sibp_jax.sibp(0.1, solver=sibp_jax.ConjugateGradient(0))
  with pytest.raises(ValueError, match='iterations'):
    sibp_jax.sibp(0.1, variant='paper',
                  solver=sibp_jax.NonlinearCG(iterations=0))


# --- hard numerics ----------------------------------------------------------


def _hard_batches():
  # A batch smaller than the width (rank-deficient FᵀF, the batch-space
  # path) is test_batch_of_one's.
  x, y = classification(batch=BATCH, seed=9)
  yield 'duplicated examples', jnp.concatenate([x[:6], x[:6]]), jnp.concatenate(
      [y[:6], y[:6]])
  yield 'all-zero inputs', jnp.zeros_like(x), y
  yield 'one example repeated', jnp.tile(x[:1], (12, 1)), jnp.tile(y[:1], 12)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('case', list(range(3)))
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
  updates, info = _one_step(name, model, *classification(batch=BATCH))
  assert bool(info.finite)
  chex.assert_tree_all_finite(updates)
  # Dead units get no signal through the ReLU: their incoming weights stay
  # put (only the proximal pull, which is zero at the old value, acts).
  dead = np.asarray(updates['layers'][0]['kernel'])[:, :4]
  assert np.abs(dead).max() < 1e-6


# The settings (lr, λ_W, λ_b, τ_prox) are traced: one compiled step serves
# them all, for SIBP's two variants and ProxBP.
EXTREME = {
    'linearized': lambda lr, lam_w, lam_b, tau: sibp_jax.sibp(
        lr, lambda_w=lam_w, lambda_b=lam_b),
    'paper': lambda lr, lam_w, lam_b, tau: sibp_jax.sibp(
        lr, variant='paper', lambda_w=lam_w, lambda_b=lam_b),
    'proxbp': lambda lr, lam_w, lam_b, tau: sibp_jax.scale_by_proxbp(tau),
}


def _extreme_step(kind, x, y, learning_rate=0.1, lambda_w=1.0, lambda_b=1.0,
                  tau=0.05):
  steps = _steps(EXTREME.values(), MLP((6, 8, 3)), x, y,
                 hypers=(learning_rate, lambda_w, lambda_b, tau))
  return steps[list(EXTREME).index(kind)]


@pytest.mark.parametrize('kwargs', [
    dict(learning_rate=1e3), dict(learning_rate=1e-6),
    dict(learning_rate=0.1, lambda_w=1e-12, lambda_b=1e-12),
    dict(learning_rate=0.1, lambda_w=1e8, lambda_b=1e8),
])
@pytest.mark.parametrize('variant', ['linearized', 'paper'])
@pytest.mark.parametrize('case', [0, 1])
def test_extreme_sibp_settings_stay_finite(kwargs, variant, case):
  label, x, y = list(_hard_batches())[case]
  updates, info = _extreme_step(variant, x, y, **kwargs)
  assert bool(info.finite), (label, kwargs)
  chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize('tau', [1e-8, 1e6])
@pytest.mark.parametrize('case', [0, 1])
def test_extreme_proxbp_settings_stay_finite(tau, case):
  _, x, y = list(_hard_batches())[case]
  updates, info = _extreme_step('proxbp', x, y, tau=tau)
  assert bool(info.finite)
  chex.assert_tree_all_finite(updates)


@jax.jit
def _ridge_solves(p):
  """The Cholesky and the Woodbury solve of ``p``, in one program."""
  return [sibp_jax.Ridge(method).solve(p)
          for method in ('cholesky', 'woodbury')]


def test_tiny_lambda_on_a_singular_gram_shows_in_the_residual():
  """Rank-deficient F with λ near zero: finite, and the residual says so."""
  # A shape of RIDGE_SHAPES below: the property test reuses its program.
  p = sibp_jax.RidgeProblem(
      sibp_jax.Dense(), jnp.ones((24, 5)), jnp.ones((24, 4)), (5, 4), (4,),
      jnp.float32(1e-12), jnp.float32(1e-12))
  for delta, info in _ridge_solves(p):
    chex.assert_tree_all_finite(delta)
    assert np.isfinite(float(info.residual))
    assert int(info.status) == sibp_jax.SolveStatus.CONVERGED


@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_solves_run_in_float32(name):
  model = MLP((6, 8, 3), dtype=jnp.bfloat16)
  x, y = classification(batch=BATCH)
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

# (rows, cols, d_out): each shape compiles once, and hypothesis draws the
# data, λ and the shape among these. One row and one column; batch space
# far smaller than parameter space and the reverse; a parameter-space factor
# (cols + 1) as large as the batch-space one (rows).
RIDGE_SHAPES = [(1, 1, 1), (3, 24, 2), (24, 5, 4), (8, 7, 3)]


@settings(max_examples=12, deadline=None)
@given(shape=st.sampled_from(RIDGE_SHAPES), log_lam=st.floats(-3, 2),
       seed=st.integers(0, 2**16))
def test_property_ridge_matches_numpy(shape, log_lam, seed):
  rows, cols, d_out = shape
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
  for method, ((dk, db), _) in zip(('cholesky', 'woodbury'), _ridge_solves(p),
                                   strict=True):
    got = np.concatenate([np.asarray(dk), np.asarray(db)[None]], axis=0)
    # Forward error of a float32 solve: about cond · 2⁻²⁴ relative.
    tol = 50 * cond * 6e-8 * np.abs(ref).max() + 1e-6
    np.testing.assert_allclose(got, ref, atol=tol, err_msg=method)


@functools.partial(jax.jit, static_argnames=('iterations',))
def _proxbp_exact_and_cg(iterations, graphdef, state, x, y):
  """ProxBP's direction by the exact solve and by CG, one forward pass."""
  model = nnx.merge(graphdef, state)
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=xent)
  grads, params = pure(grads), pure(nnx.state(model, nnx.Param))
  out = []
  for solver in ('exact', sibp_jax.ConjugateGradient(iterations, tol=0.0,
                                                     eps=0.0)):
    tx = sibp_jax.scale_by_proxbp(0.5, solver=solver)
    out.append(tx.update(grads, tx.init(params), params,
                         problems=problems)[0])
  return out


# (batch, layer sizes): each stack compiles once, and hypothesis draws the
# weights, inputs and labels, and the stack among these. One layer on one
# example; two layers, the batch above the first layer's width and below
# the second's (parameter space, then batch space); three layers through a
# width-one bottleneck.
CG_STACKS = [(1, (7, 1)), (6, (2, 7, 5)), (3, (4, 1, 6, 7))]


@settings(max_examples=6, deadline=None)
@given(stack=st.sampled_from(CG_STACKS), seed=st.integers(0, 2**16))
def test_property_cg_agrees_with_exact_on_random_stacks(stack, seed):
  """Layer stacks: ProxBP with many CG steps equals the exact solve.

  Textbook CG (no early exit, ε = 0): the authors' ε = 1e-6 in the
  denominators is absolute and, on these tiny layers, not small next to
  ``pᵀ(AᵀA + Λ)p``.
  """
  batch, sizes = stack
  graphdef, state = nnx.split(MLP(sizes, seed=seed % 97))
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, sizes[0])), jnp.float32)
  y = jnp.asarray(rng.integers(0, sizes[-1], batch), jnp.int32)
  exact, cg = _proxbp_exact_and_cg(2 * max(sizes) + 4, graphdef, pure(state),
                                   x, y)
  for a, b in zip(jax.tree.leaves(cg), jax.tree.leaves(exact)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
