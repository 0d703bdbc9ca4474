"""Smoke test of examples/quickstart.py: both methods train from one start."""

import json
import math

import pytest

pytest.importorskip('sklearn')
pytest.importorskip('tqdm')

import quickstart  # noqa: E402


def test_both_methods_train_and_write_json(tmp_path, capsys):
  path = tmp_path / 'results.json'
  results = quickstart.main(['--epochs', '1', '--no_progress', '--json',
                             str(path)])
  out = capsys.readouterr().out
  assert 'sibp' in out and 'adam' in out
  saved = json.loads(path.read_text())
  assert [r['method'] for r in saved['results']] == ['sibp', 'adam']
  assert saved['settings']['epochs'] == 1
  for r in results:
    assert all(math.isfinite(r[k]) for k in ('final_train_loss',
                                             'test_accuracy',
                                             'update_seconds')), r
    # Ten classes: chance is 0.1; one epoch of either method does better,
    # and the loss falls below its start (log 10 = 2.30).
    assert r['test_accuracy'] > 0.5 and r['final_train_loss'] < 2.3, r
