"""The optimizers of the examples, in one registry.

Each entry names an optax transformation factory, whether its update needs
the layer-wise ``problems`` of ``sibp_jax.nnx.value_grad_and_problems``, the
learning rate used when none is given, and the learning-rate grid that
``reproduce.py`` and ``benchmark.py`` try; every example builds its
optimizers here.

* ``sibp`` / ``sibp_linearized``: ``sibp_jax.sibp``, the exact-ridge
  variant (the library default); ``sibp_paper``: the authors' nonlinear-CG
  fit through the activation. The learning rate is ``η``, the step on the
  neurons.
* ``sibp_adam`` / ``sibp_nesterov``: SIBP's direction at ``η =
  sibp_eta`` (0.1) handed to Adam / Nesterov SGD (``sibp(..., outer=)``);
  the learning rate is the outer optimizer's. ``sibp_adam`` with
  ``schedule='cosine'`` is the recipe of docs/performance.md.
* ``proxbp``: ``sibp_jax.proxbp`` with Nesterov (or Adam) outside.
* ``sgd``, ``nesterov``, ``adam``, ``adamw`` (weight decay 1e-4, the
  usual transformer baseline): optax on the plain gradient;
  ``sgd_momentum``: SGD with momentum 0.9 and weight decay 5e-4, the usual
  ResNet baseline.
* ``muon``, ``schedule_free_adamw``: ``optax.contrib``'s Muon and
  schedule-free AdamW, modern first-order baselines. Schedule-free AdamW is
  evaluated at its averaged iterate (``schedule_free_eval_params``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

import sibp_jax


@dataclasses.dataclass(frozen=True)
class Method:
  """One registry entry (module docstring).

  ``make(learning_rate, hp)`` gets the other hyperparameters by name, as
  :class:`Hyperparameters` holds them; ``eval_params(opt_state, params)``
  gives the parameters to evaluate (``None``: the trained ones).
  """

  make: Callable[[float, Any], optax.GradientTransformation]
  needs_problems: bool
  learning_rate: float
  grid: tuple[float, ...]
  eval_params: Callable[[Any, Any], Any] | None = None


def _sibp(variant: str | None):
  def make(lr, hp):
    kwargs = {'lambda_w': hp.lambda_w, 'lambda_b': hp.lambda_b}
    if hp.others == 'gradient':  # the paper's: a gradient step of size eta
      kwargs['others'] = None
    if variant == 'paper':
      kwargs['nonlinear_solver'] = sibp_jax.NonlinearCG(
          iterations=hp.inner_iterations)
    if variant:
      kwargs['variant'] = variant
    return sibp_jax.sibp(lr, **kwargs)
  return make


def _sibp_outer(outer):
  """SIBP's direction at ``η = hp.sibp_eta`` into ``outer(lr, hp)``."""
  def make(lr, hp):
    return sibp_jax.sibp(hp.sibp_eta, lambda_w=hp.lambda_w,
                         lambda_b=hp.lambda_b, outer=outer(lr, hp))
  return make


def _proxbp(lr, hp):
  solver = ('exact' if hp.proxbp_solver == 'exact' else
            sibp_jax.ConjugateGradient(int(hp.proxbp_solver[2:])))
  if hp.proxbp_outer == 'adam':
    return sibp_jax.proxbp(tau_prox=hp.tau_prox, solver=solver,
                           outer=optax.adam(lr))
  return sibp_jax.proxbp(lr, tau_prox=hp.tau_prox, momentum=hp.momentum,
                         solver=solver)


def _schedule_free_eval(opt_state, params):
  # Under optax.inject_hyperparams (a sweep) the state is wrapped.
  inner = getattr(opt_state, 'inner_state', opt_state)
  return optax.contrib.schedule_free_eval_params(inner, params)


METHODS: dict[str, Method] = {
    'sibp': Method(_sibp(None), True, 0.1, (0.1,)),
    'sibp_paper': Method(_sibp('paper'), True, 0.1, (0.1,)),
    'sibp_linearized': Method(_sibp('linearized'), True, 0.1, (0.1,)),
    'sibp_adam': Method(_sibp_outer(lambda lr, hp: optax.adam(lr)), True,
                        3e-3, (1e-3, 3e-3, 1e-2)),
    'sibp_nesterov': Method(
        _sibp_outer(lambda lr, hp: optax.sgd(lr, momentum=hp.momentum,
                                             nesterov=True)),
        True, 0.01, (0.003, 0.01, 0.03)),
    'proxbp': Method(_proxbp, True, 1.0, (0.3, 1.0, 3.0)),
    'sgd': Method(lambda lr, hp: optax.sgd(lr), False, 0.1, (0.03, 0.1, 0.3)),
    'nesterov': Method(
        lambda lr, hp: optax.sgd(lr, momentum=hp.momentum, nesterov=True),
        False, 0.05, (0.01, 0.05, 0.2)),
    'sgd_momentum': Method(
        lambda lr, hp: optax.chain(optax.add_decayed_weights(5e-4),
                                   optax.sgd(lr, momentum=0.9)),
        False, 0.1, (0.03, 0.1, 0.3)),
    'adam': Method(lambda lr, hp: optax.adam(lr), False, 1e-3,
                   (3e-4, 1e-3, 3e-3)),
    'adamw': Method(lambda lr, hp: optax.adamw(lr, weight_decay=1e-4), False,
                    1e-3, (3e-4, 1e-3, 3e-3)),
    'muon': Method(lambda lr, hp: optax.contrib.muon(lr), False, 0.02,
                   (0.01, 0.02, 0.05)),
    'schedule_free_adamw': Method(
        lambda lr, hp: optax.contrib.schedule_free_adamw(lr), False, 3e-3,
        (1e-3, 3e-3, 1e-2), _schedule_free_eval),
}
# ProxBP's default learning rate with Adam outside (``proxbp_outer='adam'``).
PROXBP_ADAM_LEARNING_RATE = 1e-3
PROXBP_SOLVERS = ('exact', 'cg3', 'cg5', 'cg10')
PROXBP_OUTERS = ('nesterov', 'adam')
# SIBP's parameters no layer owns (normalisation scales and biases): the
# Adam at its usual rate (sibp's default), or the paper's plain gradient
# step of size eta.
OTHERS = ('gradient', 'adam')
# Learning-rate schedules over the whole run: constant, cosine decay to 0,
# or the same decay after a linear warm-up from 0 over the first 5 %.
SCHEDULES = ('constant', 'cosine', 'warmup_cosine')
WARMUP_FRACTION = 0.05


@dataclasses.dataclass
class Hyperparameters:
  """The hyperparameters besides the learning rate, with their defaults."""

  lambda_w: float = 1.0
  lambda_b: float = 1.0
  inner_iterations: int = 5
  tau_prox: float = 0.05
  momentum: float = 0.95
  proxbp_solver: str = 'exact'
  proxbp_outer: str = 'nesterov'
  schedule: str = 'constant'
  sibp_eta: float = 0.1
  others: str = 'adam'


def default_learning_rate(name: str, hp: Any = None) -> float:
  """The learning rate of ``name`` when none is given."""
  hp = hp or Hyperparameters()
  if name == 'proxbp' and hp.proxbp_outer == 'adam':
    return PROXBP_ADAM_LEARNING_RATE
  return METHODS[name].learning_rate


def create(name: str, learning_rate: float | None = None,
           hp: Any = None, total_steps: int | None = None
           ) -> optax.GradientTransformation:
  """The transformation of ``name`` (default learning rate if ``None``).

  With ``hp.schedule == 'cosine'`` the learning rate decays from its value
  to 0 over ``total_steps`` steps (``optax.cosine_decay_schedule``);
  ``'warmup_cosine'`` first rises linearly from 0 over
  ``WARMUP_FRACTION`` of them.
  """
  hp = hp or Hyperparameters()
  if learning_rate is None:
    learning_rate = default_learning_rate(name, hp)
  if hp.schedule != 'constant':
    if not total_steps:
      raise ValueError(f'schedule={hp.schedule!r} needs the run\'s '
                       'total_steps')
    warmup = (round(WARMUP_FRACTION * total_steps)
              if hp.schedule == 'warmup_cosine' else 0)
    # A shape of peak 1, scaled: the peak may be a traced value (a sweep).
    shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, total_steps)
    peak = learning_rate
    learning_rate = lambda count: peak * shape(count)
  return METHODS[name].make(learning_rate, hp)
