from sibp_jax._src.flax_linen import TrainState
from sibp_jax._src.flax_linen import value_grad_and_problems

__all__ = ("TrainState", "value_grad_and_problems")
