"""Solvers against closed forms, each other, and their own guarantees."""

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sibp_jax
from sibp_jax._src.solvers import cholesky

# float32 solves of systems with condition number up to ~1e3 (λ = 0.5..2,
# ‖F‖² ~ rows·cols): a relative residual of 1e-4 is ~1000 ulps, tight enough
# to catch a wrong formula (which gives O(1)) and loose enough for round-off.
RTOL = 1e-4


def _problem(rows, cols, d_out, seed=0, kernel=True, bias=True,
             lam_kernel=1.0, lam_bias=0.5):
  rng = np.random.default_rng(seed)
  f = jnp.asarray(rng.normal(size=(rows, cols)), jnp.float32)
  r = jnp.asarray(rng.normal(size=(rows, d_out)), jnp.float32)
  return sibp_jax.RidgeProblem(
      sibp_jax.Dense(), f, r, (cols, d_out) if kernel else None,
      (d_out,) if bias else None, jnp.float32(lam_kernel),
      jnp.float32(lam_bias))


def _closed_form(p):
  """The ridge solution by NumPy in float64, from its normal equations."""
  f = np.asarray(p.inputs, np.float64)
  blocks, lam = [], []
  if p.kernel_shape is not None:
    blocks.append(f)
    lam += [float(p.lam_kernel)] * f.shape[1]
  if p.bias_shape is not None:
    blocks.append(np.ones((f.shape[0], 1)))
    lam += [float(p.lam_bias)]
  design = np.concatenate(blocks, axis=1)
  gram = design.T @ design + np.diag(lam)
  x = np.linalg.solve(gram, design.T @ np.asarray(p.residual, np.float64))
  return design, gram, x


@functools.partial(jax.jit, static_argnums=0)
def _jit_solves(solvers, p):
  """``[solver.solve(p) for solver in solvers]``, one compiled program.

  Module level with the solvers static: tests that solve problems of the
  same shapes with the same solvers share the program.
  """
  return [solver.solve(p) for solver in solvers]


def _jit_solve(solver, p):
  return _jit_solves((solver,), p)[0]


METHODS = ('cholesky', 'woodbury', 'auto')


@functools.cache
def _ridge_solutions(rows, cols, d_out, seed=0, kernel=True, bias=True):
  """The problem and its solves by every ``Ridge`` method, one program."""
  p = _problem(rows, cols, d_out, seed=seed, kernel=kernel, bias=bias)
  solved = _jit_solves(tuple(sibp_jax.Ridge(m) for m in METHODS), p)
  return p, dict(zip(METHODS, solved, strict=True))


def _stack(delta):
  dk, db = delta
  parts = [] if dk is None else [np.asarray(dk)]
  if db is not None:
    parts.append(np.asarray(db)[None])
  return np.concatenate(parts, axis=0)


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('rows,cols', [(40, 7), (6, 15)])
@pytest.mark.parametrize('kernel,bias', [(True, True), (True, False),
                                         (False, True)])
def test_ridge_satisfies_normal_equations(method, rows, cols, kernel, bias):
  p, solved = _ridge_solutions(rows, cols, 3, kernel=kernel, bias=bias)
  delta, info = solved[method]
  design, gram, expected = _closed_form(p)
  x = _stack(delta)
  rhs = design.T @ np.asarray(p.residual, np.float64)
  residual = np.linalg.norm(gram @ x - rhs) / np.linalg.norm(rhs)
  assert residual < RTOL, residual
  np.testing.assert_allclose(x, expected, rtol=1e-3, atol=1e-5)
  assert float(info.residual) < RTOL


@pytest.mark.parametrize('rows,cols', [(40, 7), (6, 15), (12, 11)])
def test_cholesky_and_woodbury_agree(rows, cols):
  # Other data, same shapes: the programs above serve.
  _, solved = _ridge_solutions(rows, cols, 3, seed=1)
  a, _ = solved['cholesky']
  b, _ = solved['woodbury']
  chex.assert_trees_all_close(a, b, rtol=1e-3, atol=1e-5)


def test_auto_picks_by_shape():
  """Wide problems go to batch space: the factor there is rows × rows."""
  wide = _problem(6, 15, 2)
  hlo = jax.jit(sibp_jax.Ridge().solve).lower(wide).as_text()
  assert 'tensor<6x6xf32>' in hlo and 'tensor<16x16xf32>' not in hlo
  tall = _problem(40, 7, 2)
  hlo = jax.jit(sibp_jax.Ridge().solve).lower(tall).as_text()
  assert 'tensor<8x8xf32>' in hlo and 'tensor<40x40xf32>' not in hlo


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float64])
def test_cpu_blocked_and_lapack_spd_solves_agree(dtype):
  """The CPU's blocked solves (with small LAPACK factors, and in plain XLA
  as under vmap; batched triangular inverse; one refinement step) and
  LAPACK's whole solve against NumPy's float64 solve, at sides around the
  inverse's block size (one block, two, padded ones) and at the largest
  side LAPACK factors whole and past it (one split, then two, odd ones)."""
  rng = np.random.default_rng(0)
  tol = 1e-4 if dtype == jnp.float32 else 1e-10
  whole = cholesky._single_threaded_potrf_max(dtype)
  sides = (1, cholesky._BLOCK, cholesky._BLOCK + 1, 3 * cholesky._BLOCK - 1,
           whole, whole + 1, 2 * whole + 3)
  paths = [('potrf', functools.partial(cholesky._blocked_spd_solve,
                                       lapack=True)),
           ('xla', functools.partial(cholesky._blocked_spd_solve,
                                     lapack=False)),
           ('lapack', cholesky._lapack_spd_solve)]
  with jax.enable_x64(dtype == jnp.float64):
    for n in sides:
      m = rng.normal(size=(n, 2 * n))
      a = m @ m.T / n + 0.1 * np.eye(n)  # condition number ~1e2
      b = rng.normal(size=(n, 3))
      expected = np.linalg.solve(a, b)
      args = (jnp.asarray(a, dtype), jnp.asarray(b, dtype))
      for name, solve in paths:
        if name == 'xla' and n > 2 * cholesky._BLOCK:
          continue  # the same recursion as 'potrf' above the blocks
        x = np.asarray(jax.jit(solve)(*args), np.float64)
        error = np.linalg.norm(x - expected) / np.linalg.norm(expected)
        assert error < tol, (name, n, error)


def _lapack_calls(fun, *args):
  hlo = jax.jit(fun).lower(*args).as_text()
  return re.findall(r'custom_call @lapack_(\w+)_ffi\(.*?\(tensor<([\dx]+)',
                    hlo)


def test_cpu_solve_calls_lapack_only_on_one_thread(monkeypatch):
  """On CPU the dispatch's only LAPACK calls are Cholesky factors below
  OpenBLAS's threading size: no triangular solves, whose threads wake at
  about a thousand right-hand-side entries and then spin. Past the
  blocked solve's limit it hands the whole system to LAPACK."""
  monkeypatch.setattr(cholesky, '_CPU_SOLVE_MAX', 600)
  calls = _lapack_calls(cholesky.spd_solve, jnp.eye(600), jnp.ones((600, 9)))
  assert {name for name, _ in calls} == {'spotrf'}, calls
  assert all(int(shape.split('x')[0]) <= 255 for _, shape in calls), calls
  calls = _lapack_calls(cholesky.spd_solve, jnp.eye(601), jnp.ones((601, 9)))
  assert {name for name, _ in calls} == {'spotrf', 'strsm'}


def test_cpu_solve_under_vmap_is_plain_xla():
  """Batched solves make no LAPACK call (a vmapped training scan with them
  has hung XLA:CPU) and agree with the solves one at a time, for batched
  and shared factors."""
  rng = np.random.default_rng(1)
  n = 40
  m = rng.normal(size=(3, n, 2 * n))
  a = jnp.asarray(m @ m.transpose(0, 2, 1) / n + 0.1 * np.eye(n),
                  jnp.float32)
  b = jnp.asarray(rng.normal(size=(3, n, 2)), jnp.float32)
  for axes in [(0, 0), (None, 0), (0, None)]:
    args = tuple(x if ax is not None else x[0]
                 for x, ax in zip((a, b), axes, strict=True))
    batched = jax.vmap(cholesky.spd_solve, axes)
    assert not _lapack_calls(batched, *args), axes
    one = [cholesky.spd_solve(args[0] if axes[0] is None else a[i],
                              args[1] if axes[1] is None else b[i])
           for i in range(3)]
    np.testing.assert_allclose(jax.jit(batched)(*args), jnp.stack(one),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kernel,bias', [(True, True), (True, False),
                                         (False, True)])
def test_cg_with_enough_steps_reaches_exact(kernel, bias):
  # Unknowns per output column: cols (+1); CG in exact arithmetic needs at
  # most that many steps; a few more absorb float32 round-off.
  p = _problem(30, 6, 3, seed=2, kernel=kernel, bias=bias)
  # tol=0: run all 12 steps (the default exits early, at 1e-2).
  (exact, _), (approx, info) = _jit_solves(
      (sibp_jax.Ridge(), sibp_jax.ConjugateGradient(12, tol=0.0)), p)
  chex.assert_trees_all_close(approx, exact, rtol=1e-3, atol=1e-5)
  assert float(info.residual) < 1e-3
  assert int(info.iterations) == 12
  # tol = 0 never exits early: the limit is reported, however small the
  # residual.
  assert int(info.status) == sibp_jax.SolveStatus.MAX_ITERATIONS


def test_cg_few_steps_is_partial_and_reports_it():
  p = _problem(30, 6, 3, seed=3, lam_kernel=0.01, lam_bias=0.01)
  (_, info1), (_, info12) = _jit_solves(
      (sibp_jax.ConjugateGradient(1), sibp_jax.ConjugateGradient(12, tol=0.0)),
      p)
  assert float(info1.residual) > 10 * float(info12.residual)
  assert int(info1.status) == sibp_jax.SolveStatus.MAX_ITERATIONS


def test_cg_zero_rhs_stays_zero():
  p = _problem(10, 4, 2)
  p = sibp_jax.RidgeProblem(p.kind, p.inputs, jnp.zeros_like(p.residual),
                            p.kernel_shape, p.bias_shape, p.lam_kernel,
                            p.lam_bias)
  delta, info = _jit_solve(sibp_jax.ConjugateGradient(3), p)
  chex.assert_tree_all_finite(delta)
  assert float(jnp.abs(_stack(delta)).max()) == 0.0
  assert float(info.residual) == 0.0
  assert int(info.status) == sibp_jax.SolveStatus.CONVERGED


# Every status, from each solver that can report it: an exact solve, one
# handed to a fallback that converges and one whose fallback stops at its
# limit, CG with and without enough steps, each also on a problem with a NaN.
STATUS_SOLVERS = {
    'ridge': sibp_jax.Ridge(),
    'fallback': sibp_jax.Ridge(max_factor=3,
                               fallback=sibp_jax.ConjugateGradient(20)),
    'fallback-limit': sibp_jax.Ridge(
        max_factor=3, fallback=sibp_jax.ConjugateGradient(1)),
    'cg': sibp_jax.ConjugateGradient(20),
    'cg-limit': sibp_jax.ConjugateGradient(1),
}


def test_every_status_is_reported():
  s = sibp_jax.SolveStatus
  p = _problem(30, 6, 3, seed=7)
  bad = dataclasses.replace(p, residual=p.residual.at[2, 1].set(jnp.nan))
  expected = {'ridge': s.CONVERGED, 'fallback': s.FALLBACK,
              'fallback-limit': s.MAX_ITERATIONS, 'cg': s.CONVERGED,
              'cg-limit': s.MAX_ITERATIONS}
  for problem, nonfinite in ((p, False), (bad, True)):
    solved = _jit_solves(tuple(STATUS_SOLVERS.values()), problem)
    for name, (_, info) in zip(STATUS_SOLVERS, solved, strict=True):
      want = s.NONFINITE if nonfinite else expected[name]
      assert int(info.status) == want, (name, s(int(info.status)), want)
  # The nonlinear solver: converged, at its limit (above) and not finite.
  solver = sibp_jax.NonlinearCG()
  _, info = solver.minimize(lambda x: jnp.sum(x ** 2) * jnp.nan, jnp.ones(3))
  assert int(info.status) == s.NONFINITE
  assert s.unconverged(s.NONFINITE) and not s.unconverged(s.FALLBACK)
  assert 'iteration limit' in s.MAX_ITERATIONS.message


def _relu_fit(seed):
  """The data ``(f, t, w0)`` of a ReLU fit (see ``_relu_objective``)."""
  rng = np.random.default_rng(seed)
  f = jnp.asarray(rng.normal(size=(20, 5)), jnp.float32)
  t = jnp.asarray(np.maximum(rng.normal(size=(20, 4)), 0), jnp.float32)
  w0 = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  return f, t, w0


@jax.jit
def _relu_objective(w, f, t, w0):
  fit = jax.nn.relu(f @ w) - t
  return jnp.vdot(fit, fit) + 0.5 * jnp.vdot(w - w0, w - w0)


@functools.partial(jax.jit, static_argnums=0)
def _minimize_relu_fit(solver, f, t, w0):
  """``solver.minimize`` of the ReLU fit from ``w0``; the data are traced,
  so that one program per solver serves every seed."""
  return solver.minimize(lambda w: _relu_objective(w, f, t, w0), w0)


@pytest.mark.parametrize('seed', range(5))
@pytest.mark.parametrize('iterations', [1, 5])
def test_nonlinear_cg_never_increases_objective(seed, iterations):
  data = _relu_fit(seed)
  objective = lambda w: float(_relu_objective(w, *data))
  solver = sibp_jax.NonlinearCG(iterations=iterations)
  w, info = _minimize_relu_fit(solver, *data)
  assert objective(w) < objective(data[-1])
  # The iterates' objective is monotone: each prefix of the run ends no
  # higher than the one before it.
  values = [objective(_minimize_relu_fit(sibp_jax.NonlinearCG(iterations=k),
                                         *data)[0])
            for k in range(1, iterations + 1)]
  assert all(b <= a for a, b in zip(values, values[1:])), values
  assert int(info.iterations) >= 1 + iterations
  # A few iterations leave the gradient above 1e-2 of its start.
  assert float(info.residual) > solver.tol
  assert int(info.status) == sibp_jax.SolveStatus.MAX_ITERATIONS


def test_nonlinear_cg_keeps_point_when_no_step_is_accepted():
  """With no shrinks allowed and a first step far too long, nothing moves."""
  data = _relu_fit(0)
  solver = sibp_jax.NonlinearCG(iterations=3, max_shrinks=0,
                                initial_decrease=1e6)
  w, _ = _minimize_relu_fit(solver, *data)
  chex.assert_trees_all_equal(w, data[-1])


def test_nonlinear_cg_stationary_start_stays():
  solver = sibp_jax.NonlinearCG()
  w0 = jnp.ones((3, 2))
  w, info = solver.minimize(lambda w: jnp.vdot(w - 1.0, w - 1.0), w0)
  chex.assert_trees_all_equal(w, w0)
  assert float(info.residual) == 0.0
  assert int(info.status) == sibp_jax.SolveStatus.CONVERGED


def test_nonlinear_cg_converges_on_quadratic():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(8,)), jnp.float32)
  objective = lambda x: jnp.sum((a @ x - b) ** 2) + jnp.sum(x ** 2)
  solver = sibp_jax.NonlinearCG(iterations=200, initial_decrease=0.5)
  x, info = solver.minimize(objective, jnp.zeros(8))
  expected = jnp.linalg.solve(a.T @ a + jnp.eye(8), a.T @ b)
  np.testing.assert_allclose(x, expected, rtol=1e-2, atol=1e-3)
  assert float(info.residual) < 1e-2
  assert int(info.status) == sibp_jax.SolveStatus.CONVERGED


@jax.jit
def _minimize_in_both_spaces(f, t, w0):
  """The ReLU fit below by ``minimize`` (the kernel, through ``linear``)
  and by ``minimize_in_row_space``; compiled once for every seed."""
  n, d = t.shape
  lam, y_old = 0.7, f @ w0
  fit = lambda y: jnp.sum((jax.nn.relu(y) - t) ** 2)
  solver = sibp_jax.NonlinearCG(iterations=5)
  w, info = solver.minimize(
      lambda y, k: fit(y) + lam * jnp.vdot(k - w0, k - w0), w0,
      linear=lambda k: f @ k)
  c, image, info_rows = solver.minimize_in_row_space(
      lambda v: fit(y_old + v), f @ f.T, lam, jnp.zeros((n, d), f.dtype))
  return w, info, c, image, info_rows


@pytest.mark.parametrize('seed', range(3))
def test_nonlinear_cg_in_row_space_is_the_same_iteration(seed):
  """Row space (Δ = Fᵀc, n < m) retraces minimize's iterates in float64.

  Same points, same number of objective evaluations (so every Armijo test
  decided alike), same reported gradient-norm ratio.
  """
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    n, m, d = 6, 15, 4
    f = jnp.asarray(rng.normal(size=(n, m)))
    t = jnp.asarray(np.maximum(rng.normal(size=(n, d)), 0))
    w0 = jnp.asarray(rng.normal(size=(m, d))) * 0.3
    w, info, c, image, info_rows = _minimize_in_both_spaces(f, t, w0)
    np.testing.assert_allclose(w0 + f.T @ c, w, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(image, f @ (f.T @ c), rtol=1e-10, atol=1e-12)
    assert int(info_rows.iterations) == int(info.iterations)
    np.testing.assert_allclose(info_rows.residual, info.residual, rtol=1e-8)
    assert float(jnp.abs(c).max()) > 0


@pytest.mark.parametrize('kwargs', [
    dict(iterations=0), dict(iterations=2.0), dict(shrink=1.0),
    dict(shrink=0.0), dict(sufficient_decrease=1.5), dict(max_shrinks=-1),
    dict(initial_decrease=0.0), dict(space='rows')])
def test_nonlinear_cg_rejects_bad_settings(kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    sibp_jax.NonlinearCG(**kwargs)


def test_other_solvers_reject_bad_settings():
  with pytest.raises(ValueError, match='iterations'):
    sibp_jax.ConjugateGradient(0)
  with pytest.raises(ValueError, match='method'):
    sibp_jax.Ridge('qr')


def test_ridge_vmaps_over_problems():
  ps = [_problem(12, 5, 2, seed=s) for s in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *ps)
  batched, _ = jax.jit(jax.vmap(sibp_jax.Ridge().solve))(stacked)
  for i, p in enumerate(ps):
    single, _ = _jit_solve(sibp_jax.Ridge(), p)
    chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], batched),
                                single,
                                rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Block CG against a NumPy transcription of the ProxBP authors' prox_cgN.
# --------------------------------------------------------------------------


def block_cg(apply_m, rhs, iterations, eps=1e-6, tol=1e-2):
  """The ProxBP authors' "matrix version" of CG, float64, slip fixed.

  Solves ``M X = rhs`` from ``X = 0`` for every column of ``rhs`` at once,
  with per-column step ``α = ‖r‖² / (pᵀMp + ε)`` and conjugation weight
  ``β = ‖r_new‖² / (‖r‖² + ε)``; stops after ``iterations`` steps or, before
  that, once the largest column's ``‖r‖²`` is below ``tol²`` times the mean
  initial one. The first direction is a copy of the residual (the authors'
  code aliases the two). Returns ``(X, steps)``.
  """
  x = np.zeros_like(rhs)
  r = rhs.copy()
  p = r.copy()
  rr = np.sum(r * r, axis=0)
  scale = np.mean(rr)
  k = 0
  while True:
    k += 1
    mp = apply_m(p)
    alpha = rr / (np.sum(p * mp, axis=0) + eps)
    x = x + alpha * p
    if k == iterations:
      break
    r = r - alpha * mp
    rr_new = np.sum(r * r, axis=0)
    if np.max(rr_new) < tol**2 * scale:
      break
    p = r + (rr_new / (rr + eps)) * p
    rr = rr_new
  return x, k


def _block_cg_reference(p, iterations, blocks, **settings):
  design, gram, _ = _closed_form(p)
  rhs = design.T @ np.asarray(p.residual, np.float64)
  if blocks == 'columns':
    return block_cg(lambda x: gram @ x, rhs, iterations, **settings)
  shape = rhs.shape
  x, k = block_cg(lambda v: (gram @ v.reshape(shape)).reshape(-1, 1),
                  rhs.reshape(-1, 1), iterations, **settings)
  return x.reshape(shape), k


CG_ITERATIONS = (1, 2, 3, 10, 50)


@functools.cache
def _block_cg_solutions(blocks, kernel, bias):
  """The float64 problem, and CG's solves for every ``CG_ITERATIONS``, one
  program for the tests of these blocks (call under ``enable_x64``)."""
  p = _problem(30, 12, 5, seed=4, kernel=kernel, bias=bias, lam_kernel=0.05,
               lam_bias=0.02)
  p = jax.tree.map(lambda a: a.astype(jnp.float64), p)
  solvers = tuple(sibp_jax.ConjugateGradient(k, blocks=blocks)
                  for k in CG_ITERATIONS)
  return p, dict(zip(CG_ITERATIONS, _jit_solves(solvers, p), strict=True))


# float64 on both sides: the two differ only by the order of float64 sums
# over at most a few hundred terms carried through 50 steps (largest seen
# 1e-13 relative), far below 1e-10.
@pytest.mark.parametrize('blocks', ['columns', 'layer'])
@pytest.mark.parametrize('iterations', CG_ITERATIONS)
@pytest.mark.parametrize('kernel,bias', [(True, True), (True, False),
                                         (False, True)])
def test_cg_matches_authors_block_cg(blocks, iterations, kernel, bias):
  with jax.enable_x64(True):
    p, solved = _block_cg_solutions(blocks, kernel, bias)
    expected, steps = _block_cg_reference(p, iterations, blocks)
    delta, info = solved[iterations]
    np.testing.assert_allclose(_stack(delta), expected, rtol=1e-10,
                               atol=1e-10 * np.abs(expected).max())
    assert int(info.iterations) == steps


def test_cg_early_exit_fires_as_the_authors():
  """A well-conditioned system meets tol = 1e-2 long before 50 steps."""
  with jax.enable_x64(True):
    p = _problem(40, 12, 5, seed=5, lam_kernel=10.0, lam_bias=10.0)
    p = jax.tree.map(lambda a: a.astype(jnp.float64), p)
    tols = (1e-2, 1e-4)
    solved = _jit_solves(tuple(sibp_jax.ConjugateGradient(50, tol=tol)
                               for tol in tols), p)
    for tol, (delta, info) in zip(tols, solved, strict=True):
      expected, steps = _block_cg_reference(p, 50, 'columns', tol=tol)
      assert 1 < steps < 50, steps
      assert int(info.iterations) == steps, tol
      assert int(info.status) == sibp_jax.SolveStatus.CONVERGED, tol
      np.testing.assert_allclose(_stack(delta), expected, rtol=1e-10,
                                 atol=1e-10 * np.abs(expected).max(),
                                 err_msg=str(tol))


def test_cg_columns_are_independent_solves():
  """Column-wise CG of a dense layer = one CG per output unit on its own."""
  p = _problem(30, 6, 4, seed=6)
  solver = sibp_jax.ConjugateGradient(4, tol=0.0)
  together, _ = _jit_solve(solver, p)
  for j in range(4):
    single = sibp_jax.RidgeProblem(
        p.kind, p.inputs, p.residual[:, j:j + 1], (6, 1), (1,),
        p.lam_kernel, p.lam_bias)
    alone, _ = _jit_solve(solver, single)
    chex.assert_trees_all_close(
        jax.tree.map(lambda a, j=j: a[..., j:j + 1], together), alone,
        rtol=1e-5, atol=1e-6)
