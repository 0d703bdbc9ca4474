"""flax.nnx adapter: layer-wise problems from one forward pass."""

from sibp_jax._src.flax_nnx import value_grad_and_problems

__all__ = ('value_grad_and_problems',)
