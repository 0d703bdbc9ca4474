r"""One training script for every experiment: a model, an optimizer, a dataset.

Trains one of the papers' networks (``examples/models.py``) with SIBP, ProxBP
or a first-order baseline on one dataset (``examples/input_pipeline.py``) and
records, after every epoch, the full training-set loss and accuracy, the
validation and test loss and accuracy, and the cumulative seconds spent in
update steps alone (compilation and evaluation excluded)::

  python examples/train.py --dataset mnist --model paper_mlp \
      --optimizer sibp --epochs 5 --metrics_out sibp.json --plot_out sibp.png
  python examples/train.py --dataset cifar10 --model proxprop_mlp \
      --optimizer proxbp --proxbp_solver cg3 --batch_size 500 --epochs 50
  python examples/train.py --dataset digits --optimizer adam   # offline
  python examples/compare.py sibp.json adam.json --out compare.png

The defaults are the SIBP authors' reference run (MNIST, ``paper_mlp``,
batch 100, 5 epochs, ``η = 0.1``, ``λ_W = λ_b = 1``) with the library's
default (linearized) SIBP. A TFDS dataset that is not prepared is downloaded
and prepared on the first run (needs internet and TensorFlow, which
``pip install ".[examples,prepare]"`` installs); training itself reads the
prepared array_record files without TensorFlow. Without internet, use
``--dataset digits`` or ``--data_dir`` of a prepared copy.

Optimizers (default learning rate when ``--learning_rate`` is not given):

* ``sibp`` (0.1): ``sibp_jax.sibp``, the library default (linearized)
  variant; ``sibp_linearized`` names it explicitly; ``sibp_paper`` (0.1) is
  the authors' fit through the activation by ``--inner_iterations`` steps of
  nonlinear CG. The learning rate is ``η``, the step on the neurons;
  ``--lambda_w``, ``--lambda_b`` (1, 1) are the proximal weights.
* ``proxbp`` (1.0 with the Nesterov outer step, 1e-3 with Adam):
  ``sibp_jax.proxbp`` with ``--tau_prox`` (0.05), ``--proxbp_solver``
  (``exact`` or ``cgN``: N conjugate-gradient steps), ``--proxbp_outer``
  (``nesterov`` with ``--momentum`` 0.95, or ``adam``).
* ``sgd`` (0.1), ``nesterov`` (0.05, ``--momentum`` 0.95), ``adam`` (1e-3):
  optax on the plain gradient.

Every step has the same batch shape (the last partial batch of an epoch is
dropped), so each jitted step compiles once. Batches are drawn by a seeded
permutation per epoch (the SIBP authors drew them with replacement; an epoch
here sees every kept example once). The update time of a step is measured
from the call to the moment its new parameters are ready, with the batch
already gathered on the device. On CPU, set ``OPENBLAS_NUM_THREADS=1`` when
the cores are shared: the exact solves' triangular solves go through
OpenBLAS, whose threads spin-wait badly on busy cores (one SIBP epoch of
Fashion-MNIST took 10.3 s of updates without it and 2.9 s with it on a busy
2-core machine), which would distort the seconds recorded.

``--metrics_out FILE.json`` is rewritten (atomically) after every epoch::

  {"config": {...}, "data": {...}, "initial": {...},
   "history": [{"epoch", "train_loss", "train_accuracy", "val_loss",
                "val_accuracy", "test_loss", "test_accuracy", "seconds",
                "train_examples_per_second"}, ...]}

``initial`` holds the same evaluation before the first step (epoch 0).
Non-finite values are written as ``null``.

Checkpoints and resuming. With ``--checkpoint_dir DIR`` the run saves, with
orbax, at the end of every epoch: the whole ``nnx.split`` state of model
and optimizer (parameters, optimizer counts, moments, ``info``), the
position (epoch and step within it), the settings and the metrics so far.
Ctrl-C finishes the step under way, saves the state after it (mid-epoch)
and exits with status 130 and the command that resumes; a second Ctrl-C
stops at once. ``--resume`` continues from the latest checkpoint in ``DIR``
at exactly the next step (``--epochs`` may be raised)::

  python examples/train.py --dataset digits --epochs 2 --checkpoint_dir ck
  python examples/train.py --dataset digits --epochs 4 --checkpoint_dir ck \
      --resume

The batch order is a pure function of ``(seed, epoch)`` and no other
randomness enters a step, so on one machine a resumed run ends with
parameters bitwise equal to an uninterrupted one, and two runs with the
same seed are bitwise equal (the recorded seconds aside). ``--resume``
without a checkpoint starts afresh (with a note); a checkpoint written with
other settings (model, optimizer and its hyperparameters, dataset and its
sizes, batch size, seed) is refused with a message naming them.
``--params_out FILE.npz`` writes the final parameters; ``--stop_after_steps
N`` acts as a Ctrl-C after ``N`` steps of this run (for tests).

Learning-rate sweeps. ``--sweep LR1,LR2,...`` trains K runs of the same
optimizer, one per learning rate, in ONE compiled program: the train step
under ``jax.vmap`` over the K stacked parameters and
``optax.inject_hyperparams`` states, from the same initial weights on the
same batches. ``--metrics_out`` then holds ``{"config", "data", "device",
"sweep": [metrics of rate 1, ...]}``, each entry a run's metrics as above
(its ``config.learning_rate`` the rate), which ``compare.py`` can read; the
``seconds`` are the whole sweep's update time (all K rates together)::

  python examples/train.py --dataset digits --optimizer sibp \
      --sweep 0.03,0.1,0.3,1 --metrics_out sweep.json

A sweep takes no ``--learning_rate`` and is not checkpointed: it refuses
``--checkpoint_dir``, ``--resume``, ``--params_out`` and
``--stop_after_steps``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import sibp_jax

import input_pipeline
import models
import quickstart

LOSS = optax.softmax_cross_entropy_with_integer_labels

OPTIMIZERS = ('sibp', 'sibp_paper', 'sibp_linearized', 'proxbp', 'sgd',
              'nesterov', 'adam')
PROXBP_SOLVERS = ('exact', 'cg3', 'cg5', 'cg10')
PROXBP_OUTERS = ('nesterov', 'adam')
# Learning rates used when none is given (see the module docstring).
DEFAULT_LEARNING_RATES = {
    'sibp': 0.1, 'sibp_paper': 0.1, 'sibp_linearized': 0.1,
    'proxbp': 1.0, 'proxbp_adam': 1e-3,
    'sgd': 0.1, 'nesterov': 0.05, 'adam': 1e-3,
}
_NEEDS_PROBLEMS = {'sibp', 'sibp_paper', 'sibp_linearized', 'proxbp'}


# The settings that decide the trajectory of the parameters: a checkpoint
# resumes only under the same ones (epochs, paths and the evaluation batch
# size may change).
RESUME_SETTINGS = ('dataset', 'model', 'optimizer', 'learning_rate',
                   'lambda_w', 'lambda_b', 'inner_iterations', 'tau_prox',
                   'momentum', 'proxbp_solver', 'proxbp_outer', 'batch_size',
                   'seed', 'train_examples', 'validation_examples',
                   'mock_data')
# Settings a --sweep refuses (see the module docstring).
_NOT_WITH_SWEEP = ('checkpoint_dir', 'resume', 'params_out',
                   'stop_after_steps')
# Exit status of an interrupted run (128 + SIGINT, as a shell reports it).
INTERRUPTED_STATUS = 130
_CHECKPOINT_FORMAT = 1


class UsageError(ValueError):
  """A setting or a size that cannot work; the message says which."""


class Interrupted(KeyboardInterrupt):
  """Training stopped by Ctrl-C (or ``stop_after_steps``) between steps.

  Attributes:
    checkpoint_step: the global step of the checkpoint that resumes the run,
      or ``None`` without a ``checkpoint_dir``.
    message: what happened and how to resume.
  """

  def __init__(self, message: str, checkpoint_step: int | None):
    super().__init__(message)
    self.message = message
    self.checkpoint_step = checkpoint_step


@dataclasses.dataclass
class Config:
  """Settings of one run; the command-line flags have the same names.

  Attributes:
    dataset: one of ``input_pipeline.DATASETS``.
    data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).
    model: one of ``models.MODELS``.
    optimizer: one of :data:`OPTIMIZERS`.
    learning_rate: the optimizer's learning rate (SIBP: ``η``); ``None``
      for :data:`DEFAULT_LEARNING_RATES`.
    lambda_w: SIBP's ``λ_W`` (absolute, data term summed over the batch).
    lambda_b: SIBP's ``λ_b``.
    inner_iterations: nonlinear CG steps per subproblem of ``sibp_paper``.
    tau_prox: ProxBP's ``τ_prox``.
    momentum: Nesterov momentum of ``nesterov`` and of ProxBP's default
      outer step.
    proxbp_solver: ``'exact'`` or ``'cgN'``.
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
    stop_after_steps: for tests, act as a Ctrl-C after this many steps of
      this run.
    sweep: learning rates trained together in one vmapped program (see
      :func:`train_sweep`); ``learning_rate`` must then be ``None``.
  """

  dataset: str = 'mnist'
  data_dir: str | None = None
  model: str = 'paper_mlp'
  optimizer: str = 'sibp'
  learning_rate: float | None = None
  lambda_w: float = 1.0
  lambda_b: float = 1.0
  inner_iterations: int = 5
  tau_prox: float = 0.05
  momentum: float = 0.95
  proxbp_solver: str = 'exact'
  proxbp_outer: str = 'nesterov'
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


def _as_config(config: Config | Mapping[str, Any]) -> Config:
  if isinstance(config, Config):
    return dataclasses.replace(config)
  fields = {f.name for f in dataclasses.fields(Config)}
  unknown = sorted(set(config) - fields)
  if unknown:
    raise UsageError(f'unknown settings {unknown}; known: {sorted(fields)}')
  return Config(**config)


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
  config = _as_config(config)
  choices = {'dataset': input_pipeline.DATASETS, 'model': models.MODELS,
             'optimizer': OPTIMIZERS, 'proxbp_solver': PROXBP_SOLVERS,
             'proxbp_outer': PROXBP_OUTERS}
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
    refused = [name for name in _NOT_WITH_SWEEP if getattr(config, name)]
    if refused:
      raise UsageError(f'--sweep cannot be combined with '
                       f'{", ".join("--" + n for n in refused)} (a sweep is '
                       'not checkpointed)')
    bad = [lr for lr in config.sweep if not lr > 0]
    if bad:
      raise UsageError(f'sweep learning rates must be > 0, got {bad}')
  elif config.learning_rate is None:
    key = config.optimizer
    if key == 'proxbp' and config.proxbp_outer == 'adam':
      key = 'proxbp_adam'
    config.learning_rate = DEFAULT_LEARNING_RATES[key]
  positive = ('learning_rate' if config.sweep is None else 'lambda_w',
              'lambda_w', 'lambda_b', 'tau_prox',
              'batch_size', 'eval_batch_size', 'inner_iterations')
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


def create_optimizer(config: Config) -> tuple[optax.GradientTransformation,
                                              bool]:
  """The optax transformation of ``config.optimizer``.

  Args:
    config: resolved settings (see :func:`resolve`).

  Returns:
    ``(tx, needs_problems)``: the transformation, and whether its update
    needs the ``problems`` of ``sibp_jax.nnx.value_grad_and_problems``.
  """
  lr, name = config.learning_rate, config.optimizer
  if name in ('sibp', 'sibp_linearized', 'sibp_paper'):
    kwargs = {'lambda_w': config.lambda_w, 'lambda_b': config.lambda_b}
    if name == 'sibp_linearized':
      kwargs['variant'] = 'linearized'
    elif name == 'sibp_paper':
      kwargs['variant'] = 'paper'
      kwargs['solver'] = sibp_jax.NonlinearCG(
          iterations=config.inner_iterations)
    return sibp_jax.sibp(lr, **kwargs), True
  if name == 'proxbp':
    solver = ('exact' if config.proxbp_solver == 'exact' else
              sibp_jax.ConjugateGradient(int(config.proxbp_solver[2:])))
    if config.proxbp_outer == 'adam':
      return sibp_jax.proxbp(tau_prox=config.tau_prox, solver=solver,
                             outer=optax.adam(lr)), True
    return sibp_jax.proxbp(lr, tau_prox=config.tau_prox,
                           momentum=config.momentum, solver=solver), True
  if name == 'sgd':
    return optax.sgd(lr), False
  if name == 'nesterov':
    return optax.sgd(lr, momentum=config.momentum, nesterov=True), False
  if name == 'adam':
    return optax.adam(lr), False
  raise UsageError(f'unknown optimizer {name!r}')


def _accuracy(logits, y):
  return jnp.mean(jnp.argmax(logits, axis=-1) == y)


def make_train_step(graphdef, needs_problems: bool):
  """A jitted step ``(state, x, y) -> (state, loss, accuracy)``.

  ``state`` is ``nnx.split((model, optimizer))[1]`` and is donated. With
  ``needs_problems`` the gradient and the layer-wise problems come from
  ``sibp_jax.nnx.value_grad_and_problems`` and go to
  ``optimizer.update(model, grads, problems=problems)``; otherwise the step
  is plain ``nnx.value_and_grad``. Loss and accuracy are the batch's, before
  the update.
  """

  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    if needs_problems:
      loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
          model, x, y, loss_fn=LOSS)
      # The last layer's recorded output is the logits.
      logits = problems.layers[-1].outputs
      optimizer.update(model, grads, problems=problems)
    else:
      def mean_loss(model):
        logits = model(x)
        return jnp.mean(LOSS(logits, y)), logits
      (loss, logits), grads = nnx.value_and_grad(mean_loss, has_aux=True)(
          model)
      optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss, _accuracy(logits, y)

  return jax.jit(step, donate_argnums=0)


def make_evaluate(graphdef, batch_size: int, *, runs: bool = False):
  """``evaluate(state, x, y) -> (mean loss, accuracy)`` in batches.

  Every batch has ``batch_size`` rows (the last one is padded and the
  padding weighted zero), so the evaluation compiles once per run. With
  ``runs``, ``graphdef`` is the model's alone and ``state`` its parameters
  stacked over K runs (a sweep); loss and accuracy are then NumPy arrays of
  K values.
  """

  def one_sums(state, x, y, weight):
    model = nnx.merge(graphdef, state)
    model = model if runs else model[0]
    logits = model(x)
    return (jnp.sum(weight * LOSS(logits, y)),
            jnp.sum(weight * (jnp.argmax(logits, axis=-1) == y)))

  sums = jax.jit(jax.vmap(one_sums, in_axes=(0, None, None, None))
                 if runs else one_sums)
  to_host = np.asarray if runs else float

  def evaluate(state, x, y):
    n = len(x)
    loss_sum = correct = 0.0
    for start in range(0, n, batch_size):
      xb, yb = x[start:start + batch_size], y[start:start + batch_size]
      weight = jnp.ones(len(xb), jnp.float32)
      pad = batch_size - len(xb)
      if pad:
        xb = jnp.concatenate([xb, jnp.zeros((pad, *xb.shape[1:]), xb.dtype)])
        yb = jnp.concatenate([yb, jnp.zeros((pad,), yb.dtype)])
        weight = jnp.concatenate([weight, jnp.zeros((pad,), jnp.float32)])
      s_loss, s_correct = sums(state, xb, yb, weight)
      loss_sum += to_host(s_loss)
      correct += to_host(s_correct)
    return loss_sum / n, correct / n

  return evaluate


def _finite_or_none(value: float) -> float | None:
  return value if math.isfinite(value) else None


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` through a temporary file + rename.

  A reader never sees a half-written file: the JSON goes to a temporary
  file in the same directory, which then replaces ``path`` at once.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.',
                             suffix='.tmp', dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(obj, f, indent=2, allow_nan=False)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_params_npz(path: str, graphdef, state) -> None:
  """Writes the model's ``nnx.Param`` arrays to ``path`` (``.npz``).

  Keys are the parameters' paths joined by ``/`` (``hidden/kernel``); the
  file is replaced atomically, as the metrics file.
  """
  model = nnx.merge(graphdef, state)[0]
  flat = jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
  arrays = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
            for path, v in flat}
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.npz', dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def checkpoint_manager(directory: str):
  """An orbax ``CheckpointManager`` on ``directory`` (created if needed).

  Saves are synchronous: the next step donates the state's buffers, and a
  checkpoint must be on disk when its epoch is reported. The two latest
  checkpoints are kept. Each holds ``state`` (``nnx.to_pure_dict`` of the
  ``nnx.split`` state of ``(model, optimizer)``, ``StandardSave``) and
  ``progress`` (JSON: position, settings, metrics so far).
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  options = ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_checkpoint(manager, state, progress: dict[str, Any]) -> bool:
  """Saves ``state`` and ``progress`` at ``progress['global_step']``.

  Returns:
    Whether a checkpoint was written (``False``: that step is saved
    already, as when Ctrl-C comes right after an epoch's checkpoint).
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  step = progress['global_step']
  if step in manager.all_steps():
    return False
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
      progress=ocp.args.JsonSave(progress)))
  manager.wait_until_finished()
  return True


def read_progress(manager, step: int) -> dict[str, Any]:
  """The JSON ``progress`` of the checkpoint at ``step``."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return manager.restore(step, args=ocp.args.Composite(
      progress=ocp.args.JsonRestore())).progress


def restore_state(manager, step: int, state):
  """``state`` (an ``nnx.State``) with the checkpoint's arrays at ``step``.

  ``state`` gives the tree, shapes and dtypes: a checkpoint of another
  model or optimizer fails here.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          nnx.to_pure_dict(state))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract))).state
  nnx.replace_by_pure_dict(state, restored)
  return state


def _resume_settings(config: Config) -> dict[str, Any]:
  return {name: getattr(config, name) for name in RESUME_SETTINGS}


def _check_resumable(progress: dict[str, Any], config: Config,
                     data_sizes: dict[str, Any], directory: str) -> None:
  """Raises :class:`UsageError` naming what differs from the checkpoint."""
  if progress.get('format') != _CHECKPOINT_FORMAT:
    raise UsageError(f'the checkpoint in {directory} has format '
                     f'{progress.get("format")!r}, this script reads '
                     f'{_CHECKPOINT_FORMAT}')
  saved, now = progress['config'], _resume_settings(config)
  differ = [f'{k} (checkpoint {saved.get(k)!r}, command line {now[k]!r})'
            for k in RESUME_SETTINGS if saved.get(k) != now[k]]
  saved_data = progress['metrics']['data']
  differ += [f'data {k} (checkpoint {saved_data.get(k)!r}, now {v!r})'
             for k, v in data_sizes.items() if saved_data.get(k) != v]
  if differ:
    raise UsageError(
        f'cannot resume from {directory}: its checkpoint was written with '
        f'other settings: {"; ".join(differ)}. Pass the checkpoint\'s '
        'settings, or another --checkpoint_dir to start afresh.')


class _InterruptGuard:
  """Turns the first Ctrl-C into a request to stop between steps.

  A Ctrl-C that lands inside a step would lose the donated state; instead
  the handler records it and the loop stops before the next step. A second
  Ctrl-C raises ``KeyboardInterrupt`` at once. Outside the main thread
  (where signal handlers cannot be set) Ctrl-C is left as it is.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print('\nInterrupted: stopping after the current step '
          '(Ctrl-C again to stop at once).', file=sys.stderr, flush=True)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None
    return False


def _evaluate_all(evaluate, state, data_on_device) -> dict[str, float | None]:
  out = {}
  for split, (x, y) in data_on_device.items():
    loss, accuracy = evaluate(state, x, y)
    out[f'{split}_loss'] = _finite_or_none(loss)
    out[f'{split}_accuracy'] = _finite_or_none(accuracy)
  return out


def _summary(entry: dict[str, Any]) -> str:
  def fmt(v, spec):
    return 'nan' if v is None else format(v, spec)
  parts = [f'epoch {entry["epoch"]:3d}']
  for split in ('train', 'val', 'test'):
    parts.append(f'{split} loss {fmt(entry[split + "_loss"], ".4f")} '
                 f'acc {fmt(entry[split + "_accuracy"], ".4f")}')
  parts.append(f'update s {entry["seconds"]:.2f}')
  if entry.get('train_examples_per_second'):
    parts.append(f'{entry["train_examples_per_second"]:.0f} ex/s')
  return ' | '.join(parts)


def _load_data(config: Config):
  """The run's data, training-set size, steps per epoch and size summary."""
  try:
    data = input_pipeline.load(
        config.dataset, config.data_dir,
        validation_examples=config.validation_examples,
        train_examples=config.train_examples, mock_data=config.mock_data)
  except ValueError as e:
    raise UsageError(str(e)) from None
  n_train = len(data.x_train)
  if config.batch_size > n_train:
    raise UsageError(f'batch_size={config.batch_size} is larger than the '
                     f'training set ({n_train} examples)')
  steps = n_train // config.batch_size
  return data, n_train, steps, {**data.sizes(), 'steps_per_epoch': steps}


def train_and_evaluate(config: Config | Mapping[str, Any]) -> dict[str, Any]:
  """Trains and evaluates one run; returns (and writes) its metrics.

  With ``config.checkpoint_dir`` the state is checkpointed after every
  epoch; with ``config.resume`` the run continues from the latest
  checkpoint there (see the module docstring).

  Args:
    config: a :class:`Config` or a dict of its fields.

  Returns:
    ``{"config", "data", "device", "initial", "history"}`` as described in
    the module docstring; ``history`` has one entry per epoch.

  Raises:
    UsageError: a setting or a size that cannot work, or a checkpoint
      written with other settings.
    input_pipeline.DatasetUnavailableError: the dataset is not prepared and
      cannot be prepared here (the message says what to do).
    Interrupted: Ctrl-C (or ``stop_after_steps``) stopped training between
      two steps, after the state was checkpointed (with a
      ``checkpoint_dir``); the metrics file holds every finished epoch.
  """
  config = resolve(config)
  if config.sweep is not None:
    return train_sweep(config)
  data, n_train, steps, data_sizes = _load_data(config)

  model = models.create_model(config.model, data.input_shape, data.classes,
                              seed=config.seed)
  tx, needs_problems = create_optimizer(config)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  del model, optimizer

  manager, progress = None, None
  if config.checkpoint_dir:
    manager = checkpoint_manager(config.checkpoint_dir)
    latest = manager.latest_step()
    if latest is not None and not config.resume:
      manager.close()
      raise UsageError(
          f'{config.checkpoint_dir} holds checkpoints already (latest step '
          f'{latest}): pass --resume to continue from it, or another '
          '--checkpoint_dir to start afresh')
    if config.resume and latest is None:
      print(f'No checkpoint in {config.checkpoint_dir}: starting afresh.',
            flush=True)
    elif config.resume:
      progress = read_progress(manager, latest)
      try:
        _check_resumable(progress, config, data_sizes, config.checkpoint_dir)
      except UsageError:
        manager.close()
        raise
      state = restore_state(manager, latest, state)

  train_step = make_train_step(graphdef, needs_problems)
  evaluate = make_evaluate(graphdef, config.eval_batch_size)

  on_device = {
      'train': (jnp.asarray(data.x_train), jnp.asarray(data.y_train)),
      'val': (jnp.asarray(data.x_val), jnp.asarray(data.y_val)),
      'test': (jnp.asarray(data.x_test), jnp.asarray(data.y_test)),
  }
  xs, ys = on_device['train']

  device = f'{jax.devices()[0].device_kind} ({jax.default_backend()})'
  if progress is None:
    metrics: dict[str, Any] = {
        'config': dataclasses.asdict(config),
        'data': data_sizes,
        'device': device,
        'initial': {'epoch': 0, **_evaluate_all(evaluate, state, on_device),
                    'seconds': 0.0},
        'history': [],
    }
    # Where the next step starts: epochs done, steps done in the next one,
    # and the sums of that epoch's steps so far.
    done_epochs, done_steps = 0, 0
    seconds = epoch_seconds = loss_sum = acc_sum = 0.0
  else:
    metrics = {**progress['metrics'], 'config': dataclasses.asdict(config),
               'device': device}
    done_epochs, done_steps = progress['epoch'], progress['step']
    seconds, epoch_seconds = progress['seconds'], progress['epoch_seconds']
    loss_sum, acc_sum = progress['loss_sum'], progress['acc_sum']
  print(f'{config.dataset}: {n_train} train / {len(data.x_val)} validation / '
        f'{len(data.x_test)} test, {config.model}, {config.optimizer} '
        f'(learning rate {config.learning_rate:g}), batch '
        f'{config.batch_size}, {metrics["device"]}', flush=True)
  print(_summary(metrics['initial']), flush=True)
  for entry in metrics['history']:
    print(_summary(entry), flush=True)
  if progress is not None:
    print(f'Resumed from {config.checkpoint_dir} (step '
          f'{progress["global_step"]}: epoch {done_epochs + 1}, step '
          f'{done_steps} of {steps} done).', flush=True)
    if done_epochs >= config.epochs:
      print(f'The checkpoint has {done_epochs} epochs done, --epochs is '
            f'{config.epochs}: nothing to train.', flush=True)

  def progress_at(epoch_steps_done: int) -> dict[str, Any]:
    # The checkpoint's JSON: everything besides the state that the next
    # step depends on (the batch order is a function of seed and epoch).
    return {'format': _CHECKPOINT_FORMAT,
            'global_step': done_epochs * steps + epoch_steps_done,
            'epoch': done_epochs, 'step': epoch_steps_done,
            'seconds': seconds, 'epoch_seconds': epoch_seconds,
            'loss_sum': loss_sum, 'acc_sum': acc_sum,
            'config': _resume_settings(config), 'metrics': metrics}

  def interrupted(epoch_steps_done: int) -> Interrupted:
    where = (f'epoch {done_epochs + 1} after step {epoch_steps_done} of '
             f'{steps}' if epoch_steps_done else
             f'epoch {done_epochs + 1} before its first step')
    if manager is None:
      return Interrupted(f'Interrupted in {where}; no --checkpoint_dir, so '
                         'the run cannot be resumed.', None)
    saved = progress_at(epoch_steps_done)
    save_checkpoint(manager, state, saved)
    return Interrupted(
        f'Interrupted in {where}; checkpoint saved in '
        f'{config.checkpoint_dir} (step {saved["global_step"]}). Run the '
        'same command with --resume to continue from the next step.',
        saved['global_step'])

  if done_epochs < config.epochs:
    # Compile the step on a throwaway copy of the state (twice: the first
    # step's output may differ from the initial state in weak types), so
    # that the timed steps exclude compilation and the run starts untouched.
    warm = jax.tree.map(jnp.copy, state)
    first = quickstart.epoch_batches(n_train, config.batch_size,
                                     config.seed, 0)[0]
    for _ in range(2):
      warm, *_ = train_step(warm, xs[first], ys[first])
    jax.block_until_ready(warm)
    del warm

  run_steps = run_epochs = 0
  try:
    with _InterruptGuard() as guard:
      while done_epochs < config.epochs:
        epoch = done_epochs + 1
        batches = quickstart.epoch_batches(n_train, config.batch_size,
                                           config.seed, done_epochs)
        bar = tqdm(total=steps, initial=done_steps,
                   desc=f'epoch {epoch}/{config.epochs}', unit='step',
                   disable=not config.progress, leave=False)
        for i in range(done_steps, steps):
          if guard.requested:
            bar.close()
            raise interrupted(i)
          idx = batches[i]
          xb, yb = jax.block_until_ready((xs[idx], ys[idx]))
          start = time.perf_counter()
          state, loss, accuracy = train_step(state, xb, yb)
          jax.block_until_ready(state)
          epoch_seconds += time.perf_counter() - start
          loss_sum += float(loss)
          acc_sum += float(accuracy)
          run_steps += 1
          if run_steps == config.stop_after_steps:
            guard.requested = True  # as a Ctrl-C: stop before the next step
          # The sums and seconds cover this epoch's steps 1..i+1, some of
          # which may have run before a resume.
          bar.set_postfix(
              loss=f'{loss_sum / (i + 1):.4f}',
              acc=f'{acc_sum / (i + 1):.4f}',
              ex_per_s=f'{(i + 1) * config.batch_size / epoch_seconds:.0f}',
              refresh=False)
          bar.update()
        bar.close()
        seconds += epoch_seconds
        entry = {'epoch': epoch, **_evaluate_all(evaluate, state, on_device),
                 'seconds': seconds,
                 'train_examples_per_second': (
                     steps * config.batch_size / epoch_seconds)}
        metrics['history'].append(entry)
        done_epochs, done_steps = epoch, 0
        run_epochs += 1
        epoch_seconds = loss_sum = acc_sum = 0.0
        print(_summary(entry), flush=True)
        if config.metrics_out:
          write_json_atomic(config.metrics_out, metrics)
        if manager is not None:
          save_checkpoint(manager, state, progress_at(0))
        if guard.requested and done_epochs < config.epochs:
          raise interrupted(0)
  finally:
    if manager is not None:
      manager.close()
  if config.metrics_out and not run_epochs:
    write_json_atomic(config.metrics_out, metrics)
  if config.params_out:
    write_params_npz(config.params_out, graphdef, state)
  if config.plot_out:
    import compare  # pylint: disable=import-outside-toplevel
    compare.plot([(config.optimizer, metrics)], config.plot_out)
  return metrics


def train_sweep(config: Config) -> dict[str, Any]:
  """Trains one run per rate of ``config.sweep`` in one vmapped program.

  The K runs start from the same initial weights and see the same batches
  as a run of :func:`train_and_evaluate` with that learning rate; their
  parameters and ``optax.inject_hyperparams`` states are stacked on a
  leading axis and the train step is ``jax.vmap``-ed over it (batch
  shared). They are equal to K separate runs up to float32 round-off (a
  batched matmul may sum in another order).

  Args:
    config: resolved settings (:func:`resolve`) with ``sweep`` set.

  Returns:
    ``{"config", "data", "device", "sweep"}``: ``sweep`` holds one metrics
    dict per rate, as :func:`train_and_evaluate` returns them; their
    ``seconds`` are the update time of the whole sweep.
  """
  data, n_train, steps, data_sizes = _load_data(config)
  rates = config.sweep

  model = models.create_model(config.model, data.input_shape, data.classes,
                              seed=config.seed)
  graphdef, params = nnx.split(model)
  params = nnx.as_pure(params)
  del model
  needs_problems = create_optimizer(
      dataclasses.replace(config, learning_rate=rates[0]))[1]
  tx = optax.inject_hyperparams(
      lambda learning_rate: create_optimizer(dataclasses.replace(
          config, learning_rate=learning_rate))[0])(learning_rate=rates[0])

  def init(lr):
    opt_state = tx.init(params)
    opt_state.hyperparams['learning_rate'] = lr
    return params, opt_state

  def step(params, opt_state, x, y):
    if needs_problems:
      loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
          nnx.merge(graphdef, params), x, y, loss_fn=LOSS)
      logits = problems.layers[-1].outputs
      updates, opt_state = tx.update(nnx.as_pure(grads), opt_state, params,
                                     problems=problems)
    else:
      def mean_loss(params):
        logits = nnx.merge(graphdef, params)(x)
        return jnp.mean(LOSS(logits, y)), logits
      (loss, logits), grads = jax.value_and_grad(mean_loss, has_aux=True)(
          params)
      updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, loss,
            _accuracy(logits, y))

  train_step = jax.jit(jax.vmap(step, in_axes=(0, 0, None, None)),
                       donate_argnums=(0, 1))
  evaluate = make_evaluate(graphdef, config.eval_batch_size, runs=True)
  params_k, states_k = jax.jit(jax.vmap(init))(
      jnp.asarray(rates, jnp.float32))

  on_device = {
      'train': (jnp.asarray(data.x_train), jnp.asarray(data.y_train)),
      'val': (jnp.asarray(data.x_val), jnp.asarray(data.y_val)),
      'test': (jnp.asarray(data.x_test), jnp.asarray(data.y_test)),
  }
  xs, ys = on_device['train']

  def evaluate_all() -> list[dict[str, float | None]]:
    per_split = {split: evaluate(params_k, x, y)
                 for split, (x, y) in on_device.items()}
    return [{f'{split}_{what}': _finite_or_none(float(values[i][k]))
             for split, values in per_split.items()
             for i, what in enumerate(('loss', 'accuracy'))}
            for k in range(len(rates))]

  device = f'{jax.devices()[0].device_kind} ({jax.default_backend()})'
  runs = [{'config': dataclasses.asdict(dataclasses.replace(
               config, learning_rate=lr, sweep=None)),
           'data': data_sizes, 'device': device,
           'initial': {'epoch': 0, **initial, 'seconds': 0.0},
           'history': []}
          for lr, initial in zip(rates, evaluate_all(), strict=True)]
  metrics = {'config': dataclasses.asdict(config), 'data': data_sizes,
             'device': device, 'sweep': runs}
  print(f'{config.dataset}: {n_train} train / {len(data.x_val)} validation '
        f'/ {len(data.x_test)} test, {config.model}, {config.optimizer} '
        f'sweep over {len(rates)} learning rates '
        f'({", ".join(f"{lr:g}" for lr in rates)}), batch '
        f'{config.batch_size}, {device}', flush=True)

  if config.epochs:
    # Compile on throwaway copies (twice, as train_and_evaluate does).
    warm = jax.tree.map(jnp.copy, (params_k, states_k))
    first = quickstart.epoch_batches(n_train, config.batch_size,
                                     config.seed, 0)[0]
    for _ in range(2):
      warm = train_step(*warm, xs[first], ys[first])[:2]
    jax.block_until_ready(warm)
    del warm

  seconds = 0.0
  for epoch in range(1, config.epochs + 1):
    batches = quickstart.epoch_batches(n_train, config.batch_size,
                                       config.seed, epoch - 1)
    epoch_seconds = 0.0
    for idx in tqdm(batches, desc=f'epoch {epoch}/{config.epochs}',
                    unit='step', disable=not config.progress, leave=False):
      xb, yb = jax.block_until_ready((xs[idx], ys[idx]))
      start = time.perf_counter()
      params_k, states_k, _, _ = train_step(params_k, states_k, xb, yb)
      jax.block_until_ready((params_k, states_k))
      epoch_seconds += time.perf_counter() - start
    seconds += epoch_seconds
    for lr, run, evaluation in zip(rates, runs, evaluate_all(), strict=True):
      entry = {'epoch': epoch, **evaluation, 'seconds': seconds,
               'train_examples_per_second': (
                   steps * config.batch_size / epoch_seconds)}
      run['history'].append(entry)
      print(f'lr {lr:<8g} ' + _summary(entry), flush=True)
    if config.metrics_out:
      write_json_atomic(config.metrics_out, metrics)
  if config.metrics_out and not config.epochs:
    write_json_atomic(config.metrics_out, metrics)
  if config.plot_out:
    import compare  # pylint: disable=import-outside-toplevel
    compare.plot([(f'{config.optimizer} lr {lr:g}', run)
                  for lr, run in zip(rates, runs, strict=True)],
                 config.plot_out)
  return metrics


def _rates(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.split(',') if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'expected comma-separated learning rates, got {text!r}') from None


def parse_args(argv: Sequence[str] | None = None) -> Config:
  """Parses the command line (``argv`` without the program name)."""
  d = Config()
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add = parser.add_argument
  add('--dataset', choices=input_pipeline.DATASETS, default=d.dataset,
      help='digits is bundled with scikit-learn (no download)')
  add('--data_dir', default=d.data_dir,
      help='TFDS data directory (default $TFDS_DATA_DIR or '
      '~/tensorflow_datasets)')
  add('--model', choices=models.MODELS, default=d.model,
      help='see examples/models.py')
  add('--optimizer', choices=OPTIMIZERS, default=d.optimizer,
      help='sibp is the library default (linearized) variant')
  defaults = ', '.join(f'{k} {v:g}' for k, v in
                       DEFAULT_LEARNING_RATES.items())
  add('--learning_rate', type=float, default=None,
      help=f'SIBP: the neuron step eta. Default per optimizer: {defaults} '
      '(proxbp_adam: proxbp with --proxbp_outer adam)')
  add('--lambda_w', type=float, default=d.lambda_w, help='SIBP lambda_W')
  add('--lambda_b', type=float, default=d.lambda_b, help='SIBP lambda_b')
  add('--inner_iterations', type=int, default=d.inner_iterations,
      help='sibp_paper: nonlinear CG iterations per subproblem')
  add('--tau_prox', type=float, default=d.tau_prox, help='ProxBP tau_prox')
  add('--momentum', type=float, default=d.momentum,
      help='Nesterov momentum (nesterov; proxbp with the nesterov outer step)')
  add('--proxbp_solver', choices=PROXBP_SOLVERS, default=d.proxbp_solver,
      help='exact, or N conjugate-gradient steps (cgN)')
  add('--proxbp_outer', choices=PROXBP_OUTERS, default=d.proxbp_outer)
  add('--epochs', type=int, default=d.epochs,
      help='0: only prepare the data and evaluate')
  add('--batch_size', type=int, default=d.batch_size)
  add('--seed', type=int, default=d.seed,
      help='seed of the initial weights and the batch order')
  add('--train_examples', type=int, default=d.train_examples,
      help='train on the first N training examples (default all)')
  add('--validation_examples', type=int, default=d.validation_examples,
      help='held out from the training split (a fifth when smaller)')
  add('--eval_batch_size', type=int, default=d.eval_batch_size)
  add('--metrics_out', metavar='FILE.json', default=None,
      help='JSON metrics, rewritten after every epoch')
  add('--plot_out', metavar='FILE.png', default=None,
      help='loss and accuracy against epochs and seconds')
  add('--mock_data', metavar='N', type=int, default=None,
      help='train on tfds.testing.mock_data with N examples per split')
  add('--no_progress', dest='progress', action='store_false',
      help='hide the progress bars')
  add('--checkpoint_dir', metavar='DIR', default=None,
      help='orbax checkpoints of model and optimizer, written after every '
      'epoch and on Ctrl-C')
  add('--resume', action='store_true',
      help='continue from the latest checkpoint in --checkpoint_dir (same '
      'settings; --epochs may be raised)')
  add('--params_out', metavar='FILE.npz', default=None,
      help='the final model parameters')
  add('--stop_after_steps', metavar='N', type=int, default=None,
      help='testing: act as a Ctrl-C after N steps of this run')
  add('--sweep', metavar='LR1,LR2,...', type=_rates, default=None,
      help='train these learning rates in one vmapped program (no '
      'checkpoints); --metrics_out gets one history per rate')
  args = parser.parse_args(argv)
  return Config(**vars(args))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs :func:`train_and_evaluate` from the command line.

  A setting that cannot work, a dataset that cannot be had or Ctrl-C ends
  the program with a message (``SystemExit``), not a traceback.

  Args:
    argv: arguments without the program name (default ``sys.argv[1:]``).

  Returns:
    The metrics of :func:`train_and_evaluate`.

  Raises:
    SystemExit: with a message for an unusable setting or dataset; with
      status 130 (:data:`INTERRUPTED_STATUS`) after Ctrl-C, having printed
      the command that resumes.
  """
  config = parse_args(argv)
  try:
    return train_and_evaluate(config)
  except (UsageError, input_pipeline.DatasetUnavailableError) as e:
    raise SystemExit(f'train.py: error: {e}') from None
  except Interrupted as e:
    message = e.message
    if e.checkpoint_step is not None:
      args = list(sys.argv[1:] if argv is None else argv)
      args = [a for a in args if a != '--resume']
      i = 0  # the test hook would stop the resumed run too: drop it
      while i < len(args):
        if args[i] == '--stop_after_steps':
          del args[i:i + 2]
        elif args[i].startswith('--stop_after_steps='):
          del args[i]
        else:
          i += 1
      message += '\n  ' + shlex.join(['python', 'examples/train.py', *args,
                                       '--resume'])
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(INTERRUPTED_STATUS) from None
  except KeyboardInterrupt:  # before training, or a second Ctrl-C
    print('Interrupted at once: no checkpoint was written now (--resume '
          'continues from the last epoch\'s, if any).', file=sys.stderr,
          flush=True)
    raise SystemExit(INTERRUPTED_STATUS) from None


if __name__ == '__main__':
  main()
