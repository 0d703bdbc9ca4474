"""The Gram matrix of a convolution's patches, without forming the patches.

A convolution's design matrix ``F`` (im2col) holds, for every example ``b``
and output position ``p``, the input under the window at that position: the
column for window offset ``i`` and channel ``c`` is ``x̄[b, u(p, i), c]``,
with ``u(p, i) = s·p + d·i - lo`` per spatial axis (stride ``s``, dilation
``d``, low padding ``lo``) and ``x̄`` the input, zero outside the image. Its
Gram matrix::

    (FᵀWF)[(i, c), (j, c')] = Σ_b Σ_p w[b, p] x̄[b, u(p, i), c] x̄[b, u(p, j), c']

is ``k^d·C`` square, but ``F`` has ``k^d`` times the input's entries. Two
exact ways to the Gram that never hold ``F``:

* **offsets** (any stride, dilation, padding, row weights): one strided
  slice of the padded input per window offset, and one ``C × C`` product
  per pair of offsets ``i ≤ j`` (the Gram is symmetric): ``k^d (k^d + 1)/2``
  products over the rows, instead of the ``k^{2d}`` of ``FᵀF``.
* **shifts** (stride 1, no row weights): summed over *all* positions ``p``,
  the block ``(i, j)`` depends on ``i - j`` only, the input's correlation
  with itself at that shift, ``D[δ] = Σ_v x̄[v + d·δ] x̄[v]ᵀ``. The ``k (2k -
  1)^{d-1}`` shifts with a non-negative first component are one
  convolution of the input with itself (the form of a kernel gradient,
  ``D[-δ] = D[δ]ᵀ`` gives the rest): about ``k (2k-1)^{d-1}`` products of
  ``C × C`` per position, 15 for a 3×3 kernel against the 81 of ``FᵀF``.
  The positions ``p`` outside the output (the frame that the padding or
  the image's edge removes) are then subtracted: each frame line sees only
  the offsets that land inside the image (one row of a 3×3 SAME window),
  so the correction costs about ``k^{d-1}`` products per frame position.

``gram`` picks *shifts* for unweighted stride-1 convolutions with
non-negative padding and *offsets* otherwise, and under explicit sharding
of the batch (where the convolution's sum over the sharded batch axis has
no declared result sharding).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sibp_jax._src import sharding

_SPATIAL = {1: 'W', 2: 'HW', 3: 'DHW'}


def _padded(x, low, high):
  pads = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in zip(low, high)] + [
      (0, 0, 0)]
  return jax.lax.pad(x, jnp.zeros((), x.dtype), pads)


def _slice(xp, starts, sizes, steps):
  """``xp[:, starts + steps·(0..sizes), :]`` per spatial axis."""
  where = tuple(slice(a, a + s * (n - 1) + 1, s)
                for a, n, s in zip(starts, sizes, steps))
  return xp[(slice(None), *where)]


def _flat(offset, window):
  return int(np.ravel_multi_index(offset, window))


def _out_sizes(n, window, strides, padding, dilation):
  return [(size + lo + hi - d * (k - 1) - 1) // s + 1
          for size, k, s, (lo, hi), d in zip(n, window, strides, padding,
                                             dilation)]


def offsets_gram(x, window, strides, padding, dilation, row_weights=None,
                 precision=None):
  """``FᵀWF`` and ``FᵀW1`` from one slice per window offset.

  Args:
    x: the input, ``(B, spatial..., C)``.
    window, strides, padding, dilation: the convolution's settings, one
      entry per spatial axis (``padding`` as ``(low, high)`` pairs).
    row_weights: ``None`` or ``(B, out_spatial...)`` weights ``w``.
    precision: the products' precision.

  Returns:
    ``(gram, column_sums)``: ``(K·C, K·C)`` and ``(K·C,)`` with ``K`` the
    window's size, ordered like ``kernel.reshape(-1, C_out)``.
  """
  c = x.shape[-1]
  xp = _padded(x, [lo for lo, _ in padding], [hi for _, hi in padding])
  out = _out_sizes(x.shape[1:-1], window, strides, padding, dilation)
  offsets = list(itertools.product(*[range(k) for k in window]))
  rows = [sharding.reshape_rows(
      _slice(xp, [d * o for d, o in zip(dilation, off)], out, strides),
      (-1, c)) for off in offsets]
  weighted = rows
  if row_weights is not None:
    w = sharding.reshape_rows(row_weights.astype(x.dtype), (-1, 1))
    weighted = [r * w for r in rows]
  blocks = [[None] * len(offsets) for _ in offsets]
  for a, b in itertools.combinations_with_replacement(range(len(offsets)), 2):
    blocks[a][b] = sharding.contract_rows(weighted[a], rows[b], precision)
    if a != b:
      blocks[b][a] = blocks[a][b].T
  gram = jnp.block(blocks)
  sums = jnp.concatenate([jnp.sum(r, axis=0) for r in weighted])
  return gram, sums


def _correlation(x, window, dilation, precision):
  """``D[δ]`` for ``δ₀ ∈ [0, k₀)`` and ``δ_a ∈ (-k_a, k_a)`` on the others.

  Shape ``(k₀, 2k₁-1, ..., C, C)``; entry ``[t, c, c']`` is
  ``Σ_{b,v} x̄[b, v + d·δ, c] x̄[b, v, c']`` with ``δ₀ = t₀`` and
  ``δ_a = t_a - (k_a - 1)``: the kernel gradient of a same-size convolution
  of ``x`` with a ``k₀ × (2k₁-1) × ...`` window, taken with ``x`` itself as
  the output's cotangent. Asking for it through ``jax.vjp`` hands XLA the
  form backprop uses, which its CPU backend runs far faster than the same
  contraction written as one explicit convolution of the padded input.
  """
  nd = x.ndim - 2
  shape = (window[0],) + tuple(2 * k - 1 for k in window[1:])
  reach = [d * (k - 1) for d, k in zip(dilation, window)]
  padding = [(0, reach[0])] + [(r, r) for r in reach[1:]]
  s = _SPATIAL[nd]
  dn = ('N' + s + 'C', s + 'IO', 'N' + s + 'C')

  def convolve(kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1,) * nd, padding, rhs_dilation=tuple(dilation),
        dimension_numbers=dn, precision=precision)

  _, transpose = jax.vjp(convolve, jnp.zeros(shape + (x.shape[-1],) * 2,
                                             x.dtype))
  return transpose(x)[0]


def _toeplitz(corr, window):
  """The blocks ``D[i - j]`` of every pair of offsets, as ``(K·C, K·C)``."""
  c = corr.shape[-1]
  offsets = np.array(list(itertools.product(*[range(k) for k in window])))
  delta = offsets[:, None, :] - offsets[None, :, :]  # (K, K, nd)
  negative = delta[..., 0] < 0
  delta = np.where(negative[..., None], -delta, delta)
  index = delta.copy()
  index[..., 1:] += np.array(window[1:], dtype=int) - 1
  blocks = corr[tuple(np.moveaxis(index, -1, 0))]  # (K, K, C, C)
  blocks = jnp.where(negative[:, :, None, None],
                     jnp.swapaxes(blocks, -1, -2), blocks)
  k = len(offsets)
  return blocks.transpose(0, 2, 1, 3).reshape(k * c, k * c)


def _frame(x, window, padding, dilation, precision):
  """``Σ patch patchᵀ`` over the positions ``p`` outside the output whose
  window still reaches the image, as ``(K·C, K·C)`` (stride 1).

  Per axis ``a`` the positions reaching the image are ``ext_a = [lo -
  d(k-1), n + lo)`` and the output's are ``[0, n_out)``. The frame is cut
  into disjoint boxes, one per axis ``a`` and frame line ``ℓ`` of that axis:
  ``p_a = ℓ``, the earlier axes inside the output, the later ones anywhere
  in ``ext``. On the line only the offsets landing inside the image count.
  """
  nd, c = x.ndim - 2, x.shape[-1]
  sizes = x.shape[1:-1]
  reach = [d * (k - 1) for d, k in zip(dilation, window)]
  out = _out_sizes(sizes, window, [1] * nd, padding, dilation)
  ext = [(lo - r, n + lo) for (lo, _), r, n in zip(padding, reach, sizes)]
  low = [max(lo, r) for (lo, _), r in zip(padding, reach)]
  high = [max(hi, r) for (_, hi), r in zip(padding, reach)]
  xp = _padded(x, low, high)
  dim = math.prod(window) * c
  total = jnp.zeros((dim, dim), x.dtype)
  for a in range(nd):
    lines = [p for p in range(*ext[a]) if not 0 <= p < out[a]]
    for line in lines:
      lo_a, d_a = padding[a][0], dilation[a]
      valid = [i for i in range(window[a])
               if 0 <= line + d_a * i - lo_a < sizes[a]]
      ranges, ranks = [], []
      for b in range(nd):
        if b < a:
          ranges.append((0, out[b]))
          ranks.append(range(window[b]))
        elif b == a:
          ranges.append((line, line + 1))
          ranks.append(valid)
        else:
          ranges.append(ext[b])
          ranks.append(range(window[b]))
      if any(hi <= lo for lo, hi in ranges):
        continue
      offsets = list(itertools.product(*ranks))
      columns = []
      for off in offsets:
        starts = [r0 + dilation[b] * off[b] - padding[b][0] + low[b]
                  for b, (r0, _) in enumerate(ranges)]
        columns.append(_slice(xp, starts, [hi - lo for lo, hi in ranges],
                              [1] * nd))
      patches = jnp.stack(columns, axis=-2).reshape(-1, len(offsets) * c)
      box = jnp.matmul(patches.T, patches, precision=precision)
      index = np.concatenate([
          _flat(off, window) * c + np.arange(c) for off in offsets])
      total = total.at[index[:, None], index[None, :]].add(box)
  return total


def shifts_gram(x, window, padding, dilation, precision=None):
  """``FᵀF`` and ``Fᵀ1`` of a stride-1 convolution from the shifts.

  Args:
    x: the input, ``(B, spatial..., C)``.
    window, padding, dilation: as :func:`offsets_gram`; padding must not be
      negative.
    precision: the products' precision.

  Returns:
    ``(gram, column_sums)`` as :func:`offsets_gram`.
  """
  corr = _correlation(x, window, dilation, precision)
  gram = _toeplitz(corr, window) - _frame(x, window, padding, dilation,
                                          precision)
  # Column sums are cheap either way: one slice sum per offset.
  sums = _column_sums(x, window, padding, dilation)
  return 0.5 * (gram + gram.T), sums


def _column_sums(x, window, padding, dilation):
  nd = x.ndim - 2
  xp = _padded(x, [lo for lo, _ in padding], [hi for _, hi in padding])
  out = _out_sizes(x.shape[1:-1], window, [1] * nd, padding, dilation)
  return jnp.concatenate([
      jnp.sum(_slice(xp, [d * o for d, o in zip(dilation, off)], out,
                     [1] * nd), axis=tuple(range(nd + 1)))
      for off in itertools.product(*[range(k) for k in window])])


def gram(x, window, strides, padding, dilation, row_weights=None,
         precision=None, method='auto'):
  """The patch Gram ``FᵀWF`` and column sums ``FᵀW1`` of a convolution.

  Args:
    x: the input, ``(B, spatial..., C)``.
    window: the kernel's spatial shape.
    strides, padding, dilation: the convolution's settings per spatial axis
      (``padding`` as ``(low, high)`` pairs).
    row_weights: ``None``, or the weights of the rows, ``(B, out...)``.
    precision: the products' precision.
    method: ``'auto'`` (see the module's docstring), ``'shifts'`` or
      ``'offsets'``.

  Returns:
    ``(gram, column_sums)``, shapes ``(K·C, K·C)`` and ``(K·C,)`` with ``K =
    prod(window)``, in the column order of ``kernel.reshape(-1, C_out)``.
  """
  window, strides = tuple(window), tuple(strides)
  padding = tuple(tuple(p) for p in padding)
  dilation = tuple(dilation)
  shifts_ok = (all(s == 1 for s in strides) and row_weights is None and
               all(lo >= 0 and hi >= 0 for lo, hi in padding))
  if method == 'auto':
    method = ('shifts' if shifts_ok and math.prod(window) > 1 and
              not sharding.rows_sharded(x) else 'offsets')
  if method == 'shifts':
    if not shifts_ok:
      raise ValueError('the shifts Gram needs stride 1, no row weights and '
                       'non-negative padding')
    return shifts_gram(x, window, padding, dilation, precision)
  return offsets_gram(x, window, strides, padding, dilation, row_weights,
                      precision)
