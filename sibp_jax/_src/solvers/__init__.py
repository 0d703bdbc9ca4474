"""Solvers for the per-layer proximal subproblems, one per module.

Each solver is a small immutable object that checks its settings when it is
built, runs under ``jit`` and ``vmap`` with static iteration counts, and
reports a :class:`SolveInfo` with a :class:`SolveStatus` instead of raising.

- :mod:`.base`: the shared types (:class:`RidgeProblem`, the
  :class:`RidgeSolver` protocol, :class:`SolveInfo`, :class:`SolveStatus`).
- :mod:`.cholesky`: the factorisation of the exact solves (a blocked
  Cholesky factor and triangular inverse that keep OpenBLAS off its
  threads on CPU, a ``custom_vmap`` rule for batched solves).
- :mod:`.ridge`: :class:`Ridge`, exact (Cholesky or Woodbury by shape).
- :mod:`.conjugate_gradient`: :class:`ConjugateGradient`, matrix-free.
- :mod:`.nonlinear_cg`: :class:`NonlinearCG`, the SIBP paper variant's fit
  through the activation.
"""

from sibp_jax._src.solvers.base import PRECISION
from sibp_jax._src.solvers.base import Delta
from sibp_jax._src.solvers.base import RidgeProblem
from sibp_jax._src.solvers.base import RidgeSolver
from sibp_jax._src.solvers.base import SolveInfo
from sibp_jax._src.solvers.base import SolveStatus
from sibp_jax._src.solvers.base import all_finite
from sibp_jax._src.solvers.base import combine
from sibp_jax._src.solvers.base import ratio
from sibp_jax._src.solvers.conjugate_gradient import ConjugateGradient
from sibp_jax._src.solvers.nonlinear_cg import NonlinearCG
from sibp_jax._src.solvers.ridge import Ridge

__all__ = (
    'PRECISION',
    'ConjugateGradient',
    'Delta',
    'NonlinearCG',
    'Ridge',
    'RidgeProblem',
    'RidgeSolver',
    'SolveInfo',
    'SolveStatus',
    'all_finite',
    'combine',
    'ratio',
)
