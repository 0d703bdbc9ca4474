"""The check of ``problems`` against the gradient handed to ``update``.

SIBP and ProxBP take the step of every recognised layer from ``problems``,
not from the incoming gradient. When the two disagree, the step is not the
one the user meant: problems from another batch (stale), a transformation
chained before this one (clipping, scaling), or a wrapper that averages
gradients over several calls (``optax.MultiSteps``: its final micro-step
hands on the averaged gradient with the last micro-batch's problems only).
:func:`grad_mismatch` measures the disagreement; :func:`make_check` builds
the host callback that warns (once), raises or stays quiet.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from sibp_jax._src import solvers

MODES = ('warn', 'raise', 'ignore')

# ‖g - ĝ‖ / ‖ĝ‖ beyond which the gradient and the problems are taken to come
# from different computations. Seen when they agree: float32 round-off of
# one product, 0 to 7e-8 (MLPs up to 784-500-10 at batch 100, a small
# ConvNet); bfloat16 models, 1.6e-3 to 2.5e-3. Seen when they do not: 0.6
# to 2.4 for problems of another batch, 1 for a gradient clipped before the
# transformation. 1e-2 leaves five orders of magnitude above float32's
# round-off and more than one below the smallest real disagreement; 16-bit
# gradients get 1e-1, 40 times their round-off.
TOLERANCE = 1e-2
TOLERANCE_16_BIT = 1e-1


class GradMismatchWarning(UserWarning):
  """The gradient handed to ``update`` disagrees with ``problems``."""


class GradMismatchError(ValueError):
  """What ``on_grad_mismatch='raise'`` raises where it would warn."""


def tolerance(dtype) -> float:
  """The tolerance for a gradient of ``dtype`` (see :data:`TOLERANCE`)."""
  return TOLERANCE_16_BIT if jnp.dtype(dtype).itemsize <= 2 else TOLERANCE


def grad_mismatch(implied, terms, grad) -> jax.Array:
  """``‖g - ĝ‖ / ‖ĝ‖`` with ``ĝ = implied / N``.

  ``implied`` is the gradient of ``Σ w ℓ`` with respect to one kernel that
  ``problems`` imply (``A_iᵀ(e_g)``, from the sweep), ``N`` the number of
  loss terms (:attr:`sibp_jax.Problems.terms`) and ``grad`` the gradient
  handed to ``update`` for that kernel.
  """
  dtype = implied.dtype
  implied = implied / jnp.asarray(terms, dtype)
  diff = grad.astype(dtype) - implied
  return solvers.ratio(jnp.sqrt(jnp.sum(jnp.square(diff))),
                       jnp.sqrt(jnp.sum(jnp.square(implied)))).astype(
                           jnp.float32)


def _message(name: str, value: float, tol: float, mode: str) -> str:
  return (
      f'{name}: the gradient handed to update disagrees with problems= '
      f'(grad_mismatch {value:.3g} > {tol:g}, relative, on the last '
      "solved layer's kernel). The step of every recognised layer comes "
      'from problems alone, so it is not the step the gradient asks for. '
      'Causes: problems from another batch or an earlier step; a '
      'transformation chained before this one (clipping, scaling, weight '
      'decay: put it after); a wrapper that averages gradients over '
      'calls, such as optax.MultiSteps, whose final micro-step hands on '
      "the averaged gradient with the last micro-batch's problems; a "
      'loss with terms beyond the per-example loss on that kernel (a '
      "weight penalty). Pass on_grad_mismatch='ignore' if this is "
      'intended' + (", or 'raise' to stop. This warning is shown once."
                    if mode == 'warn' else '.'))


def make_check(name: str, mode: str):
  """``check(value, dtype)``: the traced check of one transformation.

  ``'warn'`` warns a :class:`GradMismatchWarning` the first time a step's
  mismatch exceeds the tolerance, once per transformation object (not
  every step); ``'raise'`` raises :class:`GradMismatchError` from the step
  that exceeds it (under ``jit`` the runtime error that surfaces carries
  its message); ``'ignore'`` puts nothing in the program. The callback
  (``jax.debug.callback``, in a ``lax.cond`` on the tolerance) runs on the
  host with the value the step computed, under ``jit``, ``vmap`` (each
  run's value is checked) and sharding alike; it takes no part in
  tracing, so it adds no recompilation.
  """
  if mode not in MODES:
    raise ValueError(f'on_grad_mismatch must be one of {MODES}, got '
                     f'{mode!r}')
  if mode == 'ignore':
    return lambda value, dtype: None
  warned = []

  def host(value, tol):
    value = np.asarray(value)
    bad = value > tol  # NaN (a step that is not finite) does not count
    if not np.any(bad) or (mode == 'warn' and warned):
      return
    message = _message(name, float(np.max(value[bad])), float(tol), mode)
    if mode == 'raise':
      raise GradMismatchError(message)
    warned.append(True)
    warnings.warn(message, GradMismatchWarning, stacklevel=2)

  def check(value, dtype):
    tol = np.float32(tolerance(dtype))
    # The host is called only on a step that exceeds the tolerance, so a
    # step that agrees costs no transfer to the host and no wait on it.
    # (Under vmap the condition is batched and the callback runs for every
    # run, each value checked on the host.)
    jax.lax.cond(value > tol, lambda v: jax.debug.callback(host, v, tol),
                 lambda v: None, value)

  return check
