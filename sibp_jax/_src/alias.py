"""The optimizers users call: SIBP and ProxBP with their usual outer steps."""

from __future__ import annotations

from typing import Any

import jax
import optax

from sibp_jax._src import solvers
from sibp_jax._src import transform

# Adam's learning rate for the parameters no layer owns (``sibp``'s default
# ``others``): the examples' measured setting.
OTHERS_LEARNING_RATE = 1e-3


def sibp(
    learning_rate: optax.ScalarOrSchedule,
    *,
    variant: str = 'linearized',
    lambda_w: jax.typing.ArrayLike = 1.0,
    lambda_b: jax.typing.ArrayLike = 1.0,
    solver: str | solvers.RidgeSolver | None = None,
    nonlinear_solver: solvers.NonlinearCG | None = None,
    last_layer_solver: str | solvers.RidgeSolver | None = None,
    on_grad_mismatch: str = 'warn',
    weight_decay: jax.typing.ArrayLike = 0.0,
    weight_decay_mask: Any = None,
    outer: optax.GradientTransformation | None = None,
    others: optax.GradientTransformation | str | None = 'adam',
) -> optax.GradientTransformationExtraArgs:
  r"""Semi-implicit back propagation (Liu & Zhang, 2020) as an optimizer.

  One step moves the output neurons by ``t_L = z - η e`` and sweeps down the
  layers, fitting each layer's parameters to its moved neurons by a proximal
  step and moving the neurons below:

  .. math::

     θ_i \leftarrow \arg\min_θ \|s_i(A_i(f_{i-1}; θ)) - t_i\|^2
        + λ_W\|W - W_i\|^2 + λ_b\|b - b_i\|^2 ,\qquad
     t_{i-1} = f_{i-1} - η\, e_{i-1}.

  By default the new parameters are the update (no outer optimizer):
  ``sibp`` is ``scale_by_sibp`` followed by ``scale_by_learning_rate``.
  Parameters that no recognised linear layer owns (normalisation scales and
  biases) take Adam's step (``others``), or ``outer``'s step on their
  gradient when ``outer`` is given. See :func:`scale_by_sibp` for the
  variants and solvers.

  **Weight decay** is decoupled, as in ``optax.adamw``: ``weight_decay · θ``
  joins the direction between ``scale_by_sibp`` and
  ``scale_by_learning_rate``, so a step is

  .. math::

     θ \leftarrow θ^{SIBP} - η\, \mathrm{wd}\, θ ,

  with ``θ^{SIBP}`` the parameters the sweep fitted and ``θ`` the ones
  before the step (with an ``outer`` optimizer, the term goes through it
  with the direction).

  **An outer optimizer.** ``outer=`` hands the direction
  ``D = (θ - θ^{SIBP}) / η`` to any optax transformation instead of taking
  the step ``η D``, as :func:`proxbp` does with its direction. On one epoch
  of the 784-500-10 MLP, Adam on ``D`` with a cosine decay lowers the
  training loss more than the plain step with the same decay, and both more
  than a constant ``η`` (docs/performance.md, "Beyond the paper's step").

  **Chaining.** The step of every parameter of a recognised linear layer
  comes from ``problems`` (the forward pass's activations and output
  error), not from the gradient handed to ``update``: a transformation
  chained before this one (clipping, scaling, weight decay) does not act on
  those parameters. Put ``sibp`` first in an ``optax.chain``. Its update is
  already scaled by ``-η``, so a term chained after it is added to the
  parameters as it is: ``optax.add_decayed_weights(wd)`` there would add
  ``+wd·θ`` and grow the weights; use ``weight_decay=`` instead.
  ``state.info.grad_mismatch`` (see :class:`sibp_jax.LayerwiseInfo`) shows
  when the incoming gradient and the problems disagree.

  **Skipped steps.** On a step that is not finite the update is zero and
  the state, the count of a schedule passed as ``learning_rate`` included,
  stays as it was. Under ``optax.inject_hyperparams`` the schedule is
  evaluated by the wrapper, whose own count advances on every call, skipped
  steps included: pass the schedule to ``sibp`` itself for it to hold.

  Args:
    learning_rate: ``η``, the step on the neurons (> 0, a scalar or a
      schedule). The paper's setting is 0.1. Its unit is the loss's: the
      output target is ``t = z - η e`` with ``e = ∂ℓ/∂z`` the per-example
      error (not divided by the batch size), so the logits move by
      ``η‖e‖`` per step. For softmax cross-entropy ``‖e‖ < √2``; for a
      summed squared error ``e = 2(z - y)`` and ``η ≥ 1/2`` overshoots
      the labels. Scaling the loss by ``c`` scales the step as ``η c``.
      Test accuracy stays near its best for η far above SGD's stable
      learning rates, while the training loss (the logits' confidence)
      grows for large η; docs/performance.md measures both.
    variant: ``'linearized'`` (default; exact ridge solves) or ``'paper'``
      (the authors' fit through the activation by nonlinear CG).
    lambda_w: ``λ_W`` (> 0; absolute, with the data term summed over the
      batch; default 1).
    lambda_b: ``λ_b`` (> 0; default 1).
    solver: ``'linearized'`` only, see :func:`scale_by_sibp`.
    nonlinear_solver: ``'paper'`` only, a :class:`sibp_jax.NonlinearCG`.
    last_layer_solver: ``'paper'`` only, see :func:`scale_by_sibp`.
    on_grad_mismatch: ``'warn'`` (default, once), ``'raise'`` or
      ``'ignore'``, see :func:`scale_by_sibp`.
    weight_decay: ``wd``, decoupled weight decay (>= 0, a scalar; per step
      the parameters shrink by ``η · wd`` of their value; default 0, none).
    weight_decay_mask: a tree of booleans like the parameters, or a
      function of the parameters returning one, naming the parameters to
      decay (default all), as ``optax.add_decayed_weights``'s ``mask``.
    outer: what turns the direction ``D = (θ - θ^{SIBP}) / η`` into the
      step (default ``optax.scale_by_learning_rate(learning_rate)``, the
      SIBP step ``θ ← θ^{SIBP}``): any optax transformation, as
      :func:`proxbp`'s ``outer``. ``optax.adam(1e-2)`` with a cosine
      decay is the recipe of docs/performance.md ("Beyond the paper's
      step"); ``optax.sgd(lr, momentum=0.9, nesterov=True)`` is momentum
      on the SIBP direction. ``weight_decay · θ`` joins ``D`` before
      ``outer``.
    others: the optimizer of the parameters no layer owns (normalisation
      scales and biases, those let through by ``unsolved='gradient'``), on
      their gradient. Default ``'adam'``: ``optax.adam(1e-3)`` for those of
      at most one axis (as Muon hands its non-matrix parameters to Adam;
      an unowned matrix takes the rest's step) when ``outer`` is ``None``
      (on ResNet-20 and a ViT it trained better than a plain gradient step
      of size ``η``: docs/experiments.md), else ``outer`` takes them with
      the rest. ``None``: the same step as the rest (``outer``'s, or a
      plain gradient step of size ``learning_rate``, the paper's). Or any
      optax transformation, for every parameter no layer owns (its state
      spans the whole tree). Weight decay reaches them only when ``outer``
      takes them.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and the keyword ``problems`` from ``value_grad_and_problems``.

  Example:
    >>> import jax.numpy as jnp, optax, sibp_jax
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
    ...                        nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    >>> optimizer = nnx.Optimizer(model, sibp_jax.sibp(0.1), wrt=nnx.Param)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
    ...       model, x, y,
    ...       loss_fn=optax.softmax_cross_entropy_with_integer_labels)
    ...   optimizer.update(model, grads, problems=problems)
    ...   return loss
    >>> x, y = jnp.ones((16, 4)), jnp.zeros((16,), jnp.int32)
    >>> first = train_step(model, optimizer, x, y)
    >>> bool(train_step(model, optimizer, x, y) < first)
    True

  References:
    Liu & Zhang, `Semi-Implicit Back Propagation
    <https://arxiv.org/abs/2002.03516>`_, 2020.
  """
  vectors_only = isinstance(others, str)
  if vectors_only:
    if others != 'adam':
      raise ValueError(f"others must be 'adam', None or an optax "
                       f'transformation, got {others!r}')
    # One flat vector: a handful of operations rather than a handful per
    # normalisation parameter.
    others = (optax.flatten(optax.adam(OTHERS_LEARNING_RATE))
              if outer is None else None)
  for what, tx in (('outer', outer), ('others', others)):
    if tx is not None and not (hasattr(tx, 'init') and hasattr(tx, 'update')):
      raise TypeError(f'{what} must be an optax GradientTransformation '
                      f'(with init and update), got {tx!r}')
  # Held still together on a skipped step, so that a schedule's count in
  # the outer scaling stays in step with the inner one.
  return transform.skip_outer_on_bad_step(
      transform.scale_by_sibp(learning_rate, variant=variant,
                              lambda_w=lambda_w, lambda_b=lambda_b,
                              solver=solver,
                              nonlinear_solver=nonlinear_solver,
                              last_layer_solver=last_layer_solver,
                              on_grad_mismatch=on_grad_mismatch),
      _outer_steps(_with_weight_decay(
          weight_decay, weight_decay_mask,
          optax.scale_by_learning_rate(learning_rate) if outer is None
          else outer), others, vectors_only))


def _outer_steps(outer, others, vectors_only):
  """``outer``, and ``others`` for the parameters no layer owns."""
  return outer if others is None else transform.with_others(
      outer, others, vectors_only)


def proxbp(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    tau_prox: jax.typing.ArrayLike = 0.05,
    momentum: float | None = 0.95,
    solver: str | solvers.RidgeSolver = 'exact',
    outer: optax.GradientTransformation | None = None,
    on_grad_mismatch: str = 'warn',
    weight_decay: jax.typing.ArrayLike = 0.0,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Proximal backpropagation (Frerix et al., 2018) with an outer optimizer.

  :func:`scale_by_proxbp`'s direction ``X_old - X_new`` is handed to
  ``outer``, by default Nesterov SGD with ``learning_rate`` and ``momentum``
  (the authors' MLP setting: 1.0, 0.95, ``τ_prox = 0.05``). On a step flagged
  as not finite the update is zero and ``outer``'s momentum is left untouched.

  **Weight decay** is coupled, as PyTorch's ``SGD(weight_decay=...)``
  applies it: ``weight_decay · θ`` is added to the direction before
  ``outer`` sees it, like an L2 term's gradient, so it goes through
  ``outer``'s momentum (or moments) with the rest; ``outer``, not
  ``proxbp``, holds the learning rate, so this works with any ``outer``.
  With plain SGD (``momentum=None``) one step is

  .. math::

     θ \leftarrow θ - \mathrm{lr}\,(X_{old} - X_{new} + \mathrm{wd}\, θ).

  The direction ``X_old - X_new`` is about ``τ_prox ∇J``, so ``wd`` acts as
  an L2 penalty ``wd / (2 τ_prox) ‖θ‖²`` on the mean loss.

  **Chaining.** The step of every parameter of a recognised linear layer
  comes from ``problems`` (the forward pass's activations and output
  error), not from the gradient handed to ``update``: a transformation
  chained before this one (clipping, scaling, weight decay) does not act on
  those parameters. Put ``proxbp`` first in an ``optax.chain``, and give
  what acts on the direction as ``weight_decay=`` or inside ``outer``
  (e.g. ``outer=optax.chain(optax.clip_by_global_norm(1.0),
  optax.sgd(1.0))``): a term chained after ``proxbp`` is added to the
  parameters as it is. ``state.info.grad_mismatch`` (see
  :class:`sibp_jax.LayerwiseInfo`) shows when the incoming gradient and the
  problems disagree.

  **Skipped steps.** On a step that is not finite the update is zero and
  ``outer``'s state, the count of a schedule included, stays as it was.
  Under ``optax.inject_hyperparams`` a schedule is evaluated by the
  wrapper, whose own count advances on every call, skipped steps included.

  Args:
    learning_rate: the outer optimizer's learning rate (default 1.0); unused
      when ``outer`` is given.
    tau_prox: ``τ_prox`` (> 0; default 0.05).
    momentum: Nesterov momentum of the default outer optimizer (default 0.95;
      ``None`` for plain SGD); unused when ``outer`` is given.
    solver: ``'exact'``, ``'cg'``, :class:`sibp_jax.Ridge`,
      :class:`sibp_jax.ConjugateGradient` (``ConjugateGradient(3)`` is the
      authors' "prox_cg3": one CG per output unit of a dense layer, their
      ``ε`` and early exit) or any :class:`sibp_jax.RidgeSolver`.
    outer: any optax transformation to use instead, e.g. ``optax.adam(1e-3)``
      as for the authors' ConvNet.
    on_grad_mismatch: ``'warn'`` (default, once), ``'raise'`` or
      ``'ignore'``, see :func:`scale_by_sibp`.
    weight_decay: ``wd``, coupled weight decay (>= 0, a scalar; added to
      the direction as ``wd · θ`` before ``outer``; default 0, none).
    weight_decay_mask: a tree of booleans like the parameters, or a
      function of the parameters returning one, naming the parameters to
      decay (default all), as ``optax.add_decayed_weights``'s ``mask``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    and the keyword ``problems``.

  Example:
    >>> import optax, sibp_jax
    >>> tx = sibp_jax.proxbp(1.0, tau_prox=0.05)
    >>> tx_adam = sibp_jax.proxbp(tau_prox=1.0, outer=optax.adam(1e-3))
    >>> tx_decay = sibp_jax.proxbp(1.0, weight_decay=5e-4)

  References:
    Frerix, Möllenhoff, Moeller & Cremers, `Proximal Backpropagation
    <https://arxiv.org/abs/1706.04638>`_, ICLR 2018.
  """
  if outer is None:
    transform.check_positive('learning_rate', learning_rate)
    outer = optax.sgd(learning_rate, momentum=momentum,
                      nesterov=momentum is not None)
  return transform.skip_outer_on_bad_step(
      transform.scale_by_proxbp(tau_prox, solver=solver,
                                on_grad_mismatch=on_grad_mismatch),
      _with_weight_decay(weight_decay, weight_decay_mask, outer))


def _with_weight_decay(weight_decay, mask, outer):
  """``outer`` preceded by ``add_decayed_weights``, unless the decay is 0.

  A decay of plain 0 (the default) leaves ``outer`` and so the state's
  structure as they were without the argument; an array (as
  ``optax.inject_hyperparams`` passes) always adds the term.
  """
  if isinstance(weight_decay, (int, float)):
    if not weight_decay >= 0:
      raise ValueError(f'weight_decay must be >= 0, got {weight_decay}')
    if weight_decay == 0:
      return outer
  return optax.chain(optax.add_decayed_weights(weight_decay, mask), outer)
