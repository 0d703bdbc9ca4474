"""Layer settings that change the map are refused; rounding settings solve.

sibp_jax solves every layer of its registry as the registry's plain map
(``f @ W + b`` for a dense layer). A module attribute that changes the map
(a custom ``dot_general``, convolution, einsum or ``promote_dtype``) or a
subclass with its own ``__call__`` (``attend``) would be solved as that
plain map, wrongly: each is refused by name. ``precision`` only changes the
rounding and is solved; Flax's own subclasses (``nnx.LoRALinear``, linen's
lifted ``nn.remat(nn.Dense)``) apply the registered map and are solved.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sibp_jax

from _models import xent


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _twice_dot(*args, **kwargs):
  return 2 * jax.lax.dot_general(*args, **kwargs)


def _twice_conv(*args, **kwargs):
  return 2 * jax.lax.conv_general_dilated(*args, **kwargs)


def _twice_einsum(*args, **kwargs):
  return 2 * jnp.einsum(*args, **kwargs)


def _doubling_promote(args, dtype=None, inexact=True):
  """nnx's ``promote_dtype`` signature, doubling every operand."""
  del dtype, inexact
  return tuple(None if a is None else 2 * a for a in args)


def _linen_doubling_promote(*args, dtype=None, inexact=True):
  """linen's ``promote_dtype`` signature, doubling every operand."""
  return _doubling_promote(args, dtype, inexact)


class TwiceDotGeneral:
  """A ``dot_general_cls`` (as quantisation libraries hand linen)."""

  def __call__(self, *args, **kwargs):
    return _twice_dot(*args, **kwargs)


class Stack(nnx.Module):
  """``layers[0]`` (the layer under test), ReLU, flatten, a dense head."""

  def __init__(self, first, features, *, dtype=jnp.float32, precision=None):
    self.layers = nnx.List([first, nnx.Linear(
        features, 3, precision=precision, param_dtype=dtype, dtype=dtype,
        rngs=nnx.Rngs(1))])

  def __call__(self, x):
    h = jax.nn.relu(self.layers[0](x))
    return self.layers[1](h.reshape(h.shape[0], -1))


class LinenStack(nn.Module):
  """``first`` (the layer under test), ReLU, flatten, a dense head."""

  first: nn.Module
  precision: jax.lax.Precision | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.relu(self.first(x))
    return nn.Dense(3, precision=self.precision, param_dtype=self.dtype,
                    dtype=self.dtype)(h.reshape(h.shape[0], -1))


class NnxTwice(nnx.Linear):
  """Applies its kernel once more than the call sibp_jax records."""

  def __call__(self, x):
    return super().__call__(x) + x @ self.kernel[...]


class LinenTwice(nn.Dense):
  """Applies its kernel once more than the call sibp_jax records."""

  def __call__(self, x):
    return super().__call__(x) + x @ self.variables['params']['kernel']


class ScaledAttend(nnx.Embed):
  """A tied output projection of its own."""

  def attend(self, query):
    return 2 * super().attend(query)


class Tied(nnx.Module):
  """Embedding lookups, their mean over tokens, the tied projection."""

  def __init__(self):
    self.layers = nnx.List([ScaledAttend(7, 4, rngs=nnx.Rngs(0))])

  def __call__(self, ids):
    return self.layers[0].attend(self.layers[0](ids).mean(axis=1))


def _data(shape, classes=3):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  return x, jnp.asarray(np.arange(shape[0]) % classes, jnp.int32)


def _rngs():
  return nnx.Rngs(0)


NNX_REFUSED = {
    'dot_general': lambda: (
        Stack(nnx.Linear(4, 5, dot_general=_twice_dot, rngs=_rngs()), 5),
        (8, 4)),
    'conv_general_dilated': lambda: (
        Stack(nnx.Conv(4, 5, (3,), conv_general_dilated=_twice_conv,
                       rngs=_rngs()), 6 * 5),
        (8, 6, 4)),
    'promote_dtype': lambda: (
        Stack(nnx.Linear(4, 5, promote_dtype=_doubling_promote,
                         rngs=_rngs()), 5),
        (8, 4)),
    'einsum_op': lambda: (
        Stack(nnx.Einsum('bd,dh->bh', (4, 5), einsum_op=_twice_einsum,
                         rngs=_rngs()), 5),
        (8, 4)),
    'NnxTwice overrides nnx.Linear.__call__': lambda: (
        Stack(NnxTwice(4, 5, rngs=_rngs()), 5), (8, 4)),
}


@pytest.mark.parametrize('what', list(NNX_REFUSED))
def test_nnx_settings_that_change_the_map_are_refused(what):
  model, shape = NNX_REFUSED[what]()
  x, y = _data(shape)
  with pytest.raises(ValueError, match=r"layer 'layers/0': ") as info:
    sibp_jax.nnx.value_grad_and_problems(model, x, y, loss_fn=xent)
  message = str(info.value)
  assert what in message and 'solved wrongly' in message, message
  assert 'parameter-free code around the layer' in message, message


def test_nnx_attend_of_its_own_is_refused():
  model = Tied()
  ids = jnp.asarray(np.arange(24).reshape(6, 4) % 7)
  y = jnp.arange(6) % 7
  with pytest.raises(ValueError, match=r"layer 'layers/0': ScaledAttend "
                     r'overrides nnx\.Embed\.attend'):
    sibp_jax.nnx.value_grad_and_problems(model, ids, y, loss_fn=xent)


LINEN_REFUSED = {
    'dot_general': lambda: nn.Dense(5, dot_general=_twice_dot),
    'dot_general_cls': lambda: nn.Dense(5, dot_general_cls=TwiceDotGeneral),
    'promote_dtype': lambda: nn.Dense(
        5, promote_dtype=_linen_doubling_promote),
    'conv_general_dilated': lambda: nn.Conv(
        5, (3,), conv_general_dilated=_twice_conv),
    'LinenTwice overrides linen.Dense.__call__': lambda: LinenTwice(5),
}


@pytest.mark.parametrize('what', list(LINEN_REFUSED))
def test_linen_settings_that_change_the_map_are_refused(what):
  first = LINEN_REFUSED[what]()
  x, y = _data((8, 6, 4) if isinstance(first, nn.Conv) else (8, 4))
  module = LinenStack(first)
  params = module.init(jax.random.key(0), x)['params']
  with pytest.raises(ValueError, match=r"layer 'first': ") as info:
    sibp_jax.linen.value_grad_and_problems(module, params, x, y,
                                           loss_fn=xent)
  message = str(info.value)
  assert what in message and 'solved wrongly' in message, message


def _relative_error(updates, grads, tau):
  """max |update / τ − ∇J| over every leaf, relative to max |∇J|."""
  miss = jax.tree.leaves(jax.tree.map(
      lambda u, g: jnp.abs(u / tau - g).max(), updates, grads))
  largest = jax.tree.leaves(jax.tree.map(lambda g: jnp.abs(g).max(), grads))
  return float(max(miss) / max(largest))


TAU = 1e-6


def _proxbp(grads, params, problems):
  tx = sibp_jax.scale_by_proxbp(TAU)
  return tx.update(grads, tx.init(params), params, problems=problems)[0]


@nnx.jit
def _nnx_limit(model, x, y):
  """``(problems, gradient, ProxBP's direction at τ)`` of an nnx model."""
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=xent)
  grads = nnx.as_pure(grads)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  return problems, grads, _proxbp(grads, params, problems)


@jax.jit(static_argnums=0)
def _linen_limit(module, params, x, y):
  """``(problems, gradient, ProxBP's direction at τ)`` of a linen module."""
  _, grads, problems = sibp_jax.linen.value_grad_and_problems(
      module, params, x, y, loss_fn=xent)
  return problems, grads, _proxbp(grads, params, problems)


@pytest.mark.usefixtures('x64')
def test_precision_is_solved_and_proxbp_tends_to_the_gradient():
  """Precision only changes the rounding: both layers are solved, and
  ProxBP's direction / τ is the gradient to first order in τ."""
  high = jax.lax.Precision.HIGHEST
  x, y = _data((8, 4))
  x = x.astype(jnp.float64)

  model = Stack(nnx.Linear(4, 5, precision=high, param_dtype=jnp.float64,
                           dtype=jnp.float64, rngs=_rngs()), 5,
                dtype=jnp.float64, precision=high)
  problems, grads, updates = _nnx_limit(model, x, y)
  assert [layer.kernel_path for layer in problems.layers] == [
      ('layers', 0, 'kernel'), ('layers', 1, 'kernel')]
  error = _relative_error(updates, grads, TAU)
  assert error < 1e-3, error

  module = LinenStack(nn.Dense(5, precision=high, param_dtype=jnp.float64,
                               dtype=jnp.float64),
                      precision=high, dtype=jnp.float64)
  params = module.init(jax.random.key(0), x)['params']
  problems, grads, updates = _linen_limit(module, params, x, y)
  assert [layer.kernel_path for layer in problems.layers] == [
      ('first', 'kernel'), ('Dense_0', 'kernel')]
  error = _relative_error(updates, grads, TAU)
  assert error < 1e-3, error


def test_linen_lifted_layer_is_still_solved():
  """``nn.remat(nn.Dense)`` subclasses Dense with a ``__call__`` of its own
  that applies Dense's: the call recorded is Dense's, and is solved."""
  x, y = _data((8, 4))
  module = LinenStack(nn.remat(nn.Dense)(5))
  params = module.init(jax.random.key(0), x)['params']
  problems = jax.eval_shape(
      lambda p: sibp_jax.linen.value_grad_and_problems(
          module, p, x, y, loss_fn=xent)[2], params)
  assert [layer.kernel_path for layer in problems.layers] == [
      ('first', 'kernel'), ('Dense_0', 'kernel')]


@pytest.mark.skipif(not hasattr(nnx, 'LoRALinear'), reason='no LoRALinear')
def test_flax_lora_linear_keeps_its_linear_solved():
  """Flax's own ``nnx.LoRALinear`` applies ``nnx.Linear``'s map through
  ``super()`` and adds its LoRA branch: the Linear is solved, the LoRA
  parameters are left to the gradient when asked."""
  x, y = _data((8, 4))
  graphdef, state = nnx.split(
      Stack(nnx.LoRALinear(4, 5, lora_rank=2, rngs=_rngs()), 5))
  problems = jax.eval_shape(
      lambda s: sibp_jax.nnx.value_grad_and_problems(
          nnx.merge(graphdef, s), x, y, loss_fn=xent,
          unsolved='gradient')[2], state)
  assert [layer.kernel_path for layer in problems.layers] == [
      ('layers', 0, 'kernel'), ('layers', 1, 'kernel')]
