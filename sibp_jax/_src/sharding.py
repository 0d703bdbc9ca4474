"""Keeping a batch that is sharded over devices sharded, without gathering it.

sibp_jax leaves data parallelism to JAX: the user shards the batch over a
device mesh, replicates the parameters and jits the step. Every operation
of the sweep is then per example (no communication) except the sums over
the batch, ``FᵀF``, ``FᵀR`` and the gradients, which become one all-reduce
of a parameter-sized result each.

Under explicit sharding (mesh axes of type
``jax.sharding.AxisType.Explicit``, the default of ``jax.make_mesh``) a
traced array's type carries its sharding, and JAX asks to be told the
result's sharding where it is ambiguous: a product that sums over the
sharded rows, or a reshape that merges the sharded batch axis with others
into rows. The helpers here say so. Under automatic (GSPMD) sharding the
types carry nothing and they reduce to the plain operation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _spec(a):
  """``a``'s partition spec if its type carries one, else ``None``."""
  typeof = getattr(jax, 'typeof', None)
  if typeof is None:
    return None
  return getattr(getattr(typeof(a), 'sharding', None), 'spec', None)


def rows_sharded(a) -> bool:
  """Whether ``a``'s leading (batch or row) axis is split over devices.

  Only explicit sharding can answer ``True``: under GSPMD the traced type
  does not say how an array will be split.
  """
  spec = _spec(a)
  return bool(spec) and spec[0] is not None


def contract_rows(a, b, precision):
  """``aᵀ b``, the sum over the rows of two ``(n, ·)`` matrices.

  With the rows sharded, every device multiplies its own rows and one
  all-reduce of the ``(a.shape[1], b.shape[1])`` result follows; the result
  is not split along the summed rows and keeps the columns' sharding.
  """
  if not rows_sharded(a):
    return jnp.matmul(a.T, b, precision=precision)
  sa, sb = jax.typeof(a).sharding, jax.typeof(b).sharding
  col = lambda spec: spec[1] if len(spec) > 1 else None
  out = jax.sharding.NamedSharding(
      sa.mesh, jax.sharding.PartitionSpec(col(sa.spec), col(sb.spec)))
  return jnp.matmul(a.T, b, precision=precision, out_sharding=out)


def reshape_rows(a, shape):
  """``a.reshape(shape)`` where the leading axes merge into the first one.

  With ``a``'s leading axis sharded (and ``a`` laid out row-major, so that
  each device's examples stay contiguous rows), the merged leading axis is
  sharded the same way and every other axis is not.
  """
  if not rows_sharded(a):
    return a.reshape(shape)
  shape = list(shape)
  if -1 in shape:
    known = math.prod(d for d in shape if d != -1)
    shape[shape.index(-1)] = a.size // known
  sharding = jax.typeof(a).sharding
  out = jax.sharding.NamedSharding(
      sharding.mesh,
      jax.sharding.PartitionSpec(sharding.spec[0], *[None] * (len(shape) - 1)))
  return jax.lax.reshape(a, tuple(shape), out_sharding=out)


def rows_then(a, ndim: int):
  """The sharding of an ``ndim``-axis result whose leading axes are ``a``'s
  (split as ``a``'s) and whose other axes are whole; ``None`` unless
  ``a``'s rows are sharded in its type."""
  if not rows_sharded(a):
    return None
  sharding = jax.typeof(a).sharding
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  return jax.sharding.NamedSharding(sharding.mesh,
                                    jax.sharding.PartitionSpec(*spec))


def replicated(a):
  """A whole (unsplit) result on ``a``'s mesh; ``None`` unless ``a``'s rows
  are sharded in its type (a sum over them, say)."""
  if not rows_sharded(a):
    return None
  return jax.sharding.NamedSharding(jax.typeof(a).sharding.mesh,
                                    jax.sharding.PartitionSpec())
