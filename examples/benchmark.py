r"""Benchmarks: step cost, time to a target loss, and step-size robustness.

Everything is measured in ONE process, with jitted steps, compilation
excluded, and reported as medians and ratios to Adam (robustness: to SGD),
because absolute times on shared machines are noisy.

* ``--section step``: median wall time of one train step (forward pass,
  problems or gradient, update) of each method on random data, for each of
  ``--models``: the SIBP authors' network (``paper_mlp``, 784-500-10, ReLU)
  at batch 100, and the ProxBP authors' MLP and ConvNet (``proxprop_mlp``,
  ``proxprop_convnet``) on CIFAR-10 shapes (32×32×3) at batch 500. Methods
  are timed in interleaved rounds so that machine noise hits them alike.
  Also the compiled step's temporary memory
  (``.lower(...).compile().memory_analysis()``) and XLA's count of its
  floating-point operations (``cost_analysis()``, the arithmetic that
  bounds the step time from below), as ratios to Adam's.
* ``--section epoch``: one epoch of ``paper_mlp`` with the same initial
  weights and the same batches for every method; the full training-set loss
  after the epoch and the seconds spent in update steps.
* ``--section target``: time to target. Adam trains ``--target_epochs`` (3)
  epochs; the full training loss it then has is the target. Every method,
  at its best learning rate (:func:`best_learning_rates`), trains at most
  ``--max_epochs`` (6) epochs on the same batches, the full training loss
  evaluated ``--evals_per_epoch`` (5) times an epoch; reported: the epochs
  and update seconds until it first is at or below the target, and their
  ratios to Adam's (Adam's own first crossing, at most ``target_epochs``).
* ``--section robustness``: each method with the learning rates
  ``logspace(-3, 2, --grid_points)``, all of them trained for one epoch as
  ONE compiled program (``jax.vmap`` of a ``lax.scan`` over the batches,
  same initial weights and batches for every rate). A rate "works" when the
  full training loss after the epoch is finite and below the start; the
  method's range is the largest ratio ``max/min`` of a contiguous run of
  working rates, reported with its ratio to SGD's range.

Data: ``epoch``, ``target`` and ``robustness`` train ``paper_mlp`` at batch
100 on Fashion-MNIST (``--data_dir``, a prepared TFDS directory; 60,000
images, pixels in [0, 1]), or with ``--mock_data N`` on N synthetic images
of the same shape whose labels a random linear teacher gives (for tests).
``--train_examples`` subsamples the training set of ``target`` and
``robustness`` (the first N of a seeded permutation).

Run (on CPU set ``OPENBLAS_NUM_THREADS=1`` on a machine whose cores are
busy: jaxlib's CPU triangular solves of the exact solves go through
OpenBLAS, whose threads spin-wait badly when they share the cores)::

  OPENBLAS_NUM_THREADS=1 python examples/benchmark.py --section step
  OPENBLAS_NUM_THREADS=1 python examples/benchmark.py --section all \
      --data_dir ~/tensorflow_datasets --json bench.json --markdown bench.md
  python examples/benchmark.py --quick --mock_data 2000   # < 2 minutes

``--quick`` runs a reduced version of every section (few rounds, small
batches for the ProxBP models, a subset of the data, fewer epochs and grid
points) that reports the same keys.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sibp_jax

import models as models_lib
from models import PaperMLP

LOSS = optax.softmax_cross_entropy_with_integer_labels

# Learning rates used when --table has no row for a method. sibp: the
# paper's η; proxbp: the authors' MLP setting (Nesterov 0.95, τ 0.05);
# sgd and adam: the best of the reproduction's grids (runs/sibp/table.md).
DEFAULT_LEARNING_RATES = {
    'sibp_linearized': 0.1, 'sibp_paper': 0.1, 'proxbp': 1.0,
    'proxbp_cg3': 1.0, 'sgd': 0.3, 'adam': 1e-3,
}

# name -> (transformation factory of the learning rate, needs problems)
METHODS: dict[str, tuple[Callable[..., optax.GradientTransformation],
                         bool]] = {
    'sibp_linearized': (lambda learning_rate: sibp_jax.sibp(learning_rate),
                        True),
    'sibp_paper': (lambda learning_rate: sibp_jax.sibp(
        learning_rate, variant='paper'), True),
    'proxbp': (lambda learning_rate: sibp_jax.proxbp(
        learning_rate, tau_prox=0.05), True),
    'proxbp_cg3': (lambda learning_rate: sibp_jax.proxbp(
        learning_rate, tau_prox=0.05,
        solver=sibp_jax.ConjugateGradient(3)), True),
    'sgd': (lambda learning_rate: optax.sgd(learning_rate), False),
    'adam': (lambda learning_rate: optax.adam(learning_rate), False),
}
# The step-cost section times each method at one rate (cost does not
# depend on it): the defaults above.
STEP_MODELS = {  # model -> (example shape, batch size)
    'paper_mlp': ((784,), 100),
    'proxprop_mlp': ((32, 32, 3), 500),
    'proxprop_convnet': ((32, 32, 3), 500),
}


def make_step(model: nnx.Module, tx: optax.GradientTransformation,
              needs_problems: bool):
  """A pure jitted step ``(state, x, y) -> (state, loss)``.

  Returns:
    ``(step, state, model_of)``: the step, the initial state of model and
    optimizer, and ``model_of(state)`` giving the model back.
  """
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    if needs_problems:
      loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
          model, x, y, loss_fn=LOSS)
      optimizer.update(model, grads, problems=problems)
    else:
      loss, grads = nnx.value_and_grad(
          lambda m: jnp.mean(LOSS(m(x), y)))(model)
      optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  def model_of(state):
    return nnx.merge(graphdef, state)[0]

  return jax.jit(step, donate_argnums=0), state, model_of


def _transformation(name: str, learning_rate: float | None = None):
  factory, needs = METHODS[name]
  lr = DEFAULT_LEARNING_RATES[name] if learning_rate is None else (
      learning_rate)
  return factory(lr), needs


def _flops(compiled) -> float | None:
  """XLA's estimate of a compiled program's floating-point operations.

  ``compiled.cost_analysis()`` counts a loop body once, whatever its trip
  count: the line searches of the paper variant (and any loop left rolled)
  are undercounted, so the figure is a lower bound there.
  """
  try:
    cost = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError):  # a backend without one
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  value = None if not cost else cost.get('flops')
  return None if value is None or value < 0 else float(value)


def step_cost(methods: Sequence[str], model: str = 'paper_mlp',
              batch: int | None = None, rounds: int = 30,
              seed: int = 0) -> dict[str, Any]:
  """Median step time and compiled temporary memory of each method."""
  shape, default_batch = STEP_MODELS[model]
  batch = default_batch if batch is None else batch
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.random((batch, *shape)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  steps, states, memory, flops = {}, {}, {}, {}
  for name in methods:
    tx, needs = _transformation(name)
    net = models_lib.create_model(model, shape, 10, seed=seed)
    steps[name], states[name], _ = make_step(net, tx, needs)
    compiled = steps[name].lower(states[name], x, y).compile()
    analysis = compiled.memory_analysis()
    memory[name] = None if analysis is None else int(
        analysis.temp_size_in_bytes)
    flops[name] = _flops(compiled)
    states[name], loss = steps[name](states[name], x, y)  # warm-up
    jax.block_until_ready(loss)
  times = {name: [] for name in methods}
  for _ in range(rounds):
    for name in methods:
      start = time.perf_counter()
      states[name], loss = steps[name](states[name], x, y)
      jax.block_until_ready((states[name], loss))
      times[name].append(time.perf_counter() - start)
  base = float(np.median(times['adam']))
  return {
      name: {
          'median_ms': 1e3 * float(np.median(times[name])),
          'ratio_to_adam': float(np.median(times[name])) / base,
          'temp_bytes': memory[name],
          'memory_ratio_to_adam': (
              None if memory[name] is None or not memory['adam'] else
              memory[name] / memory['adam']),
          'flops': flops[name],
          'flops_ratio_to_adam': (
              None if flops[name] is None or not flops['adam'] else
              flops[name] / flops['adam']),
      } for name in methods}


def load_tfds(name: str, data_dir: str | None, split: str):
  """Images as float32 in [0, 1] and int32 labels, via ``tfds.data_source``."""
  import tensorflow_datasets as tfds  # examples extra
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  records = source.__getitems__(list(range(len(source))))
  x = np.stack([r['image'] for r in records]).astype(np.float32) / 255.0
  y = np.asarray([r['label'] for r in records], np.int32)
  return x.reshape(len(x), -1), y


def mock_data(n: int, d: int = 784, classes: int = 10, seed: int = 0):
  """``n`` random images in [0, 1] labelled by a random linear teacher."""
  rng = np.random.default_rng(seed)
  x = rng.random((n, d)).astype(np.float32)
  teacher = rng.normal(size=(d, classes)).astype(np.float32)
  y = np.argmax((x - 0.5) @ teacher, axis=1).astype(np.int32)
  return x, y


def load_data(args) -> tuple[np.ndarray, np.ndarray]:
  if args.mock_data:
    return mock_data(args.mock_data, seed=args.seed)
  return load_tfds(args.dataset, args.data_dir, 'train')


def _subsample(x, y, n: int | None, seed: int):
  if n is None or n >= len(x):
    return x, y
  keep = np.random.default_rng(seed + 1).permutation(len(x))[:n]
  return x[keep], y[keep]


def _full_loss_fn(xs, ys):
  @nnx.jit
  def full_loss(model):
    return jnp.mean(LOSS(model(xs), ys))
  return full_loss


def one_epoch(methods: Sequence[str], x, y, batch: int = 100,
              seed: int = 0) -> dict[str, Any]:
  """Training loss after one epoch, same initial weights and batches."""
  order = np.random.default_rng(seed).permutation(len(x))
  batches = order[:len(x) // batch * batch].reshape(-1, batch)
  xs, ys = jnp.asarray(x), jnp.asarray(y)
  full_loss = _full_loss_fn(xs, ys)
  results = {}
  for name in methods:
    tx, needs = _transformation(name)
    model = PaperMLP(x.shape[1], seed=seed)
    start_loss = float(full_loss(model))
    step, state, model_of = make_step(model, tx, needs)
    # Compile on a copy of the state: the run itself starts untouched.
    warm = jax.tree.map(jnp.copy, state)
    jax.block_until_ready(step(warm, xs[batches[0]], ys[batches[0]]))
    seconds = 0.0
    for idx in batches:
      xb, yb = jax.block_until_ready((xs[idx], ys[idx]))
      begin = time.perf_counter()
      state, _ = step(state, xb, yb)
      jax.block_until_ready(state)
      seconds += time.perf_counter() - begin
    results[name] = {'start_loss': start_loss,
                     'train_loss': float(full_loss(model_of(state))),
                     'update_seconds': seconds}
  return results


def best_learning_rates(methods: Sequence[str],
                        table: str | None) -> dict[str, dict[str, Any]]:
  """Each method's learning rate: the best of ``table``'s grid, else default.

  ``table`` is the reproduction's markdown table (``runs/sibp/table.md``,
  written by ``examples/reproduce.py``), whose rows read ``| method |
  best (grid) | ...``. Methods without a row (``proxbp_cg3``) take
  :data:`DEFAULT_LEARNING_RATES`, or ``proxbp``'s row for ``proxbp_cg3``.
  """
  rows = {}
  if table and os.path.exists(table):
    with open(table) as f:
      for line in f:
        m = re.match(r'\|\s*(\w+)\s*\|\s*([\d.e+-]+)\s*\(([^)]*)\)', line)
        if m:
          rows[m.group(1)] = (float(m.group(2)), m.group(3).strip())
  out = {}
  for name in methods:
    key = 'proxbp' if name == 'proxbp_cg3' and name not in rows else name
    if key in rows:
      lr, grid = rows[key]
      out[name] = {'learning_rate': lr,
                   'source': f'{os.path.relpath(table)}: best of ({grid})' + (
                       ' for proxbp' if key != name else '')}
    else:
      out[name] = {'learning_rate': DEFAULT_LEARNING_RATES[name],
                   'source': 'default (no grid result)'}
  return out


def time_to_target(methods: Sequence[str], x, y, rates: dict[str, Any],
                   batch: int = 100, target_epochs: int = 3,
                   max_epochs: int = 6, evals_per_epoch: int = 5,
                   seed: int = 0) -> dict[str, Any]:
  """Epochs and update seconds each method needs to reach Adam's loss.

  The target is the full training loss of Adam after ``target_epochs``.
  A method's run stops at its first evaluation at or below the target, or
  after ``max_epochs``.
  """
  n = len(x)
  steps = n // batch
  xs, ys = jnp.asarray(x), jnp.asarray(y)
  full_loss = _full_loss_fn(xs, ys)
  eval_at = {round(steps * (k + 1) / evals_per_epoch) - 1
             for k in range(evals_per_epoch)}

  def run(name, epochs, target):
    tx, needs = _transformation(name, rates[name]['learning_rate'])
    model = PaperMLP(x.shape[1], seed=seed)
    step, state, model_of = make_step(model, tx, needs)
    first = np.random.default_rng((seed, 0)).permutation(n)[:batch]
    warm = jax.tree.map(jnp.copy, state)
    jax.block_until_ready(step(warm, xs[first], ys[first]))
    del warm
    seconds, curve = 0.0, []
    for epoch in range(epochs):
      order = np.random.default_rng((seed, epoch)).permutation(n)
      for i in range(steps):
        idx = order[i * batch:(i + 1) * batch]
        xb, yb = jax.block_until_ready((xs[idx], ys[idx]))
        begin = time.perf_counter()
        state, _ = step(state, xb, yb)
        jax.block_until_ready(state)
        seconds += time.perf_counter() - begin
        if i in eval_at:
          loss = float(full_loss(model_of(state)))
          curve.append((epoch + (i + 1) / steps, seconds, loss))
          if target is not None and loss <= target:
            return curve
    return curve

  adam_curve = run('adam', target_epochs, None)
  target = adam_curve[-1][2]
  results = {}
  for name in methods:
    curve = adam_curve if name == 'adam' else run(name, max_epochs, target)
    hit = next((c for c in curve if c[2] <= target), None)
    results[name] = {
        'learning_rate': rates[name]['learning_rate'],
        'rate_source': rates[name]['source'],
        'reached': hit is not None,
        'epochs': None if hit is None else round(hit[0], 3),
        'update_seconds': None if hit is None else hit[1],
        'final_loss': curve[-1][2] if math.isfinite(curve[-1][2]) else None,
    }
  base = results['adam']
  for row in results.values():
    for key in ('epochs', 'update_seconds'):
      row[key + '_ratio_to_adam'] = (
          None if row[key] is None else row[key] / base[key])
  return {'target_loss': target, 'target_epochs': target_epochs,
          'max_epochs': max_epochs, 'evals_per_epoch': evals_per_epoch,
          'train_examples': n, 'methods': results}


def robustness(methods: Sequence[str], x, y, batch: int = 100,
               grid_points: int = 11, low: float = 1e-3, high: float = 1e2,
               seed: int = 0) -> dict[str, Any]:
  """Learning rates at which one epoch lowers the loss, by vmapped runs."""
  rates = np.logspace(math.log10(low), math.log10(high), grid_points)
  n = len(x)
  batches = np.random.default_rng(seed).permutation(n)[
      :n // batch * batch].reshape(-1, batch)
  xs, ys = jnp.asarray(x), jnp.asarray(y)
  graphdef, params = nnx.split(PaperMLP(x.shape[1], seed=seed))
  params = nnx.as_pure(params)

  def loss_of(p):
    return jnp.mean(LOSS(nnx.merge(graphdef, p)(xs), ys))

  start_loss = float(jax.jit(loss_of)(params))
  results = {}
  for name in methods:
    factory, needs = METHODS[name]
    tx = optax.inject_hyperparams(factory)(learning_rate=rates[0])

    def run(lr, tx=tx, needs=needs):
      opt_state = tx.init(params)
      opt_state.hyperparams['learning_rate'] = jnp.asarray(lr, jnp.float32)

      def step(carry, idx):
        p, s = carry
        xb, yb = xs[idx], ys[idx]
        model = nnx.merge(graphdef, p)
        if needs:
          _, grads, problems = sibp_jax.nnx.value_grad_and_problems(
              model, xb, yb, loss_fn=LOSS)
          updates, s = tx.update(nnx.as_pure(grads), s, p,
                                 problems=problems)
        else:
          grads = jax.grad(lambda q: jnp.mean(LOSS(
              nnx.merge(graphdef, q)(xb), yb)))(p)
          updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

      (p, _), _ = jax.lax.scan(step, (params, opt_state),
                               jnp.asarray(batches))
      return loss_of(p)

    program = jax.jit(jax.vmap(run))
    begin = time.perf_counter()
    losses = np.asarray(program(jnp.asarray(rates, jnp.float32)))
    seconds = time.perf_counter() - begin
    works = np.isfinite(losses) & (losses < start_loss)
    best, lo_hi = 1.0, None
    for i in range(len(rates)):
      for j in range(i, len(rates)):
        if not works[i:j + 1].all():
          break
        if lo_hi is None or rates[j] / rates[i] > best:
          best, lo_hi = rates[j] / rates[i], (float(rates[i]),
                                              float(rates[j]))
    results[name] = {
        'losses': [float(v) if math.isfinite(v) else None for v in losses],
        'working_range': lo_hi,
        'range': best if lo_hi is not None else 0.0,
        'seconds_with_compile': seconds,
    }
  base = results['sgd']['range'] if 'sgd' in results else None
  for row in results.values():
    row['range_ratio_to_sgd'] = (row['range'] / base if base else None)
  return {'learning_rates': [float(r) for r in rates],
          'start_loss': start_loss, 'train_examples': n, 'epochs': 1,
          'methods': results}


def _fmt(v) -> str:
  if v is None:
    return 'n/a'
  if isinstance(v, bool):
    return 'yes' if v else 'no'
  if isinstance(v, float):
    return f'{v:.3g}'
  if isinstance(v, (tuple, list)):
    return '–'.join(_fmt(u) for u in v)
  return str(v)


def _table(results: dict[str, Any], columns: Sequence[str],
           headers: Sequence[str] | None = None) -> str:
  headers = columns if headers is None else headers
  lines = ['| method | ' + ' | '.join(headers) + ' |',
           '|---' * (len(columns) + 1) + '|']
  for name, row in results.items():
    lines.append(f'| {name} | ' + ' | '.join(_fmt(row[c]) for c in columns)
                 + ' |')
  return '\n'.join(lines)


def markdown(out: dict[str, Any]) -> str:
  """The results as markdown tables, one per section."""
  parts = [f'Device: {out["device"]} ({out["backend"]}); '
           f'OPENBLAS_NUM_THREADS={out["openblas_num_threads"]}'
           f'{"; --quick" if out["quick"] else ""}.']
  for model, res in out.get('step', {}).items():
    parts.append(f'**Step cost**, `{model}`, batch {res["batch"]}, random '
                 f'data, median of {res["rounds"]} interleaved rounds:\n\n'
                 + _table(res['methods'], ['median_ms', 'ratio_to_adam',
                                           'memory_ratio_to_adam',
                                           'flops_ratio_to_adam'],
                          ['median ms', 'time / Adam',
                           'compiled temp memory / Adam',
                           'compiled flops / Adam']))
  if 'epoch' in out:
    parts.append('**One epoch**, `paper_mlp`, batch 100:\n\n' + _table(
        out['epoch'], ['start_loss', 'train_loss', 'update_seconds'],
        ['start loss', 'train loss after 1 epoch', 'update seconds']))
  if 'target' in out:
    t = out['target']
    parts.append(
        f'**Time to target**, `paper_mlp`, batch 100, '
        f'{t["train_examples"]} training examples: target = Adam\'s full '
        f'training loss after {t["target_epochs"]} epochs = '
        f'{t["target_loss"]:.4f}; loss evaluated {t["evals_per_epoch"]}× '
        f'per epoch, at most {t["max_epochs"]} epochs:\n\n' + _table(
            t['methods'], ['learning_rate', 'reached', 'epochs',
                           'epochs_ratio_to_adam', 'update_seconds',
                           'update_seconds_ratio_to_adam', 'final_loss'],
            ['learning rate', 'reached', 'epochs', 'epochs / Adam',
             'update s', 'update s / Adam', 'last loss']))
  if 'robustness' in out:
    r = out['robustness']
    parts.append(
        f'**Step-size robustness**, `paper_mlp`, batch 100, one epoch of '
        f'{r["train_examples"]} examples (start loss '
        f'{r["start_loss"]:.4f}), learning rates '
        f'{_fmt(r["learning_rates"][0])} … {_fmt(r["learning_rates"][-1])} '
        f'({len(r["learning_rates"])} log-spaced), one vmapped program per '
        'method; a rate works when the final training loss is finite and '
        'below the start:\n\n' + _table(
            r['methods'], ['working_range', 'range', 'range_ratio_to_sgd'],
            ['working rates', 'range (max/min)', 'range / SGD\'s']))
  return '\n\n'.join(parts) + '\n'


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--section', default='step',
                      help='comma-separated: step, epoch, target, '
                      'robustness, or all (default step)')
  parser.add_argument('--methods', default=','.join(METHODS),
                      help='comma-separated subset of ' + ', '.join(METHODS))
  parser.add_argument('--models', default=','.join(STEP_MODELS),
                      help='step section: comma-separated subset of '
                      + ', '.join(STEP_MODELS))
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data directory holding the dataset')
  parser.add_argument('--dataset', default='fashion_mnist')
  parser.add_argument('--mock_data', type=int, default=None, metavar='N',
                      help='N synthetic examples instead of the dataset')
  parser.add_argument('--rounds', type=int, default=None,
                      help='step: timed rounds (default 30 for paper_mlp, '
                      '5 for the ProxBP models)')
  parser.add_argument('--table', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), '..', 'runs', 'sibp',
      'table.md'),
                      help='target: reproduction table with the best '
                      'learning rates')
  parser.add_argument('--train_examples', type=int, default=None,
                      help='target, robustness: subsample the training set')
  parser.add_argument('--robustness_examples', type=int, default=None,
                      help='robustness only: subsample (overrides '
                      '--train_examples there)')
  parser.add_argument('--target_epochs', type=int, default=3)
  parser.add_argument('--max_epochs', type=int, default=6)
  parser.add_argument('--evals_per_epoch', type=int, default=5)
  parser.add_argument('--grid_points', type=int, default=11)
  parser.add_argument('--quick', action='store_true',
                      help='a reduced run of the same sections and keys')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None, help='write results here')
  parser.add_argument('--markdown', default=None,
                      help='write the markdown tables here')
  args = parser.parse_args(argv)
  sections = [s for s in args.section.split(',') if s]
  if 'all' in sections:
    sections = ['step', 'epoch', 'target', 'robustness']
  bad = set(sections) - {'step', 'epoch', 'target', 'robustness'}
  if bad:
    parser.error(f'unknown sections {sorted(bad)}')
  methods = [m for m in args.methods.split(',') if m]
  unknown = set(methods) - set(METHODS)
  if unknown:
    parser.error(f'unknown methods {sorted(unknown)}')
  if 'adam' not in methods:
    methods.append('adam')
  models = [m for m in args.models.split(',') if m]
  if set(models) - set(STEP_MODELS):
    parser.error(f'unknown models {sorted(set(models) - set(STEP_MODELS))}')
  if args.quick:
    # Reduced sizes; the keys of the output are the same.
    args.target_epochs, args.max_epochs = 1, 2
    args.evals_per_epoch = 2
    args.grid_points = min(args.grid_points, 6)
    args.train_examples = args.train_examples or 2000
  out: dict[str, Any] = {
      'device': jax.devices()[0].device_kind,
      'backend': jax.default_backend(),
      'openblas_num_threads': os.environ.get('OPENBLAS_NUM_THREADS'),
      'quick': args.quick, 'argv': list(argv) if argv is not None else None}
  print(f'# device: {out["device"]} ({out["backend"]}), '
        f'OPENBLAS_NUM_THREADS={out["openblas_num_threads"]}', flush=True)
  if 'step' in sections:
    out['step'] = {}
    for model in models:
      batch = STEP_MODELS[model][1]
      rounds = args.rounds or (30 if model == 'paper_mlp' else 5)
      if args.quick and model != 'paper_mlp':
        batch, rounds = 50, 2
      elif args.quick:
        rounds = min(rounds, 5)
      res = step_cost(methods, model, batch, rounds, args.seed)
      out['step'][model] = {'batch': batch, 'rounds': rounds,
                            'methods': res}
      print(f'\n## step cost, {model}, batch {batch}\n', flush=True)
      print(_table(res, ['median_ms', 'ratio_to_adam',
                         'memory_ratio_to_adam', 'flops_ratio_to_adam']),
            flush=True)
  if {'epoch', 'target', 'robustness'} & set(sections):
    x, y = load_data(args)
  if 'epoch' in sections:
    xe, ye = _subsample(x, y, 2000 if args.quick else None, args.seed)
    out['epoch'] = one_epoch(methods, xe, ye, seed=args.seed)
    print('\n## one epoch\n', flush=True)
    print(_table(out['epoch'], ['start_loss', 'train_loss',
                                'update_seconds']), flush=True)
  if 'target' in sections:
    xt, yt = _subsample(x, y, args.train_examples, args.seed)
    rates = best_learning_rates(methods, args.table)
    out['target'] = time_to_target(
        methods, xt, yt, rates, target_epochs=args.target_epochs,
        max_epochs=args.max_epochs, evals_per_epoch=args.evals_per_epoch,
        seed=args.seed)
    print('\n## time to target\n', flush=True)
    print(_table(out['target']['methods'], [
        'learning_rate', 'epochs', 'epochs_ratio_to_adam', 'update_seconds',
        'update_seconds_ratio_to_adam']), flush=True)
  if 'robustness' in sections:
    n = args.robustness_examples or args.train_examples
    xr, yr = _subsample(x, y, n, args.seed)
    rob_methods = methods if 'sgd' in methods else [*methods, 'sgd']
    out['robustness'] = robustness(rob_methods, xr, yr,
                                   grid_points=args.grid_points,
                                   seed=args.seed)
    print('\n## step-size robustness\n', flush=True)
    print(_table(out['robustness']['methods'], [
        'working_range', 'range', 'range_ratio_to_sgd']), flush=True)
  text = markdown(out)
  print('\n' + text, flush=True)
  if args.markdown:
    with open(args.markdown, 'w') as f:
      f.write(text)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == '__main__':
  main()
