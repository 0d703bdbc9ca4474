"""Known limits (docs/algorithms.md section 4) and stationary points."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sibp_jax

from _models import MLP
from _models import classification
from _models import mse
from _models import regression


def _cosine(a, b):
  a, b = np.ravel(a), np.ravel(b)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


PROXBP_SOLVERS = {'exact': 'exact', 'cg20': sibp_jax.ConjugateGradient(20)}
# (τ_prox, λ), the step to the limit of each.
LIMITS = ((1e-5, 1e4), (1e-6, 1e5))


@jax.jit
def _limit_updates(graphdef, state, x, y, tau, lam):
  """The updates of the limits below, all in one float64 program.

  Returns the gradient, the batch size and ``{'proxbp': {solver: ProxBP's
  direction at τ_prox = tau}, 'sibp': the linearized update at λ = lam,
  'paper': the paper variant's at λ = 1e4}``.
  """
  model = nnx.merge(graphdef, state)
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=optax.softmax_cross_entropy_with_integer_labels)
  grads, params = nnx.as_pure(grads), nnx.as_pure(nnx.state(model, nnx.Param))

  def update(tx):
    return tx.update(grads, tx.init(params), params, problems=problems)[0]

  return grads, problems.batch_size, {
      'proxbp': {name: update(sibp_jax.scale_by_proxbp(tau, solver=solver))
                 for name, solver in PROXBP_SOLVERS.items()},
      'sibp': update(sibp_jax.sibp(0.5, lambda_w=lam, lambda_b=lam)),
      'paper': update(sibp_jax.sibp(
          0.1, variant='paper', lambda_w=1e4, lambda_b=1e4,
          nonlinear_solver=sibp_jax.NonlinearCG(iterations=1))),
  }


@functools.cache
def _limits():
  """``_limit_updates`` of the float64 MLP for each of ``LIMITS`` (call
  under x64): one compiled program, run once per setting."""
  graphdef, state = nnx.split(MLP((6, 8, 5, 3), seed=2, dtype=jnp.float64))
  x, y = classification(seed=2)
  return [_limit_updates(graphdef, nnx.as_pure(state), x.astype(jnp.float64),
                         y, jnp.float64(tau), jnp.float64(lam))
          for tau, lam in LIMITS]


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('solver', list(PROXBP_SOLVERS))
def test_proxbp_small_tau_hands_on_tau_times_gradient(solver):
  """ProxBP's direction is τ_prox ∇J + O(τ_prox²)."""
  errors = []
  for (tau, _), (grads, _, updates) in zip(LIMITS, _limits(), strict=True):
    direction = updates['proxbp'][solver]
    scaled = jax.tree.map(lambda d, tau=tau: d / tau, direction)
    errors.append(max(float(jnp.abs(s - g).max()) for s, g in zip(
        jax.tree.leaves(scaled), jax.tree.leaves(grads))))
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
  # First order: the error is O(τ‖FᵀF‖) relative (‖FᵀF‖ ~ 10³ here), and
  # shrinks with τ (by about 10× here).
  assert errors[1] < 1e-2 * scale
  assert errors[1] < 0.2 * errors[0]


@pytest.mark.usefixtures('x64')
def test_sibp_linearized_large_lambda_is_an_sgd_step():
  """λ → ∞: X_new - X_old → -(η B / λ) ∇J, i.e. SGD with lr η B / λ.

  The first order term is exact in each ridge solve; the rest of the gap is
  the error chained through the new weights, O(η/λ) relative.
  """
  eta = 0.5
  errors = []
  for (_, lam), (grads, batch, updates) in zip(LIMITS, _limits(),
                                               strict=True):
    update = updates['sibp']
    sgd = jax.tree.map(lambda g, lr=eta * batch / lam: -lr * g, grads)
    errors.append(max(float(jnp.abs(u - s).max() / jnp.abs(s).max())
                      for u, s in zip(jax.tree.leaves(update),
                                      jax.tree.leaves(sgd))))
  assert errors[1] < 1e-3
  assert errors[1] < 0.2 * errors[0]


@pytest.mark.usefixtures('x64')
def test_sibp_paper_one_inner_step_follows_the_gradient():
  """One nonlinear-CG iteration is a steepest-descent step on the fit.

  The fit's gradient at the old weights is 2ηB ∇J (the backprop gradient of
  the summed loss); with the error chained through weights that moved by
  O(η/λ), hidden kernels move along -∇J up to that.
  """
  grads, _, updates = _limits()[0]
  for i in range(3):
    cos = _cosine(updates['paper']['layers'][i]['kernel'],
                  -grads['layers'][i]['kernel'])
    assert cos > 1 - 1e-6, (i, cos)


def _fit(model, tx, x, y, steps):
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=mse)
    opt.update(model, grads, problems=problems)
    return optax.global_norm(grads)

  norms = [float(step(model, opt, x, y)) for _ in range(steps)]
  return norms


@pytest.mark.parametrize('make', [
    lambda: sibp_jax.sibp(0.2),
    lambda: sibp_jax.sibp(0.2, variant='paper'),
    lambda: sibp_jax.proxbp(1.0, tau_prox=0.5, momentum=None),
])
def test_full_batch_iteration_converges_to_the_least_squares_fit(make):
  """One linear layer, MSE, full batch: ‖∇J‖ → 0 at the least-squares fit."""
  x, y = regression(batch=24, d_in=4, d_out=2, seed=7)
  model = MLP((4, 2), seed=1)
  norms = _fit(model, make(), x, y, 300)
  assert norms[-1] < 1e-4 * norms[0], (norms[0], norms[-1])
  design = np.concatenate([np.asarray(x), np.ones((24, 1))], axis=1)
  solution = np.linalg.lstsq(design, np.asarray(y), rcond=None)[0]
  fitted = np.concatenate([model.layers[0].kernel[...],
                           model.layers[0].bias[...][None]], axis=0)
  np.testing.assert_allclose(fitted, solution, rtol=1e-3, atol=1e-4)
