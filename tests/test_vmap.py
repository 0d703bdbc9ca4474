"""K training runs in one compiled program: the train step under vmap.

Each test runs K runs batched by ``jax.vmap`` (or ``nnx.vmap``) and the
same K runs one at a time, unbatched, and compares the parameters after a
few steps.

Tolerance: 1e-5 relative to the largest parameter. A batched matmul is
another XLA kernel than the unbatched one and may sum in another order, a
few float32 ulps (1.2e-7) per sum, which an exact solve amplifies by the
condition number of ``FᵀF + Λ`` (a few tens here). Observed: at most 1e-6.
The paper variant's Armijo line search turns such round-off into a discrete
choice when a trial step lies within round-off of the sufficient-decrease
line; the batched run then accepts another (equally valid) step length.
Its tests therefore also compare the inner iteration counts, so that such a
flip shows as one instead of as a loose tolerance; the settings below do
not flip.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sibp_jax

from _models import MLP
from _models import classification
from _models import find_info
from _models import xent

K = 3
STEPS = 3
RTOL = 1e-5


def _batches(seed=0):
  xs, ys = zip(*(classification(batch=16, seed=seed + s)
                 for s in range(STEPS)))
  return jnp.stack(xs), jnp.stack(ys)


def _split(model):
  graphdef, params = nnx.split(model)
  return graphdef, nnx.as_pure(params)


def train(tx, graphdef, params, xs, ys, opt_state=None):
  """``STEPS`` steps of the pure train step, scanned over the batches.

  Starts from ``opt_state`` (default ``tx.init(params)``). Returns the final
  parameters, the losses and the inner iteration counts (per layer).
  """

  def step(carry, batch):
    params, opt_state = carry
    model = nnx.merge(graphdef, params)
    loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, *batch, loss_fn=xent)
    updates, opt_state = tx.update(nnx.as_pure(grads), opt_state, params,
                                   problems=problems)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), (loss, find_info(opt_state).iterations)

  (params, _), (losses, iterations) = jax.lax.scan(
      step, (params, tx.init(params) if opt_state is None else opt_state),
      (xs, ys))
  return params, losses, iterations


def _assert_same_runs(batched, separate):
  """``batched`` holds K runs on a leading axis; ``separate`` is a list."""
  params, losses, iterations = batched
  for k, (p, loss, its) in enumerate(separate):
    run = jax.tree.map(lambda a, k=k: a[k], params)
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(p))
    chex.assert_trees_all_close(run, p, rtol=0, atol=RTOL * scale)
    np.testing.assert_allclose(losses[k], loss, rtol=RTOL)
    chex.assert_trees_all_equal(
        jax.tree.map(lambda a, k=k: a[k], iterations), its)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _separate_run(factory, graphdef, hyper, params, xs, ys):
  """One unbatched run of ``train`` with ``factory(hyper)``, ``hyper``
  traced: the reference runs of the tests below share these programs."""
  return train(factory(hyper), graphdef, params, xs, ys)


def _proxbp_with_tau(tau):
  return sibp_jax.proxbp(1.0, tau_prox=tau)


LEARNING_RATE_RUNS = {
    'sibp_linearized': (sibp_jax.sibp, (0.05, 0.3, 2.0)),
    'sibp_paper': (functools.partial(sibp_jax.sibp, variant='paper'),
                   (0.05, 0.1, 2.0)),
    'proxbp_cg3': (functools.partial(
        sibp_jax.proxbp, tau_prox=0.05,
        solver=sibp_jax.ConjugateGradient(3)), (0.1, 0.5, 1.0)),
}


@pytest.mark.parametrize('name', sorted(LEARNING_RATE_RUNS))
def test_vmap_over_learning_rates_equals_separate_runs(name):
  """The usual sweep: ``inject_hyperparams`` states stacked over K rates."""
  factory, rates = LEARNING_RATE_RUNS[name]
  graphdef, params = _split(MLP((6, 8, 3)))
  xs, ys = _batches()
  tx = optax.inject_hyperparams(factory)(learning_rate=rates[0])

  def run(lr):
    state = tx.init(params)
    state.hyperparams['learning_rate'] = lr
    return train(tx, graphdef, params, xs, ys, state)

  batched = jax.jit(jax.vmap(run))(jnp.asarray(rates))
  # The reference runs build the optimizer with each rate as a plain
  # argument (traced, one compile), without inject_hyperparams.
  _assert_same_runs(batched, [
      _separate_run(factory, graphdef, jnp.float32(lr), params, xs, ys)
      for lr in rates])


def test_vmap_over_tau_prox_with_the_hyperparameter_traced():
  """A hyperparameter that is a batched tracer when the optimizer is built."""
  graphdef, params = _split(MLP((6, 8, 3)))
  xs, ys = _batches()
  taus = jnp.asarray([0.01, 0.05, 0.5])

  def run(tau):
    return train(_proxbp_with_tau(tau), graphdef, params, xs, ys)

  batched = jax.jit(jax.vmap(run))(taus)
  _assert_same_runs(batched, [
      _separate_run(_proxbp_with_tau, graphdef, t, params, xs, ys)
      for t in taus])


# The optimizer as (factory, hyperparameter): the separate runs are those of
# the tests above.
@pytest.mark.parametrize('factory,hyper', [
    (sibp_jax.sibp, 0.1), (_proxbp_with_tau, 0.05),
], ids=['sibp_linearized', 'proxbp_exact'])
def test_vmap_over_seeds_and_batches_equals_separate_runs(factory, hyper):
  """K model replicas from K seeds, each on its own batches."""
  tx = factory(hyper)
  models = [_split(MLP((6, 8, 3), seed=s)) for s in range(K)]
  graphdef = models[0][0]
  params = jax.tree.map(lambda *a: jnp.stack(a), *[p for _, p in models])
  data = [_batches(seed=10 * s) for s in range(K)]
  xs, ys = (jnp.stack(a) for a in zip(*data))

  def run(params, xs, ys):
    return train(tx, graphdef, params, xs, ys)

  batched = jax.jit(jax.vmap(run))(params, xs, ys)
  _assert_same_runs(batched, [
      _separate_run(factory, graphdef, jnp.float32(hyper), p, *d)
      for (_, p), d in zip(models, data)])


def test_nnx_vmap_of_model_and_optimizer():
  """The nnx idiom: replicas made by ``nnx.vmap``, trained by ``nnx.vmap``."""

  @nnx.split_rngs(splits=K)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    model = nnx.Sequential(nnx.Linear(6, 8, rngs=rngs), nnx.relu,
                           nnx.Linear(8, 3, rngs=rngs))
    return model, nnx.Optimizer(model, sibp_jax.sibp(0.1), wrt=nnx.Param)

  model, opt = create(nnx.Rngs(0))
  graphdef, start = _split(model)
  xs, ys = _batches()

  @nnx.jit
  @nnx.vmap(in_axes=(0, 0, None, None))
  def step(model, opt, x, y):
    loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=xent)
    opt.update(model, grads, problems=problems)
    return loss

  for x, y in zip(xs, ys):
    step(model, opt, x, y)
  batched = nnx.as_pure(nnx.state(model, nnx.Param))
  single = jax.jit(lambda p: train(sibp_jax.sibp(0.1), graphdef, p, xs, ys))
  for k in range(K):
    p, _, _ = single(jax.tree.map(lambda a, k=k: a[k], start))
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(p))
    chex.assert_trees_all_close(jax.tree.map(lambda a, k=k: a[k], batched),
                                p, rtol=0, atol=RTOL * scale)
