"""sibp_jax: semi-implicit back propagation for Flax, as optax transforms."""

from sibp_jax import linen
from sibp_jax import nnx
from sibp_jax import tag
from sibp_jax._src.alias import proxbp
from sibp_jax._src.alias import sibp
from sibp_jax._src.kinds import Attend
from sibp_jax._src.kinds import Conv
from sibp_jax._src.kinds import Dense
from sibp_jax._src.kinds import DenseGeneral
from sibp_jax._src.kinds import Embed
from sibp_jax._src.layerwise import LayerwiseInfo
from sibp_jax._src.layerwise import LayerwiseState
from sibp_jax._src.mismatch import GradMismatchError
from sibp_jax._src.mismatch import GradMismatchWarning
from sibp_jax._src.problems import LayerProblem
from sibp_jax._src.problems import Problems
from sibp_jax._src.problems import Segment
from sibp_jax._src.solvers import ConjugateGradient
from sibp_jax._src.solvers import NonlinearCG
from sibp_jax._src.solvers import Ridge
from sibp_jax._src.solvers import RidgeProblem
from sibp_jax._src.solvers import RidgeSolver
from sibp_jax._src.solvers import SolveInfo
from sibp_jax._src.solvers import SolveStatus
from sibp_jax._src.sweep import backward_sweep  # noqa: F401  (not in __all__)
from sibp_jax._src.transform import SkipOnBadStepState
from sibp_jax._src.transform import scale_by_proxbp
from sibp_jax._src.transform import scale_by_sibp
from sibp_jax._src.transform import skip_outer_on_bad_step

__version__ = '0.1.0'

__all__ = (
    'Attend',
    'ConjugateGradient',
    'Conv',
    'Dense',
    'DenseGeneral',
    'Embed',
    'GradMismatchError',
    'GradMismatchWarning',
    'LayerProblem',
    'LayerwiseInfo',
    'LayerwiseState',
    'NonlinearCG',
    'Problems',
    'Ridge',
    'RidgeProblem',
    'RidgeSolver',
    'Segment',
    'SkipOnBadStepState',
    'SolveInfo',
    'SolveStatus',
    'linen',
    'nnx',
    'proxbp',
    'scale_by_proxbp',
    'scale_by_sibp',
    'sibp',
    'skip_outer_on_bad_step',
    'tag',
)
