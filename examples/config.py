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
                   'momentum', 'proxbp_solver', 'proxbp_outer', 'schedule',
                   'batch_size',
                   'seed', 'train_examples', 'validation_examples',
                   'mock_data', 'seq_len', 'text_file', 'validation_fraction')
# Settings a sweep refuses: it is not checkpointed.
NOT_WITH_SWEEP = ('checkpoint_dir', 'resume', 'params_out',
                  'stop_after_steps')
CHOICES = {'dataset': input_pipeline.DATASETS, 'model': models.MODELS,
           'optimizer': tuple(optimizers.METHODS),
           'proxbp_solver': optimizers.PROXBP_SOLVERS,
           'proxbp_outer': optimizers.PROXBP_OUTERS,
           'schedule': optimizers.SCHEDULES, 'others': optimizers.OTHERS}


@dataclasses.dataclass
class Config(optimizers.Hyperparameters):
  """Settings of one run, and flags of ``train.py`` (``--no_progress``),
  by name; :data:`HELP` says what each one does. SIBP's inherited ``λ_W``,
  ``λ_b`` are absolute: the data term is summed over the batch."""

  dataset: str = 'mnist'
  data_dir: str | None = None
  text_file: str | None = None
  model: str = 'paper_mlp'
  optimizer: str = 'sibp'
  learning_rate: float | None = None
  epochs: int = 5
  batch_size: int = 100
  seq_len: int = input_pipeline.SEQ_LEN
  seed: int = 0
  train_examples: int | None = None
  validation_examples: int = input_pipeline.VALIDATION_EXAMPLES
  validation_fraction: float | None = None
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


# Each setting's help, in the order ``train.py --help`` lists them.
HELP = {
    'dataset': 'digits is bundled with scikit-learn (no download); '
               'text_file reads --text_file (char_lm)',
    'data_dir': 'TFDS data directory (default $TFDS_DATA_DIR or '
                '~/tensorflow_datasets)',
    'text_file': '--dataset text_file: local UTF-8 text to train char_lm on, '
                 'a file or directory, or several separated by commas; the '
                 "files and each directory's files (not hidden, not .dat, "
                 'not in subdirectories) are read in sorted order of their '
                 'paths, a file reached twice (a link) once, and '
                 'concatenated; the vocabulary is the whole text\'s '
                 'characters',
    'model': 'see examples/models.py',
    'optimizer': 'sibp is the library default (linearized) variant',
    'learning_rate': 'SIBP: the neuron step eta. Default per optimizer: '
                     + ', '.join(f'{k} {m.learning_rate:g}'
                                 for k, m in optimizers.METHODS.items())
                     + ', proxbp_adam '
                     f'{optimizers.PROXBP_ADAM_LEARNING_RATE:g} (proxbp '
                     'with --proxbp_outer adam)',
    'lambda_w': 'SIBP lambda_W', 'lambda_b': 'SIBP lambda_b',
    'inner_iterations': 'sibp_paper: nonlinear CG iterations per subproblem',
    'tau_prox': 'ProxBP tau_prox',
    'momentum': 'Nesterov momentum (nesterov; proxbp with the nesterov '
                'outer step)',
    'proxbp_solver': 'exact, or N conjugate-gradient steps',
    'proxbp_outer': "ProxBP's outer step",
    'sibp_eta': "sibp_adam, sibp_nesterov: SIBP's neuron step eta (the "
                'learning rate is the outer optimizer\'s)',
    'others': 'sibp, sibp_paper, sibp_linearized: the step of the '
              'parameters no layer owns (norm scales and biases): Adam at '
              "1e-3 (sibp's default), or the gradient times eta (the "
              "paper's)",
    'schedule': 'learning rate over --epochs: constant, or cosine decay to 0 '
                '(warmup_cosine: after a linear warm-up over the first '
                'twentieth)',
    'epochs': 'passes over the training set; 0: only prepare the data and '
              'evaluate',
    'batch_size': 'examples per step',
    'seq_len': 'tiny_shakespeare, text_file: characters per example (the '
               "char_lm model's context)",
    'seed': 'seed of the initial weights and the batch order',
    'train_examples': 'train on the first N training examples (default all)',
    'validation_examples': 'held out from the training split (a fifth when '
                           'smaller)',
    'validation_fraction': '--dataset text_file: the share of the text held '
                           'out at its end for validation (and test: the '
                           'same text); unset: '
                           f'{input_pipeline.VALIDATION_FRACTION:g}',
    'eval_batch_size': 'examples per evaluation batch (memory only)',
    'metrics_out': 'JSON metrics, rewritten after every epoch',
    'plot_out': 'loss and accuracy against epochs and seconds',
    'mock_data': 'train on tfds.testing.mock_data with N examples per split',
    'progress': 'hide the progress bars',
    'checkpoint_dir': 'orbax checkpoints of model and optimizer, written '
                      'after every epoch and on Ctrl-C',
    'resume': 'continue from the latest checkpoint in --checkpoint_dir '
              '(same settings; --epochs may be raised)',
    'params_out': 'the final model parameters',
    'stop_after_steps': 'testing: act as a Ctrl-C after N steps of this run',
    'sweep': 'train these learning rates in one vmapped program (no '
             'checkpoints; --learning_rate must be unset); --metrics_out '
             'gets one history per rate',
}
METAVARS = {'metrics_out': 'FILE.json', 'plot_out': 'FILE.png',
            'mock_data': 'N', 'checkpoint_dir': 'DIR', 'params_out': 'FILE.npz',
            'stop_after_steps': 'N', 'sweep': 'LR1,LR2,...',
            'text_file': 'PATH[,PATH...]', 'validation_fraction': 'F'}


def _methods(**changes) -> dict[str, tuple[str, dict[str, Any], Any]]:
  return {**{name: (name, {}, None) for name in (
      'sibp_linearized', 'sibp_paper', 'proxbp', 'sgd', 'adam', 'muon',
      'schedule_free_adamw')}, **changes}


# The papers' settings. ``methods``: reproduction label -> (optimizer,
# extra settings, learning-rate grid or None for the registry's).
PRESETS: dict[str, dict[str, Any]] = {
    'sibp': dict(  # the SIBP authors' run, and SIBP's direction into Adam
        model='paper_mlp', batch_size=100, epochs=5, methods=_methods(
            sibp_adam=('sibp_adam', {'schedule': 'cosine'},
                       (3e-3, 1e-2, 3e-2)),
            muon_cosine=('muon', {'schedule': 'cosine'}, (0.05,)))),
    'proxprop_mlp': dict(  # the ProxBP authors' MLP, Nesterov backprop
        model='proxprop_mlp', batch_size=500, epochs=5, methods=_methods(
            proxbp=('proxbp', {'tau_prox': 0.05}, None),
            sgd=('nesterov', {}, None))),
    'proxprop_convnet': dict(  # the ProxBP authors' ConvNet, Adam outside
        model='proxprop_convnet', batch_size=500, epochs=3, methods=_methods(
            proxbp=('proxbp', {'tau_prox': 1.0, 'proxbp_outer': 'adam',
                               'proxbp_solver': 'cg3'}, (3e-4, 1e-3, 3e-3)))),
    # resnet20, vit: 'sibp_linearized' is the paper's step for the norm
    # parameters too (the gradient times eta), 'sibp_others_adam' sibp's
    # default (Adam for them).
    'resnet20': dict(  # ResNet-20: SIBP's eta on a grid, the usual baselines
        model='resnet20', batch_size=128, epochs=5, methods={
            'sibp_linearized': ('sibp_linearized', {'others': 'gradient'},
                                (0.03, 0.1, 0.3, 1.0)),
            'proxbp': ('proxbp', {}, (1.0,)),
            'sgd_momentum': ('sgd_momentum', {'schedule': 'cosine'}, (0.1,)),
            'adam': ('adam', {}, (1e-3,)),
            'sibp_adam': ('sibp_adam', {'schedule': 'cosine'}, (1e-2,)),
            'muon': ('muon', {}, (0.02,)),
            'sibp_others_adam': ('sibp_linearized', {'others': 'adam'},
                                 (1.0,))}),
    'vit': dict(  # a small vision transformer, three rates per method
        model='vit', batch_size=128, epochs=5, methods={
            'sibp_linearized': ('sibp_linearized', {'others': 'gradient'},
                                (0.01, 0.03, 0.1)),
            'proxbp': ('proxbp', {}, None),
            'adamw': ('adamw', {}, None),
            'muon': ('muon', {}, None),
            'sibp_others_adam': ('sibp_linearized', {'others': 'adam'},
                                 (0.1,)),
            'sibp_adam': ('sibp_adam', {'schedule': 'cosine'}, (1e-2,))}),
    'char_lm': dict(  # a small character language model, SIBP vs AdamW
        model='char_lm', dataset='tiny_shakespeare', batch_size=64,
        seq_len=64, epochs=1, methods={
            'sibp_linearized': ('sibp_linearized', {}, (0.01, 0.03, 0.1)),
            'adamw': ('adamw', {}, None)}),
    # The character model on a local text, 32 windows of 64 per step:
    # where plain SIBP loses (docs/experiments.md). SIBP's lambda_W =
    # lambda_b on a grid against eta, and the paper's gradient step for
    # the norm parameters instead of Adam; AdamW with and without a
    # warm-up and cosine decay; SIBP's direction into Adam with a cosine
    # decay. A grid whose best rate was its largest got one rate more.
    'char_lm_fortunes': dict(
        model='char_lm', dataset='text_file', batch_size=32, seq_len=64,
        epochs=1, methods={
            **{f'sibp_lambda{lam:g}': (
                'sibp', {'lambda_w': lam, 'lambda_b': lam},
                (0.03, 0.1, 0.3, 1.0)) for lam in (1.0, 10.0, 100.0, 1000.0)},
            'sibp_lambda1_others_gradient': ('sibp', {'others': 'gradient'},
                                             (0.1,)),
            'sibp_lambda10_others_gradient': (
                'sibp', {'lambda_w': 10.0, 'lambda_b': 10.0,
                         'others': 'gradient'}, (0.3,)),
            'adamw': ('adamw', {}, (1e-3, 3e-3, 1e-2)),
            'adamw_cosine': ('adamw', {'schedule': 'cosine'},
                             (3e-3, 1e-2, 3e-2)),
            'adamw_warmup_cosine': ('adamw', {'schedule': 'warmup_cosine'},
                                    (1e-3, 3e-3, 1e-2, 3e-2)),
            'sibp_adam_cosine': ('sibp_adam', {'schedule': 'cosine'},
                                 (1e-3, 3e-3, 1e-2, 3e-2))}),
}


def preset_settings(name: str) -> dict[str, Any]:
  """The :class:`Config` fields a preset sets."""
  return {k: v for k, v in PRESETS[name].items() if k != 'methods'}


def resolve(config: Config | Mapping[str, Any]) -> Config:
  """A new :class:`Config` of ``config`` (or of a dict of its fields).

  Its ``learning_rate`` is set (the default when ``None``; ``None`` for a
  sweep). Raises ``UsageError`` for a setting unknown or out of range.
  """
  if isinstance(config, Config):
    config = dataclasses.replace(config)
  else:
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(config) - fields)
    if unknown:
      raise UsageError(f'unknown settings {unknown}; known: {sorted(fields)}')
    config = Config(**config)
  for name, allowed in CHOICES.items():
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
              'eval_batch_size', 'inner_iterations', 'seq_len')
  ranges = {  # setting -> (whether a value is in range, the range)
      **{name: (lambda v: v > 0, '> 0') for name in (
          positive if config.sweep else ('learning_rate', *positive))},
      'momentum': (lambda v: 0 <= v < 1, 'in [0, 1)'),
      'epochs': (lambda v: v >= 0, '>= 0'),
      'stop_after_steps': (lambda v: v is None or v >= 1, '>= 1')}
  for name, (ok, what) in ranges.items():
    if not ok(getattr(config, name)):
      raise UsageError(f'{name} must be {what}, got {getattr(config, name)}')
  text = config.dataset in input_pipeline.TEXT_DATASETS
  if text != (config.model in models.SEQUENCE_MODELS):
    raise UsageError(
        f'--model {config.model} does not fit --dataset {config.dataset}: '
        f'the text datasets ({", ".join(input_pipeline.TEXT_DATASETS)}) need '
        f'a sequence model ({", ".join(models.SEQUENCE_MODELS)}), which '
        'needs one of them')
  if config.mock_data is not None and config.dataset in ('digits',
                                                         'text_file'):
    raise UsageError('--mock_data is for the TFDS datasets, not '
                     f'{config.dataset}')
  if config.dataset == 'text_file':
    if not config.text_file:
      raise UsageError('--dataset text_file needs --text_file PATH (a UTF-8 '
                       'text file or a directory of them)')
    if config.validation_fraction is None:
      config.validation_fraction = input_pipeline.VALIDATION_FRACTION
    if not 0 < config.validation_fraction < 1:
      raise UsageError('validation_fraction must be in (0, 1), got '
                       f'{config.validation_fraction}')
  else:
    given = [name for name in ('text_file', 'validation_fraction')
             if getattr(config, name) is not None]
    if given:
      raise UsageError(f'{", ".join("--" + n for n in given)} is for '
                       f'--dataset text_file, not {config.dataset}')
  if config.resume and not config.checkpoint_dir:
    raise UsageError('--resume needs --checkpoint_dir')
  return config
