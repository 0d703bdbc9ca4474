"""A convolution's patch Gram without patches: equal to im2col's, in float64.

``sibp_jax._src.conv_gram`` forms ``FᵀWF`` from the input's correlation at
the window's shifts (stride 1) or from one slice per window offset (the
rest). Both are held to the Gram of the explicit im2col matrix built by
``Conv.design``, and the Ridge solve built on them to a NumPy float64 solve
of the design matrix's normal equations.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sibp_jax
from sibp_jax._src import conv_gram


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _padding(kind, window, dilation, spatial, strides):
  if kind in ('SAME', 'VALID'):
    dilated = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    return tuple(tuple(p) for p in jax.lax.padtype_to_pads(
        spatial, dilated, strides, kind))
  return tuple((2, 1) if a % 2 else (0, 3) for a in range(len(window)))


# (input spatial shape, window, strides, dilation): odd and even sizes and
# windows, 1-D to 3-D, strides and dilations.
GEOMETRIES = [
    ((9,), (3,), (1,), (1,)),
    ((8,), (4,), (2,), (2,)),
    ((7, 6), (3, 3), (1, 1), (1, 1)),
    ((6, 7), (2, 3), (1, 1), (2, 1)),
    ((7, 8), (3, 2), (2, 1), (1, 1)),
    ((8, 8), (1, 1), (2, 2), (1, 1)),
    ((5, 4, 6), (3, 2, 3), (1, 1, 1), (1, 1, 2)),
    ((5, 6, 4), (2, 3, 2), (1, 2, 1), (1, 1, 1)),
]


def _case(geometry, padding_kind, seed=0):
  spatial, window, strides, dilation = geometry
  padding = _padding(padding_kind, window, dilation, spatial, strides)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(2, *spatial, 3)))
  kind = sibp_jax.Conv(strides, padding, dilation)
  return x, kind, window


@pytest.mark.parametrize('geometry', GEOMETRIES)
@pytest.mark.parametrize('padding_kind', ['SAME', 'VALID', 'explicit'])
def test_gram_equals_the_patch_matrix_gram(geometry, padding_kind):
  x, kind, window = _case(geometry, padding_kind)
  design = np.asarray(kind.design(x, window))
  rng = np.random.default_rng(1)
  out_rows = kind.apply(jnp.zeros(window + (3, 1)), None, x).shape[:-1]
  weights = rng.uniform(size=out_rows)
  methods = ['offsets'] + (['shifts'] if set(kind.strides) == {1} else [])
  for method, w in itertools.product(methods, [None, weights]):
    if method == 'shifts' and w is not None:
      continue
    gram, sums = conv_gram.gram(
        x, window, kind.strides, kind.padding, kind.kernel_dilation,
        None if w is None else jnp.asarray(w), method=method)
    wf = design if w is None else design * w.reshape(-1, 1)
    # float64 sums of at most a few hundred products: 1e-12 relative.
    np.testing.assert_allclose(gram, wf.T @ design, rtol=1e-12, atol=1e-12,
                               err_msg=method)
    np.testing.assert_allclose(sums, wf.sum(0), rtol=1e-12, atol=1e-12,
                               err_msg=method)


def test_shifts_refuse_strides_and_weights():
  x, kind, window = _case(GEOMETRIES[4], 'SAME')
  with pytest.raises(ValueError, match='stride 1'):
    conv_gram.gram(x, window, kind.strides, kind.padding,
                   kind.kernel_dilation, method='shifts')


@pytest.mark.parametrize('geometry', [GEOMETRIES[0], GEOMETRIES[2],
                                      GEOMETRIES[4], GEOMETRIES[6]])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('weighted', [False, True])
def test_ridge_solve_equals_the_normal_equations(geometry, bias, weighted):
  x, kind, window = _case(geometry, 'SAME', seed=2)
  rng = np.random.default_rng(3)
  outputs = kind.apply(jnp.zeros(window + (3, 4)), None, x)
  residual = rng.normal(size=outputs.shape)
  weights = rng.uniform(size=outputs.shape[:-1]) if weighted else None
  problem = sibp_jax.RidgeProblem.weighted(
      kind, x, jnp.asarray(residual), window + (3, 4), (4,) if bias else None,
      0.7, 1.3, None if weights is None else jnp.asarray(weights))
  assert sibp_jax.Ridge().path(problem) == 'cholesky'
  (dk, db), info = jax.jit(sibp_jax.Ridge().solve)(problem)
  design = np.asarray(kind.design(x, window))
  lam = [0.7] * design.shape[1]
  if bias:
    design = np.concatenate([design, np.ones((len(design), 1))], axis=1)
    lam.append(1.3)
  w = np.ones(len(design)) if weights is None else weights.reshape(-1)
  # Row counts enter the curvature alone (the residual carries them).
  expected = np.linalg.solve(design.T @ (w[:, None] * design) + np.diag(lam),
                             design.T @ residual.reshape(-1, 4))
  got = np.asarray(dk).reshape(-1, 4)
  if bias:
    got = np.concatenate([got, np.asarray(db)[None]])
  # float64 solve of a system with condition number ≲ 10³: 1e-10.
  np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
  assert float(info.residual) < 1e-10


def _largest_buffer(fn, *args):
  """The most elements of any value in ``fn``'s jaxpr, sub-jaxprs included."""
  def walk(jaxpr):
    sizes = [np.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars
             if hasattr(v.aval, 'shape')]
    for eqn in jaxpr.eqns:
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        sizes.append(walk(sub))
    return max(sizes, default=0)
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize('strides', [(1, 1), (2, 2)])
def test_exact_solve_holds_no_patch_matrix(strides):
  """No value of the solve is larger than the padded input or the Gram."""
  x = jnp.ones((4, 16, 16, 8))
  kind = sibp_jax.Conv(strides, ((1, 1), (1, 1)), (1, 1))
  outputs = kind.apply(jnp.zeros((3, 3, 8, 8)), None, x)
  problem = sibp_jax.RidgeProblem(kind, x, outputs, (3, 3, 8, 8), (8,),
                                  1.0, 1.0)
  patches = kind.design(x, (3, 3)).size
  largest = _largest_buffer(sibp_jax.Ridge().solve, problem)
  # The input padded by the window's reach (2) on every side.
  padded_input, gram = 4 * 20 * 20 * 8, (9 * 8 + 1) ** 2
  assert largest <= max(padded_input, gram) < patches, (largest, patches)
  # What the design-matrix path held: the patches themselves.
  assert _largest_buffer(sibp_jax.Ridge('woodbury').solve, problem) >= patches


class Upsampler(nnx.Module):
  """Conv, then ConvTranspose (stride 2) back up, then a dense head."""

  def __init__(self, padding, seed=0):
    kw = dict(rngs=nnx.Rngs(seed), param_dtype=jnp.float64)
    self.down = nnx.Conv(2, 3, (3, 3), strides=2, **kw)
    self.up = nnx.ConvTranspose(3, 4, (3, 2), strides=(2, 3),
                                padding=padding, **kw)
    self.head = nnx.Linear(4, 3, **kw)

  def __call__(self, x):
    h = jax.nn.relu(self.up(jnp.tanh(self.down(x))))
    return self.head(h.mean(axis=(1, 2)))


class LinenUpsampler(nn.Module):
  padding: object

  @nn.compact
  def __call__(self, x):
    kw = dict(param_dtype=jnp.float64)
    h = jnp.tanh(nn.Conv(3, (3, 3), strides=2, name='down', **kw)(x))
    h = jax.nn.relu(nn.ConvTranspose(4, (3, 2), strides=(2, 3),
                                     padding=self.padding, name='up',
                                     **kw)(h))
    return nn.Dense(3, name='head', **kw)(h.mean(axis=(1, 2)))


@pytest.mark.parametrize('padding', ['SAME', 'VALID', ((2, 1), (0, 2))])
def test_conv_transpose_is_solved_by_the_layer_rule(padding):
  """The recorded kind reproduces Flax's ConvTranspose, and ProxBP's
  direction tends to τ times the gradient for its kernel and bias (it would
  equal the gradient itself if the layer were left to the gradient)."""
  model = Upsampler(padding)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(3, 8, 9, 2)))
  y = jnp.asarray(rng.integers(0, 3, 3))
  loss_fn = optax.softmax_cross_entropy_with_integer_labels
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=loss_fn)
  up = [p for p in problems.layers if 'up' in str(p.kernel_path)]
  assert len(up) == 1 and up[0].kind.input_dilation == (2, 3)
  expected = model.up(jnp.tanh(model.down(x)))
  np.testing.assert_allclose(
      up[0].kind.apply(model.up.kernel[...], model.up.bias[...],
                       up[0].inputs), expected, rtol=1e-12, atol=1e-12)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = nnx.as_pure(grads)
  tau = 1e-10
  tx = sibp_jax.scale_by_proxbp(tau)
  direction = tx.update(grads, tx.init(params), params,
                        problems=problems)[0]
  for name in ('kernel', 'bias'):
    got, grad = direction['up'][name], grads['up'][name]
    # float64: the proximal solve's next term is τ‖FᵀF‖ ≈ 1e-7 relative.
    np.testing.assert_allclose(np.asarray(got) / tau, grad, rtol=1e-5,
                               atol=1e-12)
  # linen: the same layer, the same problem and solve.
  lparams = {name: {k: jnp.asarray(v) for k, v in layer.items()}
             for name, layer in params.items()}
  _, lgrads, lproblems = sibp_jax.linen.value_grad_and_problems(
      LinenUpsampler(padding), lparams, x, y, loss_fn=loss_fn)
  lup = [p for p in lproblems.layers if 'up' in str(p.kernel_path)]
  assert lup[0].kind == up[0].kind
  ldirection = tx.update(lgrads, tx.init(lparams), lparams,
                         problems=lproblems)[0]
  np.testing.assert_allclose(ldirection['up']['kernel'],
                             direction['up']['kernel'], rtol=1e-9)


def test_transposed_kernel_is_refused_by_name():
  class Net(nnx.Module):
    def __init__(self):
      self.up = nnx.ConvTranspose(2, 3, (3, 3), strides=2,
                                  transpose_kernel=True, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.up(x).mean(axis=(1, 2))

  x, y = jnp.ones((2, 4, 4, 2)), jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="'up'.*transpose_kernel"):
    sibp_jax.nnx.value_grad_and_problems(
        Net(), x, y, loss_fn=optax.softmax_cross_entropy_with_integer_labels)
