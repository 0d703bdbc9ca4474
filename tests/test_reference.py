"""One library step against a NumPy transcription of docs/algorithms.md.

Each algorithm of ``docs/algorithms.md`` is transcribed below in float64
NumPy for a small ReLU MLP (2 or 3 linear layers, softmax cross-entropy with
integer labels) without calling the library's solvers or sweep:

* section 2, SIBP linearized (``sibp_jax.sibp(eta, variant='linearized')``),
  whose update is ``X_new - X_old``;
* section 1, SIBP as its authors run it (``variant='paper'``): the last layer
  by its two ridge closed forms, each hidden layer by Fletcher–Reeves
  nonlinear CG with Armijo backtracking, as ``sibp_jax.NonlinearCG`` states
  its rule;
* section 3, ProxBP (``sibp_jax.scale_by_proxbp``), whose direction is
  ``X_old - X_new``, and ``sibp_jax.proxbp`` with plain SGD on top.

The ridge problems are solved here by ``np.linalg.solve`` on the normal
equations in parameter space, whatever the shape, so the cases where the
library takes its batch-space (Woodbury) path are checked against an
independent solve.
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

# (batch B, layer widths d0, d1, ..., dL). Which exact solve the library picks
# for a ridge problem with m columns and B rows: Cholesky if m <= B, else
# Woodbury. The linearized variant and ProxBP fit [W; b] (m = d_in + 1); the
# paper variant's last layer fits W alone (m = d_in). The paper variant's
# hidden layers run their nonlinear CG in row space when d_in > B (layer 1 of
# the first and third shapes, layer 2 of the fourth), else over the kernel.
SHAPES = {
    # layer 1: m = 9 > 6, Woodbury; layer 2: m = 5 <= 6, Cholesky.
    'mlp2-B6-8-4-3': (6, (8, 4, 3)),
    # layer 1: m = 6 <= 7, Cholesky; layer 2: m = 9 > 7, Woodbury (and the
    # paper variant's weights-only last layer: m = 8 > 7, Woodbury).
    'mlp2-B7-5-8-3': (7, (5, 8, 3)),
    # Woodbury, Cholesky (m = 6 = B), Cholesky.
    'mlp3-B6-7-5-4-3': (6, (7, 5, 4, 3)),
    # Cholesky, Woodbury, Cholesky.
    'mlp3-B7-5-8-4-3': (7, (5, 8, 4, 3)),
}

# (eta, lambda_w, lambda_b); unequal lambdas catch a swap of the two.
HYPERS = [
    (0.1, 1.0, 1.0),
    (1.0, 1.0, 1.0),
    (0.1, 0.5, 0.5),
    (1.0, 0.5, 1.0),
    (1.0, 1.0, 0.5),
]

# The exact variants run in float32. Each step is a chain of ridge solves
# whose matrices have condition number <= 1 + ||F||^2 / min(lambda) (at most
# about 55 here), so float32 round-off (eps ~ 6e-8) leaves errors of a few
# 1e-6 of an update's size (largest seen: 3e-6 linearized, 7e-6 ProxBP).
# Entries near zero are judged against the largest entry of the same array
# (ATOL_F32 times it).
RTOL_F32 = 2e-5
ATOL_F32 = 2e-5

# The paper variant runs in float64 (jax_enable_x64) so that every Armijo
# accept/reject decision is the same as in this transcription (checked
# through the count of objective evaluations); the two then differ only by
# float64 round-off carried through the CG iterations (largest seen: 3e-14
# of an update's size), far below this.
RTOL_F64 = 1e-10
ATOL_F64 = 1e-10


# The shapes of the tests that need only two: each has a layer whose fit
# runs in row space (layer 1 of the first, layer 2 of the second).
TWO_SHAPES = ('mlp2-B6-8-4-3', 'mlp3-B7-5-8-4-3')


def _cases(names=tuple(SHAPES)):
  return [pytest.param(*SHAPES[name], id=name) for name in names]


# --------------------------------------------------------------------------
# The problem: random weights, inputs and labels.
# --------------------------------------------------------------------------


def _problem(batch, sizes, seed=0):
  """Random ``[(W, b), ...]``, inputs and labels, all exact float32 values."""
  rng = np.random.default_rng(seed)
  params = []
  for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True):
    w = rng.normal(scale=1.0 / np.sqrt(d_in), size=(d_in, d_out))
    b = rng.normal(scale=0.2, size=(d_out,))
    params.append((w, b))
  x = rng.normal(size=(batch, sizes[0]))
  y = rng.integers(0, sizes[-1], size=(batch,))
  # Round to float32 so that the float32 library run and this float64
  # transcription start from exactly the same numbers.
  to32 = lambda a: a.astype(np.float32).astype(np.float64)
  return [(to32(w), to32(b)) for w, b in params], to32(x), y.astype(np.int32)


# --------------------------------------------------------------------------
# NumPy transcription of docs/algorithms.md.
# --------------------------------------------------------------------------


def _relu(g):
  return np.maximum(g, 0.0)


def _relu_grad(g):
  # s'(g) for ReLU; 0 at g = 0, as jax.nn.relu (never hit with random data).
  return (g > 0).astype(np.float64)


def _forward(params, x):
  """Returns ``fs, gs``: ``fs[i] = f_i`` (``fs[0] = x``), ``gs[i] = g_{i+1}``.

  With 0-based layers, layer ``i`` maps ``fs[i]`` to ``gs[i]``; the logits
  are ``z = gs[-1]`` and ``fs[i + 1] = relu(gs[i])`` for the hidden layers.
  """
  fs, gs = [x], []
  for i, (w, b) in enumerate(params):
    g = fs[-1] @ w + b
    gs.append(g)
    if i + 1 < len(params):
      fs.append(_relu(g))
  return fs, gs


def _output_error(z, y):
  """``e = ∂ℓ/∂z`` per example: ``softmax(z) - onehot(y)``."""
  p = np.exp(z - z.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  return p


def _with_ones(f):
  """``F = [f, 1]``."""
  return np.concatenate([f, np.ones((f.shape[0], 1))], axis=1)


def sibp_linearized_step(params, x, y, eta, lam_w, lam_b):
  """docs/algorithms.md section 2: one step; the new ``[(W, b), ...]``."""
  fs, gs = _forward(params, x)
  n_layers = len(params)
  e = _output_error(gs[-1], y)  # error on the layer's output f_i (z on top)
  new = [None] * n_layers
  for i in reversed(range(n_layers)):
    w, b = params[i]
    f_in, g = fs[i], gs[i]
    if i == n_layers - 1:
      u = g - eta * e  # u_L = t_L = z - eta e
    else:
      f_out = fs[i + 1]
      t = f_out - eta * e
      u = g + _relu_grad(g) * (t - f_out)
    # X_new = X_old + (FᵀF + Λ)⁻¹ Fᵀ (u - g),  Λ = diag(λ_W, …, λ_W, λ_b).
    big_f = _with_ones(f_in)
    lam = np.diag([lam_w] * w.shape[0] + [lam_b])
    delta = np.linalg.solve(big_f.T @ big_f + lam, big_f.T @ (u - g))
    w_new, b_new = w + delta[:-1], b + delta[-1]
    new[i] = (w_new, b_new)
    if i:
      # e <- (e ⊙ s'(g_i)) W_newᵀ (the top layer has no s: e <- e W_newᵀ).
      e_g = e if i == n_layers - 1 else e * _relu_grad(g)
      e = e_g @ w_new.T
  return new


def nonlinear_cg(fun, grad, x0, *, iterations=5, shrink=0.6,
                 sufficient_decrease=0.1, max_shrinks=50,
                 initial_decrease=0.01, stats=None):
  """Fletcher–Reeves nonlinear CG with Armijo backtracking over powers of ρ.

  The SIBP authors' hidden-layer rule (docs/algorithms.md section 1) with
  their slips fixed: trials ``α = ρ^m`` for ``m = m₀, m₀ + 1, …`` in order,
  the first passing one taken (also at ``m = 0``), starting from the
  authors' ``m₀ = max(floor(log(c φ / (σ |∇φ·d|)) / log ρ), 0)``: the
  largest power of ρ, at most 1, with ``σ ρ^m₀ |∇φ·d| ≥ c φ``. The
  defaults are the authors' settings (K = 5, ρ = 0.6, σ = 0.1, c = 0.01);
  the shrinks after the first trial are bounded by ``max_shrinks``, and a
  direction that is not descent is restarted from ``-∇φ``, as
  ``sibp_jax.NonlinearCG`` documents.

  Returns ``(x, evaluations)``: evaluations count every objective evaluation
  (the start, each line-search trial, and the value and gradient at each
  iteration's end point), as ``sibp_jax.SolveInfo.iterations`` documents.
  ``stats``, if given, counts which branches ran: ``'restart'`` (direction
  not descent), ``'shrink'`` (rejected trials), ``'stuck'`` (no trial
  accepted) and ``'unit'`` (a first trial of α = 1, m₀ = 0).
  """
  rho, sigma = shrink, sufficient_decrease
  stats = {} if stats is None else stats
  count = lambda key: stats.__setitem__(key, stats.get(key, 0) + 1)
  x = x0
  f, g = fun(x), grad(x)
  d = -g
  evals = 1
  for _ in range(iterations):
    gg = np.vdot(g, g)
    slope = np.vdot(g, d)
    if not slope < 0:  # not a descent direction: restart
      count('restart')
      d = -g
      slope = -gg
    if slope < 0 and f > 0:
      m0 = max(int(np.floor(np.log(initial_decrease * f / (sigma * -slope)) /
                            np.log(rho))), 0)
      alpha0 = rho**m0
      if m0 == 0:
        count('unit')
    else:
      alpha0 = 0.0
    accepted, alpha = False, 0.0
    for j in range(max_shrinks + 1):
      trial = alpha0 * rho**j
      f_trial = fun(x + trial * d)
      evals += 1
      if np.isfinite(f_trial) and f_trial < f + sigma * trial * slope:
        accepted, alpha = True, trial
        break
      count('shrink')
    if not accepted:
      count('stuck')
    x = x + alpha * d  # x stays put when nothing was accepted
    f_new, g_new = fun(x), grad(x)
    evals += 1
    beta = np.vdot(g_new, g_new) / gg if gg > 0 else 0.0
    d = -g_new + beta * d if accepted else -g_new
    f = f_new if accepted else f
    g = g_new
  return x, evals


def sibp_paper_step(params, x, y, eta, lam_w, lam_b, **cg_settings):
  """docs/algorithms.md section 1: one step; new params and CG evaluations.

  ``cg_settings`` go to :func:`nonlinear_cg` (the hidden layers' solver).
  """
  fs, gs = _forward(params, x)
  n_layers = len(params)
  e = _output_error(gs[-1], y)
  new = [None] * n_layers
  evals = 0

  # Last layer: two ridge problems in closed form.
  w, b = params[-1]
  f_in, z = fs[-1], gs[-1]
  t = z - eta * e
  # argmin_W ‖f W + b - t‖² + λ_W ‖W - W_old‖², bias held at its old value.
  w_new = np.linalg.solve(f_in.T @ f_in + lam_w * np.eye(w.shape[0]),
                          f_in.T @ (t - b) + lam_w * w)
  # argmin_b ‖f W_new + b - t‖² + λ_b ‖b - b_old‖², with the new weights.
  b_new = ((t - f_in @ w_new).sum(axis=0) + lam_b * b) / (len(y) + lam_b)
  new[-1] = (w_new, b_new)
  e = e @ w_new.T

  # Hidden layers, top to bottom: fit through the ReLU.
  for i in reversed(range(n_layers - 1)):
    w, b = params[i]
    f_in, g, f_out = fs[i], gs[i], fs[i + 1]
    t = f_out - eta * e

    def misfit(w_, b_, f_in=f_in, t=t):
      r = _relu(f_in @ w_ + b_) - t
      return np.vdot(r, r)

    def misfit_grad_g(w_, b_, f_in=f_in, t=t):
      """∂/∂g of ‖relu(g) - t‖² at g = f w + b."""
      g_ = f_in @ w_ + b_
      return 2.0 * (_relu(g_) - t) * _relu_grad(g_)

    w_new, n_w = nonlinear_cg(
        lambda w_, w=w, b=b, misfit=misfit: (
            misfit(w_, b) + lam_w * np.vdot(w_ - w, w_ - w)),
        lambda w_, w=w, b=b, f_in=f_in, mg=misfit_grad_g: (
            f_in.T @ mg(w_, b) + 2.0 * lam_w * (w_ - w)),
        w, **cg_settings)
    b_new, n_b = nonlinear_cg(
        lambda b_, b=b, w_new=w_new, misfit=misfit: (
            misfit(w_new, b_) + lam_b * np.vdot(b_ - b, b_ - b)),
        lambda b_, b=b, w_new=w_new, mg=misfit_grad_g: (
            mg(w_new, b_).sum(axis=0) + 2.0 * lam_b * (b_ - b)),
        b, **cg_settings)
    evals += n_w + n_b
    new[i] = (w_new, b_new)
    if i:
      e = (e * _relu_grad(g)) @ w_new.T
  return new, evals


def proxbp_direction(params, x, y, tau_prox):
  """docs/algorithms.md section 3: ``[(W_old - W_new, b_old - b_new), ...]``."""
  fs, gs = _forward(params, x)
  n_layers = len(params)
  # δ = ∂J/∂g of the MEAN loss, backpropagated with the OLD weights.
  delta = _output_error(gs[-1], y) / len(y)
  out = [None] * n_layers
  for i in reversed(range(n_layers)):
    w, b = params[i]
    tau = gs[i] - delta
    # argmin ½‖F X - τ‖² + 1/(2 τ_prox) ‖X - X_old‖²:
    # (FᵀF + I/τ_prox) X = Fᵀτ + X_old/τ_prox.
    big_f = _with_ones(fs[i])
    x_old = np.concatenate([w, b[None]], axis=0)
    x_new = np.linalg.solve(
        big_f.T @ big_f + np.eye(big_f.shape[1]) / tau_prox,
        big_f.T @ tau + x_old / tau_prox)
    out[i] = (w - x_new[:-1], b - x_new[-1])
    if i:
      delta = (delta @ w.T) * _relu_grad(gs[i - 1])
  return out


# --------------------------------------------------------------------------
# The library side.
# --------------------------------------------------------------------------


class MLP(nnx.Module):
  """``nnx.Linear`` layers with ReLU between them, weights set from NumPy."""

  def __init__(self, params, dtype):
    rngs = nnx.Rngs(0)
    self.layers = nnx.List([
        nnx.Linear(w.shape[0], w.shape[1], rngs=rngs, param_dtype=dtype,
                   dtype=dtype) for w, _ in params])
    for layer, (w, b) in zip(self.layers, params, strict=True):
      layer.kernel.set_value(jnp.asarray(w, dtype))
      layer.bias.set_value(jnp.asarray(b, dtype))

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


def _transformation(algorithm, hypers, solver):
  """The library transformation under test; ``hypers`` may be traced."""
  if algorithm in ('linearized', 'paper'):
    eta, lam_w, lam_b = hypers
    return sibp_jax.sibp(
        eta, variant=algorithm, lambda_w=lam_w, lambda_b=lam_b,
        **{'nonlinear_solver' if algorithm == 'paper' else 'solver': solver})
  if algorithm == 'scale_by_proxbp':
    (tau_prox,) = hypers
    return sibp_jax.scale_by_proxbp(tau_prox)
  if algorithm == 'proxbp_sgd':
    learning_rate, tau_prox = hypers
    return sibp_jax.proxbp(learning_rate, tau_prox=tau_prox, momentum=None)
  raise ValueError(algorithm)


@functools.partial(jax.jit, static_argnames=('runs',))
def _library_updates(runs, hypers, params, x, y):
  """One forward pass, then one update per ``(algorithm, solver)`` of runs.

  Jitted with the hyperparameters traced (``hypers[i]`` for ``runs[i]``) and
  every algorithm of a precision in one program, so that each shape
  compiles once per precision (this keeps the file fast); users jit the
  step too.
  """
  model = MLP(params, x.dtype)
  _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=optax.softmax_cross_entropy_with_integer_labels)
  params_pure = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = nnx.as_pure(grads)
  out = []
  for (algorithm, solver), h in zip(runs, hypers, strict=True):
    tx = _transformation(algorithm, h, solver)
    updates, state = tx.update(grads, tx.init(params_pure), params_pure,
                               problems=problems)
    layers = updates['layers']
    out.append(([(layers[i]['kernel'], layers[i]['bias'])
                 for i in range(len(params))], state))
  return out


# What runs in each precision's program, with hyperparameters for the runs
# a test does not look at. The runs marked ``two`` only on TWO_SHAPES.
F32_RUNS = {('linearized', None): HYPERS[0], ('scale_by_proxbp', None): (0.05,),
            ('proxbp_sgd', None): (0.5, 0.05)}


def _runs(algorithm, batch, sizes):
  """The runs of the program of ``algorithm``'s precision for a shape."""
  two = (batch, sizes) in [SHAPES[name] for name in TWO_SHAPES]
  if algorithm == 'paper':
    solvers = [None] + [sibp_jax.NonlinearCG(**settings)
                        for settings, _ in OTHER_CG.values()]
    if two:
      solvers.append(sibp_jax.NonlinearCG(space='parameters'))
    return [('paper', s) for s in solvers]
  return [run for run in F32_RUNS if two or run[0] != 'proxbp_sgd']


def library_step(algorithm, hypers, params, x, y, dtype, solver=None):
  """One ``tx.update`` on the MLP; returns ``[(dW, db), ...]`` and the state.

  Float32 runs share one program per shape, the paper variant's runs
  another (all with ``hypers``): see ``_runs``.
  """
  to = lambda a: jnp.asarray(a, dtype)
  sizes = tuple(w.shape[0] for w, _ in params) + (params[-1][0].shape[1],)
  runs = _runs(algorithm, len(x), sizes)
  all_hypers = [hypers if run == (algorithm, solver) or algorithm == 'paper'
                else F32_RUNS[run] for run in runs]
  out, state = _library_updates(
      tuple(runs), [tuple(to(h) for h in hs) for hs in all_hypers],
      [(to(w), to(b)) for w, b in params], to(x),
      jnp.asarray(y))[runs.index((algorithm, solver))]
  chex.assert_type(jax.tree.leaves(out), dtype)
  return [(np.asarray(w, np.float64), np.asarray(b, np.float64))
          for w, b in out], state


def assert_layers_close(actual, expected, rtol, atol):
  """Each array to ``rtol``, plus ``atol`` times its largest expected entry."""
  for i, (got, want) in enumerate(zip(actual, expected, strict=True)):
    for name, a, b in zip(('kernel', 'bias'), got, want, strict=True):
      chex.assert_shape(a, b.shape)
      np.testing.assert_allclose(
          a, b, rtol=rtol, atol=atol * max(np.abs(b).max(), 1e-30),
          err_msg=f'layer {i} {name}')


def _differences(new, old):
  return [(w1 - w0, b1 - b0)
          for (w1, b1), (w0, b0) in zip(new, old, strict=True)]


# --------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('eta,lam_w,lam_b', HYPERS)
@pytest.mark.parametrize('batch,sizes', _cases())
def test_sibp_linearized_matches_transcription(batch, sizes, eta, lam_w,
                                               lam_b):
  params, x, y = _problem(batch, sizes)
  expected = _differences(
      sibp_linearized_step(params, x, y, eta, lam_w, lam_b), params)
  got, state = library_step('linearized', (eta, lam_w, lam_b), params, x, y,
                            jnp.float32)
  assert bool(state[0].info.finite)
  assert_layers_close(got, expected, RTOL_F32, ATOL_F32)


def _check_paper(batch, sizes, hypers, cg_settings, branch=None,
                 space='auto'):
  params, x, y = _problem(batch, sizes)
  stats = {}
  new, evals = sibp_paper_step(params, x, y, *hypers, **cg_settings,
                               stats=stats)
  if branch is not None:
    # The case is meant to exercise this branch of the line search.
    assert stats.get(branch, 0) > 0, stats
  expected = _differences(new, params)
  solver = sibp_jax.NonlinearCG(**cg_settings, space=space) if (
      cg_settings or space != 'auto') else None
  with jax.enable_x64(True):
    got, state = library_step('paper', hypers, params, x, y, jnp.float64,
                              solver=solver)
    info = state[0].info
    assert bool(info.finite)
    # The same number of objective evaluations means the same line-search
    # decisions (the exact last layer counts none).
    assert sum(int(i) for i in info.iterations.values()) == evals
  assert_layers_close(got, expected, RTOL_F64, ATOL_F64)


@pytest.mark.parametrize('eta,lam_w,lam_b', HYPERS)
@pytest.mark.parametrize('batch,sizes', _cases())
def test_sibp_paper_matches_transcription(batch, sizes, eta, lam_w, lam_b):
  # The authors' solver settings (the default NonlinearCG()), whose first
  # trial (sufficient-decrease term 1% of the objective, a power of ρ) is
  # often accepted and sometimes shrunk.
  _check_paper(batch, sizes, (eta, lam_w, lam_b), {})


@pytest.mark.parametrize('batch,sizes', _cases(TWO_SHAPES))
def test_sibp_paper_in_parameter_space_matches_transcription(batch, sizes):
  # space='parameters' keeps the kernel fits out of row space (the GSPMD
  # setting): the same transcription holds on the cases that use row space.
  _check_paper(batch, sizes, HYPERS[1], {}, space='parameters')


# Other NonlinearCG settings, chosen so that the line search's other branches
# run on every case: many rejected trials (a long first trial step), a first
# trial of α = 1 (m₀ = 0, the cap), and iterations where no trial is
# accepted and the point is kept (few shrinks).
OTHER_CG = {
    'unit-first-trial': ({'iterations': 5, 'initial_decrease': 10.0},
                         'unit'),
    'long-first-step': ({'iterations': 8, 'initial_decrease': 0.1},
                        'shrink'),
    'few-shrinks': ({'iterations': 8, 'initial_decrease': 0.3,
                     'shrink': 0.3, 'sufficient_decrease': 0.2,
                     'max_shrinks': 3}, 'stuck'),
}


@pytest.mark.parametrize('cg', list(OTHER_CG))
@pytest.mark.parametrize('eta,lam_w,lam_b', [HYPERS[1], HYPERS[3]])
@pytest.mark.parametrize('batch,sizes', _cases())
def test_sibp_paper_line_search_branches(batch, sizes, eta, lam_w, lam_b,
                                         cg):
  cg_settings, branch = OTHER_CG[cg]
  _check_paper(batch, sizes, (eta, lam_w, lam_b), cg_settings, branch)


@pytest.mark.parametrize('tau_prox', [0.05, 1.0])
@pytest.mark.parametrize('batch,sizes', _cases())
def test_proxbp_matches_transcription(batch, sizes, tau_prox):
  params, x, y = _problem(batch, sizes)
  expected = proxbp_direction(params, x, y, tau_prox)
  got, state = library_step('scale_by_proxbp', (tau_prox,), params, x, y,
                            jnp.float32)
  assert bool(state.info.finite)
  assert_layers_close(got, expected, RTOL_F32, ATOL_F32)


@pytest.mark.parametrize('learning_rate', [0.5, 1.0])
@pytest.mark.parametrize('batch,sizes', _cases(TWO_SHAPES))
def test_proxbp_with_sgd_steps_along_direction(batch, sizes, learning_rate):
  params, x, y = _problem(batch, sizes)
  tau_prox = 0.05
  expected = [(-learning_rate * dw, -learning_rate * db)
              for dw, db in proxbp_direction(params, x, y, tau_prox)]
  got, _ = library_step('proxbp_sgd', (learning_rate, tau_prox), params, x, y,
                        jnp.float32)
  assert_layers_close(got, expected, RTOL_F32, ATOL_F32)
