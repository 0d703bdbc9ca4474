r"""Reproduces the SIBP and ProxBP papers' comparisons with examples/train.py.

Each setting runs every method over a grid of learning rates and several
seeds, writes one metrics file per run into ``--out_dir`` (runs already
there are skipped, so an interrupted reproduction continues), and prints a
markdown table: for each method its best learning rate from the grid (by the
mean final training loss over seeds, the quantity both papers plot), with
the final training loss, test accuracy and update seconds as mean ± standard
deviation over seeds. ``--plot_out`` draws the best runs of seed 0.

Settings (SIBP.md):

* ``sibp``: the SIBP authors' run, ``paper_mlp`` (in-500-10), batch 100,
  5 epochs; SIBP at the paper's η = 0.1, λ = 1.
* ``proxprop_mlp``: the ProxBP authors' MLP (in-4000-1000-4000-10), batch
  500, 5 epochs; ProxBP with Nesterov (momentum 0.95), τ_prox = 0.05.
* ``proxprop_convnet``: the ProxBP authors' ConvNet, batch 500, 3 epochs;
  ProxBP with Adam outside, τ_prox = 1, cg3.

Run (``DIR`` a TFDS data directory holding the dataset)::

  python examples/reproduce.py --setting sibp --dataset fashion_mnist \
      --data_dir DIR --out_dir runs/sibp --plot_out examples/results/sibp.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

import compare
import train

# method -> (optimizer, extra settings, learning-rate grid)
GRIDS = {
    'sibp': dict(
        model='paper_mlp', batch_size=100, epochs=5,
        methods={
            'sibp_linearized': ('sibp_linearized', {}, [0.1]),
            'sibp_paper': ('sibp_paper', {}, [0.1]),
            'proxbp': ('proxbp', {}, [0.3, 1.0, 3.0]),
            'sgd': ('sgd', {}, [0.03, 0.1, 0.3]),
            'adam': ('adam', {}, [3e-4, 1e-3, 3e-3]),
        }),
    'proxprop_mlp': dict(
        model='proxprop_mlp', batch_size=500, epochs=5,
        methods={
            'sibp_linearized': ('sibp_linearized', {}, [0.1]),
            'sibp_paper': ('sibp_paper', {}, [0.1]),
            'proxbp': ('proxbp', {'tau_prox': 0.05}, [0.3, 1.0, 3.0]),
            'sgd': ('nesterov', {}, [0.01, 0.05, 0.2]),
            'adam': ('adam', {}, [3e-4, 1e-3, 3e-3]),
        }),
    'proxprop_convnet': dict(
        model='proxprop_convnet', batch_size=500, epochs=3,
        methods={
            'sibp_linearized': ('sibp_linearized', {}, [0.1]),
            'sibp_paper': ('sibp_paper', {}, [0.1]),
            'proxbp': ('proxbp', {'tau_prox': 1.0, 'proxbp_outer': 'adam',
                                  'proxbp_solver': 'cg3'},
                       [3e-4, 1e-3, 3e-3]),
            'sgd': ('sgd', {}, [0.03, 0.1, 0.3]),
            'adam': ('adam', {}, [3e-4, 1e-3, 3e-3]),
        }),
}


def run_name(method: str, lr: float, seed: int) -> str:
  return f'{method}_lr{lr:g}_seed{seed}'


def run_all(setting: str, *, dataset: str, data_dir: str | None,
            out_dir: str, seeds: Sequence[int], methods: Sequence[str],
            epochs: int | None, train_examples: int | None,
            middle_rate_only: bool = False) -> list[str]:
  """Runs the grid; returns the metrics files (existing ones are kept)."""
  grid = GRIDS[setting]
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for method in methods:
    optimizer, extra, rates = grid['methods'][method]
    if middle_rate_only:
      rates = [rates[len(rates) // 2]]
    for lr in rates:
      for seed in seeds:
        path = os.path.join(out_dir, run_name(method, lr, seed) + '.json')
        paths.append(path)
        want = epochs or grid['epochs']
        if os.path.exists(path):
          with open(path) as f:
            if len(json.load(f)['history']) >= want:
              continue
        train.train_and_evaluate(dict(
            dataset=dataset, data_dir=data_dir, model=grid['model'],
            optimizer=optimizer, learning_rate=lr, epochs=want,
            batch_size=grid['batch_size'], seed=seed,
            train_examples=train_examples, metrics_out=path, progress=False,
            **extra))
  return paths


def summarize(paths: Sequence[str]) -> tuple[str, dict[str, Any]]:
  """The markdown table of best learning rates, and the chosen runs."""
  runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
  for path in paths:
    with open(path) as f:
      metrics = json.load(f)
    name = os.path.basename(path).rsplit('_lr', 1)[0]
    runs.setdefault((name, metrics['config']['learning_rate']),
                    []).append(metrics)

  def final(metrics, key):
    value = metrics['history'][-1][key]
    return np.nan if value is None else value

  best: dict[str, Any] = {}
  for (name, lr), group in runs.items():
    loss = np.mean([final(m, 'train_loss') for m in group])
    if name not in best or not loss >= best[name]['loss']:
      best[name] = {'lr': lr, 'loss': loss, 'runs': group}
  lines = ['| method | learning rate (grid) | final train loss | '
           'test accuracy | update seconds | seeds |',
           '|---|---|---|---|---|---|']
  for name, b in sorted(best.items(), key=lambda kv: kv[1]['loss']):
    grid = sorted(lr for (n, lr) in runs if n == name)
    cells = []
    for key in ('train_loss', 'test_accuracy', 'seconds'):
      values = np.array([final(m, key) for m in b['runs']])
      cells.append(f'{values.mean():.4f} ± {values.std():.4f}')
    grid_text = ', '.join(f'{lr:g}' for lr in grid)
    lines.append(f'| {name} | {b["lr"]:g} ({grid_text}) | ' +
                 ' | '.join(cells) + f' | {len(b["runs"])} |')
  return '\n'.join(lines), best


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--setting', choices=sorted(GRIDS), default='sibp')
  parser.add_argument('--dataset', default='mnist')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--methods', default=None,
                      help='comma-separated subset (default all)')
  parser.add_argument('--epochs', type=int, default=None,
                      help="override the setting's epochs")
  parser.add_argument('--train_examples', type=int, default=None)
  parser.add_argument('--middle_rate_only', action='store_true',
                      help="only each grid's middle learning rate (the "
                      "papers' setting), for settings too costly to tune")
  parser.add_argument('--plot_out', default=None)
  args = parser.parse_args(argv)
  methods = (args.methods.split(',') if args.methods else
             list(GRIDS[args.setting]['methods']))
  try:
    paths = run_all(args.setting, dataset=args.dataset,
                    data_dir=args.data_dir, out_dir=args.out_dir,
                    seeds=[int(s) for s in args.seeds.split(',')],
                    methods=methods, epochs=args.epochs,
                    train_examples=args.train_examples,
                    middle_rate_only=args.middle_rate_only)
  except Exception as e:  # the training script's own clear errors
    if type(e).__name__ in ('UsageError', 'DatasetUnavailableError'):
      sys.exit(f'reproduce.py: error: {e}')
    raise
  table, best = summarize(paths)
  print(table)
  with open(os.path.join(args.out_dir, 'table.md'), 'w') as f:
    f.write(table + '\n')
  if args.plot_out:
    chosen = [(f'{name} (lr {b["lr"]:g})', b['runs'][0])
              for name, b in best.items()]
    compare.plot(chosen, args.plot_out)
  return table


if __name__ == '__main__':
  main()
