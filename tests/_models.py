"""Small models and data shared by the tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sibp_jax

xent = optax.softmax_cross_entropy_with_integer_labels


def mse(logits, targets):
  return jnp.sum((logits - targets) ** 2, axis=-1)


class MLP(nnx.Module):
  """Linear layers with ReLU between them."""

  def __init__(self, sizes, *, seed=0, dtype=jnp.float32, use_bias=True,
               activation=jax.nn.relu):
    self.activation = activation
    rngs = nnx.Rngs(seed)
    self.layers = nnx.List([
        nnx.Linear(a, b, rngs=rngs, param_dtype=dtype, dtype=dtype,
                   use_bias=use_bias)
        for a, b in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = self.activation(layer(x))
    return self.layers[-1](x)


class LinenMLP(nn.Module):
  sizes: tuple

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.sizes[1:-1]):
      x = nn.relu(nn.Dense(width, name=f'dense_{i}')(x))
    return nn.Dense(self.sizes[-1], name='out')(x)


def classification(batch=32, d_in=6, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, d_in)).astype(np.float32)
  w = rng.normal(size=(d_in, classes))
  y = np.argmax(x @ w, axis=1).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def regression(batch=32, d_in=6, d_out=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, d_in)).astype(np.float32)
  y = np.tanh(x @ rng.normal(size=(d_in, d_out))).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


TRANSFORMS = {
    'sibp_linearized': lambda: sibp_jax.sibp(0.1),
    'sibp_linearized_cg': lambda: sibp_jax.sibp(
        0.1, solver=sibp_jax.ConjugateGradient(5)),
    'sibp_paper': lambda: sibp_jax.sibp(0.1, variant='paper'),
    'proxbp_exact': lambda: sibp_jax.proxbp(1.0, tau_prox=0.05),
    'proxbp_cg3': lambda: sibp_jax.proxbp(
        1.0, tau_prox=0.05, solver=sibp_jax.ConjugateGradient(3)),
}


def pure(tree):
  return nnx.as_pure(tree)


def step_inputs(model, x, y, loss_fn=xent):
  """(grads, params, problems) as plain pytrees for ``tx.update``."""
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=loss_fn)
  return pure(grads), pure(nnx.state(model, nnx.Param)), problems


def find_info(state):
  """The SIBPInfo inside any optax state."""
  return optax.tree_utils.tree_get(nnx.as_pure(state), 'info')
