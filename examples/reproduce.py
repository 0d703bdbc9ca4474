r"""Reproduces the SIBP and ProxBP papers' comparisons with examples/train.py.

Each setting (a preset of ``examples/config.py``, described in
``docs/experiments.md``) runs every method over its learning-rate grid
(``examples/optimizers.py``) and several seeds, writes one metrics file per
run into ``--out_dir`` (finished runs of the same settings are skipped, so
an interrupted reproduction continues), and prints a markdown table: for
each method its best learning rate from the grid (by the mean final
training loss over seeds, the quantity both papers plot; never a rate with
a non-finite loss), with the final training loss, test accuracy and update
seconds as mean ± standard deviation over seeds. ``--plot_out`` draws the
best runs of seed 0. ``DIR`` is a TFDS data directory holding the dataset::

  python examples/reproduce.py --setting sibp --dataset fashion_mnist \
      --data_dir DIR --out_dir runs/sibp --plot_out sibp.png

``--text_file PATH`` is passed to ``--dataset text_file``; ``--every_run``
adds a table of every run (``runs.md``): final validation and training
loss in bits, and the batch loss over the last steps against its lowest
mean over as many steps, whether the loss still falls, stalls or turns
back up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

import compare
import config as config_lib
import input_pipeline
import optimizers
import train


def _is_done(path: str, settings: dict[str, Any], epochs: int) -> bool:
  """Whether ``path`` holds a finished run of these very settings."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    metrics = json.load(f)
  saved = metrics.get('config', {})
  same = all(saved.get(k) == v for k, v in settings.items()
             if k not in ('epochs', 'metrics_out', 'progress', 'data_dir'))
  return same and len(metrics.get('history', [])) >= epochs


def run_all(setting: str, *, dataset: str, data_dir: str | None,
            out_dir: str, seeds: Sequence[int], methods: Sequence[str],
            epochs: int | None, train_examples: int | None,
            middle_rate_only: bool = False,
            text_file: str | None = None) -> list[str]:
  """Runs the grid; returns the metrics files (finished ones are kept)."""
  preset = config_lib.PRESETS[setting]
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for method in methods:
    optimizer, extra, rates = preset['methods'][method]
    rates = rates or optimizers.METHODS[optimizer].grid
    if middle_rate_only:
      rates = [rates[len(rates) // 2]]
    for lr in rates:
      for seed in seeds:
        path = os.path.join(out_dir, f'{method}_lr{lr:g}_seed{seed}.json')
        paths.append(path)
        settings = dict(
            config_lib.preset_settings(setting), dataset=dataset,
            data_dir=data_dir, optimizer=optimizer, learning_rate=lr,
            seed=seed, train_examples=train_examples, metrics_out=path,
            progress=False, **extra)
        if text_file is not None:
          settings['text_file'] = text_file
        if epochs:
          settings['epochs'] = epochs
        if not _is_done(path, settings, settings['epochs']):
          train.train_and_evaluate(settings)
  return paths


def _final(metrics, key) -> float:
  value = metrics['history'][-1][key]
  return math.nan if value is None else value


def to_target(metrics, target: float) -> tuple[float, float] | None:
  """``(epoch, update seconds)`` of the first evaluation whose validation
  accuracy is at least ``target`` (``None``: never)."""
  return next(((e['epoch'], e['seconds']) for e in metrics['history']
               if (e.get('val_accuracy') or 0.0) >= target), None)


def summarize(paths: Sequence[str], select: str = 'train_loss',
              target_accuracy: float | None = None
              ) -> tuple[str, dict[str, Any]]:
  """The markdown table of best learning rates, and the chosen runs.

  Each method's rate is the one of the lowest final training loss
  (``select='train_loss'``), of the highest final validation accuracy
  (``'val_accuracy'``, the held-out images) or of the lowest final
  validation loss (``'val_loss'``), averaged over seeds. With
  ``target_accuracy`` a column gives each seed's epoch and update seconds
  to that validation accuracy (``–``: not reached).
  """
  runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
  for path in paths:
    with open(path) as f:
      metrics = json.load(f)
    name = os.path.basename(path).rsplit('_lr', 1)[0]
    runs.setdefault((name, metrics['config']['learning_rate']),
                    []).append(metrics)
  best: dict[str, Any] = {}
  for (name, lr), group in runs.items():
    loss = float(np.mean([_final(m, 'train_loss') for m in group]))
    key = loss if math.isfinite(loss) else math.inf  # diverged: never best
    if select == 'val_accuracy' and math.isfinite(loss):
      key = -float(np.mean([_final(m, 'val_accuracy') for m in group]))
    if select == 'val_loss' and math.isfinite(loss):
      key = float(np.mean([_final(m, 'val_loss') for m in group]))
      key = key if math.isfinite(key) else math.inf
    if name not in best or key < best[name]['key']:
      best[name] = {'lr': lr, 'loss': loss, 'key': key, 'runs': group}
  target = ([] if target_accuracy is None else
            [f'epoch, update s to val acc {target_accuracy:g}'])
  lines = ['| ' + ' | '.join(['method', 'learning rate (grid)',
                              'final train loss', 'test accuracy',
                              'update seconds', *target, 'seeds']) + ' |',
           '|---' * (6 + len(target)) + '|']
  for name, b in sorted(best.items(), key=lambda kv: kv[1]['key']):
    grid = ', '.join(f'{lr:g}' for lr in sorted(
        lr for (n, lr) in runs if n == name))
    values = [np.array([_final(m, key) for m in b['runs']])
              for key in ('train_loss', 'test_accuracy', 'seconds')]
    cells = [f'{v.mean():.4f} ± {v.std():.4f}' for v in values]
    if target:
      hits = [to_target(m, target_accuracy) for m in b['runs']]
      cells.append('; '.join('–' if h is None else f'{h[0]}, {h[1]:.0f}'
                             for h in hits))
    lines.append(f'| {name} | {b["lr"]:g} ({grid}) | ' + ' | '.join(cells)
                 + f' | {len(b["runs"])} |')
  return '\n'.join(lines), best


def every_run(paths: Sequence[str], window: int = 50) -> str:
  """A markdown table of every run: final validation and training loss in
  bits (the loss over ln 2; per character for a character model), the
  mean batch loss of the last ``window`` steps and the lowest mean over
  ``window`` consecutive steps (with the step it ends at), in bits, and
  the steps skipped as not finite. A last mean well above the lowest
  says the loss turned back up; equal, that it was still falling or
  flat at the end."""
  bits = lambda v: '–' if v is None or not math.isfinite(v) else (
      f'{v / math.log(2):.3f}')
  lines = ['| method | learning rate | seed | val bits | train bits | '
           f'batch bits, last {window} steps | lowest {window}-step mean '
           '(at step) | skipped steps |', '|---' * 8 + '|']
  for path in paths:
    with open(path) as f:
      metrics = json.load(f)
    name = os.path.basename(path).rsplit('_lr', 1)[0]
    last = metrics['history'][-1]
    losses = metrics.get('step_loss') or []
    means = compare.smoothed(losses, window)
    if len(means) and np.isfinite(means).any():
      at = int(np.nanargmin(means))  # the window ending at step at + w
      w = window if len(losses) >= window else 1
      lowest = f'{bits(means[at])} ({at + w})'
      end = bits(means[-1])
    else:
      lowest = end = '–'
    skipped = sum(e.get('skipped_steps', 0) for e in metrics['history'])
    lines.append(f'| {name} | {metrics["config"]["learning_rate"]:g} | '
                 f'{metrics["config"].get("seed", 0)} | '
                 f'{bits(last.get("val_loss"))} | '
                 f'{bits(last.get("train_loss"))} | {end} | {lowest} | '
                 f'{skipped} |')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add = parser.add_argument
  add('--setting', choices=sorted(config_lib.PRESETS), default='sibp')
  add('--dataset', default='mnist')
  add('--data_dir', default=None)
  add('--text_file', default=None,
      help='--dataset text_file: the text (a file or directory)')
  add('--out_dir', required=True)
  add('--seeds', default='0,1,2')
  add('--methods', default=None, help='comma-separated subset (default all)')
  add('--epochs', type=int, default=None, help="override the setting's epochs")
  add('--train_examples', type=int, default=None)
  add('--middle_rate_only', action='store_true',
      help="only each grid's middle learning rate (the papers' setting), for "
      'settings too costly to tune')
  add('--plot_out', default=None)
  add('--target_accuracy', type=float, default=None,
      help='add a column: epoch and update seconds to this validation '
      'accuracy')
  add('--select', choices=('train_loss', 'val_accuracy', 'val_loss'),
      default='train_loss',
      help="each method's learning rate: lowest final training loss, "
      'highest final validation accuracy, or lowest final validation loss')
  add('--every_run', action='store_true',
      help='also print (and write to runs.md) a table of every run')
  args = parser.parse_args(argv)
  methods = (args.methods.split(',') if args.methods else
             list(config_lib.PRESETS[args.setting]['methods']))
  try:
    paths = run_all(args.setting, dataset=args.dataset,
                    data_dir=args.data_dir, out_dir=args.out_dir,
                    seeds=[int(s) for s in args.seeds.split(',')],
                    methods=methods, epochs=args.epochs,
                    train_examples=args.train_examples,
                    middle_rate_only=args.middle_rate_only,
                    text_file=args.text_file)
  except (train.UsageError, input_pipeline.DatasetUnavailableError) as e:
    sys.exit(f'reproduce.py: error: {e}')
  table, best = summarize(paths, args.select, args.target_accuracy)
  print(table)
  with open(os.path.join(args.out_dir, 'table.md'), 'w') as f:
    f.write(table + '\n')
  if args.every_run:
    runs = every_run(paths)
    print(runs)
    with open(os.path.join(args.out_dir, 'runs.md'), 'w') as f:
      f.write(runs + '\n')
  if args.plot_out:
    compare.plot([(f'{name} (lr {b["lr"]:g})', b['runs'][0])
                  for name, b in best.items()], args.plot_out)
  return table


if __name__ == '__main__':
  main()
