r"""One training script for every experiment: a model, an optimizer, a dataset.

Trains a network of ``models.py`` with an optimizer of ``optimizers.py`` on
a dataset of ``input_pipeline.py``, with the settings of ``config.py``
(flags of the same names, ``--preset`` for the papers' settings)::

  python examples/train.py --dataset mnist --optimizer sibp --epochs 5 \
      --metrics_out sibp.json --plot_out sibp.png
  python examples/train.py --dataset cifar10 --preset proxprop_mlp \
      --optimizer proxbp --proxbp_solver cg3
  python examples/train.py --dataset digits --optimizer adam   # offline
  python examples/train.py --preset char_lm --optimizer adamw   # text
  python examples/train.py --preset char_lm --dataset text_file \
      --text_file corpus.txt   # any local UTF-8 text (or a directory)

The defaults are the SIBP authors' run (MNIST, ``paper_mlp``, batch 100,
5 epochs, ``η = 0.1``, ``λ_W = λ_b = 1``) with the library's default
(linearized) SIBP. Batches are a seeded permutation per epoch, a function of
``(seed, epoch)``; the last partial batch is dropped so the step compiles
once. After every epoch ``--metrics_out FILE.json`` is rewritten atomically
with the full training-set, validation and test loss and accuracy, and the
cumulative seconds in update steps alone (no compilation, no evaluation)::

  {"config": {...}, "data": {...}, "device": "...", "initial": {...},
   "history": [{"epoch", "train_loss", "train_accuracy", "val_loss",
                "val_accuracy", "test_loss", "test_accuracy", "seconds",
                "train_examples_per_second", "skipped_steps",
                "unconverged_solves"}, ...], "step_loss": [...]}

(``initial``: the same before the first step; non-finite values are
``null``; ``step_loss``: the batch loss of every step so far, in order,
each before its update, the curve between evaluations; ``skipped_steps``:
steps of the epoch that SIBP / ProxBP flagged as not finite and skipped,
also shown in the progress bar, with a warning at the end of a run that
had any; ``unconverged_solves``: layer solves of the epoch that ended
unconverged, an iterative solver at its iteration
limit or a solve not finite). ``--checkpoint_dir DIR`` saves model
and optimizer with orbax after every epoch; Ctrl-C saves after the step
under way and exits with status 130 and the command that resumes;
``--resume`` continues at exactly the next step, bitwise equal to an
uninterrupted run on one machine, and refuses a checkpoint of other
settings. ``--sweep LR1,LR2,...`` trains one run per learning rate in ONE
program (the same step under ``jax.vmap``; not checkpointed);
``--metrics_out`` then holds ``{"config", "data", "device", "sweep": [one
metrics dict per rate]}``, whose ``seconds`` are the whole sweep's.
``docs/experiments.md`` shows all of it in use.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import checkpoints
import config as config_lib
import input_pipeline
import models
import optimizers
import steps
from checkpoints import INTERRUPTED_STATUS
from checkpoints import Interrupted
from checkpoints import UsageError
from config import Config

OPTIMIZERS = config_lib.CHOICES['optimizer']


def load_data(config: Config):
  """The run's data, and its sizes as the metrics file records them."""
  try:
    data = input_pipeline.load(
        config.dataset, config.data_dir,
        validation_examples=config.validation_examples,
        train_examples=config.train_examples, mock_data=config.mock_data,
        seq_len=config.seq_len, text_file=config.text_file,
        validation_fraction=(config.validation_fraction
                             or input_pipeline.VALIDATION_FRACTION))
  except ValueError as e:
    raise UsageError(str(e)) from None
  if config.batch_size > len(data.x_train):
    raise UsageError(f'batch_size={config.batch_size} is larger than the '
                     f'training set ({len(data.x_train)} examples)')
  steps_per_epoch = len(data.x_train) // config.batch_size
  return data, {**data.sizes(), 'steps_per_epoch': steps_per_epoch}


def create_state(config: Config, data: input_pipeline.Data):
  """``(graphdef, state)``: the model and optimizer, K stacked for a sweep."""
  model = models.create_model(config.model, data.input_shape, data.classes,
                              seed=config.seed)
  total_steps = config.epochs * (len(data.x_train) // config.batch_size)
  make = lambda learning_rate: optimizers.create(
      config.optimizer, learning_rate, config, total_steps)
  if config.sweep is None:
    return steps.init_state(model, make(config.learning_rate))
  tx = optax.inject_hyperparams(make)(learning_rate=config.sweep[0])
  graphdef, state = steps.init_state(model, tx)
  return graphdef, steps.stack_learning_rates(state, config.sweep)


def _summary(entry: dict[str, Any]) -> str:
  fmt = lambda v: 'nan' if v is None else f'{v:.4f}'
  parts = [f'epoch {entry["epoch"]:3d}', *(
      f'{s} loss {fmt(entry[s + "_loss"])} acc {fmt(entry[s + "_accuracy"])}'
      for s in ('train', 'val', 'test')), f'update s {entry["seconds"]:.2f}']
  if entry.get('train_examples_per_second'):
    parts.append(f'{entry["train_examples_per_second"]:.0f} ex/s')
  if entry.get('skipped_steps'):
    parts.append(f'{entry["skipped_steps"]} steps skipped (not finite)')
  if entry.get('unconverged_solves'):
    parts.append(f'{entry["unconverged_solves"]} solves not converged')
  return ' | '.join(parts)


@dataclasses.dataclass
class Position:
  """Where the next step starts, and the sums of its epoch so far."""

  epoch: int = 0  # epochs done
  step: int = 0  # steps done in the next epoch
  seconds: float = 0.0  # update seconds of the epochs done
  epoch_seconds: float = 0.0
  loss_sum: float = 0.0
  acc_sum: float = 0.0
  # Steps of the next epoch so far that SIBP / ProxBP flagged as not
  # finite and skipped, one count per run.
  skipped: list[int] = dataclasses.field(default_factory=list)
  # Layer solves of the next epoch so far that ended unconverged (CG at its
  # iteration limit, not finite), one count per run.
  unconverged: list[int] = dataclasses.field(default_factory=list)

  def add(self, stats: dict[str, Any], seconds: float) -> None:
    """Counts one more step of the epoch, with its ``stats``."""
    self.step, self.epoch_seconds = self.step + 1, self.epoch_seconds + seconds
    self.loss_sum += float(jnp.mean(stats['loss']))
    self.acc_sum += float(jnp.mean(stats['accuracy']))
    flagged = np.atleast_1d(np.asarray(stats['skipped'], int))
    self.skipped = [int(v) for v in flagged + (self.skipped or 0)]
    missed = np.atleast_1d(np.asarray(stats['unconverged'], int))
    self.unconverged = [int(v) for v in missed + (self.unconverged or 0)]

  def postfix(self) -> dict[str, Any]:
    """The progress bar's running means of the epoch."""
    return dict(loss=f'{self.loss_sum / self.step:.4f}',
                acc=f'{self.acc_sum / self.step:.4f}',
                skipped=sum(self.skipped),
                unconverged=sum(self.unconverged))

  def next_epoch(self) -> Position:
    return Position(self.epoch + 1, 0, self.seconds + self.epoch_seconds)


def make_evaluate(config: Config, graphdef, splits):
  """``evaluate(state, epoch, **extra)``: one history entry per run, with
  loss and accuracy on every split (``None`` where not finite)."""
  method = optimizers.METHODS[config.optimizer]
  evaluate = steps.make_evaluate(graphdef, config.eval_batch_size,
                                 runs=config.sweep is not None,
                                 eval_params=method.eval_params)

  def evaluate_all(state, epoch: int, **extra) -> list[dict[str, Any]]:
    per_split = {k: evaluate(state, *xy) for k, xy in splits.items()}
    return [{'epoch': epoch, **{
        f'{k}_{what}': (values[r][i] if math.isfinite(values[r][i]) else None)
        for k, values in per_split.items()
        for i, what in enumerate(('loss', 'accuracy'))}, **extra}
            for r in range(len(config.sweep or (None,)))]

  return evaluate_all


def new_records(config: Config, sizes, device: str, initial: list[dict]):
  """``(records, metrics)`` of a new run: one record per learning rate, and
  the metrics file's content (the record, or a sweep's list of them)."""
  if config.sweep is None:
    record = {'config': dataclasses.asdict(config), 'data': sizes,
              'device': device, 'initial': initial[0], 'history': [],
              'step_loss': []}
    return [record], record
  records = [{'config': dataclasses.asdict(dataclasses.replace(
                  config, learning_rate=lr, sweep=None)),
              'data': sizes, 'device': device, 'initial': entry,
              'history': [], 'step_loss': []}
             for lr, entry in zip(config.sweep, initial)]
  return records, {'config': dataclasses.asdict(config), 'data': sizes,
                   'device': device, 'sweep': records}


def record_step_loss(records, stats: dict[str, Any]) -> None:
  """Appends each run's batch loss of the step (``None`` where not finite)
  to its record's ``step_loss``; a checkpoint saves them with the record."""
  losses = np.atleast_1d(np.asarray(stats['loss'], np.float64))
  for record, loss in zip(records, losses, strict=True):
    record.setdefault('step_loss', []).append(
        float(loss) if math.isfinite(loss) else None)


def record_epoch(config: Config, records, entries, at: Position) -> None:
  """Appends each run's entry of an epoch to its record, and prints it."""
  rates = config.sweep or (config.learning_rate,)
  for i, (lr, record, entry) in enumerate(zip(rates, records, entries)):
    entry['skipped_steps'] = at.skipped[i] if at.skipped else 0
    entry['unconverged_solves'] = (at.unconverged[i] if at.unconverged
                                   else 0)
    record['history'].append(entry)
    print((f'lr {lr:<8g} ' if config.sweep else '') + _summary(entry),
          flush=True)


class Checkpoints:
  """The run's checkpoints in ``--checkpoint_dir``; does nothing without."""

  def __init__(self, config: Config, sizes: dict[str, Any]):
    self.config = config
    self.manager = self.progress = None
    if config.checkpoint_dir:
      self.manager, self.progress = checkpoints.open_for(
          config.checkpoint_dir, config.resume, _resume_settings(config),
          sizes)

  def restore(self, state, device: str):
    """``(state, position, records, metrics)`` where the checkpoint is."""
    state = checkpoints.restore_state(self.manager,
                                      self.progress['global_step'], state)
    at = Position(**{f.name: self.progress[f.name]
                     for f in dataclasses.fields(Position)
                     if f.name in self.progress})
    record = {**self.progress['metrics'],
              'config': dataclasses.asdict(self.config), 'device': device}
    return state, at, [record], record

  def save(self, state, at: Position, per_epoch: int, metrics):
    """Saves the state and all else that the next step needs, if on."""
    if self.manager is None:
      return None
    saved = {'format': checkpoints.FORMAT,
             'global_step': at.epoch * per_epoch + at.step,
             **dataclasses.asdict(at),
             'config': _resume_settings(self.config), 'metrics': metrics}
    checkpoints.save(self.manager, state, saved)
    return saved

  def interrupted(self, state, at: Position, per_epoch: int,
                  metrics) -> Interrupted:
    """Saves where the run stopped; the exception that says how to go on."""
    where = (f'epoch {at.epoch + 1} after step {at.step} of {per_epoch}'
             if at.step else f'epoch {at.epoch + 1} before its first step')
    saved = self.save(state, at, per_epoch, metrics)
    if saved is None:
      return Interrupted(f'Interrupted in {where}; no --checkpoint_dir, so '
                         'the run cannot be resumed.', None)
    return Interrupted(
        f'Interrupted in {where}; checkpoint saved in '
        f'{self.config.checkpoint_dir} (step {saved["global_step"]}). Run '
        'the same command with --resume to continue from the next step.',
        saved['global_step'])

  def close(self) -> None:
    if self.manager is not None:
      self.manager.close()


def _print_start(config, data, device, records, progress, at, per_epoch):
  what = (f'sweep over {len(config.sweep)} learning rates '
          f'({", ".join(f"{lr:g}" for lr in config.sweep)})' if config.sweep
          else f'(learning rate {config.learning_rate:g})')
  print(f'{config.dataset}: {len(data.x_train)} train / {len(data.x_val)} '
        f'validation / {len(data.x_test)} test, {config.model}, '
        f'{config.optimizer} {what}, batch {config.batch_size}, {device}',
        flush=True)
  for record in records:
    for entry in [record['initial'], *record['history']]:
      print(_summary(entry), flush=True)
  if progress is not None:
    print(f'Resumed from {config.checkpoint_dir} (step '
          f'{progress["global_step"]}: epoch {at.epoch + 1}, step '
          f'{at.step} of {per_epoch} done).', flush=True)
    if at.epoch >= config.epochs:
      print(f'The checkpoint has {at.epoch} epochs done, --epochs is '
            f'{config.epochs}: nothing to train.', flush=True)


def finish(config: Config, graphdef, state, records) -> None:
  """Warns of skipped steps; writes the parameters and the plot asked for."""
  rates = config.sweep or (config.learning_rate,)
  for lr, record in zip(rates, records):
    skipped = sum(e.get('skipped_steps', 0) for e in record['history'])
    if skipped:
      print(f'warning: {skipped} steps'
            + (f' at lr {lr:g}' if config.sweep else '')
            + ' were flagged as not finite (NaN or Inf in the batch, the '
            'loss or a solve) and skipped: the parameters did not move on '
            'them. A learning rate too large for the loss is the usual '
            'cause.', file=sys.stderr, flush=True)
  if config.params_out:
    checkpoints.write_params_npz(config.params_out, graphdef, state)
  if config.plot_out:
    import compare  # pylint: disable=import-outside-toplevel
    compare.plot([(f'{config.optimizer} lr {lr:g}' if config.sweep else
                   config.optimizer, record)
                  for lr, record in zip(rates, records)], config.plot_out)


def train_and_evaluate(config: Config | Mapping[str, Any]) -> dict[str, Any]:
  """Trains and evaluates one run (or a sweep) of ``config`` (a
  :class:`Config` or a dict of its fields); returns the metrics of the
  module docstring.

  Raises ``UsageError`` (a setting or size that cannot work, or a checkpoint
  of other settings), ``input_pipeline.DatasetUnavailableError``, or
  :class:`Interrupted` (Ctrl-C or ``stop_after_steps`` between two steps,
  after saving a checkpoint where there is a ``checkpoint_dir``).
  """
  config = config_lib.resolve(config)
  data, sizes = load_data(config)
  graphdef, state = create_state(config, data)
  method = optimizers.METHODS[config.optimizer]
  step = steps.jit(steps.make_step(graphdef, method.needs_problems),
                   config.sweep is not None)
  splits = {k: (jnp.asarray(x), jnp.asarray(y)) for k, (x, y) in {
      'train': (data.x_train, data.y_train), 'val': (data.x_val, data.y_val),
      'test': (data.x_test, data.y_test)}.items()}
  evaluate = make_evaluate(config, graphdef, splits)
  saved = Checkpoints(config, sizes)
  device = f'{jax.devices()[0].device_kind} ({jax.default_backend()})'
  if saved.progress is None:
    at = Position()
    records, metrics = new_records(config, sizes, device,
                                   evaluate(state, 0, seconds=0.0))
  else:
    state, at, records, metrics = saved.restore(state, device)
  per_epoch = sizes['steps_per_epoch']
  _print_start(config, data, device, records, saved.progress, at, per_epoch)

  xs, ys = splits['train']
  if at.epoch < config.epochs:
    first = steps.epoch_batches(len(xs), config.batch_size, config.seed, 0)[0]
    steps.compile_on_copy(step, state, xs[first], ys[first])
  steps_this_run, epochs_this_run = 0, 0
  try:
    with checkpoints.InterruptGuard() as guard:
      while at.epoch < config.epochs:
        batches = steps.epoch_batches(len(xs), config.batch_size, config.seed,
                                      at.epoch)
        bar = tqdm(total=per_epoch, initial=at.step, unit='step',
                   desc=f'epoch {at.epoch + 1}/{config.epochs}',
                   disable=not config.progress, leave=False)
        for i in range(at.step, per_epoch):
          if guard.requested:
            bar.close()
            raise saved.interrupted(state, at, per_epoch, metrics)
          state, stats, seconds = steps.timed_step(
              step, state, xs[batches[i]], ys[batches[i]])
          at.add(stats, seconds)
          record_step_loss(records, stats)
          steps_this_run += 1
          if steps_this_run == config.stop_after_steps:
            guard.requested = True  # as a Ctrl-C: stop before the next step
          bar.set_postfix(**at.postfix(), refresh=False)
          bar.update()
        bar.close()
        speed = per_epoch * config.batch_size / at.epoch_seconds
        done, at = at, at.next_epoch()
        record_epoch(config, records, evaluate(
            state, at.epoch, seconds=at.seconds,
            train_examples_per_second=speed), done)
        epochs_this_run += 1
        if config.metrics_out:
          checkpoints.write_json_atomic(config.metrics_out, metrics)
        saved.save(state, at, per_epoch, metrics)
        if guard.requested and at.epoch < config.epochs:
          raise saved.interrupted(state, at, per_epoch, metrics)
  finally:
    saved.close()
  if config.metrics_out and not epochs_this_run:
    checkpoints.write_json_atomic(config.metrics_out, metrics)
  finish(config, graphdef, state, records)
  return metrics


def _resume_settings(config: Config) -> dict[str, Any]:
  return {name: getattr(config, name) for name in config_lib.RESUME_SETTINGS}


def _rates(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.split(',') if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'expected comma-separated learning rates, got {text!r}') from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults, except for on/off flags: ``--no_progress``'s stored
  default is ``True`` (progress on), which would read as the flag's."""

  def _get_help_string(self, action):
    if action.nargs == 0:
      return action.help
    return super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None = None) -> Config:
  """Parses ``argv``: a flag per :class:`Config` field (``config.HELP``),
  whose default is the ``--preset``'s or the field's."""
  first = argparse.ArgumentParser(add_help=False)
  first.add_argument('--preset', choices=sorted(config_lib.PRESETS),
                     help="a paper's setting (model, batch size, epochs); "
                     'flags override')
  preset = first.parse_known_args(argv)[0].preset
  defaults = Config(**(config_lib.preset_settings(preset) if preset else {}))
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0], parents=[first],
      formatter_class=_HelpFormatter)
  kinds = {f.name: f.type.split(' |')[0] for f in dataclasses.fields(Config)}
  for name, text in config_lib.HELP.items():
    default = getattr(defaults, name)
    if kinds[name] == 'bool':  # --name, or --no_name where it is on
      parser.add_argument(('--no_' if default else '--') + name, dest=name,
                          action=f'store_{not default}'.lower(), help=text)
      continue
    parser.add_argument(
        '--' + name, default=default, help=text,
        choices=config_lib.CHOICES.get(name),
        metavar=config_lib.METAVARS.get(name),
        type={'str': str, 'int': int, 'float': float}.get(kinds[name],
                                                          _rates))
  args = vars(parser.parse_args(argv))
  del args['preset']
  return Config(**args)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs :func:`train_and_evaluate` from the command line: a setting that
  cannot work, a dataset that cannot be had or Ctrl-C ends it with a
  message, not a traceback (Ctrl-C: status 130 and the command that
  resumes)."""
  config = parse_args(argv)
  try:
    return train_and_evaluate(config)
  except (UsageError, input_pipeline.DatasetUnavailableError) as e:
    raise SystemExit(f'train.py: error: {e}') from None
  except Interrupted as e:
    message = e.message
    if e.checkpoint_step is not None:
      message += '\n  ' + checkpoints.resume_command(
          sys.argv[1:] if argv is None else argv)
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(INTERRUPTED_STATUS) from None
  except KeyboardInterrupt:  # before training, or a second Ctrl-C
    print('Interrupted at once: no checkpoint was written now (--resume '
          'continues from the last epoch\'s, if any).', file=sys.stderr,
          flush=True)
    raise SystemExit(INTERRUPTED_STATUS) from None


if __name__ == '__main__':
  main()
