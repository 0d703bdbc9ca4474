r"""Draws the metrics files of several runs of ``train.py`` on one figure.

Four panels, the way both papers plot their runs: loss against epochs and
against seconds spent in update steps (log scale), accuracy against epochs
and against seconds; the training set solid, the validation set dashed, one
colour per run, starting from the evaluation before the first step::

  python examples/compare.py sibp.json adam.json proxbp.json --out runs.png

Each run is labelled by its optimizer and the settings in which the runs
differ (``--labels`` overrides). ``--steps`` draws instead each run's batch
loss at every step (``step_loss``, before the step's update), averaged over
``--smooth`` steps, ``--bits`` in bits (the loss over ln 2: bits per
character for a character model)::

  python examples/compare.py sibp.json adamw.json --steps --bits --out c.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

# Settings that do not change what is trained, left out of labels.
_NOT_LABELS = ('metrics_out', 'plot_out', 'data_dir', 'progress',
               'eval_batch_size')


def load(path: str) -> dict[str, Any]:
  """Reads one metrics file written by ``train.py``."""
  with open(path) as f:
    metrics = json.load(f)
  if 'config' not in metrics or 'history' not in metrics:
    raise ValueError(f'{path} is not a metrics file of train.py (needs '
                     '"config" and "history")')
  return metrics


def labels(configs: Sequence[Mapping[str, Any]]) -> list[str]:
  """A label per run's ``"config"``: the optimizer and the settings in
  which the runs differ, e.g. ``'proxbp proxbp_solver=cg3'``."""
  keys = sorted({k for c in configs for k in c} - {'optimizer', *_NOT_LABELS})
  differing = [k for k in keys
               if len({json.dumps(c.get(k)) for c in configs}) > 1]
  return [' '.join([str(c.get('optimizer', '?')),
                    *(f'{k}={c.get(k)}' for k in differing)])
          for c in configs]


def _values(entries, key):
  return np.asarray([np.nan if e.get(key) is None else e[key]
                     for e in entries], float)


def plot(runs: Sequence[tuple[str, Mapping[str, Any]]], path: str,
         title: str | None = None) -> None:
  """Plots ``(label, metrics)`` pairs (``metrics`` as ``train.py`` writes
  them) to the image file ``path`` (its suffix picks the format); the title
  defaults to the first run's dataset and model."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (label, metrics) in enumerate(runs):
    color = colors[i % len(colors)]
    entries = [metrics['initial']] if metrics.get('initial') else []
    entries += metrics['history']
    for col, xkey in enumerate(('epoch', 'seconds')):
      for row, what in enumerate(('loss', 'accuracy')):
        for split, style in (('train', '-'), ('val', '--')):
          axes[row][col].plot(
              _values(entries, xkey), _values(entries, f'{split}_{what}'),
              style, color=color, marker='.', label=f'{label} ({split})')
  for col, xlabel in enumerate(('epoch', 'seconds in update steps')):
    for row, what in enumerate(('loss', 'accuracy')):
      axes[row][col].set(xlabel=xlabel, ylabel=what,
                         yscale='log' if what == 'loss' else 'linear')
      axes[row][col].grid(True, alpha=0.3)
  axes[0][0].legend(fontsize='small')
  if title is None and runs:
    c = runs[0][1].get('config', {})
    title = f'{c.get("dataset", "")} {c.get("model", "")}'.strip()
  if title:
    fig.suptitle(f'{title}: training (solid) and validation (dashed)')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def smoothed(values: Sequence[float | None], window: int) -> np.ndarray:
  """The mean of each ``window`` consecutive values, ending at each step
  from the ``window``-th on (``None``: NaN, which spoils its windows)."""
  v = np.asarray([np.nan if x is None else x for x in values], float)
  if window <= 1 or len(v) < window:
    return v
  c = np.concatenate([[0.0], np.cumsum(v)])
  return (c[window:] - c[:-window]) / window


def plot_steps(runs: Sequence[tuple[str, Mapping[str, Any]]], path: str,
               title: str | None = None, smooth: int = 1,
               bits: bool = False) -> None:
  """Plots each run's ``step_loss`` against the step, the mean of
  ``smooth`` steps ending at each (``bits``: divided by ln 2), to the image
  file ``path``."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, ax = plt.subplots(figsize=(9, 5.5))
  for label, metrics in runs:
    if not metrics.get('step_loss'):
      raise ValueError(f'{label}: the metrics hold no step_loss (written '
                       'by an older train.py)')
    y = smoothed(metrics['step_loss'], smooth) / (math.log(2) if bits else 1)
    ax.plot(np.arange(len(y)) + min(smooth, len(metrics['step_loss'])), y,
            label=label, linewidth=1.2)
  unit = 'bits' if bits else 'nats'
  ax.set(xlabel='step', ylabel=f'batch loss before the step ({unit})'
         + (f', mean of {smooth} steps' if smooth > 1 else ''))
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize='small')
  if title is None and runs:
    c = runs[0][1].get('config', {})
    title = f'{c.get("dataset", "")} {c.get("model", "")}'.strip()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[str]:
  """Plots the metrics files named in ``argv``; returns their labels."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('metrics', nargs='+', help='metrics files of train.py')
  parser.add_argument('--out', default='compare.png', help='the image file')
  parser.add_argument('--labels', default=None,
                      help='comma-separated labels, one per file')
  parser.add_argument('--title', default=None)
  parser.add_argument('--steps', action='store_true',
                      help='the batch loss of every step instead')
  parser.add_argument('--smooth', type=int, default=1,
                      help='--steps: the mean of this many steps')
  parser.add_argument('--bits', action='store_true',
                      help='--steps: the loss in bits (over ln 2)')
  args = parser.parse_args(argv)
  try:
    runs = [load(p) for p in args.metrics]
  except (OSError, ValueError) as e:
    parser.error(str(e))
  if args.labels is not None:
    names = args.labels.split(',')
    if len(names) != len(runs):
      parser.error(f'{len(names)} labels for {len(runs)} files')
  else:
    names = labels([r['config'] for r in runs])
  pairs = list(zip(names, runs, strict=True))
  if args.steps:
    try:
      plot_steps(pairs, args.out, title=args.title, smooth=args.smooth,
                 bits=args.bits)
    except ValueError as e:
      parser.error(str(e))
  else:
    plot(pairs, args.out, title=args.title)
  print(f'wrote {args.out}')
  return names


if __name__ == '__main__':
  main()
