"""The contract every transformation of sibp_jax keeps.

Most checks run every transformation on one architecture at once: the
updates of all of them come from one jax.jit program (on the regression
shapes: batch 64, width 16, 2 outputs) and their train steps from one
nnx.jit program (nnx_step over a dict of models and optimizers, on the
classification shapes: batch 64, width 16, 3 classes), which compiles much
faster than one program per transformation and check. Each assertion
names the transformation it is about.
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

from _models import ARCHS
from _models import MLP
from _models import TRACES
from _models import TRANSFORMS
from _models import arch_data
from _models import arch_model
from _models import find_info
from _models import jit_step_inputs
from _models import mse
from _models import nnx_step
from _models import pure
from _models import transform
from _models import xent

NAMES = sorted(TRANSFORMS)
# Fraction of the first loss that 25 full-batch steps must reach. The
# ResNet (BatchNorm after every conv, 4096 conv rows per layer at batch 64)
# moves slower at these settings; measured ratios after 25 steps
# (classification / regression): SIBP linearized 0.92 / 0.38, ProxBP exact
# 0.72 / 0.57, ProxBP cg3 0.73 / 0.57, SGD(0.1) 0.85 / 0.31.
LOWERS_TO = {'mlp': 0.7, 'convnet': 0.7, 'resnet': 0.95}


def _names(arch):
  """The transformations checked on ``arch``: the SIBP paper variant is
  defined on chains only and refuses the ResNet (tests/test_graph.py
  checks how)."""
  return tuple(n for n in NAMES
               if not (arch == 'resnet' and n == 'sibp_paper'))


@pytest.fixture(autouse=True)
def _paper_needs_a_chain(request):
  """The paper variant refuses the ResNet (tests/test_graph.py checks how)."""
  params = getattr(request.node, 'callspec', None)
  params = params.params if params else {}
  if params.get('arch') == 'resnet' and params.get('name') == 'sibp_paper':
    pytest.skip('the SIBP paper variant is defined on chains only')


def _traces_of(key, fn, *args):
  """``fn(*args)`` and the number of times it traced the program ``key``."""
  before = TRACES[key]
  out = fn(*args)
  return out, TRACES[key] - before


# Unknown keyword arguments are dropped where `update` starts, before
# anything that depends on the model, so the MLP's programs check that for
# every transformation; the other architectures' programs leave it out
# (on the ResNet a second update per transformation lengthens tracing).
_EXTRA_ARCH = 'mlp'


def _update(arch, dtype=jnp.float32):
  """``update(inputs) -> {name: (plain, extra)}`` under one jax.jit for the
  transformations of ``arch``: ``inputs[name]`` is ``(grads, state,
  params, problems)``, ``plain`` the ``(updates, state)`` of
  ``transform(name)`` and ``extra`` the same update given unknown keyword
  arguments as well (on ``_EXTRA_ARCH`` in float32; ``None`` otherwise).
  Traces are counted in ``TRACES['contract_update', arch, dtype]`` (dtype
  by name)."""
  return _update_program(arch, jnp.dtype(dtype).name)


@functools.cache  # one key per program: the dtype by name
def _update_program(arch, dtype):
  names = _names(arch)
  extra = arch == _EXTRA_ARCH and dtype == 'float32'

  @jax.jit
  def update(inputs):
    TRACES['contract_update', arch, dtype] += 1
    out = {}
    for name in names:
      tx = transform(name)
      grads, state, params, problems = inputs[name]
      out[name] = (
          tx.update(grads, state, params, problems=problems),
          tx.update(grads, state, params, problems=problems, loss=1.0,
                    something_else='x') if extra else None)
    return out

  return update


def _update_model(arch, dtype=jnp.float32):
  """The model of the update checks (the regression shapes)."""
  return arch_model(arch, 2, hidden=16, dtype=dtype)


def _update_data(arch, seed=0, task='classification'):
  return arch_data(arch, task, batch=64, seed=seed, out=2)


@functools.cache
def _inputs(arch, dtype=jnp.float32):
  """(grads, params, problems) at the update checks' model and batch."""
  x, y = _update_data(arch)
  _, grads, params, problems = jit_step_inputs(
      _update_model(arch, dtype), x.astype(dtype), y)
  return grads, params, problems


def _same_inputs(names, grads, params, problems):
  return {n: (grads, transform(n).init(params), params, problems)
          for n in names}


@functools.cache
def _first_updates(arch, dtype=jnp.float32):
  """``{name: (plain, extra)}``: each transformation's first update at
  ``_inputs(arch, dtype)`` (``extra`` in float32 only)."""
  return _update(arch, dtype)(_same_inputs(_names(arch),
                                           *_inputs(arch, dtype)))


def _train_model(arch):
  """The model of the train-step checks (the classification shapes)."""
  return arch_model(arch, hidden=16)


def _train_data(arch, seed=4):
  return arch_data(arch, batch=64, seed=seed)


def _fresh(arch):
  """A model and an nnx.Optimizer for each transformation, as dicts."""
  models = {n: _train_model(arch) for n in _names(arch)}
  opts = {n: nnx.Optimizer(models[n], transform(n), wrt=nnx.Param)
          for n in models}
  return models, opts


def test_ignores_unknown_extra_args():
  for name, (plain, extra) in _first_updates(_EXTRA_ARCH).items():
    chex.assert_trees_all_equal(plain, extra, custom_message=name)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('arch', ARCHS)
def test_missing_problems_says_what_to_pass(arch, name):
  tx = transform(name)
  grads, params, _ = _inputs(arch)
  with pytest.raises(ValueError, match='problems=.*value_grad_and_problems'):
    tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('arch', ARCHS)
def test_missing_params_is_an_error(arch, name):
  tx = transform(name)
  grads, params, problems = _inputs(arch)
  with pytest.raises(ValueError, match='params'):
    tx.update(grads, tx.init(params), None, problems=problems)


@pytest.mark.parametrize('arch', ARCHS)
def test_second_jitted_step_does_not_recompile(arch):
  """Problems from a forward pass outside the jitted update: the update is
  traced at most once (by the first call), never again for later batches
  and states."""
  names = _names(arch)
  models = {n: _update_model(arch) for n in names}
  params = {n: pure(nnx.state(models[n], nnx.Param)) for n in names}
  states = {n: transform(n).init(params[n]) for n in names}
  for seed in range(3):
    x, y = _update_data(arch, seed)
    inputs = {}
    for n in names:
      _, grads, _, problems = jit_step_inputs(models[n], x, y)
      inputs[n] = (grads, states[n], params[n], problems)
    out, traced = _traces_of(('contract_update', arch, 'float32'),
                             _update(arch), inputs)
    assert traced <= (1 if seed == 0 else 0), (seed, traced)
    for n in names:
      (updates, states[n]), _ = out[n]
      params[n] = optax.apply_updates(params[n], updates)
      nnx.update(models[n], params[n])
  for n in names:
    chex.assert_tree_all_finite(params[n])


@pytest.mark.parametrize('arch', ARCHS)
def test_train_step_does_not_recompile(arch):
  models, opts = _fresh(arch)
  for seed in range(3):
    _, traced = _traces_of(('nnx_step', xent), nnx_step(xent), models, opts,
                           *_train_data(arch, seed))
    assert traced <= (1 if seed == 0 else 0), (seed, traced)


FACTORIES = {
    'sibp': (sibp_jax.sibp, {}),
    'sibp_paper': (sibp_jax.sibp, {'variant': 'paper'}),
    'proxbp': (sibp_jax.proxbp, {'tau_prox': 0.05}),
}


@pytest.mark.parametrize('arch', ARCHS)
def test_works_under_inject_hyperparams_with_schedule(arch):
  schedule = optax.linear_schedule(0.2, 0.05, transition_steps=4)
  kinds = [k for k in FACTORIES if not (arch == 'resnet' and 'paper' in k)]
  models = {k: arch_model(arch) for k in kinds}
  opts = {}
  for k in kinds:
    factory, kwargs = FACTORIES[k]
    tx = optax.inject_hyperparams(factory)(learning_rate=schedule, **kwargs)
    opts[k] = nnx.Optimizer(models[k], tx, wrt=nnx.Param)
  x, y = arch_data(arch)
  losses = {k: [] for k in kinds}
  rates = {k: [] for k in kinds}
  for _ in range(4):
    for k, loss in nnx_step(xent)(models, opts, x, y).items():
      losses[k].append(float(loss))
      rates[k].append(float(opts[k].opt_state.hyperparams['learning_rate'][
          ...]))
  for k in kinds:
    np.testing.assert_allclose(rates[k], [schedule(i) for i in range(4)],
                               rtol=1e-6, err_msg=k)
    assert losses[k][-1] < losses[k][0], (k, losses[k])


@functools.cache
def _small_mlp_updates():
  """First updates of a few settings on a 6-8-3 MLP, from one program."""
  _, grads, params, problems = jit_step_inputs(MLP((6, 8, 3)),
                                               *arch_data('mlp'))
  txs = {
      'sibp_constant': sibp_jax.sibp(0.3),
      'sibp_schedule': sibp_jax.sibp(optax.constant_schedule(0.3)),
      'scale_by_sibp': sibp_jax.scale_by_sibp(0.1),
      'scale_by_proxbp_cg4': sibp_jax.scale_by_proxbp(
          solver=sibp_jax.ConjugateGradient(4)),
      'scale_by_sibp_paper': sibp_jax.scale_by_sibp(0.1, variant='paper'),
  }

  @jax.jit
  def updates(grads, params, problems):
    return {k: tx.update(grads, tx.init(params), params, problems=problems)
            for k, tx in txs.items()}

  return updates(grads, params, problems)


def test_sibp_learning_rate_schedule_is_used_in_the_sweep():
  """A schedule equal to a constant gives the constant's update."""
  out = _small_mlp_updates()
  chex.assert_trees_all_close(out['sibp_constant'][0],
                              out['sibp_schedule'][0], rtol=1e-6)


# bfloat16 on the MLP: tests/test_reliability.py's
# test_bfloat16_solves_run_in_float32 checks the same (dtypes, finite
# updates and info) for every transformation, and the updates' closeness to
# float32.
@pytest.mark.parametrize(('arch', 'dtype'), [
    *[(a, jnp.float32) for a in ARCHS],
    *[(a, jnp.bfloat16) for a in ARCHS if a != 'mlp']])
def test_keeps_parameter_dtypes(arch, dtype):
  _, params, _ = _inputs(arch, dtype)
  for name, ((updates, state), _) in _first_updates(arch, dtype).items():
    chex.assert_trees_all_equal_dtypes(updates, params, custom_message=name)
    chex.assert_tree_all_finite(updates)
    assert bool(find_info(state).finite), name


@pytest.mark.parametrize('arch', ARCHS)
def test_lowers_loss_on_classification(arch):
  """25 steps of the nnx.jit train step, through nnx.Optimizer."""
  x, y = _train_data(arch)
  models, opts = _fresh(arch)
  losses = {n: [] for n in models}
  for _ in range(25):
    for n, loss in nnx_step(xent)(models, opts, x, y).items():
      losses[n].append(float(loss))
  for n in models:
    assert losses[n][-1] < LOWERS_TO[arch] * losses[n][0], (n, losses[n])
    info = find_info(opts[n].opt_state)
    assert bool(info.finite), n


@pytest.mark.parametrize('arch', ARCHS)
def test_lowers_loss_on_regression(arch):
  """25 steps of the jitted update, on problems from a jitted forward
  pass."""
  x, y = _update_data(arch, seed=5, task='regression')
  names = _names(arch)
  models = {n: _update_model(arch) for n in names}
  states = {n: transform(n).init(pure(nnx.state(models[n], nnx.Param)))
            for n in names}
  losses = {n: [] for n in names}
  for _ in range(25):
    inputs = {}
    for n in names:
      loss, grads, params, problems = jit_step_inputs(models[n], x, y, mse)
      inputs[n] = (grads, states[n], params, problems)
      losses[n].append(float(loss))
    out = _update(arch)(inputs)
    for n in names:
      (updates, states[n]), _ = out[n]
      nnx.update(models[n], optax.apply_updates(inputs[n][2], updates))
  for n in names:
    assert losses[n][-1] < LOWERS_TO[arch] * losses[n][0], (n, losses[n])


@pytest.mark.parametrize('bad', [np.nan, np.inf])
@pytest.mark.parametrize('arch', ARCHS)
def test_non_finite_batch_leaves_parameters_unchanged(arch, bad):
  models, opts = _fresh(arch)
  step = nnx_step(xent)
  x, y = _train_data(arch, seed=0)
  step(models, opts, x, y)  # a good step first, so momentum is non-zero
  before = {n: jax.tree.map(jnp.copy, pure(nnx.state(m, nnx.Param)))
            for n, m in models.items()}
  opt_before = {n: jax.tree.map(jnp.copy, pure(o.opt_state))
                for n, o in opts.items()}
  step(models, opts, x.at[3, 2].set(bad), y)
  for n in models:
    chex.assert_trees_all_equal(pure(nnx.state(models[n], nnx.Param)),
                                before[n], custom_message=n)
    assert not bool(find_info(opts[n].opt_state).finite), n
    # ProxBP's outer optimizer (Nesterov momentum) is held exactly as it
    # was.
    after = pure(opts[n].opt_state)
    if isinstance(after, sibp_jax.SkipOnBadStepState):
      chex.assert_trees_all_equal(after.outer, opt_before[n].outer,
                                  custom_message=n)
  # A good batch afterwards trains again.
  step(models, opts, x, y)
  for n in models:
    assert bool(find_info(opts[n].opt_state).finite), n
    assert not all(bool(jnp.array_equal(a, b)) for a, b in zip(
        jax.tree.leaves(pure(nnx.state(models[n], nnx.Param))),
        jax.tree.leaves(before[n]))), n


@pytest.mark.parametrize('arch', ARCHS)
def test_zero_output_error_gives_zero_update(arch):
  """At a point where every example's output error is zero, nothing moves."""
  model = _update_model(arch)
  x, y = _update_data(arch, task='regression')
  # The targets are the outputs z of the same program on the same inputs,
  # which the model then fits exactly: e = 2(z - y) = 0.
  targets = jit_step_inputs(model, x, y, mse)[-1].layers[-1].outputs
  _, grads, params, problems = jit_step_inputs(model, x, targets, mse)
  assert float(jnp.abs(problems.output_error).max()) == 0.0
  names = _names(arch)
  out = _update(arch)(_same_inputs(names, grads, params, problems))
  for name, ((updates, _), _) in out.items():
    for leaf in jax.tree.leaves(updates):
      assert float(jnp.abs(leaf).max()) == 0.0, name


@pytest.mark.parametrize('build', [
    lambda: sibp_jax.sibp(0.0),
    lambda: sibp_jax.sibp(-1.0),
    lambda: sibp_jax.sibp(float('nan')),
    lambda: sibp_jax.sibp(0.1, lambda_w=0.0),
    lambda: sibp_jax.sibp(0.1, lambda_b=-1.0),
    lambda: sibp_jax.scale_by_proxbp(0.0),
    lambda: sibp_jax.proxbp(-1.0),
])
def test_rejects_out_of_range_hyperparameters(build):
  with pytest.raises(ValueError, match='must be a positive'):
    build()


def test_rejects_unknown_variant_and_solver():
  with pytest.raises(ValueError, match='variant'):
    sibp_jax.sibp(0.1, variant='exact')
  with pytest.raises(ValueError, match='solver'):
    sibp_jax.sibp(0.1, solver='lu')
  with pytest.raises(ValueError, match='NonlinearCG'):
    sibp_jax.sibp(0.1, variant='paper', solver='exact')


def test_state_reports_diagnostics():
  out = _small_mlp_updates()
  # Exact solves show round-off; 4 CG steps on 9 unknowns per column a
  # clearly larger, still small, residual.
  # Per layer, keyed by the layers' names.
  for key, iterations, bounds in [
      ('scale_by_sibp', 0, (0.0, 1e-4)),
      ('scale_by_proxbp_cg4', 4, (1e-5, 0.1))]:
    _, state = out[key]
    assert int(state.count) == 1
    assert bool(state.info.finite)
    assert sorted(state.info.iterations) == ['layers/0', 'layers/1']
    for name, its in state.info.iterations.items():
      assert int(its) == iterations, (key, name)
      assert bounds[0] <= float(state.info.residual[name]) < bounds[1]
  _, state = out['scale_by_sibp_paper']
  # Hidden layer: weights and bias, ≥ 1 + 5 evaluations each; the last
  # layer is solved exactly.
  assert int(state.info.iterations['layers/0']) >= 12
  assert int(state.info.iterations['layers/1']) == 0
