"""Tagging API: layer-wise problems of any JAX model whose layers are tagged.

Compute each linear layer with these functions (they return the same
values as the plain operations) and get the problems with
:func:`value_grad_and_problems`, as the Flax adapters give them.
"""

from sibp_jax._src.tagged import attend
from sibp_jax._src.tagged import conv
from sibp_jax._src.tagged import dense
from sibp_jax._src.tagged import dense_general
from sibp_jax._src.tagged import embed
from sibp_jax._src.tagged import value_grad_and_problems

__all__ = ('attend', 'conv', 'dense', 'dense_general', 'embed',
           'value_grad_and_problems')
