"""Convolutions: patches, solves against dense references, one sweep by hand."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sibp_jax

from _models import find_info
from _models import pure
from _models import xent

CONFIGS = [
    # window, strides, padding, dilation
    ((3, 3), (1, 1), 'SAME', (1, 1)),
    ((2, 3), (2, 1), 'VALID', (1, 1)),
    ((3, 2), (1, 2), ((1, 0), (2, 1)), (1, 1)),
    ((2, 2), (1, 1), 'SAME', (2, 2)),
]


def _kind(window, strides, padding, dilation, spatial):
  if isinstance(padding, str):
    dilated = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    padding = jax.lax.padtype_to_pads(spatial, dilated, strides, padding)
  return sibp_jax.Conv(tuple(strides), tuple(tuple(p) for p in padding),
                       tuple(dilation))


def _np_patches(x, window, kind):
  """im2col written out: rows (n, i, j), columns (kh, kw, c)."""
  (plo_h, phi_h), (plo_w, phi_w) = kind.padding
  xp = np.pad(x, ((0, 0), (plo_h, phi_h), (plo_w, phi_w), (0, 0)))
  (kh, kw), (sh, sw), (dh, dw) = window, kind.strides, kind.kernel_dilation
  out_h = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
  out_w = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
  rows = []
  for n in range(x.shape[0]):
    for i in range(out_h):
      for j in range(out_w):
        rows.append(np.stack([
            xp[n, i * sh + a * dh, j * sw + b * dw, :]
            for a in range(kh) for b in range(kw)]).ravel())
  return np.asarray(rows), (x.shape[0], out_h, out_w)


@pytest.mark.parametrize('window,strides,padding,dilation', CONFIGS)
def test_patches_and_apply_match_explicit_im2col(window, strides, padding,
                                                 dilation):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
  kernel = rng.normal(size=window + (3, 4)).astype(np.float32)
  bias = rng.normal(size=(4,)).astype(np.float32)
  kind = _kind(window, strides, padding, dilation, (7, 6))
  patches, out_shape = _np_patches(x, window, kind)
  np.testing.assert_allclose(kind.design(jnp.asarray(x), window), patches,
                             rtol=1e-6)
  expected = (patches @ kernel.reshape(-1, 4) + bias).reshape(out_shape + (4,))
  np.testing.assert_allclose(kind.apply(kernel, bias, jnp.asarray(x)),
                             expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('shape,window,strides,padding,dilation', [
    ((3, 10, 4), (3,), (2,), ((1, 2),), (2,)),
    ((2, 5, 5, 4, 2), (2, 3, 2), (1, 2, 1), ((1, 0), (1, 1), (0, 1)),
     (1, 1, 2)),
])
def test_patches_in_one_and_three_dimensions(shape, window, strides, padding,
                                             dilation):
  """1-D and 3-D patches reproduce XLA's own convolution."""
  kind = sibp_jax.Conv(strides, padding, dilation)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=window + (shape[-1], 5)), jnp.float32)
  expected = kind.apply(kernel, None, x)
  got = kind.design(x, window) @ kernel.reshape(-1, 5)
  np.testing.assert_allclose(got, expected.reshape(-1, 5), rtol=1e-5,
                             atol=1e-5)


EXACT = (sibp_jax.Ridge('cholesky'), sibp_jax.Ridge('woodbury'))
BLOCKS = [(True, True), (False, True), (True, False)]


@functools.partial(jax.jit, static_argnums=0)
def _jit_solves(solvers, problems):
  """``solver.solve(problem)`` for each solver and problem, one program."""
  return [[solver.solve(p) for solver in solvers] for p in problems]


def _conv_problems(config):
  """The patches, the residual and a problem per entry of ``BLOCKS``.

  Inputs of 5 × 3 positions: every output has at most 30 rows, so that the
  Woodbury factor compiles without the blocked recursion of factors beyond
  32 (which test_solvers covers).
  """
  window, strides, padding, dilation = config
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 3, 3)).astype(np.float32)
  kind = _kind(window, strides, padding, dilation, (5, 3))
  patches, out_shape = _np_patches(x, window, kind)
  residual = rng.normal(size=out_shape + (4,)).astype(np.float32)
  return patches, residual, [sibp_jax.RidgeProblem(
      kind, jnp.asarray(x), jnp.asarray(residual),
      window + (3, 4) if kernel else None, (4,) if bias else None,
      jnp.float32(0.7), jnp.float32(1.3)) for kernel, bias in BLOCKS]


@functools.cache
def _exact_solutions(index):
  """``EXACT``'s solves of CONFIGS[index]'s problems, one compiled program
  for the tests of that config."""
  return _jit_solves(EXACT, _conv_problems(CONFIGS[index])[2])


@pytest.mark.parametrize('index', range(len(CONFIGS)))
@pytest.mark.parametrize('block', range(len(BLOCKS)))
def test_conv_ridge_solves_match_dense_reference(index, block):
  kernel, bias = BLOCKS[block]
  patches, residual, problems = _conv_problems(CONFIGS[index])
  problem = problems[block]
  blocks, lam = [], []
  if kernel:
    blocks.append(patches)
    lam += [0.7] * patches.shape[1]
  if bias:
    blocks.append(np.ones((patches.shape[0], 1)))
    lam.append(1.3)
  design = np.concatenate(blocks, axis=1).astype(np.float64)
  reference = np.linalg.solve(design.T @ design + np.diag(lam),
                              design.T @ residual.reshape(-1, 4))

  def flat(delta):
    dk, db = delta
    parts = [] if dk is None else [np.asarray(dk).reshape(-1, 4)]
    return np.concatenate(parts + ([] if db is None else
                                   [np.asarray(db)[None]]), axis=0)

  # CG runs eagerly: over a conv the library unrolls its loop (see
  # sibp_jax._src.kinds.unroll_loops), and 60 unrolled steps compile far
  # slower than they run. ProxBP-CG's jitted ConvNet steps are in
  # test_contract and test_train.
  cg = sibp_jax.ConjugateGradient(60, tol=0.0)
  solved = _exact_solutions(index)[block] + [cg.solve(problem)]
  for solver, (delta, _) in zip(EXACT + (cg,), solved, strict=True):
    # float32 solves with condition number ≲ 10³: 1e-3 relative.
    np.testing.assert_allclose(flat(delta), reference, rtol=1e-3, atol=1e-4,
                               err_msg=str(solver))


def test_ridge_hands_oversized_factors_to_cg():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 6, 6, 2)), jnp.float32)
  kind = _kind((3, 3), (1, 1), 'SAME', (1, 1), (6, 6))
  residual = jnp.asarray(rng.normal(size=(3, 6, 6, 4)), jnp.float32)
  problem = sibp_jax.RidgeProblem(kind, x, residual, (3, 3, 2, 4), (4,),
                                  jnp.float32(1.0), jnp.float32(1.0))
  [[(exact, info)]] = _jit_solves((sibp_jax.Ridge(),), [problem])
  assert int(info.iterations) == 0
  small = sibp_jax.Ridge(max_factor=10,
                         fallback=sibp_jax.ConjugateGradient(40, tol=0.0))
  # 19 columns, 108 rows: both > 10. Eagerly, as CG above.
  approx, info = small.solve(problem)
  assert int(info.iterations) == 40
  chex.assert_trees_all_close(approx, exact, rtol=1e-3, atol=1e-4)


class TinyConvNet(nnx.Module):
  """conv 3×3 SAME, ReLU, max-pool 2×2, flatten, dense."""

  def __init__(self, seed=0):
    rngs = nnx.Rngs(seed)
    self.conv = nnx.Conv(2, 3, (3, 3), padding='SAME', rngs=rngs)
    self.dense = nnx.Linear(3 * 2 * 2, 4, rngs=rngs)

  def __call__(self, x):
    h = nnx.max_pool(jax.nn.relu(self.conv(x)), (2, 2), (2, 2))
    return self.dense(h.reshape(h.shape[0], -1))


def _np_sweep(model, x, y, rule, eta=0.1, lam=(1.0, 1.0), tau=0.05):
  """Sections 2 and 3 of docs/algorithms.md for TinyConvNet, in NumPy."""
  k = np.asarray(model.conv.kernel[...], np.float64)
  b = np.asarray(model.conv.bias[...], np.float64)
  w = np.asarray(model.dense.kernel[...], np.float64)
  c = np.asarray(model.dense.bias[...], np.float64)
  x = np.asarray(x, np.float64)
  batch = x.shape[0]
  kind = _kind((3, 3), (1, 1), 'SAME', (1, 1), (4, 4))
  patches, shape = _np_patches(x, (3, 3), kind)
  g1 = (patches @ k.reshape(-1, 3) + b).reshape(shape + (3,))
  a1 = np.maximum(g1, 0)
  pooled = a1.reshape(batch, 2, 2, 2, 2, 3).max(axis=(2, 4))
  f1 = pooled.reshape(batch, -1)
  z = f1 @ w + c
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  e = p - np.eye(4)[np.asarray(y)]

  def ridge(design, residual, lam_k, lam_b):
    full = np.concatenate([design, np.ones((len(design), 1))], axis=1)
    reg = np.diag([lam_k] * design.shape[1] + [lam_b])
    return np.linalg.solve(full.T @ full + reg, full.T @ residual)

  if rule == 'linearized':
    lam_k, lam_b, scale = lam[0], lam[1], -eta
  else:
    lam_k = lam_b = 1.0 / tau
    scale = -1.0 / batch
  top = ridge(f1, scale * e, lam_k, lam_b)
  w_new, c_new = w + top[:-1], c + top[-1]
  chain = w_new if rule == 'linearized' else w
  e_f = (e @ chain.T).reshape(batch, 2, 2, 3)
  # Max-pool's VJP routes each error to its window's maximum; ReLU's masks.
  e_a = np.zeros_like(a1)
  for n in range(batch):
    for i in range(2):
      for j in range(2):
        for ch in range(3):
          window = a1[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, ch]
          a, bb = np.unravel_index(np.argmax(window), (2, 2))
          e_a[n, 2 * i + a, 2 * j + bb, ch] += e_f[n, i, j, ch]
  e_g = e_a * (g1 > 0)
  low = ridge(patches, scale * e_g.reshape(-1, 3), lam_k, lam_b)
  k_new = k + low[:-1].reshape(k.shape)
  b_new = b + low[-1]
  return {'conv': {'kernel': k_new - k, 'bias': b_new - b},
          'dense': {'kernel': w_new - w, 'bias': c_new - c}}


def _tiny_data(seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(5, 4, 4, 2)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, 5), jnp.int32)
  return x, y


# The transformations of the TinyConvNet tests below, their hyperparameters
# traced: one compiled program (one forward pass, an update by each) serves
# every test. ProxBP with plain SGD of rate 1 hands on X_new - X_old.
def _tiny_transforms(eta, lambda_w, lambda_b, tau_prox):
  return {
      'sibp': sibp_jax.sibp(eta, lambda_w=lambda_w, lambda_b=lambda_b),
      'proxbp': sibp_jax.proxbp(1.0, tau_prox=tau_prox, momentum=None),
      'sibp-paper': sibp_jax.sibp(eta, variant='paper', lambda_w=lambda_w,
                                  lambda_b=lambda_b),
  }


DEFAULTS = dict(eta=0.1, lambda_w=1.0, lambda_b=1.0, tau_prox=0.05)


def _hypers(**kwargs):
  return {k: jnp.float32(v) for k, v in dict(DEFAULTS, **kwargs).items()}


@jax.jit
def _tiny_updates(hypers, state, x, y):
  """``{name: (updates, info)}`` of the nnx TinyConvNet's step."""
  model = nnx.merge(nnx.graphdef(TinyConvNet()), state)
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=xent)
  grads, params = pure(grads), pure(nnx.state(model, nnx.Param))
  out = {}
  for name, tx in _tiny_transforms(**hypers).items():
    updates, opt_state = tx.update(grads, tx.init(params), params,
                                   problems=problems)
    out[name] = updates, find_info(opt_state)
  return out


@pytest.mark.parametrize('rule', ['linearized', 'proxbp'])
def test_convnet_sweep_matches_numpy_transcription(rule):
  x, y = _tiny_data(3)
  model = TinyConvNet()
  state = pure(nnx.state(model))
  if rule == 'linearized':
    updates, _ = _tiny_updates(_hypers(lambda_b=0.5), state, x, y)['sibp']
    expected = _np_sweep(model, x, y, rule, eta=0.1, lam=(1.0, 0.5))
  else:
    updates, _ = _tiny_updates(_hypers(), state, x, y)['proxbp']
    expected = _np_sweep(model, x, y, rule, tau=0.05)
  for layer in ('conv', 'dense'):
    for leaf in ('kernel', 'bias'):
      # float32 forward pass and solves against float64 NumPy.
      np.testing.assert_allclose(updates[layer][leaf], expected[layer][leaf],
                                 rtol=2e-4, atol=2e-6,
                                 err_msg=f'{layer}/{leaf}')


def test_paper_variant_fits_through_relu_and_pool():
  state = pure(nnx.state(TinyConvNet()))
  _, info = _tiny_updates(_hypers(), state, *_tiny_data(4))['sibp-paper']
  assert bool(info.finite)
  # The conv layer's fit objective through ReLU and pooling decreased: the
  # solver's gradient ratio is below 1 and iterations were spent.
  assert float(info.residual['conv']) < 1.0
  assert int(info.iterations['conv']) > 10


class LinenConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Conv(3, (3, 3), padding='SAME', name='conv')(x)
    h = nn.max_pool(nn.relu(h), (2, 2), (2, 2))
    return nn.Dense(4, name='dense')(h.reshape(h.shape[0], -1))


@jax.jit
def _linen_updates(hypers, params, x, y):
  """``{name: updates}`` of the linen LinenConvNet's step."""
  _, grads, problems = sibp_jax.linen.value_grad_and_problems(
      LinenConvNet(), params, x, y, loss_fn=xent)
  return {name: tx.update(grads, tx.init(params), params,
                          problems=problems)[0]
          for name, tx in _tiny_transforms(**hypers).items()}


@pytest.mark.parametrize('name', ['sibp', 'proxbp', 'sibp-paper'])
def test_nnx_and_linen_convnets_agree(name):
  x, y = _tiny_data(5)
  model = TinyConvNet()
  updates, _ = _tiny_updates(_hypers(), pure(nnx.state(model)), x, y)[name]
  lparams = pure(nnx.state(model, nnx.Param))
  lparams = jax.tree.map(lambda a: a, dict(
      conv=dict(lparams['conv']), dense=dict(lparams['dense'])))
  lupdates = _linen_updates(_hypers(), lparams, x, y)[name]
  for layer in ('conv', 'dense'):
    for leaf in ('kernel', 'bias'):
      np.testing.assert_allclose(lupdates[layer][leaf],
                                 updates[layer][leaf], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kwargs,match', [
    (dict(feature_group_count=2), 'grouped'),
    (dict(padding='CIRCULAR'), 'CIRCULAR padding'),
    (dict(input_dilation=2), 'input dilation'),
])
def test_unsupported_convolutions_are_named(kwargs, match):
  class Net(nnx.Module):
    def __init__(self):
      self.conv = nnx.Conv(2, 2, (3, 3), rngs=nnx.Rngs(0), **kwargs)
      self.dense = nnx.Linear(2, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
      return self.dense(jnp.mean(jax.nn.relu(self.conv(x)), axis=(1, 2)))

  x = jnp.ones((2, 5, 5, 2))
  graphdef, state = nnx.split(Net())
  # Raised while tracing, as in an eager call (which also runs the model).
  with pytest.raises(ValueError, match=f"layer 'conv'.*{match}"):
    jax.eval_shape(lambda state, x: sibp_jax.nnx.value_grad_and_problems(
        nnx.merge(graphdef, state), x, jnp.zeros((2,), jnp.int32),
        loss_fn=xent), state, x)
