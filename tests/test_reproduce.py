"""examples/reproduce.py: the grid runs, skips finished runs, and summarizes."""

import json
import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       'examples'))
pytest.importorskip('sklearn')
pytest.importorskip('tqdm')
import reproduce  # noqa: E402


def test_grid_summary_and_resume(tmp_path, capsys):
  out = tmp_path / 'runs'
  argv = ['--setting', 'sibp', '--dataset', 'digits', '--out_dir', str(out),
          '--seeds', '0,1', '--epochs', '1', '--methods',
          'sgd,sibp_linearized']
  table = reproduce.main(argv)
  files = sorted(os.listdir(out))
  # 3 SGD rates × 2 seeds + 1 SIBP rate × 2 seeds, and the table.
  assert len([f for f in files if f.endswith('.json')]) == 8
  assert (out / 'table.md').read_text().strip() == table
  rows = [line for line in table.splitlines()[2:]]
  assert {r.split('|')[1].strip() for r in rows} == {'sgd',
                                                      'sibp_linearized'}
  assert '| 2 |' in rows[0]
  # The best SGD rate is the one with the lowest mean final training loss.
  losses = {}
  for f in files:
    if f.startswith('sgd'):
      with open(out / f) as fh:
        m = json.load(fh)
      losses.setdefault(m['config']['learning_rate'], []).append(
          m['history'][-1]['train_loss'])
  best = min(losses, key=lambda lr: sum(losses[lr]))
  sgd_row = next(r for r in rows if r.split('|')[1].strip() == 'sgd')
  assert sgd_row.split('|')[2].strip().startswith(f'{best:g} (')
  # A second call finds every run finished and trains nothing.
  capsys.readouterr()
  assert reproduce.main(argv) == table
  assert 'epoch' not in capsys.readouterr().out
