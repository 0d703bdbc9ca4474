"""Weights, masks and batch axes: each held to backprop by its limits.

The rule (docs/algorithms.md, "Weights"): a weight multiplies its loss term
once, so every layer's error is that of ``Σ w ℓ``, and a row of a layer's
regression counts with its own term's weight (a row shared by every
example once per example), with the batch's largest weight where it has
none of its own but carries error, and not at all where it reaches no
weighted term. The tests below check the directions against
``jax.grad`` of ``Σ w ℓ / Σ w`` (float64): ProxBP's direction / τ and
SIBP's direction · λ / Σw tend to it, the error falling with τ and 1/λ,
for every kernel and embedding.
"""

import warnings

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
from _models import batch_norm
from _models import xent

V, T, D = 11, 6, 8


class LM(nnx.Module):
  """A one-block causal decoder: token and position embeddings, attention,
  an MLP, LayerNorm, and an untied or tied (``Embed.attend``) head.

  ``positions``: ``'arange'`` looks the positions up on ``arange(T)`` (no
  batch axis), ``'broadcast'`` on the same ids broadcast over the batch.
  ``key_mask``: also mask attention to keys of weight 0 (padding).
  """

  def __init__(self, *, tied=False, positions='arange', seed=0,
               dtype=jnp.float64):
    rngs = nnx.Rngs(seed)
    kw = dict(param_dtype=dtype, dtype=dtype, rngs=rngs)
    self.tokens = nnx.Embed(V, D, **kw)
    self.pos = nnx.Embed(T, D, **kw)
    self.norm1 = nnx.LayerNorm(D, **kw)
    self.attention = nnx.MultiHeadAttention(2, D, decode=False, **kw)
    self.norm2 = nnx.LayerNorm(D, **kw)
    self.up = nnx.Linear(D, 2 * D, **kw)
    self.down = nnx.Linear(2 * D, D, **kw)
    self.tied = tied
    self.head = None if tied else nnx.Linear(D, V, **kw)
    self.positions = positions

  def __call__(self, ids, key_mask=None):
    length = ids.shape[1]
    where = jnp.arange(length)
    if self.positions == 'broadcast':
      where = jnp.broadcast_to(where, ids.shape)
    h = self.tokens(ids) + self.pos(where)
    mask = nnx.make_causal_mask(ids)
    if key_mask is not None:
      mask = nnx.combine_masks(mask, key_mask[:, None, None, :] > 0)
    h = h + self.attention(self.norm1(h), mask=mask)
    h = h + self.down(jax.nn.gelu(self.up(self.norm2(h))))
    return self.tokens.attend(h) if self.tied else self.head(h)


def _lm_data(batch, seed=0):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, V, size=(batch, T)), jnp.int32)
  return ids, jnp.roll(ids, -1, axis=1)


def _reference_grad(model, x, y, weights, call=None):
  """``∇ Σ w ℓ / Σ w`` by jax.grad alone, as a pure tree of ``nnx.Param``."""
  call = call or (lambda m, x: m(x))

  def loss(m):
    losses = xent(call(m, x), y)
    w = jnp.broadcast_to(
        weights.reshape(weights.shape + (1,) * (losses.ndim - weights.ndim)),
        losses.shape)
    return jnp.sum(w * losses) / jnp.sum(w)

  return nnx.as_pure(nnx.grad(loss)(model))


def _leaves(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def limit_errors(model, x, y, weights, *, call=None, **kwargs):
  """Per parameter owned by a layer, ``‖d/τ - g‖ / ‖g‖`` (ProxBP) and
  ``‖d·λ/Σw - g‖ / ‖g‖`` (SIBP; ``‖g‖`` at least 1e-2 of the whole
  gradient's norm) at ``(τ, λ) = (1e-5, 1e5)`` and ``(1e-7, 1e7)``, with
  ``g`` from :func:`_reference_grad`."""
  reference = _leaves(_reference_grad(model, x, y, weights, call))
  graphdef, state = nnx.split(model)
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=xent, weights=weights, **kwargs)
  nnx.update(model, state)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = nnx.as_pure(grads)
  chex.assert_trees_all_close(_leaves(grads), reference, rtol=1e-10,
                              atol=1e-12)
  owned = {'/'.join(map(str, p)) for layer in problems.layers
           for p in (layer.kernel_path, layer.bias_path) if p is not None}
  terms = float(problems.terms)
  # A gradient that vanishes by symmetry (attention's key bias: softmax
  # ignores a shift shared by all keys) is measured against a thousandth
  # of the whole gradient's norm instead of its own round-off.
  floor = 1e-2 * np.sqrt(sum(np.sum(reference[p] ** 2) for p in owned))
  errors = []
  for tau in (1e-5, 1e-7):
    lam = 1 / tau
    found = {}
    for name, tx, scale in (
        ('proxbp', sibp_jax.scale_by_proxbp(tau), 1 / tau),
        ('sibp', sibp_jax.scale_by_sibp(0.5, lambda_w=lam, lambda_b=lam),
         lam / terms)):
      out = _leaves(tx.update(grads, tx.init(params), params,
                              problems=problems)[0])
      for path in owned:
        g = reference[path]
        found[name, path] = (np.linalg.norm(out[path] * scale - g) /
                             max(np.linalg.norm(g), floor))
    errors.append(found)
  del graphdef
  return owned, errors


def assert_limits(owned, errors, expect=None):
  """Every owned parameter: below 1e-3 at the small setting and ten times
  below its error at the larger one (first order in τ and 1/λ)."""
  if expect is not None:
    assert expect <= {p.split('/')[0] for p in owned}, owned
  coarse, fine = errors
  for key, value in fine.items():
    assert value < 1e-3, (key, value, coarse[key])
    assert value < max(coarse[key] / 5, 1e-9), (key, value, coarse[key])


LM_LAYERS = {'tokens', 'pos', 'attention', 'up', 'down'}


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('tied', [False, True])
@pytest.mark.parametrize('case', ['prompt', 'left_pad', 'fractional',
                                  'per_example', 'double'])
def test_lm_weights_hold_the_backprop_limits(case, tied):
  """Prompt masks, left padding without a key mask, fractional per-token
  and per-example weights, and a uniform weight of 2 (which leaves the
  loss unchanged): every kernel and embedding tends to backprop."""
  x, y = _lm_data(4)
  rng = np.random.default_rng(3)
  weights = {
      'prompt': jnp.broadcast_to(jnp.arange(T) >= 3, (4, T)),
      'left_pad': jnp.asarray(np.arange(T)[None] >= np.array(
          [[0], [2], [1], [4]]), jnp.float64),
      'fractional': jnp.asarray(rng.random((4, T)), jnp.float64),
      'per_example': jnp.asarray([1.0, 0.0, 2.0, 1.0]),
      'double': jnp.full((4,), 2.0),
  }[case].astype(jnp.float64)
  owned, errors = limit_errors(LM(tied=tied), x, y, weights)
  assert_limits(owned, errors, LM_LAYERS | ({'tokens'} if tied else
                                            {'head'}))


@pytest.mark.usefixtures('x64')
def test_right_padding_under_a_causal_mask_adds_no_rows():
  """Right padding with a causal mask reaches no kept term: the padded
  rows are not part of any problem, so the step equals the one of the
  same batch cut to its kept length (the kept tokens see the same
  prefixes)."""
  x, y = _lm_data(3)
  weights = jnp.broadcast_to(jnp.arange(T) < 4, (3, T)).astype(jnp.float64)
  model = LM(positions='broadcast')
  owned, errors = limit_errors(model, x, y, weights)
  assert_limits(owned, errors)
  full = _directions(LM(positions='broadcast'), x, y, weights)
  cut = _directions(LM(positions='broadcast'), x[:, :4], y[:, :4],
                    weights[:, :4])
  for path in ('tokens/embedding', 'up/kernel', 'head/kernel',
               'attention/query/kernel'):
    np.testing.assert_allclose(full['sibp'][path], cut['sibp'][path],
                               rtol=1e-8, atol=1e-12)


def _directions(model, x, y, weights=None, **kwargs):
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=xent, weights=weights, **kwargs)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = nnx.as_pure(grads)
  out = {}
  for name, tx in (('sibp', sibp_jax.scale_by_sibp(0.5)),
                   ('proxbp', sibp_jax.scale_by_proxbp(0.05))):
    out[name] = _leaves(tx.update(grads, tx.init(params), params,
                                  problems=problems)[0])
  return out


@pytest.mark.usefixtures('x64')
def test_integer_weight_is_the_example_repeated():
  """Weight 2 on an example of an MLP (examples do not interact) gives the
  step of the batch with that example twice and weight 1 everywhere."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5, 6)))
  y = jnp.asarray(rng.integers(0, 3, 5), jnp.int32)
  w = jnp.asarray([1.0, 2.0, 0.0, 1.0, 3.0])
  weighted = _directions(MLP((6, 8, 3), dtype=jnp.float64), x, y, w)
  repeat = np.repeat(np.arange(5), np.asarray(w, int))
  repeated = _directions(MLP((6, 8, 3), dtype=jnp.float64), x[repeat],
                         y[repeat])
  for name in ('sibp', 'proxbp'):
    chex.assert_trees_all_close(weighted[name], repeated[name], rtol=1e-9,
                                atol=1e-12)


@pytest.mark.usefixtures('x64')
def test_weights_of_one_are_no_weights():
  x, y = _lm_data(3)
  chex.assert_trees_all_close(
      _directions(LM(), x, y, jnp.ones((3, T))), _directions(LM(), x, y),
      rtol=1e-10, atol=1e-13)


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('batch', [T, 4])
def test_positions_on_arange_are_rows_shared_by_every_example(batch):
  """``pos(arange(T))`` (no batch axis) is the broadcast form: the same
  directions at ``B == T`` and ``B != T``, and the backprop limits."""
  x, y = _lm_data(batch)
  weights = jnp.broadcast_to(jnp.arange(T) >= 2, (batch, T)).astype(float)
  for w in (None, weights):
    chex.assert_trees_all_close(
        _directions(LM(positions='arange'), x, y, w),
        _directions(LM(positions='broadcast'), x, y, w),
        rtol=1e-9, atol=1e-12)
  owned, errors = limit_errors(LM(positions='arange'), x, y, weights)
  assert_limits(owned, errors, {'pos'})


class LinenLM(nn.Module):
  """A linen decoder with positions looked up on ``arange(T)``."""

  @nn.compact
  def __call__(self, ids):
    length = ids.shape[1]
    h = nn.Embed(V, D, name='tokens', param_dtype=jnp.float64)(ids)
    h = h + nn.Embed(T, D, name='pos', param_dtype=jnp.float64)(
        jnp.arange(length))
    h = h + nn.MultiHeadDotProductAttention(
        2, param_dtype=jnp.float64, name='attention')(
        nn.LayerNorm(param_dtype=jnp.float64)(h),
        mask=nn.make_causal_mask(ids))
    return nn.Dense(V, name='head', param_dtype=jnp.float64)(h)


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('batch', [T, 4])
def test_linen_positions_on_arange_hold_the_limits(batch):
  x, y = _lm_data(batch)
  weights = jnp.broadcast_to(jnp.arange(T) >= 2, (batch, T)).astype(float)
  module = LinenLM()
  params = module.init(jax.random.key(0), x)['params']

  def loss(p):
    losses = xent(module.apply({'params': p}, x), y)
    return jnp.sum(weights * losses) / jnp.sum(weights)

  reference = _leaves(jax.grad(loss)(params))
  _, grads, problems = sibp_jax.linen.value_grad_and_problems(
      module, params, x, y, loss_fn=xent, weights=weights)
  assert any(layer.name == 'pos' for layer in problems.layers)
  for tau in (1e-6,):
    tx = sibp_jax.scale_by_proxbp(tau)
    out = _leaves(tx.update(grads, tx.init(params), params,
                            problems=problems)[0])
    owned = {'/'.join(map(str, p)) for layer in problems.layers
             for p in (layer.kernel_path, layer.bias_path) if p is not None}
    assert {'tokens/embedding', 'pos/embedding', 'head/kernel'} <= owned
    floor = 1e-2 * np.sqrt(sum(np.sum(reference[p] ** 2) for p in owned))
    for path in owned:
      g = reference[path]
      err = (np.linalg.norm(out[path] / tau - g) /
             max(np.linalg.norm(g), floor))
      assert err < 1e-3, (path, err)


class TimeMajor(nnx.Module):
  """A Linear applied to ``(T, B, d)`` inputs, then back to batch-major."""

  def __init__(self, time_major):
    rngs = nnx.Rngs(0)
    kw = dict(param_dtype=jnp.float64, dtype=jnp.float64, rngs=rngs)
    self.a = nnx.Linear(4, 6, **kw)
    self.b = nnx.Linear(6, 3, **kw)
    self.time_major = time_major

  def __call__(self, x):
    if self.time_major:
      h = jnp.swapaxes(jax.nn.tanh(self.a(jnp.swapaxes(x, 0, 1))), 0, 1)
    else:
      h = jax.nn.tanh(self.a(x))
    return self.b(h)


@pytest.mark.usefixtures('x64')
def test_a_time_major_layer_takes_its_rows_weights_by_batch_axis():
  """At ``B == T`` a time-major layer's rows are ``(T, B)``: its weights
  must follow the batch axis the computation gives it, not the shape."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5, 5, 4)))
  y = jnp.asarray(rng.integers(0, 3, (5, 5)), jnp.int32)
  w = jnp.asarray(rng.random((5, 5)) < 0.5, jnp.float64).at[0, 0].set(1)
  chex.assert_trees_all_close(
      _directions(TimeMajor(True), x, y, w),
      _directions(TimeMajor(False), x, y, w), rtol=1e-9, atol=1e-12)


class Pairs(nnx.Module):
  """A layer applied to a batch-by-batch array (it mixes the examples)."""

  def __init__(self):
    self.a = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    self.b = nnx.Linear(3, 3, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.b(self.a(jnp.einsum('bd,cd->cbd', x, x)).sum(axis=0))


def test_a_layer_over_two_batch_axes_is_refused_by_name():
  x = jnp.ones((4, 4))
  with pytest.raises(ValueError, match="'a'.*batch"):
    sibp_jax.nnx.value_grad_and_problems(
        Pairs(), x, jnp.zeros(4, jnp.int32), loss_fn=xent)


@pytest.mark.usefixtures('x64')
def test_batch_norm_with_a_weight_zero_example_holds_the_limits():
  """The weight-0 example still moves the batch statistics, so its rows
  carry the other examples' error."""

  class Net(nnx.Module):
    def __init__(self):
      rngs = nnx.Rngs(0)
      kw = dict(param_dtype=jnp.float64, dtype=jnp.float64, rngs=rngs)
      self.a = nnx.Linear(4, 6, **kw)
      self.bn = batch_norm(6, rngs=rngs)
      self.b = nnx.Linear(6, 3, **kw)

    def __call__(self, x):
      return self.b(jax.nn.relu(self.bn(self.a(x))))

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 4)))
  y = jnp.asarray(rng.integers(0, 3, 6), jnp.int32)
  w = jnp.asarray([1.0, 0.0, 1.0, 0.5, 1.0, 2.0])
  owned, errors = limit_errors(Net(), x, y, w)
  assert_limits(owned, errors, {'a', 'b'})


@pytest.mark.usefixtures('x64')
def test_tied_output_under_multisteps_warns():
  """The mismatch check for a tied output: MultiSteps hands the averaged
  gradient with the last micro-batch's problems."""
  model = LM(tied=True)
  opt = nnx.Optimizer(model, optax.MultiSteps(sibp_jax.sibp(0.1), 2),
                      wrt=nnx.Param)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    for seed in range(2):
      x, y = _lm_data(3, seed=seed)
      _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
          model, x, y, loss_fn=xent)
      opt.update(model, grads, problems=problems)
  assert any(issubclass(w.category, sibp_jax.GradMismatchWarning)
             for w in caught), [str(w.message) for w in caught]


class SharedHead(nnx.Module):
  """The last layer applied twice (shared weights)."""

  def __init__(self):
    kw = dict(param_dtype=jnp.float64, dtype=jnp.float64)
    self.a = nnx.Linear(T, V, rngs=nnx.Rngs(0), **kw)
    self.head = nnx.Linear(V, V, rngs=nnx.Rngs(1), **kw)

  def __call__(self, ids):
    h = jax.nn.tanh(self.a(jax.nn.one_hot(ids[:, 0], T)))
    return self.head(jax.nn.tanh(self.head(h)))


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('how', ['clip', 'frozen_head', 'shared_head'])
def test_mismatch_is_measured_for_every_output_kind(how):
  """A gradient scaled before the transformation is seen with a tied
  output; a frozen or shared head leaves the check to the layer below."""
  model = SharedHead() if how == 'shared_head' else LM(tied=how == 'clip')
  x, y = _lm_data(3)
  if how == 'shared_head':
    y = y[:, 0]
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=xent)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = nnx.as_pure(grads)
  if how == 'frozen_head':
    params = {k: v for k, v in params.items() if k != 'head'}
    grads = {k: v for k, v in grads.items() if k != 'head'}
  tx = sibp_jax.scale_by_proxbp(0.1, on_grad_mismatch='ignore')
  _, state = tx.update(grads, tx.init(params), params, problems=problems)
  assert float(state.info.grad_mismatch) < 1e-8
  scaled = jax.tree.map(lambda g: 0.5 * g, grads)
  _, state = tx.update(scaled, tx.init(params), params, problems=problems)
  np.testing.assert_allclose(float(state.info.grad_mismatch), 0.5,
                             rtol=1e-6)


def test_a_table_read_directly_as_the_output_is_named():
  class Direct(nnx.Module):
    def __init__(self):
      self.tokens = nnx.Embed(V, D, rngs=nnx.Rngs(0))
      self.mix = nnx.Linear(D, D, rngs=nnx.Rngs(1))

    def __call__(self, ids):
      return self.mix(self.tokens(ids)) @ self.tokens.embedding[...].T

  x, y = _lm_data(2)
  with pytest.raises(ValueError, match="tokens/embedding.*read directly"):
    sibp_jax.nnx.value_grad_and_problems(Direct(), x, y, loss_fn=xent)


def test_all_zero_weights_are_named():
  x, y = _lm_data(2)
  with pytest.raises(ValueError, match='every weight is 0'):
    sibp_jax.nnx.value_grad_and_problems(
        LM(), x, y, loss_fn=xent, weights=jnp.zeros((2, T)))


def test_positions_on_arange_train_under_jit():
  """The LM with ``pos(arange(T))`` trains with SIBP under ``nnx.jit`` on a
  prompt-masked batch, at ``B != T``: the masked loss falls."""
  x, y = _lm_data(8)
  x, y = x[:, :T], y[:, :T]
  weights = jnp.broadcast_to(jnp.arange(T) >= 2, (8, T)).astype(jnp.float32)

  model = LM(dtype=jnp.float32)
  opt = nnx.Optimizer(model, sibp_jax.sibp(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=xent, weights=weights)
    opt.update(model, grads, problems=problems)
    return loss

  losses = [float(step(model, opt)) for _ in range(6)]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize('bad', [-1.0, np.nan, np.inf])
def test_negative_or_non_finite_weights_are_named(bad):
  x, y = _lm_data(2)
  with pytest.raises(ValueError, match='finite and non-negative'):
    sibp_jax.nnx.value_grad_and_problems(
        LM(dtype=jnp.float32), x, y, loss_fn=xent,
        weights=jnp.ones((2, T)).at[1, 2].set(bad))


class MaskedLinenLM(nn.Module):
  """A linen decoder taking its attention mask as a call argument."""

  @nn.compact
  def __call__(self, ids, mask):
    h = nn.Embed(V, D, name='tokens')(ids)
    h = h + nn.MultiHeadDotProductAttention(2, name='attention')(h, mask=mask)
    return nn.Dense(V, name='head')(h)


def test_linen_call_arguments_led_by_the_batch_follow_it():
  """The batch-axis probe resizes a mask passed as a call argument."""
  x, y = _lm_data(4)
  mask = nn.make_causal_mask(x)
  module = MaskedLinenLM()
  params = module.init(jax.random.key(0), x, mask)['params']
  _, _, problems = sibp_jax.linen.value_grad_and_problems(
      module, params, x, y, mask, loss_fn=xent,
      weights=jnp.broadcast_to(jnp.arange(T) >= 2, (4, T)))
  assert [layer.batch_axis for layer in problems.layers] == [0] * 6


def test_all_zero_weights_under_jit_warn_and_skip():
  """Traced weights cannot be checked when the step is built: a batch whose
  weights are all 0 warns at run time and its step is skipped."""
  x, y = _lm_data(2)
  model = LM(dtype=jnp.float32)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  graphdef, state = nnx.split(model)
  tx = sibp_jax.scale_by_sibp(0.1)

  @jax.jit
  def step(state, weights):
    m = nnx.merge(graphdef, state)
    loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        m, x, y, loss_fn=xent, weights=weights)
    _, opt = tx.update(nnx.as_pure(grads), tx.init(params), params,
                       problems=problems)
    return loss, opt.info.finite

  with pytest.warns(UserWarning, match='every weight of this batch is 0'):
    loss, finite = step(state, jnp.zeros((2, T)))
    jax.effects_barrier()
  assert np.isnan(loss) and not finite
  loss, finite = step(state, jnp.ones((2, T)))
  assert np.isfinite(loss) and finite
