"""Smoke test of examples/quickstart.py: both methods train from one start."""

import json
import math
import pathlib
import sys

import pytest

pytest.importorskip('sklearn')
pytest.importorskip('tqdm')

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       'examples'))

import quickstart  # noqa: E402

EPOCHS = 1


@pytest.fixture(scope='module')
def data():
  return quickstart.load_digits_split(0)


@pytest.fixture(scope='module')
def results(data):
  return {method: quickstart.train(method, data, epochs=EPOCHS, seed=0,
                                   progress=False)
          for method in quickstart.METHODS}


def test_split_shapes_and_scaling(data):
  x_train, y_train, x_test, y_test = data
  assert x_train.shape == (1437, 64) and y_train.shape == (1437,)
  assert x_test.shape == (360, 64) and y_test.shape == (360,)
  assert x_train.min() >= 0.0 and x_train.max() <= 1.0
  # A fixed seed gives a fixed split.
  again = quickstart.load_digits_split(0)
  assert all((a == b).all() for a, b in zip(data, again, strict=True))


@pytest.mark.parametrize('method', quickstart.METHODS)
def test_training_lowers_the_loss(results, method):
  r = results[method]
  values = [r['initial_train_loss'], r['final_train_loss'],
            r['test_accuracy'], r['update_seconds']]
  assert all(math.isfinite(v) for v in values), r
  assert r['skipped_steps'] == 0, r
  assert r['steps'] == EPOCHS * (1437 // 64)
  assert r['final_train_loss'] < r['initial_train_loss'], r
  # Ten classes: chance is 0.1; one epoch of either method does better.
  assert r['test_accuracy'] > 0.5, r


def test_methods_start_from_the_same_weights(results):
  # Same seed, same model: the loss before any step must agree exactly.
  assert (results['sibp']['initial_train_loss'] ==
          results['adam']['initial_train_loss'])


def test_main_writes_json(tmp_path, capsys):
  path = tmp_path / 'results.json'
  quickstart.main(['--epochs', '1', '--no_progress', '--json', str(path)])
  out = capsys.readouterr().out
  assert 'sibp' in out and 'adam' in out
  saved = json.loads(path.read_text())
  assert [r['method'] for r in saved['results']] == list(quickstart.METHODS)
  assert saved['settings']['epochs'] == 1


def test_unknown_method_is_an_error(data):
  with pytest.raises(ValueError, match='Unknown method'):
    quickstart.train('sgd', data, epochs=1, progress=False)
