"""Settings of ``train.py`` as data: the Config and the papers' presets.

``PRESETS`` hold the papers' settings (model, batch size, epochs) and, per
method of the reproduction, the optimizer, its extra settings and its
learning-rate grid (default: the registry's, ``optimizers.METHODS``).
``python examples/train.py --preset proxprop_mlp ...`` starts from one;
flags given on the command line override it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import input_pipeline
import models
import optimizers
from checkpoints import UsageError

# The settings that decide the trajectory of the parameters: a checkpoint
# resumes only under the same ones.
RESUME_SETTINGS = ('dataset', 'model', 'optimizer', 'learning_rate',
                   'lambda_w', 'lambda_b', 'inner_iterations', 'tau_prox',
                   'momentum', 'proxbp_solver', 'proxbp_outer', 'batch_size',
                   'seed', 'train_examples', 'validation_examples',
                   'mock_data')
# Settings a sweep refuses: it is not checkpointed.
NOT_WITH_SWEEP = ('checkpoint_dir', 'resume', 'params_out',
                  'stop_after_steps')


@dataclasses.dataclass
class Config(optimizers.Hyperparameters):
  """Settings of one run; the command-line flags have the same names.

  Attributes:
    dataset: one of ``input_pipeline.DATASETS``.
    data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    model: one of ``models.MODELS``.
    optimizer: one of ``optimizers.METHODS``.
    learning_rate: the optimizer's learning rate (SIBP: ``η``); ``None``
      for the registry's default.
    lambda_w, lambda_b: SIBP's ``λ_W``, ``λ_b`` (absolute, data term summed
      over the batch).
    inner_iterations: nonlinear CG steps per subproblem of ``sibp_paper``.
    tau_prox: ProxBP's ``τ_prox``.
    momentum: Nesterov momentum of ``nesterov`` and of ProxBP's default
      outer step.
    proxbp_solver: ``'exact'`` or ``'cgN'`` (N conjugate-gradient steps).
    proxbp_outer: ``'nesterov'`` or ``'adam'``.
    epochs: passes over the training set (0: evaluate only).
    batch_size: examples per step.
    seed: seed of the initial weights and of the batch order.
    train_examples: train on the first this many training examples.
    validation_examples: examples held out from the training split.
    eval_batch_size: examples per evaluation batch (memory only).
    mock_data: train on ``tfds.testing.mock_data`` with this many examples
      per split.
    metrics_out: JSON file rewritten after every epoch.
    plot_out: image of loss and accuracy against epochs and seconds.
    progress: show a progress bar per epoch.
    checkpoint_dir: orbax checkpoints are written here after every epoch
      and on Ctrl-C.
    resume: continue from the latest checkpoint in ``checkpoint_dir``.
    params_out: ``.npz`` file of the final model parameters.
    stop_after_steps: for tests, act as a Ctrl-C after this many steps.
    sweep: learning rates trained together in one vmapped program;
      ``learning_rate`` must then be ``None``.
  """

  dataset: str = 'mnist'
  data_dir: str | None = None
  model: str = 'paper_mlp'
  optimizer: str = 'sibp'
  learning_rate: float | None = None
  epochs: int = 5
  batch_size: int = 100
  seed: int = 0
  train_examples: int | None = None
  validation_examples: int = input_pipeline.VALIDATION_EXAMPLES
  eval_batch_size: int = 1000
  mock_data: int | None = None
  metrics_out: str | None = None
  plot_out: str | None = None
  progress: bool = True
  checkpoint_dir: str | None = None
  resume: bool = False
  params_out: str | None = None
  stop_after_steps: int | None = None
  sweep: tuple[float, ...] | None = None


def _methods(**changes) -> dict[str, tuple[str, dict[str, Any], Any]]:
  methods = {name: (name, {}, None) for name in (
      'sibp_linearized', 'sibp_paper', 'proxbp', 'sgd', 'adam', 'muon',
      'schedule_free_adamw')}
  return {**methods, **changes}


# The papers' settings. ``methods``: reproduction label -> (optimizer,
# extra settings, learning-rate grid or None for the registry's).
PRESETS: dict[str, dict[str, Any]] = {
    'sibp': dict(  # the SIBP authors' run
        model='paper_mlp', batch_size=100, epochs=5, methods=_methods()),
    'proxprop_mlp': dict(  # the ProxBP authors' MLP, Nesterov backprop
        model='proxprop_mlp', batch_size=500, epochs=5, methods=_methods(
            proxbp=('proxbp', {'tau_prox': 0.05}, None),
            sgd=('nesterov', {}, None))),
    'proxprop_convnet': dict(  # the ProxBP authors' ConvNet, Adam outside
        model='proxprop_convnet', batch_size=500, epochs=3, methods=_methods(
            proxbp=('proxbp', {'tau_prox': 1.0, 'proxbp_outer': 'adam',
                               'proxbp_solver': 'cg3'}, (3e-4, 1e-3, 3e-3)))),
}


def preset_settings(name: str) -> dict[str, Any]:
  """The :class:`Config` fields a preset sets."""
  return {k: v for k, v in PRESETS[name].items() if k != 'methods'}


def resolve(config: Config | Mapping[str, Any]) -> Config:
  """Checks the settings and fills in the default learning rate.

  Args:
    config: a :class:`Config` or a dict of its fields.

  Returns:
    A new :class:`Config` whose ``learning_rate`` is set (``None`` for a
    sweep).

  Raises:
    UsageError: a setting is unknown or out of range.
  """
  if isinstance(config, Config):
    config = dataclasses.replace(config)
  else:
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(config) - fields)
    if unknown:
      raise UsageError(f'unknown settings {unknown}; known: {sorted(fields)}')
    config = Config(**config)
  choices = {'dataset': input_pipeline.DATASETS, 'model': models.MODELS,
             'optimizer': tuple(optimizers.METHODS),
             'proxbp_solver': optimizers.PROXBP_SOLVERS,
             'proxbp_outer': optimizers.PROXBP_OUTERS}
  for name, allowed in choices.items():
    if getattr(config, name) not in allowed:
      raise UsageError(f'{name}={getattr(config, name)!r}; expected one of '
                       f'{", ".join(allowed)}')
  if config.sweep is not None:
    config.sweep = tuple(float(lr) for lr in config.sweep)
    if not config.sweep:
      raise UsageError('--sweep needs at least one learning rate')
    if config.learning_rate is not None:
      raise UsageError('--sweep gives the learning rates: drop '
                       '--learning_rate')
    refused = [name for name in NOT_WITH_SWEEP if getattr(config, name)]
    if refused:
      raise UsageError(f'--sweep cannot be combined with '
                       f'{", ".join("--" + n for n in refused)} (a sweep is '
                       'not checkpointed)')
    if not all(lr > 0 for lr in config.sweep):
      raise UsageError(f'sweep learning rates must be > 0, got '
                       f'{list(config.sweep)}')
  elif config.learning_rate is None:
    config.learning_rate = optimizers.default_learning_rate(
        config.optimizer, config)
  positive = ('lambda_w', 'lambda_b', 'tau_prox', 'batch_size',
              'eval_batch_size', 'inner_iterations')
  if config.sweep is None:
    positive = ('learning_rate', *positive)
  for name in positive:
    if not getattr(config, name) > 0:
      raise UsageError(f'{name} must be > 0, got {getattr(config, name)}')
  if not 0 <= config.momentum < 1:
    raise UsageError(f'momentum must be in [0, 1), got {config.momentum}')
  if config.epochs < 0:
    raise UsageError(f'epochs must be >= 0, got {config.epochs}')
  if config.mock_data is not None and config.dataset == 'digits':
    raise UsageError('--mock_data is for the TFDS datasets, not digits')
  if config.resume and not config.checkpoint_dir:
    raise UsageError('--resume needs --checkpoint_dir')
  if config.stop_after_steps is not None and config.stop_after_steps < 1:
    raise UsageError(f'stop_after_steps must be >= 1, got '
                     f'{config.stop_after_steps}')
  return config
