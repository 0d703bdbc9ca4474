"""The sweep over a graph: residual networks with normalisation and dropout.

Held to: a NumPy float64 transcription of the graph sweep (docs/algorithms.md)
for a tiny residual net; the backprop limits (ProxBP's direction / τ → ∇J as
τ → 0, SIBP linearized's update · λ / (ηB) → -∇J as λ → ∞) for every owned
parameter, which prove that the error accumulated over the graph is
backprop's; nnx and linen agreeing; BatchNorm statistics and dropout masks
those of the forward pass.
"""

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
from _models import LinenResNet
from _models import ResNet
from _models import arch_data
from _models import batch_norm
from _models import classification
from _models import find_info
from _models import jit_step_inputs
from _models import jit_updates
from _models import linen_variables_from
from _models import nnx_step
from _models import pure
from _models import transform
from _models import xent


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


class ResMLP(nnx.Module):
  """stem; a block with a projection shortcut and BatchNorm; an identity
  block; head. Linear layers in call order: stem, d1, d2, proj, d3, head."""

  def __init__(self, dtype=jnp.float64, seed=0, norm='batch', dropout=0.0):
    rngs = nnx.Rngs(seed)
    kw = dict(rngs=rngs, param_dtype=dtype, dtype=dtype)
    self.stem = nnx.Linear(4, 5, **kw)
    self.d1 = nnx.Linear(5, 3, **kw)
    if norm == 'batch':
      self.norm = batch_norm(3, **kw)
    elif norm == 'layer':
      self.norm = nnx.LayerNorm(3, **kw)
    else:
      self.norm = nnx.GroupNorm(3, num_groups=1, **kw)
    self.d2 = nnx.Linear(3, 3, **kw)
    self.proj = nnx.Linear(5, 3, **kw)
    self.d3 = nnx.Linear(3, 3, **kw)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(3, 2, **kw)

  def __call__(self, x):
    h0 = self.stem(x)
    w = jax.nn.relu(self.norm(self.d1(jax.nn.relu(h0))))
    out1 = self.d2(w) + self.proj(h0)
    out2 = out1 + self.d3(jax.nn.relu(out1))
    return self.head(self.drop(jax.nn.relu(out2)))


def _numpy_sweep(model, x, e, rule, eta=0.3, lam_w=0.7, lam_b=1.3,
                 tau=0.2):
  """The graph sweep for :class:`ResMLP`, by hand, in float64.

  Reverse accumulation over the graph, with each layer's ridge solve
  ``ΔX = (FᵀF + Λ)⁻¹ Fᵀ R`` (``F = [f, 1]``): ``R = -η e_g``, ``Λ =
  diag(λ_W, λ_b)`` and the error chained through the new weights for
  SIBP; ``R = -e_g / B``, ``Λ = I / τ`` and the old weights for ProxBP.
  """
  p = {name: (np.asarray(getattr(model, name).kernel[...]),
              np.asarray(getattr(model, name).bias[...]))
       for name in ('stem', 'd1', 'd2', 'proj', 'd3', 'head')}
  gamma = np.asarray(model.norm.scale[...])
  beta = np.asarray(model.norm.bias[...])
  eps = model.norm.epsilon
  relu = lambda a: np.maximum(a, 0.0)
  lin = lambda name, f: f @ p[name][0] + p[name][1]
  x = np.asarray(x, np.float64)
  batch = x.shape[0]
  h0 = lin('stem', x)
  a1 = relu(h0)
  u = lin('d1', a1)
  mu, var = u.mean(0), u.var(0)
  s = np.sqrt(var + eps)
  xhat = (u - mu) / s
  v = gamma * xhat + beta
  w = relu(v)
  out1 = lin('d2', w) + lin('proj', h0)
  a2 = relu(out1)
  out2 = out1 + lin('d3', a2)
  a3 = relu(out2)
  inputs = {'stem': x, 'd1': a1, 'd2': w, 'proj': h0, 'd3': a2, 'head': a3}
  updates = {}

  def solve(name, e_g):
    f = inputs[name]
    design = np.concatenate([f, np.ones((batch, 1))], axis=1)
    if rule == 'linearized':
      residual = -eta * e_g
      lam = np.diag([lam_w] * f.shape[1] + [lam_b])
    else:
      residual = -e_g / batch
      lam = np.eye(f.shape[1] + 1) / tau
    delta = np.linalg.solve(design.T @ design + lam, design.T @ residual)
    updates[name] = (delta[:-1], delta[-1])
    chain = p[name][0] + delta[:-1] if rule == 'linearized' else p[name][0]
    return e_g @ chain.T  # the error on the layer's input

  e_a3 = solve('head', np.asarray(e, np.float64))
  e_out2 = e_a3 * (out2 > 0)
  e_a2 = solve('d3', e_out2)
  e_out1 = e_out2 + e_a2 * (out1 > 0)
  e_h0 = solve('proj', e_out1)
  e_v = solve('d2', e_out1) * (v > 0)
  # BatchNorm with batch statistics: the VJP through mean and variance.
  e_xhat = e_v * gamma
  e_u = (e_xhat - e_xhat.mean(0) - xhat * (e_xhat * xhat).mean(0)) / s
  e_h0 = e_h0 + solve('d1', e_u) * (h0 > 0)
  solve('stem', e_h0)
  return updates


@jax.jit
def _directions(taus, sibp_hyper, cases):
  """For each case ``(grads, params, problems)`` of the dict ``cases``:
  ProxBP's direction at each τ of ``taus`` and SIBP linearized's at each row
  ``(η, λ_W, λ_b)`` of ``sibp_hyper`` (either may be ``None``), from the
  initial states, stacked along a leading axis. One program for all cases
  and values (τ, η and λ are traced)."""

  def directions(grads, params, problems):
    def direction(tx):
      return tx.update(grads, tx.init(params), params, problems=problems)[0]

    prox = sibp = None
    if taus is not None:
      prox = jax.vmap(lambda tau: direction(sibp_jax.scale_by_proxbp(tau)))(
          taus)
    if sibp_hyper is not None:
      sibp = jax.vmap(lambda h: direction(sibp_jax.scale_by_sibp(
          h[0], lambda_w=h[1], lambda_b=h[2])))(sibp_hyper)
    return prox, sibp

  return {k: directions(*case) for k, case in cases.items()}


def _at(tree, k):
  return jax.tree.map(lambda a: a[k], tree)


@functools.cache
def _transcription_case():
  """The tiny residual net's inputs, and its ProxBP (τ = 0.2) and SIBP
  linearized (η = 0.3, λ_W = 0.7, λ_b = 1.3) directions, in float64."""
  with jax.enable_x64(True):
    model = ResMLP()
    x, y = classification(batch=7, d_in=4, classes=2, seed=1)
    x = x.astype(jnp.float64)
    start = ResMLP()
    _, grads, params, problems = jit_step_inputs(model, x, y)
    prox, sibp = _directions(jnp.asarray([0.2]),
                             jnp.asarray([[0.3, 0.7, 1.3]]),
                             {'': (grads, params, problems)})['']
    return start, x, grads, problems, {'proxbp': _at(prox, 0),
                                       'linearized': _at(sibp, 0)}


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('rule', ['linearized', 'proxbp'])
def test_graph_sweep_matches_a_numpy_transcription(rule):
  start, x, grads, problems, directions = _transcription_case()
  direction = directions[rule]
  # SIBP's direction is -ΔX / η, ProxBP's -ΔX.
  scale = -0.3 if rule == 'linearized' else -1.0
  expected = _numpy_sweep(start, x, problems.output_error, rule)
  for name, (dk, db) in expected.items():
    # float64 on both sides: agreement to round-off of the solves.
    np.testing.assert_allclose(scale * direction[name]['kernel'], dk,
                               rtol=1e-9, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(scale * direction[name]['bias'], db,
                               rtol=1e-9, atol=1e-12, err_msg=name)
  # Normalisation parameters are owned by no linear layer: their gradient.
  chex.assert_trees_all_equal(direction['norm'], grads['norm'])


def _resmlp(norm):
  return lambda: ResMLP(norm=norm, dropout=0.3, seed=2)


def _resnet():
  return ResNet(dtype=jnp.float64, seed=2)


MODELS = {
    'resmlp_batchnorm_dropout': (_resmlp('batch'), 4),
    'resmlp_layernorm_dropout': (_resmlp('layer'), 4),
    'resmlp_groupnorm_dropout': (_resmlp('group'), 4),
    'resnet_batchnorm': (_resnet, 'image'),
}


def _data(kind):
  if kind == 'image':
    x, y = arch_data('resnet', batch=12, seed=3)
  else:
    x, y = classification(batch=24, d_in=kind, classes=2, seed=3)
  return x.astype(jnp.float64), y


def _owned(problems):
  return {path[:-1] for layer in problems.layers
          for path in (layer.kernel_path, layer.bias_path) if path}


def _leaves(tree):
  return {tuple(sibp_jax._src.problems.key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


TAUS = (1e-5, 1e-6)
LAMBDAS = (1e5, 1e6)
ETA = 0.5


@functools.cache
def _limits():
  """For each of MODELS, in float64: grads, problems, ProxBP's directions at
  TAUS and SIBP linearized's (η = ETA, λ_W = λ_b = λ) at LAMBDAS, from one
  program."""
  with jax.enable_x64(True):
    cases = {}
    for name, (make, kind) in MODELS.items():
      _, grads, params, problems = jit_step_inputs(make(), *_data(kind))
      cases[name] = (grads, params, problems)
    out = _directions(
        jnp.asarray(TAUS), jnp.asarray([[ETA, lam, lam] for lam in LAMBDAS]),
        cases)
  return {name: (grads, problems,
                 [_at(out[name][0], k) for k in range(len(TAUS))],
                 [_at(out[name][1], k) for k in range(len(LAMBDAS))])
          for name, (grads, _, problems) in cases.items()}


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('name', sorted(MODELS))
def test_proxbp_small_tau_is_the_gradient_on_residual_nets(name):
  """τ → 0: ProxBP's direction / τ → ∇J for every owned parameter.

  The first-order term of each layer's proximal step is τ times that
  layer's backprop gradient, so this holds only if the error reaching each
  layer is backprop's: summed over residual branches and pulled back through
  BatchNorm's batch statistics and the forward pass's dropout mask.
  """
  grads, problems, directions, _ = _limits()[name]
  owned = _owned(problems)
  errors = []
  for tau, direction in zip(TAUS, directions):
    worst = 0.0
    for path, d in _leaves(direction).items():
      g = _leaves(grads)[path]
      if path[:-1] in owned:
        worst = max(worst, float(jnp.abs(d / tau - g).max()))
      else:
        chex.assert_trees_all_equal(d, g)
    errors.append(worst)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
  # First order: the gap is O(τ‖FᵀF‖) relative and shrinks with τ.
  assert errors[1] < 1e-3 * scale, errors
  assert errors[1] < 0.2 * errors[0], errors


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('name', sorted(MODELS))
def test_sibp_large_lambda_is_an_sgd_step_on_residual_nets(name):
  """λ → ∞: ΔX → -(η B / λ) ∇J for every owned parameter."""
  grads, problems, _, directions = _limits()[name]
  owned = _owned(problems)
  batch = problems.batch_size
  errors = []
  for lam, direction in zip(LAMBDAS, directions):
    worst = scale = 0.0
    for path, d in _leaves(direction).items():
      if path[:-1] not in owned:
        continue
      # direction = -ΔX / η → B ∇J / λ. Relative to the largest entry: a
      # bias just before BatchNorm has a zero gradient.
      sgd = batch / lam * _leaves(grads)[path]
      worst = max(worst, float(jnp.abs(d - sgd).max()))
      scale = max(scale, float(jnp.abs(sgd).max()))
    errors.append(worst / scale)
  assert errors[1] < 1e-3, errors
  assert errors[1] < 0.2 * errors[0], errors


def test_chain_update_is_unchanged_by_the_graph_sweep():
  """On a chain, the graph sweep gives the segment sweep's update.

  Every transformation (the paper variant, which sweeps the segments
  either way, too), from one program per kind of problems; the nnx one is
  also tests/test_adapters.py's (same shapes).
  """
  model = MLP((6, 8, 5, 3), seed=4)
  x, y = classification(seed=4)
  _, grads, params, problems = jit_step_inputs(model, x, y)
  chain = sibp_jax.Problems(problems.layers, problems.output_error)
  update = jit_updates(sorted(TRANSFORMS))
  a = update(grads, params, problems)
  b = update(grads, params, chain)
  for name in sorted(TRANSFORMS):
    # float32 round-off: the same operations in another program.
    chex.assert_trees_all_close(a[name][0], b[name][0], rtol=1e-5,
                                atol=1e-7, custom_message=name)
    # The per-layer report reaches the state through the graph sweep too.
    info_a, info_b = find_info(a[name][1]), find_info(b[name][1])
    chex.assert_trees_all_equal(
        (info_a.status, info_a.iterations), (info_b.status, info_b.iterations),
        custom_message=name)
    chex.assert_trees_all_close(info_a.residual, info_b.residual, rtol=1e-4,
                                custom_message=name)
  # A solve handed to Ridge's fallback says so through the graph sweep.
  tx = sibp_jax.scale_by_proxbp(solver=sibp_jax.Ridge(max_factor=2))
  _, state = jax.jit(functools.partial(tx.update, problems=problems))(
      grads, tx.init(params), params)
  assert sorted(state.info.status) == sorted(
      layer.name for layer in problems.layers)
  for name, status in state.info.status.items():
    assert int(status) >= sibp_jax.SolveStatus.FALLBACK, name
    assert int(state.info.iterations[name]) > 0, name


def test_paper_variant_refuses_a_graph_and_takes_a_chain_with_norm():
  # transform('sibp_paper') is sibp(0.1, variant='paper').
  update = jit_updates(['sibp_paper'])
  _, grads, params, problems = jit_step_inputs(ResNet(), *arch_data('resnet'))
  with pytest.raises(ValueError, match="output of layer 'stem' does not "
                                       'feed the next layer alone'):
    update(grads, params, problems)

  class NormChain(nnx.Module):
    def __init__(self):
      self.a = nnx.Linear(6, 8, rngs=nnx.Rngs(0))
      self.norm = nnx.LayerNorm(8, rngs=nnx.Rngs(0))
      self.b = nnx.Linear(8, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
      return self.b(jax.nn.relu(self.norm(self.a(x))))

  _, grads, params, problems = jit_step_inputs(NormChain(), *classification())
  assert problems.layers[0].segment is not None
  updates, _ = update(grads, params, problems)['sibp_paper']
  chex.assert_tree_all_finite(updates)


def test_nnx_batch_stats_are_those_of_a_plain_forward_pass():
  model = ResNet(seed=1)
  reference = nnx.clone(model)
  x, y = arch_data('resnet', seed=1)
  opt = nnx.Optimizer(model, transform('sibp_linearized'), wrt=nnx.Param)
  nnx_step(xent)(model, opt, x, y)
  reference(x)
  stats = pure(nnx.state(model, nnx.BatchStat))
  chex.assert_trees_all_close(stats, pure(nnx.state(reference, nnx.BatchStat)),
                              rtol=1e-6, atol=1e-7)
  # The statistics moved (momentum 0.9 from mean 0, var 1).
  assert float(jnp.abs(stats['stem_bn']['var'] - 1.0).max()) > 1e-3


def test_nnx_dropout_mask_is_the_forward_passes():
  """The replay draws the forward pass's bits: ProxBP at small τ (float32)
  gives the gradient's direction for the layers below the dropout, which a
  fresh mask would move off by tens of percent (d1's bias, just before
  BatchNorm, has no gradient and is left out)."""
  model = ResMLP(dtype=jnp.float32, dropout=0.5, seed=5)
  x, y = classification(batch=64, d_in=4, classes=2, seed=5)
  _, grads, params, problems = jit_step_inputs(model, x, y)
  prox, _ = _directions(jnp.asarray([1e-4]), None,
                        {'': (grads, params, problems)})['']
  direction = _at(prox, 0)
  for name, leaf in [('stem', 'bias'), ('stem', 'kernel'), ('d1', 'kernel'),
                     ('proj', 'bias'), ('d3', 'kernel')]:
    a = np.ravel(direction[name][leaf])
    b = np.ravel(grads[name][leaf])
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cos > 0.999, (name, leaf, cos)


# The transformations run end to end from both adapters: SIBP's and ProxBP's
# rules, which pull the error back through the adapters' segments, with an
# exact solve and with CG. Every transformation is a function of (grads,
# params, problems), which the test compares leaf by leaf; the other solver
# of each rule would add compile time only.
_END_TO_END = ('sibp_linearized', 'proxbp_cg3')


@functools.cache
def _nnx_and_linen_on_a_resnet():
  """From the nnx adapter and from the linen one, on the same ResNet and
  batch: gradients, problems, the first update of each of _END_TO_END,
  and the BatchNorm statistics after the forward pass."""
  model = ResNet(seed=6)
  variables = linen_variables_from(model)
  x, y = arch_data('resnet', seed=6)
  update = jit_updates(_END_TO_END)
  _, grads, params, problems = jit_step_inputs(model, x, y)
  updates = update(grads, params, problems)

  module = LinenResNet()

  @jax.jit
  def linen_step_inputs(params, batch_stats, x, y):
    return sibp_jax.linen.value_grad_and_problems(
        module, params, x, y, loss_fn=xent,
        model_state={'batch_stats': batch_stats}, mutable=['batch_stats'])

  _, lgrads, lproblems, updated = linen_step_inputs(
      variables['params'], variables['batch_stats'], x, y)
  lupdates = update(lgrads, variables['params'], lproblems)
  return ((dict(grads), problems, updates, dict(
      pure(nnx.state(model, nnx.BatchStat)))),
          (lgrads, lproblems, lupdates, updated['batch_stats']))


def test_nnx_and_linen_give_the_same_problems_and_updates_on_a_resnet():
  nnx_out, linen_out = _nnx_and_linen_on_a_resnet()
  grads, problems, updates, stats = nnx_out
  lgrads, lproblems, lupdates, lstats = linen_out
  # float32 round-off of two programs computing the same forward pass.
  chex.assert_trees_all_close(lgrads, grads, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(lstats, stats, rtol=1e-5, atol=1e-7)
  # The same layer problems (the segments between them hold each adapter's
  # own module state; the updates below run through them).
  assert len(lproblems.layers) == len(problems.layers) == 7
  for a, b in zip(lproblems.layers, problems.layers):
    assert (a.kind, a.kernel_path, a.bias_path) == (
        b.kind, b.kernel_path, b.bias_path)
    chex.assert_trees_all_close((a.inputs, a.outputs), (b.inputs, b.outputs),
                                rtol=1e-5, atol=1e-6, custom_message=a.name)
  chex.assert_trees_all_close(lproblems.output_error, problems.output_error,
                              rtol=1e-5, atol=1e-7)
  for name in _END_TO_END:
    # The solves amplify that round-off.
    chex.assert_trees_all_close(lupdates[name][0], dict(updates[name][0]),
                                rtol=2e-4, atol=1e-6, custom_message=name)


def test_linen_batch_stats_dropout_and_call_arguments_in_a_train_state():
  """linen: rngs, mutable and call arguments as module.apply takes them;
  TrainState carries batch_stats as flax's ImageNet example does."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train, *, rate=0.5):
      h = nn.Dense(8)(x)
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
      h = h + nn.Dense(8)(nn.relu(h))
      h = nn.Dropout(rate, deterministic=not train)(nn.relu(h))
      return nn.Dense(3)(h)

  module = Net()
  x, y = classification(batch=32, seed=7)
  variables = module.init(jax.random.key(0), x, False)
  tx = sibp_jax.proxbp(1.0, tau_prox=1e-4, momentum=None)
  state = sibp_jax.linen.TrainState.create(
      apply_fn=module.apply, params=variables['params'], tx=tx,
      batch_stats=variables['batch_stats'])
  key = jax.random.key(1)

  @jax.jit
  def step(state, x, y):
    loss, grads, problems, updated = sibp_jax.linen.value_grad_and_problems(
        module, state.params, x, y, True, loss_fn=xent, rate=0.5,
        rngs={'dropout': key}, mutable=['batch_stats'],
        model_state={'batch_stats': state.batch_stats})
    new = state.apply_gradients(grads=grads, problems=problems,
                                batch_stats=updated['batch_stats'])
    return new, grads, loss

  new, grads, _ = step(state, x, y)
  # Running statistics: those of the same forward pass without sibp_jax.
  _, expected = module.apply(
      {'params': state.params, 'batch_stats': state.batch_stats}, x, True,
      rate=0.5, rngs={'dropout': key}, mutable=['batch_stats'])
  chex.assert_trees_all_close(new.batch_stats, expected['batch_stats'],
                              rtol=1e-6)
  # The forward pass's dropout mask in the sweep: ProxBP at small τ moves
  # every parameter along its gradient (cos ≈ 1, a fresh mask is far off).
  moved = jax.tree.map(jnp.subtract, new.params, state.params)
  for (path, m), g in zip(jax.tree_util.tree_leaves_with_path(moved),
                          jax.tree.leaves(grads)):
    name = jax.tree_util.keystr(path)
    # BatchNorm's own parameters take the gradient; the bias just before
    # BatchNorm has none.
    if 'BatchNorm' in name or name == "['Dense_0']['bias']":
      continue
    a, b = -np.ravel(m), np.ravel(g)
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cos > 0.999, (jax.tree_util.keystr(path), cos)


def test_linen_variables_dict_does_not_train_batch_stats():
  module = LinenResNet()
  x, y = arch_data('resnet')
  variables = module.init(jax.random.key(0), x, train=False)
  _, grads, problems, updated = jax.jit(
      lambda variables, x, y: sibp_jax.linen.value_grad_and_problems(
          module, variables, x, y, loss_fn=xent, mutable=['batch_stats']))(
              variables, x, y)
  assert problems.layers[0].kernel_path == ('params', 'stem', 'kernel')
  for leaf in jax.tree.leaves(grads['batch_stats']):
    assert float(jnp.abs(leaf).max()) == 0.0
  # transform('sibp_linearized') is sibp(0.1).
  updates, _ = jit_updates(['sibp_linearized'])(
      grads, variables, problems)['sibp_linearized']
  for leaf in jax.tree.leaves(updates['batch_stats']):
    assert float(jnp.abs(leaf).max()) == 0.0
  assert not jax.tree.all(jax.tree.map(
      lambda a, b: bool(jnp.array_equal(a, b)), updated['batch_stats'],
      variables['batch_stats']))


def test_nnx_split_merge_step_with_batchnorm_and_dropout():
  """The pure-function recipe: only Params are trained, the rest carried."""
  model = ResMLP(dtype=jnp.float32, dropout=0.2, seed=8)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  tx = sibp_jax.sibp(0.1)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, rest, opt_state, x, y):
    model = nnx.merge(graphdef, params, rest)
    loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=xent)
    updates, opt_state = tx.update(nnx.as_pure(grads), opt_state, params,
                                   problems=problems)
    _, _, rest = nnx.split(model, nnx.Param, ...)
    return (optax.apply_updates(params, updates), nnx.as_pure(rest),
            opt_state, loss)

  x, y = classification(batch=16, d_in=4, classes=2, seed=8)
  losses = []
  for _ in range(5):
    params, rest, opt_state, loss = step(params, rest, opt_state, x, y)
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses
  assert int(rest['drop']['rngs']['count']) == 5


@pytest.mark.parametrize('name', ['sibp_linearized', 'proxbp_cg3'])
def test_vmap_over_learning_rates_on_a_resnet(name):
  """The graph sweep under jax.vmap equals separate runs."""
  factory = {'sibp_linearized': sibp_jax.sibp,
             'proxbp_cg3': functools.partial(
                 sibp_jax.proxbp, tau_prox=0.05,
                 solver=sibp_jax.ConjugateGradient(3))}[name]
  graphdef, params, rest = nnx.split(ResNet(), nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  x, y = arch_data('resnet', batch=8)

  def run(lr):
    tx = factory(lr)
    model = nnx.merge(graphdef, params, rest)
    _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=xent)
    updates, _ = tx.update(nnx.as_pure(grads), tx.init(params), params,
                           problems=problems)
    return updates

  rates = jnp.asarray([0.05, 0.3])
  batched = jax.jit(jax.vmap(run))(rates)
  run_one = jax.jit(run)  # one program for both rates
  for k, lr in enumerate(rates):
    single = run_one(lr)
    chex.assert_trees_all_close(jax.tree.map(lambda a, k=k: a[k], batched),
                                single, rtol=1e-4, atol=1e-6)


def _jaxpr_size(blocks):
  """Equations in the traced update of a residual MLP of ``blocks`` blocks."""

  class Deep(nnx.Module):
    def __init__(self):
      rngs = nnx.Rngs(0)
      self.stem = nnx.Linear(6, 8, rngs=rngs)
      self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs)
                              for _ in range(blocks)])
      self.norms = nnx.List([nnx.LayerNorm(8, rngs=rngs)
                             for _ in range(blocks)])
      self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      h = self.stem(x)
      for layer, norm in zip(self.blocks, self.norms):
        h = h + layer(jax.nn.relu(norm(h)))
      return self.head(h)

  graphdef, params, rest = nnx.split(Deep(), nnx.Param, ...)
  params, rest = pure(params), pure(rest)
  x, y = classification()
  tx = sibp_jax.sibp(0.1)

  def update(params):
    model = nnx.merge(graphdef, params, rest)
    _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=xent)
    return tx.update(nnx.as_pure(grads), tx.init(params), params,
                     problems=problems)[0]

  jaxpr = jax.make_jaxpr(update)(params)

  def count(j):
    n = 0
    for eqn in j.eqns:
      n += 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        n += count(sub)
    return n
  return count(jaxpr.jaxpr)


def test_step_program_grows_linearly_with_depth():
  """One reverse pass: the traced step grows by the same amount per block."""
  sizes = [_jaxpr_size(b) for b in (2, 4, 8)]
  per_block_low = (sizes[1] - sizes[0]) / 2
  per_block_high = (sizes[2] - sizes[1]) / 4
  assert per_block_high <= 1.05 * per_block_low, sizes
