"""The Flax adapters: what they record, nnx and linen agreeing, and errors."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sibp_jax

from _models import MLP
from _models import TRANSFORMS
from _models import LinenMLP
from _models import classification
from _models import jit_step_inputs
from _models import jit_updates
from _models import nnx_step
from _models import pure
from _models import step_inputs
from _models import transform
from _models import xent


def test_records_inputs_outputs_and_paths():
  model = MLP((6, 8, 5, 3))
  x, y = classification()
  loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=xent)
  assert [layer.kernel_path for layer in problems.layers] == [
      ('layers', i, 'kernel') for i in range(3)]
  f = x
  for layer, linear in zip(problems.layers, model.layers):
    g = f @ linear.kernel[...] + linear.bias[...]
    chex.assert_trees_all_close((layer.inputs, layer.outputs), (f, g),
                                rtol=1e-5, atol=1e-6)
    if layer.segment is not None:
      chex.assert_trees_all_close(layer.segment(g), jax.nn.relu(g))
    f = jax.nn.relu(g)
  logits = model(x)
  expected_error = jax.nn.softmax(logits) - jax.nn.one_hot(y, 3)
  chex.assert_trees_all_close(problems.output_error, expected_error,
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(loss, xent(logits, y).mean(), rtol=1e-6)
  expected_grads = nnx.grad(lambda m: xent(m(x), y).mean())(model)
  chex.assert_trees_all_close(pure(grads), pure(expected_grads), rtol=1e-5,
                              atol=1e-7)
  assert problems.layers[-1].segment is None


def test_segment_vjp_is_relu_derivative():
  model = MLP((6, 8, 3))
  _, _, problems = step_inputs(model, *classification())
  layer = problems.layers[0]
  ct = jnp.ones_like(layer.outputs)
  chex.assert_trees_all_close(layer.segment.vjp(layer.outputs, ct),
                              (layer.outputs > 0).astype(jnp.float32))


def test_sequential_and_other_activations_with_flatten():
  class Flat(nnx.Module):
    def __init__(self):
      self.a = nnx.Linear(12, 7, rngs=nnx.Rngs(0))
      self.b = nnx.Linear(7, 3, use_bias=False, rngs=nnx.Rngs(1))

    def __call__(self, x):
      h = jnp.tanh(self.a(x.reshape(x.shape[0], -1)))
      return self.b(h.reshape(h.shape[0], -1))

  model = Flat()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(9, 3, 4)),
                  jnp.float32)
  y = jnp.zeros((9,), jnp.int32)
  _, grads, params, problems = jit_step_inputs(model, x, y)
  assert problems.layers[1].bias_path is None
  g = problems.layers[0].outputs
  chex.assert_trees_all_close(problems.layers[0].segment(g), jnp.tanh(g),
                              rtol=1e-6)
  names = ('sibp_linearized', 'sibp_paper', 'proxbp_exact')
  out = jit_updates(names)(grads, params, problems)
  for name in names:
    chex.assert_tree_all_finite(out[name][0])


def _linen_params_from(model):
  return {
      f'dense_{i}': {'kernel': layer.kernel[...], 'bias': layer.bias[...]}
      for i, layer in enumerate(model.layers[:-1])} | {
          'out': {'kernel': model.layers[-1].kernel[...],
                  'bias': model.layers[-1].bias[...]}}


@functools.cache
def _nnx_and_linen_updates():
  """The first update of each transformation on the same MLP and batch,
  from the nnx adapter and from the linen one."""
  sizes = (6, 8, 5, 3)
  model = MLP(sizes, seed=3)
  x, y = classification(seed=3)
  module = LinenMLP(sizes)
  lparams = _linen_params_from(model)
  update = jit_updates(sorted(TRANSFORMS))
  _, grads, params, problems = jit_step_inputs(model, x, y)
  _, lgrads, lproblems = jax.jit(
      lambda params, x, y: sibp_jax.linen.value_grad_and_problems(
          module, params, x, y, loss_fn=xent))(lparams, x, y)
  return update(grads, params, problems), update(lgrads, lparams, lproblems)


@pytest.mark.parametrize('name', sorted(TRANSFORMS))
def test_nnx_and_linen_give_the_same_update(name):
  updates, lupdates = (out[name][0] for out in _nnx_and_linen_updates())
  for i in range(3):
    key = 'out' if i == 2 else f'dense_{i}'
    for leaf in ('kernel', 'bias'):
      np.testing.assert_allclose(lupdates[key][leaf],
                                 updates['layers'][i][leaf],
                                 rtol=1e-5, atol=1e-6)


def test_linen_accepts_variables_and_train_state():
  sizes = (6, 8, 3)
  module = LinenMLP(sizes)
  x, y = classification()
  variables = module.init(jax.random.key(0), x)
  tx = transform('sibp_linearized')  # sibp(0.1)
  _, grads, problems = sibp_jax.linen.value_grad_and_problems(
      module, variables, x, y, loss_fn=xent)
  assert problems.layers[0].kernel_path == ('params', 'dense_0', 'kernel')
  u1, _ = jit_updates(['sibp_linearized'])(
      grads, variables, problems)['sibp_linearized']

  state = sibp_jax.linen.TrainState.create(
      apply_fn=module.apply, params=variables['params'], tx=tx)

  @jax.jit
  def step(state, x, y):
    loss, grads, problems = sibp_jax.linen.value_grad_and_problems(
        module, state.params, x, y, loss_fn=xent)
    return state.apply_gradients(grads=grads, problems=problems), loss

  new_state, _ = step(state, x, y)
  assert int(new_state.step) == 1
  moved = jax.tree.map(jnp.subtract, new_state.params, state.params)
  chex.assert_trees_all_close(moved, u1['params'], rtol=1e-5, atol=1e-7)
  losses = []
  for _ in range(10):
    new_state, loss = step(new_state, x, y)
    losses.append(float(loss))
  assert losses[-1] < losses[0]


class Twice(nnx.Module):
  def __init__(self):
    self.a = nnx.Linear(6, 6, rngs=nnx.Rngs(0))
    self.b = nnx.Linear(6, 3, rngs=nnx.Rngs(1))

  def __call__(self, x):
    # Shared, but once per example and once per example and position.
    return self.b(jax.nn.relu(self.a(x)) +
                  jax.nn.relu(self.a(x[:, None, :])).mean(axis=1))


class ReadsKernel(nnx.Module):
  """``a``'s kernel also enters the logits directly, besides ``a``'s
  call: a use the sweep cannot see."""

  def __init__(self):
    self.a = nnx.Linear(6, 6, rngs=nnx.Rngs(0))
    self.b = nnx.Linear(6, 3, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.b(jax.nn.relu(self.a(x)) + self.a.kernel[...].mean(axis=0))


class SoftmaxAfter(nnx.Module):
  def __init__(self):
    self.a = nnx.Linear(6, 3, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return jax.nn.log_softmax(self.a(x))


class Branches(nnx.Module):
  def __init__(self):
    self.a = nnx.Linear(6, 6, rngs=nnx.Rngs(0))
    self.b = nnx.Linear(6, 3, rngs=nnx.Rngs(1))

  def __call__(self, x):
    self.a(x)  # computed, then ignored
    return self.b(jnp.ones_like(x))


class NoLinear(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.ones((6, 3)))

  def __call__(self, x):
    return x @ self.w[...]


class Grouped(nnx.Module):
  def __init__(self):
    self.a = nnx.Conv(2, 4, (3,), feature_group_count=2, rngs=nnx.Rngs(0))
    self.b = nnx.Linear(4, 3, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.b(self.a(x.reshape(x.shape[0], 3, 2)).mean(axis=1))


@pytest.mark.parametrize('model,match', [
    (Twice(), "'a' is applied more than once with inputs of different"),
    (SoftmaxAfter(), "output must be the output of its last linear layer"),
    (ReadsKernel(), "parameter 'a/kernel' of a linear layer is also used "
     "outside that layer's calls"),
    (Branches(), "output of layer 'a' does not reach any later linear layer"),
    (NoLinear(), r"parameters belong to no layer .*: 'w' \(NoLinear\)"),
    (Grouped(), "layer 'a': grouped convolutions"),
])
def test_unsupported_models_are_rejected(model, match):
  x, y = classification()
  with pytest.raises(ValueError, match=match):
    sibp_jax.nnx.value_grad_and_problems(model, x, y, loss_fn=xent)


@pytest.mark.parametrize('y,match', [
    (jnp.zeros((31,), jnp.int32), r'labels y have shape \(31,\) but x has '
                                  'batch 32'),
    (jnp.zeros((), jnp.int32), 'labels y have shape'),
])
def test_label_shape_errors(y, match):
  x, _ = classification()
  with pytest.raises(ValueError, match=match):
    sibp_jax.nnx.value_grad_and_problems(MLP((6, 8, 3)), x, y, loss_fn=xent)


def test_loss_must_be_per_example():
  x, y = classification()
  with pytest.raises(ValueError, match='one loss per example'):
    sibp_jax.nnx.value_grad_and_problems(
        MLP((6, 8, 3)), x, y, loss_fn=lambda z, y: xent(z, y).mean())


def test_empty_batch_is_an_error():
  with pytest.raises(ValueError, match='empty batch'):
    sibp_jax.nnx.value_grad_and_problems(
        MLP((6, 8, 3)), jnp.zeros((0, 6)), jnp.zeros((0,), jnp.int32),
        loss_fn=xent)


def test_problems_from_another_model_are_rejected():
  x, y = classification()
  _, _, problems = step_inputs(MLP((6, 8, 3)), x, y)
  other = MLP((6, 7, 3))
  grads, params, _ = step_inputs(other, x, y)
  tx = sibp_jax.sibp(0.1)
  with pytest.raises(ValueError, match='layer layers/0.*another model'):
    tx.update(grads, tx.init(params), params, problems=problems)

  grads, params, _ = step_inputs(MLP((6, 8, 3)), x, y)
  _, _, problems = step_inputs(_Renamed(), x, y)
  with pytest.raises(ValueError, match='layers first, second, none of whose'):
    tx.update(grads, tx.init(params), params, problems=problems)


class _Renamed(nnx.Module):
  def __init__(self):
    self.first = nnx.Linear(6, 8, rngs=nnx.Rngs(0))
    self.second = nnx.Linear(8, 3, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.second(jax.nn.relu(self.first(x)))


def test_problems_must_be_problems():
  x, y = classification()
  grads, params, _ = step_inputs(MLP((6, 8, 3)), x, y)
  tx = sibp_jax.sibp(0.1)
  with pytest.raises(ValueError, match='sibp_jax.Problems'):
    tx.update(grads, tx.init(params), params, problems={'layers': []})


def test_unowned_parameters_get_the_gradient():
  class Scaled(nnx.Module):
    def __init__(self):
      self.a = nnx.Linear(6, 8, rngs=nnx.Rngs(0))
      self.b = nnx.Linear(8, 3, rngs=nnx.Rngs(1))
      self.gain = nnx.Param(jnp.full((8,), 1.5))

    def __call__(self, x):
      return self.b(jax.nn.relu(self.a(x)) * self.gain[...])

  model = Scaled()
  x, y = classification()
  with pytest.raises(ValueError, match=r"no layer .*: 'gain'.*unsolved="):
    step_inputs(model, x, y)
  grads, params, problems = step_inputs(model, x, y, unsolved='gradient')
  direction, _ = sibp_jax.scale_by_proxbp().update(
      grads, sibp_jax.scale_by_proxbp().init(params), params,
      problems=problems)
  chex.assert_trees_all_equal(direction['gain'], grads['gain'])
  # The paper's plain gradient step (others=None), or Adam's (default).
  tx = sibp_jax.sibp(0.3, others=None)
  updates, _ = tx.update(grads, tx.init(params), params, problems=problems)
  chex.assert_trees_all_close(updates['gain'], -0.3 * grads['gain'],
                              rtol=1e-6)
  tx = sibp_jax.sibp(0.3)
  updates, _ = tx.update(grads, tx.init(params), params, problems=problems)
  chex.assert_trees_all_close(updates['gain'], -1e-3 * jnp.sign(
      grads['gain']), rtol=1e-3)
  assert not np.allclose(updates['a']['kernel'], 0.0)


def test_nnx_optimizer_and_apply_in_one_jit_match_eager():
  model = MLP((6, 8, 3))
  x, y = classification()
  grads, params, problems = step_inputs(model, x, y)
  tx = sibp_jax.sibp(0.1)
  eager, _ = tx.update(grads, tx.init(params), params, problems=problems)
  # transform('sibp_linearized') is sibp(0.1).
  opt = nnx.Optimizer(model, transform('sibp_linearized'), wrt=nnx.Param)
  nnx_step(xent)(model, opt, x, y)
  moved = jax.tree.map(jnp.subtract, pure(nnx.state(model, nnx.Param)),
                       params)
  chex.assert_trees_all_close(moved, eager, rtol=1e-5, atol=1e-7)


def test_does_not_leave_linear_patched():
  call = nnx.Linear.__call__
  step_inputs(MLP((6, 8, 3)), *classification())
  assert nnx.Linear.__call__ is call
  with pytest.raises(ValueError):
    sibp_jax.nnx.value_grad_and_problems(Twice(), *classification(),
                                         loss_fn=xent)
  assert nnx.Linear.__call__ is call


def test_optax_only_uses_are_unaffected():
  """Plain optax use of an nnx model is not intercepted."""
  model = MLP((6, 8, 3))
  x, y = classification()
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  grads = nnx.grad(lambda m: xent(m(x), y).mean())(model)
  opt.update(model, grads)
  chex.assert_tree_all_finite(pure(nnx.state(model)))


def test_unsolved_kernels_are_named():
  # An Einsum that is no dense map of its input, a LoRA adapter, a custom
  # module's own kernel: the error names the layer or every parameter no
  # layer solves and the module holding it.
  loss_fn = optax.softmax_cross_entropy_with_integer_labels
  x, y = jnp.ones((5, 4)), jnp.zeros((5,), jnp.int32)
  model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Einsum('bi,ji->bj', (3, 8), rngs=nnx.Rngs(1)))
  with pytest.raises(ValueError, match=(
      r"layer 'layers/2': einsum 'bi,ji->bj' is not a dense map")):
    sibp_jax.nnx.value_grad_and_problems(model, x, y, loss_fn=loss_fn)
  model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.LoRALinear(8, 3, lora_rank=2, rngs=nnx.Rngs(1)))
  with pytest.raises(ValueError, match=(
      r"'layers/2/lora/lora_a', 'layers/2/lora/lora_b' \(LoRA\)")):
    sibp_jax.nnx.value_grad_and_problems(model, x, y, loss_fn=loss_fn)

  class WithEinsum(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Einsum((3, 8), 'bi,ji->bj')(nn.relu(nn.Dense(8)(x)))

  params = WithEinsum().init(jax.random.key(0), x)['params']
  with pytest.raises(ValueError, match=(
      r"layer 'Einsum_0': einsum 'bi,ji->bj' is not a dense map")):
    sibp_jax.linen.value_grad_and_problems(WithEinsum(), params, x, y,
                                           loss_fn=loss_fn)

  class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param('w', nn.initializers.ones, (x.shape[-1], 8))
      return nn.Dense(3)(jnp.dot(x, w))

  params = Custom().init(jax.random.key(0), x)['params']
  with pytest.raises(ValueError, match=r"solves, .*: 'w' \(Custom\)"):
    sibp_jax.linen.value_grad_and_problems(Custom(), params, x, y,
                                           loss_fn=loss_fn)
  with pytest.raises(ValueError, match='unsolved must be one of'):
    sibp_jax.linen.value_grad_and_problems(Custom(), params, x, y,
                                           loss_fn=loss_fn, unsolved='grad')


def test_opted_in_unsolved_kernels_take_the_backprop_gradient():
  # With unsolved='gradient' a custom module's kernel takes exactly the
  # incoming gradient (ProxBP hands it on as it is), while the recognised
  # layers take their proximal step: tau * gradient to first order, which
  # for a small tau is far from the gradient itself.
  class Mix(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.asarray(
          np.random.default_rng(1).normal(size=(4, 4)), jnp.float32))

    def __call__(self, x):
      return jnp.einsum('btd,de->bte', x, self.w[...])

  class Attend(nnx.Module):
    def __init__(self):
      self.embed = nnx.Linear(4, 4, rngs=nnx.Rngs(2))
      self.mix = Mix()
      self.head = nnx.Linear(4, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
      return self.head(jax.nn.relu(self.mix(self.embed(x))).mean(1))

  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3, 4)),
                  jnp.float32)
  y = jnp.arange(6) % 3
  grads, params, problems = step_inputs(Attend(), x, y, unsolved='gradient')
  assert [layer.name for layer in problems.layers] == ['embed', 'head']
  tx = sibp_jax.scale_by_proxbp(1e-3)
  direction, _ = tx.update(grads, tx.init(params), params, problems=problems)
  chex.assert_trees_all_equal(direction['mix'], grads['mix'])
  chex.assert_trees_all_close(direction['head'], jax.tree.map(
      lambda g: 1e-3 * g, grads['head']), rtol=2e-2, atol=1e-7)


