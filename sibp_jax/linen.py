from sibp_jax._src.flax_linen import value_grad_and_problems, TrainState
__all__ = ("TrainState", "value_grad_and_problems")
