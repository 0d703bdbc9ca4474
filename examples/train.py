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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
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


class UsageError(ValueError):
  """A setting or a size that cannot work; the message says which."""


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
    A new :class:`Config` whose ``learning_rate`` is set.

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
  if config.learning_rate is None:
    key = config.optimizer
    if key == 'proxbp' and config.proxbp_outer == 'adam':
      key = 'proxbp_adam'
    config.learning_rate = DEFAULT_LEARNING_RATES[key]
  positive = ('learning_rate', 'lambda_w', 'lambda_b', 'tau_prox',
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


def make_evaluate(graphdef, batch_size: int):
  """``evaluate(state, x, y) -> (mean loss, accuracy)`` in batches.

  Every batch has ``batch_size`` rows (the last one is padded and the
  padding weighted zero), so the evaluation compiles once per run.
  """

  @jax.jit
  def sums(state, x, y, weight):
    model = nnx.merge(graphdef, state)[0]
    logits = model(x)
    return (jnp.sum(weight * LOSS(logits, y)),
            jnp.sum(weight * (jnp.argmax(logits, axis=-1) == y)))

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
      loss_sum += float(s_loss)
      correct += float(s_correct)
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


def train_and_evaluate(config: Config | Mapping[str, Any]) -> dict[str, Any]:
  """Trains and evaluates one run; returns (and writes) its metrics.

  Args:
    config: a :class:`Config` or a dict of its fields.

  Returns:
    ``{"config", "data", "device", "initial", "history"}`` as described in
    the module docstring; ``history`` has one entry per epoch.

  Raises:
    UsageError: a setting or a size that cannot work.
    input_pipeline.DatasetUnavailableError: the dataset is not prepared and
      cannot be prepared here (the message says what to do).
  """
  config = resolve(config)
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

  model = models.create_model(config.model, data.input_shape, data.classes,
                              seed=config.seed)
  tx, needs_problems = create_optimizer(config)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  del model, optimizer
  train_step = make_train_step(graphdef, needs_problems)
  evaluate = make_evaluate(graphdef, config.eval_batch_size)

  on_device = {
      'train': (jnp.asarray(data.x_train), jnp.asarray(data.y_train)),
      'val': (jnp.asarray(data.x_val), jnp.asarray(data.y_val)),
      'test': (jnp.asarray(data.x_test), jnp.asarray(data.y_test)),
  }
  xs, ys = on_device['train']
  steps = n_train // config.batch_size

  metrics: dict[str, Any] = {
      'config': dataclasses.asdict(config),
      'data': {**data.sizes(), 'steps_per_epoch': steps},
      'device': f'{jax.devices()[0].device_kind} ({jax.default_backend()})',
      'initial': {'epoch': 0, **_evaluate_all(evaluate, state, on_device),
                  'seconds': 0.0},
      'history': [],
  }
  print(f'{config.dataset}: {n_train} train / {len(data.x_val)} validation / '
        f'{len(data.x_test)} test, {config.model}, {config.optimizer} '
        f'(learning rate {config.learning_rate:g}), batch '
        f'{config.batch_size}, {metrics["device"]}', flush=True)
  print(_summary(metrics['initial']), flush=True)

  if config.epochs:
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

  seconds = 0.0
  for epoch in range(1, config.epochs + 1):
    batches = quickstart.epoch_batches(n_train, config.batch_size,
                                       config.seed, epoch - 1)
    bar = tqdm(total=steps, desc=f'epoch {epoch}/{config.epochs}',
               unit='step', disable=not config.progress, leave=False)
    epoch_seconds, loss_sum, acc_sum = 0.0, 0.0, 0.0
    for i, idx in enumerate(batches, 1):
      xb, yb = jax.block_until_ready((xs[idx], ys[idx]))
      start = time.perf_counter()
      state, loss, accuracy = train_step(state, xb, yb)
      jax.block_until_ready(state)
      epoch_seconds += time.perf_counter() - start
      loss_sum += float(loss)
      acc_sum += float(accuracy)
      bar.set_postfix(loss=f'{loss_sum / i:.4f}', acc=f'{acc_sum / i:.4f}',
                      ex_per_s=f'{i * config.batch_size / epoch_seconds:.0f}',
                      refresh=False)
      bar.update()
    bar.close()
    seconds += epoch_seconds
    entry = {'epoch': epoch, **_evaluate_all(evaluate, state, on_device),
             'seconds': seconds,
             'train_examples_per_second': (
                 steps * config.batch_size / epoch_seconds)}
    metrics['history'].append(entry)
    print(_summary(entry), flush=True)
    if config.metrics_out:
      write_json_atomic(config.metrics_out, metrics)

  if config.metrics_out and not config.epochs:
    write_json_atomic(config.metrics_out, metrics)
  if config.plot_out:
    import compare  # pylint: disable=import-outside-toplevel
    compare.plot([(config.optimizer, metrics)], config.plot_out)
  return metrics


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
  args = parser.parse_args(argv)
  return Config(**vars(args))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs :func:`train_and_evaluate` from the command line.

  A setting that cannot work or a dataset that cannot be had ends the
  program with a message (``SystemExit``), not a traceback.

  Args:
    argv: arguments without the program name (default ``sys.argv[1:]``).

  Returns:
    The metrics of :func:`train_and_evaluate`.
  """
  config = parse_args(argv)
  try:
    return train_and_evaluate(config)
  except (UsageError, input_pipeline.DatasetUnavailableError) as e:
    raise SystemExit(f'train.py: error: {e}') from None


if __name__ == '__main__':
  main()
