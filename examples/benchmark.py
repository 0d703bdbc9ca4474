r"""Benchmarks: step cost, time to a target loss, and step-size robustness.

Everything is measured in ONE process, with jitted steps, compilation
excluded, and reported as medians and ratios to Adam (robustness: to SGD),
because absolute times on shared machines are noisy. Every method is an
entry of ``examples/optimizers.py`` and trains with the one step of
``examples/steps.py``.

* ``--section step``: median wall time of one train step of each method on
  random data, for each of ``--models`` (``paper_mlp`` at batch 100, the
  ProxBP models on CIFAR-10 shapes at batch 500), timed in interleaved
  rounds; also the compiled step's temporary memory (``memory_analysis()``)
  and XLA's count of its floating-point operations (``cost_analysis()``; a
  loop body counts once, so line searches are undercounted), as ratios to
  Adam's, and the seconds it took to trace and compile the step.
* ``--section epoch``: one epoch of ``paper_mlp`` at batch 100, every method
  from the same initial weights on the same batches at its registry
  learning rate: the full training loss after it, and the update seconds.
* ``--section target``: Adam trains ``--target_epochs`` (3) epochs; its
  full training loss is the target. Every method, at its best learning
  rate, trains at most ``--max_epochs`` (6) epochs on the same batches, the
  loss evaluated ``--evals_per_epoch`` (5) times an epoch; reported: epochs
  and update seconds to the first evaluation at or below the target, and
  their ratios to Adam's. The best rate is the one of the method's registry
  grid with the lowest loss after one epoch (one vmapped program per
  method), or the reproduction's choice with ``--table FILE``.
* ``--section robustness``: each method at ``--grid_points`` (17)
  learning rates log-spaced over ``1e-4 … 1e4`` (half decades), trained
  ``--robustness_epochs`` (3) epochs as ONE compiled program per method
  (``jax.vmap`` of a ``lax.scan`` over the batches); then the full training
  loss and the test accuracy of every rate. Two ranges per method, each the
  largest ``max/min`` of a run of consecutive working rates: accuracy-stable
  (test accuracy within 5 points of the method's best in the grid) and
  loss-stable (training loss finite and within 1.5× the method's best),
  with their ratios to SGD's. Also SIBP's range in ``λ = λ_W = λ_b`` at
  ``η = 0.1``, where its implicit step lives. ``--plot_out`` draws accuracy
  and loss against the rate, one line per method.

Data: Fashion-MNIST's 60,000 training images (``--data_dir``), or
``--mock_data N`` synthetic images labelled by a random linear teacher.
``--quick`` runs a reduced version of every section with the same keys.
``docs/performance.md`` has the commands and their results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import input_pipeline
import models
import optimizers
import steps

# Benchmark name -> (registry name, hyperparameters besides the defaults).
METHODS = {name: (name, {}) for name in (
    'sibp_linearized', 'sibp_paper', 'proxbp', 'proxbp_cg3', 'sgd',
    'sgd_momentum', 'adam', 'adamw', 'muon', 'schedule_free_adamw')}
METHODS['proxbp_cg3'] = ('proxbp', {'proxbp_solver': 'cg3'})
# SIBP beyond the paper's step, and the baselines with the same schedule
# (the learning rate decays to 0 over the run by a cosine).
METHODS.update({
    'sibp_cosine': ('sibp_linearized', {'schedule': 'cosine'}),
    'sibp_warmup_cosine': ('sibp_linearized', {'schedule': 'warmup_cosine'}),
    'sibp_adam': ('sibp_adam', {}), 'sibp_nesterov': ('sibp_nesterov', {}),
    'sibp_adam_cosine': ('sibp_adam', {'schedule': 'cosine'}),
    'adam_cosine': ('adam', {'schedule': 'cosine'}),
    'muon_cosine': ('muon', {'schedule': 'cosine'}),
    # The paper's step for the norm parameters (sibp's default: Adam).
    'sibp_others_gradient': ('sibp_linearized', {'others': 'gradient'})})
# Learning-rate grids besides the registry's (the same three values per
# method): SIBP's eta for the tuned tables, the larger rates a decaying
# schedule allows.
GRIDS = {'sibp_linearized': (0.1, 0.3, 1.0), 'sibp_cosine': (0.3, 1.0, 3.0),
         'sibp_warmup_cosine': (0.3, 1.0, 3.0),
         'sibp_adam_cosine': (3e-3, 1e-2, 3e-2),
         'adam_cosine': (1e-3, 3e-3, 1e-2), 'muon_cosine': (0.02, 0.05, 0.1)}
STEP_MODELS = {  # model -> (example shape, batch size)
    'paper_mlp': ((784,), 100), 'proxprop_mlp': ((32, 32, 3), 500),
    'proxprop_convnet': ((32, 32, 3), 500), 'resnet20': ((32, 32, 3), 128),
    'residual_mlp': ((32, 32, 3), 128), 'residual_mlp_16': ((32, 32, 3), 128),
    'vit': ((28, 28, 1), 128)}


class Trainer:
  """One method on one model for examples like ``x``: step, state, loss."""

  def __init__(self, name: str, model: str, x, seed: int = 0,
               learning_rate: float | None = None,
               rates: Sequence[float] | None = None,
               sweep: Callable[[Any, Any], Any] | None = None,
               total_steps: int = 1000):
    key, hp = METHODS[name]
    self.method = optimizers.METHODS[key]
    hp = optimizers.Hyperparameters(**hp)
    if rates is None:  # ``total_steps``: a schedule's length
      tx = optimizers.create(key, learning_rate, hp, total_steps)
    else:  # K runs, one per learning rate or value of ``sweep(hp, value)``
      tx = optax.inject_hyperparams(lambda value: optimizers.create(
          key, learning_rate if sweep else value,
          sweep(hp, value) if sweep else hp, total_steps))(value=rates[0])
    net = models.create_model(model, x.shape[1:], 10, seed=seed)
    self.graphdef, self.state = steps.init_state(net, tx)
    if rates is not None:
      self.state = steps.stack_learning_rates(self.state, rates, 'value')
    self.pure_step = steps.make_step(self.graphdef, self.method.needs_problems)
    self.step = steps.jit(self.pure_step)
    # evaluate(state, x, y): the mean loss and accuracy of each run.
    self.evaluate = steps.make_evaluate(
        self.graphdef, min(len(x), 10_000), runs=rates is not None,
        eval_params=self.method.eval_params)

  def loss(self, state, x, y) -> list[float]:
    """The mean loss on ``(x, y)`` of each run."""
    return [loss for loss, _ in self.evaluate(state, x, y)]


def _flops(compiled) -> float | None:
  """XLA's count of a compiled program's floating-point operations."""
  try:
    cost = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError):  # a backend without one
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  value = None if not cost else cost.get('flops')
  return None if value is None or value < 0 else float(value)


_HLO_ARRAY = re.compile(r'\b([a-z]+)([0-9]+)\[([0-9,]+)\]')


def largest_array(compiled) -> str | None:
  """The largest array a compiled program names (its optimised HLO), as
  ``'f32[128,32,32,144]'``: a patch matrix or a Gram shows up here."""
  best, size = None, 0
  for kind, bits, dims in _HLO_ARRAY.findall(compiled.as_text() or ''):
    n = math.prod(int(d) for d in dims.split(',')) * int(bits) // 8
    if n > size:
      best, size = f'{kind}{bits}[{dims}]', n
  return best and f'{best} {size / 2**20:.3g} MiB'


def _ratio(value, base):
  return None if value is None or not base else value / base


def step_cost(methods: Sequence[str], model: str = 'paper_mlp',
              batch: int | None = None, rounds: int = 30,
              seed: int = 0) -> dict[str, Any]:
  """Median step time, compiled temporary memory and flops of each method,
  and the seconds it took to trace and compile its step."""
  shape, default_batch = STEP_MODELS[model]
  batch = batch or default_batch
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.random((batch, *shape)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  trainers, memory, flops, compile_seconds, largest = {}, {}, {}, {}, {}
  for name in methods:
    t = trainers[name] = Trainer(name, model, x, seed)
    start = time.perf_counter()
    compiled = t.step.lower(t.state, x, y).compile()
    compile_seconds[name] = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    memory[name] = analysis and int(analysis.temp_size_in_bytes)
    flops[name] = _flops(compiled)
    largest[name] = largest_array(compiled)
    t.state = t.step(t.state, x, y)[0]  # warm-up
  times = {name: [] for name in methods}
  for _ in range(rounds):
    for name, t in trainers.items():
      t.state, _, seconds = steps.timed_step(t.step, t.state, x, y)
      times[name].append(seconds)
  median = {name: float(np.median(v)) for name, v in times.items()}
  return {name: {
      'median_ms': 1e3 * median[name],
      'ratio_to_adam': median[name] / median['adam'],
      'temp_bytes': memory[name],
      'memory_ratio_to_adam': _ratio(memory[name], memory['adam']),
      'flops': flops[name],
      'flops_ratio_to_adam': _ratio(flops[name], flops['adam']),
      'compile_seconds': compile_seconds[name],
      'largest_array': largest[name],
  } for name in methods}


def train_curve(name: str, x, y, learning_rate: float | None, *,
                epochs: int = 1, evals_per_epoch: int = 1,
                target: float | None = None, batch: int = 100,
                seed: int = 0) -> list[tuple[float, float, float]]:
  """``(epoch, update seconds, full loss)`` at each evaluation of one run,
  which stops at its first evaluation at or below ``target``."""
  t = Trainer(name, 'paper_mlp', x, seed, learning_rate,
              total_steps=epochs * (len(x) // batch))
  xs, ys = jnp.asarray(x), jnp.asarray(y)
  curve = [(0.0, 0.0, t.loss(t.state, xs, ys)[0])]
  per_epoch = len(x) // batch
  eval_at = {round(per_epoch * (k + 1) / evals_per_epoch) - 1
             for k in range(evals_per_epoch)}
  first = steps.epoch_batches(len(x), batch, seed, 0)[0]
  steps.compile_on_copy(t.step, t.state, xs[first], ys[first], times=1)
  state, seconds = t.state, 0.0
  for epoch in range(epochs):
    for i, idx in enumerate(steps.epoch_batches(len(x), batch, seed, epoch)):
      state, _, dt = steps.timed_step(t.step, state, xs[idx], ys[idx])
      seconds += dt
      if i in eval_at:
        curve.append((epoch + (i + 1) / per_epoch, seconds,
                      t.loss(state, xs, ys)[0]))
        if target is not None and curve[-1][2] <= target:
          return curve
  return curve


def one_epoch(methods: Sequence[str], x, y, batch: int = 100, seed: int = 0,
              rates: dict[str, float] | None = None) -> dict[str, Any]:
  """Training loss after one epoch at ``rates[name]`` (default: the
  registry's), from the same initial weights on the same batches."""
  results = {}
  for name in methods:
    key, hp = METHODS[name]
    lr = (rates or {}).get(name) or optimizers.default_learning_rate(
        key, optimizers.Hyperparameters(**hp))
    curve = train_curve(name, x, y, lr, batch=batch, seed=seed)
    results[name] = {'learning_rate': lr, 'start_loss': curve[0][2],
                     'train_loss': curve[-1][2],
                     'update_seconds': curve[-1][1]}
  return results


def vmapped_runs(name: str, x, y, rates: Sequence[float], batch: int = 100,
                 seed: int = 0, epochs: int = 1,
                 sweep: Callable[[Any, Any], Any] | None = None,
                 learning_rate: float | None = None):
  """``(trainer, final stacked state, seconds with compilation)`` of K runs
  of ``epochs`` epochs as ONE compiled program, one per learning rate, or
  per value of ``sweep(hp, value) -> hp`` (all then at ``learning_rate``)."""
  t = Trainer(name, 'paper_mlp', x, seed, learning_rate, rates=rates,
              sweep=sweep, total_steps=epochs * (len(x) // batch))
  xs, ys = jnp.asarray(x), jnp.asarray(y)
  batches = jnp.asarray(np.concatenate([
      steps.epoch_batches(len(x), batch, seed, e) for e in range(epochs)]))

  def run(state):
    body = lambda s, idx: (t.pure_step(s, xs[idx], ys[idx])[0], None)
    return jax.lax.scan(body, state, batches)[0]

  begin = time.perf_counter()
  state = jax.block_until_ready(jax.jit(jax.vmap(run))(t.state))
  return t, state, time.perf_counter() - begin


def best_learning_rates(methods: Sequence[str], x, y, table: str | None,
                        seed: int = 0) -> dict[str, dict[str, Any]]:
  """Each method's learning rate for the target section, and its source:
  the row's of ``table`` (of ``examples/reproduce.py``; ``proxbp_cg3``:
  ``proxbp``'s; no row: an error), else the best of the registry grid."""
  row = re.compile(r'\|\s*(\w+)\s*\|\s*([\d.e+-]+)\s*\(([^)]*)\)')
  lines = pathlib.Path(table).read_text().splitlines() if table else []
  rows = {m.group(1): float(m.group(2)) for m in map(row.match, lines) if m}
  out = {}
  for name in methods:
    key = 'proxbp' if name == 'proxbp_cg3' and name not in rows else name
    if table:
      if key not in rows:
        raise ValueError(f'{table} has no row for {key}')
      out[name] = {'learning_rate': rows[key],
                   'source': f'{os.path.basename(table)}, row {key}'}
      continue
    grid = GRIDS.get(name) or optimizers.METHODS[METHODS[name][0]].grid
    t, state, _ = vmapped_runs(name, x, y, grid, seed=seed)
    losses = np.array(t.loss(state, jnp.asarray(x), jnp.asarray(y)))
    losses = np.where(np.isfinite(losses), losses, np.inf)
    out[name] = {'learning_rate': float(grid[int(np.argmin(losses))]),
                 'source': 'best after one epoch of grid ' +
                           ', '.join(f'{lr:g} ({loss:.3g})'
                                     for lr, loss in zip(grid, losses))}
  return out


def time_to_target(methods: Sequence[str], x, y, rates: dict[str, Any],
                   batch: int = 100, target_epochs: int = 3,
                   max_epochs: int = 6, evals_per_epoch: int = 5,
                   seed: int = 0) -> dict[str, Any]:
  """Epochs and update seconds each method needs to reach Adam's loss."""
  run = lambda name, epochs, target: train_curve(
      name, x, y, rates[name]['learning_rate'], epochs=epochs,
      evals_per_epoch=evals_per_epoch, target=target, batch=batch,
      seed=seed)[1:]
  adam_curve = run('adam', target_epochs, None)
  target = adam_curve[-1][2]
  results = {}
  for name in methods:
    curve = adam_curve if name == 'adam' else run(name, max_epochs, target)
    hit = next((c for c in curve if c[2] <= target), None)
    results[name] = {
        'learning_rate': rates[name]['learning_rate'],
        'rate_source': rates[name]['source'], 'reached': hit is not None,
        'epochs': None if hit is None else round(hit[0], 3),
        'update_seconds': None if hit is None else hit[1],
        'final_loss': curve[-1][2] if math.isfinite(curve[-1][2]) else None}
  for row in results.values():
    for key in ('epochs', 'update_seconds'):
      row[key + '_ratio_to_adam'] = _ratio(row[key], results['adam'][key])
  return {'target_loss': target, 'target_epochs': target_epochs,
          'max_epochs': max_epochs, 'evals_per_epoch': evals_per_epoch,
          'train_examples': len(x), 'methods': results}


def working_range(rates, works) -> tuple[float, tuple[float, float] | None]:
  """The largest ``max/min`` of a contiguous run of working rates."""
  best, lo_hi = 0.0, None
  for i in range(len(rates)):
    for j in range(i, len(rates)):
      if not works[i:j + 1].all():
        break
      if lo_hi is None or rates[j] / rates[i] > best:
        best, lo_hi = rates[j] / rates[i], (float(rates[i]), float(rates[j]))
  return best, lo_hi


def stable_ranges(values, losses, accuracies) -> dict[str, Any]:
  """One method's accuracy- and loss-stable ranges (module docstring)."""
  losses = np.where(np.isfinite(losses), losses, np.inf)
  accuracies = np.where(np.isfinite(accuracies), accuracies, 0.0)
  acc_range, acc_lo_hi = working_range(
      values, accuracies >= accuracies.max() - 0.05)
  loss_range, loss_lo_hi = working_range(values, losses <= 1.5 * losses.min())
  return {'train_losses': [float(v) if math.isfinite(v) else None
                           for v in losses],
          'test_accuracies': [float(v) for v in accuracies],
          'best_test_accuracy': float(accuracies.max()),
          'best_train_loss': (float(losses.min()) if math.isfinite(
              losses.min()) else None),
          'accuracy_stable': acc_lo_hi, 'accuracy_range': acc_range,
          'loss_stable': loss_lo_hi, 'loss_range': loss_range}


def robustness(methods: Sequence[str], x, y, x_test, y_test, batch: int = 100,
               grid_points: int = 17, low: float = 1e-4, high: float = 1e4,
               epochs: int = 3, seed: int = 0) -> dict[str, Any]:
  """Stable ranges of the learning rate, and of SIBP's ``λ``, vmapped."""
  values = np.logspace(math.log10(low), math.log10(high), grid_points)
  xs, ys = jnp.asarray(x), jnp.asarray(y)
  xt, yt = jnp.asarray(x_test), jnp.asarray(y_test)

  def measure(name, **kwargs):
    t, state, seconds = vmapped_runs(name, x, y, values, batch, seed, epochs,
                                     **kwargs)
    train = np.array([loss for loss, _ in t.evaluate(state, xs, ys)])
    test = np.array([acc for _, acc in t.evaluate(state, xt, yt)])
    return {**stable_ranges(values, train, test),
            'seconds_with_compile': seconds}

  results = {name: measure(name) for name in methods}
  for key in ('accuracy_range', 'loss_range'):
    base = results['sgd'][key] if 'sgd' in results else None
    for row in results.values():
      row[key + '_ratio_to_sgd'] = _ratio(row[key], base)
  both = lambda hp, v: dataclasses.replace(hp, lambda_w=v, lambda_b=v)
  lam = {'sibp_linearized': measure('sibp_linearized', sweep=both,
                                    learning_rate=0.1)}
  return {'learning_rates': [float(v) for v in values], 'epochs': epochs,
          'train_examples': len(x), 'test_examples': len(x_test),
          'methods': results, 'lambda_at_eta_0.1': lam}


def plot_robustness(res: dict[str, Any], path: str) -> None:
  """Test accuracy and training loss against the learning rate."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
  rates = res['learning_rates']
  for name, row in res['methods'].items():
    acc.plot(rates, row['test_accuracies'], marker='.', label=name)
    loss.plot(rates, [np.nan if v is None else v for v in
                      row['train_losses']], marker='.', label=name)
  for ax, what in ((acc, 'test accuracy'), (loss, 'training loss')):
    ax.set(xscale='log', xlabel='learning rate (SIBP: η)', ylabel=what)
  loss.set_yscale('log')
  acc.legend(fontsize='small')
  fig.suptitle(f'paper_mlp, {res["train_examples"]} examples, '
               f'{res["epochs"]} epochs')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


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


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  return '\n'.join(['| ' + ' | '.join(header) + ' |', '|---' * len(header)
                    + '|', *('| ' + ' | '.join(row) + ' |' for row in rows)])


def _methods_table(results: dict[str, Any], columns: dict[str, str]) -> str:
  """A row per method: its results' ``columns`` (key: header)."""
  return _table(['method', *columns.values()], [
      [name, *(_fmt(row[c]) for c in columns)]
      for name, row in results.items()])


STEP_COLUMNS = {'median_ms': 'median ms', 'ratio_to_adam': 'time / Adam',
                'memory_ratio_to_adam': 'compiled temp memory / Adam',
                'flops_ratio_to_adam': 'compiled flops / Adam',
                'compile_seconds': 'trace + compile s',
                'largest_array': 'largest array'}
EPOCH_COLUMNS = {'learning_rate': 'learning rate', 'start_loss': 'start loss',
                 'train_loss': 'train loss after 1 epoch',
                 'update_seconds': 'update seconds'}
TARGET_COLUMNS = {'learning_rate': 'learning rate', 'reached': 'reached',
                  'epochs': 'epochs', 'epochs_ratio_to_adam': 'epochs / Adam',
                  'update_seconds': 'update s',
                  'update_seconds_ratio_to_adam': 'update s / Adam',
                  'final_loss': 'last loss'}
ROBUSTNESS_COLUMNS = {
    'best_test_accuracy': 'best test acc',
    'accuracy_stable': 'accuracy-stable rates',
    'accuracy_range_ratio_to_sgd': "range / SGD's",
    'best_train_loss': 'best train loss', 'loss_stable': 'loss-stable rates',
    'loss_range_ratio_to_sgd': "range / SGD's"}
LAMBDA_COLUMNS = {'best_test_accuracy': 'best test acc',
                  'accuracy_stable': 'accuracy-stable λ',
                  'best_train_loss': 'best train loss',
                  'loss_stable': 'loss-stable λ'}


def _section_markdown(name: str, res: Any) -> list[str]:
  """One section's results as markdown: a caption and a table each."""
  if name == 'step':
    return [f'**Step cost**, `{model}`, batch {r["batch"]}, random data, '
            f'median of {r["rounds"]} interleaved rounds:\n\n'
            + _methods_table(r['methods'], STEP_COLUMNS)
            for model, r in res.items()]
  if name == 'epoch':
    tuned = any('grid' in row for row in res.values())
    columns = {**EPOCH_COLUMNS, 'grid': 'grid (loss)'} if tuned else (
        EPOCH_COLUMNS)
    return ['**One epoch**, `paper_mlp`, batch 100:\n\n' + _methods_table(
        {k: {'grid': '', **row} for k, row in res.items()}, columns)]
  if name == 'target':
    caption = (
        f'{res["train_examples"]} training examples: target = Adam\'s full '
        f'training loss after {res["target_epochs"]} epochs = '
        f'{res["target_loss"]:.4f}; loss evaluated {res["evals_per_epoch"]}× '
        f'per epoch, at most {res["max_epochs"]} epochs')
    return [f'**Time to target**, `paper_mlp`, batch 100, {caption}:\n\n'
            + _methods_table(res['methods'], TARGET_COLUMNS)]
  rates = res['learning_rates']
  caption = (
      f'{res["epochs"]} epochs of {res["train_examples"]} examples, test '
      f'accuracy on {res["test_examples"]}, learning rates {_fmt(rates[0])} '
      f'… {_fmt(rates[-1])} ({len(rates)} log-spaced), one vmapped program '
      'per method; accuracy-stable: within 5 points of the best; '
      'loss-stable: within 1.5× the best')
  per_rate = [row for name, r in res['methods'].items() for row in (
      [f'{name} acc', *(f'{v:.2f}' for v in r['test_accuracies'])],
      [f'{name} loss', *map(_fmt, r['train_losses'])])]
  return [f'**Step-size robustness**, `paper_mlp`, batch 100, {caption}:'
          '\n\n' + _methods_table(res['methods'], ROBUSTNESS_COLUMNS),
          'Per rate:\n\n' + _table(['method', *map(_fmt, rates)], per_rate),
          '**SIBP in λ = λ_W = λ_b** at η = 0.1, same grid of values:\n\n'
          + _methods_table(res['lambda_at_eta_0.1'], LAMBDA_COLUMNS)]


SECTIONS = ('step', 'epoch', 'target', 'robustness')


def markdown(out: dict[str, Any]) -> str:
  """The results as markdown tables, one per section."""
  parts = [f'Device: {out["device"]} ({out["backend"]}); '
           f'OPENBLAS_NUM_THREADS={out["openblas_num_threads"]}'
           f'{"; --quick" if out["quick"] else ""}.']
  for name in SECTIONS:
    if name in out:
      parts += _section_markdown(name, out[name])
  return '\n\n'.join(parts) + '\n'


def _subsample(x, y, n: int | None, seed: int):
  if n is None or n >= len(x):
    return x, y
  keep = np.random.default_rng(seed + 1).permutation(len(x))[:n]
  return x[keep], y[keep]


def load_data(args) -> tuple[np.ndarray, ...]:
  """All training and test images of ``--dataset`` (no validation hold-out);
  with ``--mock_data N``, N synthetic training and N // 5 test examples."""
  if args.mock_data:
    x, y = input_pipeline.teacher_data(args.mock_data + args.mock_data // 5,
                                       seed=args.seed)
    n = args.mock_data
    return x[:n], y[:n], x[n:], y[n:]
  data = input_pipeline.load(args.dataset, args.data_dir,
                             validation_examples=0)
  return data.x_train, data.y_train, data.x_test, data.y_test


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add = parser.add_argument
  names = lambda text: [v for v in text.split(',') if v]
  add('--section', type=names, default='step',
      help='comma-separated: step, epoch, target, robustness, or all '
      '(default step)')
  add('--methods', type=names, default=','.join(METHODS),
      help='comma-separated subset of ' + ', '.join(METHODS))
  add('--models', type=names, default=','.join(STEP_MODELS),
      help='step section: comma-separated subset of ' + ', '.join(STEP_MODELS))
  add('--data_dir', default=None, help='TFDS data directory')
  add('--dataset', default='fashion_mnist')
  add('--mock_data', type=int, default=None, metavar='N',
      help='N synthetic examples instead of the dataset')
  add('--rounds', type=int, default=None, help='step: timed rounds (default '
      '30 for paper_mlp, 5 for the ProxBP models)')
  add('--learning_rates', default='', metavar='NAME=LR,...',
      help='epoch: these rates instead of the registry defaults')
  add('--tune', action='store_true',
      help="epoch: each method at the best rate of its grid (GRIDS, else "
      "the registry's) after one epoch, one vmapped program per method")
  add('--table', default=None, help='target: take the learning rates from '
      'this table of examples/reproduce.py (default: tune on the grid)')
  add('--train_examples', type=int, default=None,
      help='target, robustness: subsample the training set')
  add('--robustness_examples', type=int, default=None,
      help='robustness only: subsample (overrides --train_examples there)')
  add('--target_epochs', type=int, default=3)
  add('--max_epochs', type=int, default=6)
  add('--evals_per_epoch', type=int, default=5)
  add('--grid_points', type=int, default=17,
      help='robustness: values from 1e-4 to 1e4')
  add('--robustness_epochs', type=int, default=3)
  add('--plot_out', default=None, help='robustness: plot to this file')
  add('--quick', action='store_true',
      help='a reduced run of the same sections and keys')
  add('--seed', type=int, default=0)
  add('--json', default=None, help='write results here')
  add('--markdown', default=None, help='write the markdown tables here')
  args = parser.parse_args(argv)
  if 'all' in args.section:
    args.section = list(SECTIONS)
  try:
    args.learning_rates = {k: float(v) for k, v in (
        item.split('=') for item in args.learning_rates.split(',') if item)}
  except ValueError:
    parser.error(f'--learning_rates: expected NAME=LR,..., got '
                 f'{args.learning_rates!r}')
  for what, got, known in (
      ('sections', args.section, SECTIONS),
      ('methods', [*args.methods, *args.learning_rates], METHODS),
      ('models', args.models, STEP_MODELS)):
    if set(got) - set(known):
      parser.error(f'unknown {what} {sorted(set(got) - set(known))}')
  if 'adam' not in args.methods:
    args.methods.append('adam')
  if args.quick:  # reduced sizes; the keys of the output are the same
    vars(args).update(target_epochs=1, max_epochs=2, evals_per_epoch=2,
                      grid_points=min(args.grid_points, 5), robustness_epochs=1,
                      train_examples=args.train_examples or 2000)
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  methods, sections = args.methods, args.section
  out: dict[str, Any] = {
      'device': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
      'openblas_num_threads': os.environ.get('OPENBLAS_NUM_THREADS'),
      'quick': args.quick, 'argv': list(argv) if argv is not None else None}
  print(f'# device: {out["device"]} ({out["backend"]}), '
        f'OPENBLAS_NUM_THREADS={out["openblas_num_threads"]}', flush=True)
  if 'step' in sections:
    out['step'] = {}
    for model in args.models:
      batch = STEP_MODELS[model][1]
      rounds = args.rounds or (30 if model == 'paper_mlp' else 5)
      if args.quick:
        batch, rounds = (batch, 5) if model == 'paper_mlp' else (50, 2)
      res = step_cost(methods, model, batch, rounds, args.seed)
      out['step'][model] = {'batch': batch, 'rounds': rounds, 'methods': res}
      print(_section_markdown('step', {model: out['step'][model]})[0],
            flush=True)
  if {'epoch', 'target', 'robustness'} & set(sections):
    x, y, x_test, y_test = load_data(args)
  if 'epoch' in sections:
    xe, ye = _subsample(x, y, 2000 if args.quick else None, args.seed)
    tuned = (best_learning_rates(methods, xe, ye, None, args.seed)
             if args.tune else {})
    out['epoch'] = one_epoch(methods, xe, ye, seed=args.seed, rates={
        **{k: v['learning_rate'] for k, v in tuned.items()},
        **args.learning_rates})
    for name, row in tuned.items():
      out['epoch'][name]['grid'] = row['source']
    print(*_section_markdown('epoch', out['epoch']), flush=True)
  if 'target' in sections:
    xt, yt = _subsample(x, y, args.train_examples, args.seed)
    rates = best_learning_rates(methods, xt, yt, args.table, args.seed)
    out['target'] = time_to_target(
        methods, xt, yt, rates, target_epochs=args.target_epochs,
        max_epochs=args.max_epochs, evals_per_epoch=args.evals_per_epoch,
        seed=args.seed)
    print(*_section_markdown('target', out['target']), flush=True)
  if 'robustness' in sections:
    n = args.robustness_examples or args.train_examples
    xr, yr = _subsample(x, y, n, args.seed)
    rob_methods = methods if 'sgd' in methods else [*methods, 'sgd']
    out['robustness'] = robustness(
        rob_methods, xr, yr, x_test, y_test, grid_points=args.grid_points,
        epochs=args.robustness_epochs, seed=args.seed)
    print(*_section_markdown('robustness', out['robustness']), flush=True)
    if args.plot_out:
      plot_robustness(out['robustness'], args.plot_out)
  text = markdown(out)
  print('\n' + text, flush=True)
  if args.markdown:
    pathlib.Path(args.markdown).write_text(text)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
  return out


if __name__ == '__main__':
  main()
