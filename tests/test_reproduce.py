"""examples/reproduce.py: the grid runs, skips finished runs, and summarizes."""

import json
import math
import os

import pytest

pytest.importorskip('sklearn')
pytest.importorskip('tqdm')

import reproduce  # noqa: E402


def test_grid_summary_and_resume(tmp_path, capsys):
  out = tmp_path / 'runs'
  argv = ['--setting', 'sibp', '--dataset', 'digits', '--out_dir', str(out),
          '--seeds', '0,1', '--epochs', '1', '--train_examples', '300',
          '--methods', 'sgd,sibp_linearized']
  table = reproduce.main(argv)
  files = sorted(os.listdir(out))
  # 3 SGD rates × 2 seeds + 1 SIBP rate × 2 seeds, and the table.
  assert len([f for f in files if f.endswith('.json')]) == 8
  assert (out / 'table.md').read_text().strip() == table
  rows = table.splitlines()[2:]
  assert {r.split('|')[1].strip() for r in rows} == {'sgd',
                                                      'sibp_linearized'}
  assert '| 2 |' in rows[0]
  # The best SGD rate is the one with the lowest mean final training loss.
  losses = {}
  for f in files:
    if f.startswith('sgd'):
      m = json.loads((out / f).read_text())
      losses.setdefault(m['config']['learning_rate'], []).append(
          m['history'][-1]['train_loss'])
  best = min(losses, key=lambda lr: sum(losses[lr]))
  sgd_row = next(r for r in rows if r.split('|')[1].strip() == 'sgd')
  assert sgd_row.split('|')[2].strip().startswith(f'{best:g} (')
  # A second call finds every run finished and trains nothing.
  capsys.readouterr()
  assert reproduce.main(argv) == table
  assert 'epoch' not in capsys.readouterr().out
  # A run file of other settings (here another dataset size) is not reused.
  reproduce.main([*argv[:-2], '--methods', 'sibp_linearized',
                  '--seeds', '0', '--train_examples', '200'])
  assert 'epoch' in capsys.readouterr().out


def _metrics(path, lr, loss):
  entry = {'train_loss': loss, 'test_accuracy': 0.5, 'seconds': 1.0}
  path.write_text(json.dumps({'config': {'learning_rate': lr},
                              'history': [entry]}))
  return str(path)


def test_a_diverged_rate_is_never_the_best(tmp_path):
  # The finite rate comes first, the diverged one (loss null: NaN) after.
  paths = [_metrics(tmp_path / 'sgd_lr0.1_seed0.json', 0.1, 0.5),
           _metrics(tmp_path / 'sgd_lr10_seed0.json', 10.0, None),
           _metrics(tmp_path / 'adam_lr1_seed0.json', 1.0, None)]
  table, best = reproduce.summarize(paths)
  assert best['sgd']['lr'] == 0.1
  assert math.isnan(best['adam']['loss'])  # only a diverged rate: shown
  assert table.splitlines()[2].startswith('| sgd | 0.1 (0.1, 10) |')


def test_selection_by_validation_accuracy(tmp_path):
  """The rate of the lowest loss and of the best held-out accuracy differ."""
  paths = [_metrics(tmp_path / 'sgd_lr0.1_seed0.json', 0.1, 0.5),
           _metrics(tmp_path / 'sgd_lr1_seed0.json', 1.0, 0.3)]
  for path, accuracy in zip(paths, (0.9, 0.8)):
    with open(path) as f:
      metrics = json.load(f)
    metrics['history'][-1]['val_accuracy'] = accuracy
    with open(path, 'w') as f:
      json.dump(metrics, f)
  assert reproduce.summarize(paths)[1]['sgd']['lr'] == 1.0
  assert reproduce.summarize(paths, 'val_accuracy')[1]['sgd']['lr'] == 0.1


def test_time_to_target_accuracy(tmp_path):
  """The column names the first epoch at or above the target, and its
  update seconds; a run that never gets there shows a dash."""
  path = tmp_path / 'sgd_lr0.1_seed0.json'
  history = [{'epoch': e, 'val_accuracy': acc, 'seconds': 10.0 * e,
              'train_loss': 1.0, 'test_accuracy': 0.5}
             for e, acc in enumerate((0.1, 0.6, 0.8, 0.7))]
  path.write_text(json.dumps({'config': {'learning_rate': 0.1},
                              'history': history}))
  assert reproduce.to_target(json.loads(path.read_text()), 0.75) == (2, 20.0)
  table, _ = reproduce.summarize([str(path)], target_accuracy=0.75)
  assert table.splitlines()[0].endswith('to val acc 0.75 | seeds |')
  assert table.splitlines()[2].endswith('| 2, 20 | 1 |')
  table, _ = reproduce.summarize([str(path)], target_accuracy=0.9)
  assert table.splitlines()[2].endswith('| – | 1 |')
