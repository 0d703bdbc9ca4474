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


class ConvNet(nnx.Module):
  """conv, ReLU, max-pool, strided conv, ReLU, flatten, dense (8×8 inputs)."""

  def __init__(self, channels=2, out=3, *, seed=0, dtype=jnp.float32):
    rngs = nnx.Rngs(seed)
    kw = dict(rngs=rngs, param_dtype=dtype, dtype=dtype)
    self.conv1 = nnx.Conv(channels, 4, (3, 3), padding='SAME', **kw)
    self.conv2 = nnx.Conv(4, 5, (2, 2), strides=2, padding='VALID', **kw)
    self.dense = nnx.Linear(5 * 2 * 2, out, **kw)

  def __call__(self, x):
    x = jax.nn.relu(self.conv1(x))
    x = nnx.max_pool(x, (2, 2), (2, 2))
    x = jax.nn.relu(self.conv2(x))
    return self.dense(x.reshape(x.shape[0], -1))


ARCHS = ('mlp', 'convnet')


def arch_model(arch, out=3, *, hidden=8, seed=0, dtype=jnp.float32):
  if arch == 'mlp':
    return MLP((6, hidden, out), seed=seed, dtype=dtype)
  return ConvNet(out=out, seed=seed, dtype=dtype)


def arch_data(arch, task='classification', batch=32, seed=0, out=3):
  make = classification if task == 'classification' else regression
  if arch == 'mlp':
    return make(batch=batch, d_in=6, seed=seed, **(
        {'classes': out} if task == 'classification' else {'d_out': out}))
  x, y = make(batch=batch, d_in=8 * 8 * 2, seed=seed, **(
      {'classes': out} if task == 'classification' else {'d_out': out}))
  return x.reshape(batch, 8, 8, 2), y


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
