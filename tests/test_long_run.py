"""The paper variant over 600 batches against the NumPy transcription.

``tests/test_reference.py`` checks single steps; this checks that the
library's paper variant follows the same training curve over a long run,
where the line search's accept/reject decisions compound. The SIBP authors'
setting: ``input-500-10`` with ReLU, weights and biases from ``N(0, 0.05²)``,
batch 100, ``η = 0.1``, ``λ_W = λ_b = 1``, float64; the loss on the first
10,000 training images every 50 batches. Minutes of CPU, so off unless
asked for::

  SIBP_JAX_LONG=1 python -m pytest -q -s tests/test_long_run.py
  # on Fashion-MNIST (a TFDS folder holding the prepared dataset):
  SIBP_JAX_LONG=1 SIBP_JAX_DATA_DIR=DIR python -m pytest -q -s \\
      tests/test_long_run.py

Without ``SIBP_JAX_DATA_DIR`` it runs on scikit-learn's bundled digits.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sibp_jax

import input_pipeline
from test_reference import MLP
from test_reference import _forward
from test_reference import sibp_paper_step

pytestmark = pytest.mark.skipif(
    os.environ.get('SIBP_JAX_LONG') != '1',
    reason='a long run: set SIBP_JAX_LONG=1')

BATCHES, EVERY, BATCH, SUBSET = 600, 50, 100, 10_000
ETA, LAM = 0.1, 1.0
# Largest relative gap between the two loss curves at any evaluation. Both
# run the same float64 arithmetic in another order; seen on digits: 4e-14.
# A line-search decision that went the other way would show as a gap of
# the order of the step itself.
RTOL = 1e-6


def _mean_loss(params, x, y):
  z = _forward(params, x)[1][-1]
  z = z - z.max(axis=1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  return float(-log_p[np.arange(len(y)), y].mean())


def test_paper_variant_follows_the_transcription_for_600_batches():
  data_dir = os.environ.get('SIBP_JAX_DATA_DIR')
  data = (input_pipeline.load('fashion_mnist', data_dir) if data_dir else
          input_pipeline.load('digits'))
  x = data.x_train.reshape(len(data.x_train), -1).astype(np.float64)
  y = data.y_train.astype(np.int32)
  rng = np.random.default_rng(0)
  sizes = (x.shape[1], 500, data.classes)
  init = [(rng.normal(scale=0.05, size=(a, b)),
           rng.normal(scale=0.05, size=(b,)))
          for a, b in zip(sizes[:-1], sizes[1:])]
  order = np.concatenate([rng.permutation(len(x)) for _ in range(
      -(-BATCHES * BATCH // len(x)))])
  tx = sibp_jax.sibp(ETA, variant='paper', lambda_w=LAM, lambda_b=LAM)

  with jax.enable_x64(True):
    @jax.jit
    def step(params, state, xb, yb):
      model = MLP(params, jnp.float64)
      _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
          model, xb, yb,
          loss_fn=optax.softmax_cross_entropy_with_integer_labels)
      current = nnx.as_pure(nnx.state(model, nnx.Param))
      updates, state = tx.update(nnx.as_pure(grads), state, current,
                                 problems=problems)
      new = optax.apply_updates(current, updates)['layers']
      return [(new[i]['kernel'], new[i]['bias'])
              for i in range(len(params))], state

    library = [tuple(jnp.asarray(a) for a in layer) for layer in init]
    state = tx.init(nnx.as_pure(nnx.state(MLP(library, jnp.float64),
                                          nnx.Param)))
    reference = init
    curves = []
    for k in range(BATCHES + 1):
      if k % EVERY == 0:
        as_numpy = [tuple(np.asarray(a) for a in layer) for layer in library]
        curves.append((k, _mean_loss(as_numpy, x[:SUBSET], y[:SUBSET]),
                       _mean_loss(reference, x[:SUBSET], y[:SUBSET])))
      if k == BATCHES:
        break
      idx = order[k * BATCH:(k + 1) * BATCH]
      library, state = step(library, state, jnp.asarray(x[idx]),
                            jnp.asarray(y[idx]))
      reference, _ = sibp_paper_step(reference, x[idx], y[idx], ETA, LAM,
                                     LAM)

  print('\nbatches | library loss | transcription loss | relative gap')
  gaps = []
  for k, got, want in curves:
    gaps.append(abs(got - want) / want)
    print(f'{k:7d} | {got:.4f} | {want:.4f} | {gaps[-1]:.2e}')
  assert max(gaps) <= RTOL, curves
