r"""Which of jaxlib's CPU LAPACK calls leave OpenBLAS threads spinning.

jaxlib runs ``jnp.linalg.cholesky`` (``potrf``) and
``lax.linalg.triangular_solve`` (``trsm``) through SciPy's OpenBLAS. A call
large enough to use OpenBLAS's worker threads leaves them spin-waiting
after it returns, which takes a core from every XLA operation after it.
This script calls each op once at a few sizes, sleeps 50 ms, and prints
the process's CPU seconds per second of that sleep: 0 on one thread, about
1 when a worker spins (the worst of 3 tries). The sizes at which
``potrf`` starts spinning set ``_single_threaded_potrf_max`` in
``sibp_jax/_src/solvers/cholesky.py``.

    python examples/blas_threads.py
"""

import resource
import time

import jax
import jax.numpy as jnp
import numpy as np


def _cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def spin_after(fun, *args, pause=0.05, tries=3):
  """CPU seconds per second of a ``pause`` just after ``fun(*args)``."""
  fun(*args).block_until_ready()
  worst = 0.0
  for _ in range(tries):
    time.sleep(0.3)  # let an earlier call's workers go to sleep
    fun(*args).block_until_ready()
    start = _cpu_seconds()
    time.sleep(pause)
    worst = max(worst, (_cpu_seconds() - start) / pause)
  return worst


def main():
  jax.config.update('jax_enable_x64', True)
  cholesky = jax.jit(jnp.linalg.cholesky)
  solve = jax.jit(lambda factor, b: jax.lax.linalg.triangular_solve(
      factor, b, left_side=True, lower=True))
  print(f'jax {jax.__version__}; CPU seconds per second after one call')
  for dtype in (np.float32, np.float64):
    row = []
    for n in (96, 127, 128, 200, 255, 256, 288):
      a = jnp.asarray(np.eye(n) * 2 + 0.1, dtype)
      row.append(f'{n}: {spin_after(cholesky, a):.1f}')
    print(f'potrf {np.dtype(dtype).name}  ' + '  '.join(row))
  row = []
  for n, d in ((100, 10), (33, 31), (32, 32), (127, 10), (100, 500)):
    factor = jnp.eye(n, dtype=np.float32) * 2
    b = jnp.ones((n, d), np.float32)
    row.append(f'{n}x{d}: {spin_after(solve, factor, b):.1f}')
  print('trsm float32  ' + '  '.join(row))


if __name__ == '__main__':
  main()
