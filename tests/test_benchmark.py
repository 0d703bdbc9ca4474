"""Smoke test of examples/benchmark.py: every section, --quick, mock data.

Runs ``benchmark.main(['--quick', ...])`` on synthetic data (no dataset
needed), the SIBP authors' small network only and a subset of the methods
(every method's step is the one of ``steps.py``, and every registry entry
trains in ``test_train.py``), and checks the JSON keys and that the ratios
are finite; the numbers themselves are the benchmark's business.
"""

import json
import math
import re

import pytest

import benchmark

# SIBP (the problems path), schedule-free AdamW (evaluated at its averaged
# iterate), SGD (the robustness reference) and Adam (the time reference).
METHODS = ['sibp_linearized', 'sgd', 'schedule_free_adamw', 'adam']


def _finite(v):
  return v is not None and math.isfinite(v)


def test_quick_benchmark_reports_every_section(tmp_path):
  out = benchmark.main([
      '--quick', '--section', 'all', '--models', 'paper_mlp',
      '--methods', ','.join(METHODS), '--mock_data', '300',
      '--train_examples', '300', '--grid_points', '3',
      '--json', str(tmp_path / 'b.json'),
      '--markdown', str(tmp_path / 'b.md')])
  assert json.loads((tmp_path / 'b.json').read_text()) == json.loads(
      json.dumps(out))
  text = (tmp_path / 'b.md').read_text()
  for heading in ('Step cost', 'One epoch', 'Time to target',
                  'Step-size robustness'):
    assert heading in text

  step = out['step']['paper_mlp']
  assert set(step) == {'batch', 'rounds', 'methods'}
  assert list(step['methods']) == METHODS
  for row in step['methods'].values():
    assert set(row) == {'median_ms', 'ratio_to_adam', 'temp_bytes',
                        'memory_ratio_to_adam', 'flops',
                        'flops_ratio_to_adam', 'compile_seconds',
                        'largest_array'}
    assert row['compile_seconds'] > 0
    # The MLP's largest array at batch 100: its 784 × 500 kernel at least.
    shape = row['largest_array'].split('[')[1].split(']')[0]
    assert math.prod(int(d) for d in shape.split(',')) >= 784 * 500
    # XLA:CPU reports a cost analysis; a step does at least Adam's forward
    # pass and gradient, so no method counts far fewer flops.
    assert row['flops'] > 0 and row['flops_ratio_to_adam'] > 0.5
    assert _finite(row['ratio_to_adam']) and row['ratio_to_adam'] > 0
    if row['temp_bytes'] is not None:
      assert _finite(row['memory_ratio_to_adam'])
  assert step['methods']['adam']['ratio_to_adam'] == 1.0

  for row in out['epoch'].values():
    assert all(_finite(row[k]) for k in ('start_loss', 'train_loss',
                                         'update_seconds'))

  target = out['target']
  assert _finite(target['target_loss'])
  assert list(target['methods']) == METHODS
  for row in target['methods'].values():
    assert set(row) >= {'learning_rate', 'rate_source', 'reached', 'epochs',
                        'update_seconds', 'epochs_ratio_to_adam',
                        'update_seconds_ratio_to_adam', 'final_loss'}
    if row['reached']:
      assert _finite(row['epochs_ratio_to_adam'])
      assert _finite(row['update_seconds_ratio_to_adam'])
    else:
      assert row['epochs'] is None and row['epochs_ratio_to_adam'] is None
  assert target['methods']['adam']['reached']
  assert target['methods']['adam']['epochs_ratio_to_adam'] == 1.0
  # Without --table the rate is the best of the registry's grid.
  sgd = target['methods']['sgd']
  assert sgd['learning_rate'] in (0.03, 0.1, 0.3)
  # The source lists the grid with each rate's loss; the chosen is lowest.
  found = re.findall(r'([\d.e+-]+) \(([\d.e+-]+|inf)\)', sgd['rate_source'])
  assert [float(lr) for lr, _ in found] == [0.03, 0.1, 0.3]
  losses = {float(lr): float(loss) for lr, loss in found}
  assert losses[sgd['learning_rate']] == min(losses.values())

  rob = out['robustness']
  assert len(rob['learning_rates']) == 3
  assert rob['learning_rates'][0] == 1e-4 and rob['learning_rates'][-1] == (
      1e4)
  for row in [*rob['methods'].values(), *rob['lambda_at_eta_0.1'].values()]:
    assert len(row['train_losses']) == len(row['test_accuracies']) == 3
    assert 0 <= row['best_test_accuracy'] <= 1
    assert row['accuracy_range'] >= 1 and row['loss_range'] >= 1
  for row in rob['methods'].values():
    assert _finite(row['accuracy_range_ratio_to_sgd'])
  assert rob['methods']['sgd']['loss_range_ratio_to_sgd'] == 1.0


def test_learning_rates_from_the_reproduction_table(tmp_path):
  table = tmp_path / 'table.md'
  table.write_text(
      '| method | learning rate (grid) | final train loss |\n'
      '|---|---|---|\n'
      '| proxbp | 3 (0.3, 1, 3) | 0.1 |\n'
      '| adam | 0.001 (0.0003, 0.001, 0.003) | 0.2 |\n')
  rates = benchmark.best_learning_rates(['proxbp', 'proxbp_cg3', 'adam'],
                                        None, None, str(table))
  assert rates['proxbp']['learning_rate'] == 3.0
  assert rates['proxbp_cg3']['learning_rate'] == 3.0
  assert 'row proxbp' in rates['proxbp_cg3']['source']
  assert rates['adam']['learning_rate'] == 1e-3
  # A method without a row is an error, not a silent default.
  with pytest.raises(ValueError, match='no row for sgd'):
    benchmark.best_learning_rates(['sgd'], None, None, str(table))


def test_stable_ranges():
  # Accuracy within 0.05 of the best and loss within 1.5× of the best, over
  # consecutive values only; a NaN loss breaks the run.
  values = [1e-2, 1e-1, 1.0, 10.0, 100.0]
  np = __import__('numpy')
  got = benchmark.stable_ranges(
      values, np.array([1.0, 0.5, 0.6, np.nan, 0.7]),
      np.array([0.5, 0.80, 0.78, 0.1, 0.77]))
  assert got['accuracy_stable'] == (0.1, 1.0)
  assert got['loss_stable'] == (0.1, 1.0)
  assert got['best_train_loss'] == 0.5 and got['train_losses'][3] is None


def test_working_range():
  rates = [1e-3, 1e-2, 1e-1, 1.0]
  works = __import__('numpy').array([True, False, True, True])
  assert benchmark.working_range(rates, works) == (10.0, (0.1, 1.0))
  assert benchmark.working_range(rates, ~works | True)[0] == 1e3


def test_tuned_epoch_runs_each_method_at_its_grids_best():
  """--tune: every method at the best rate of its grid (the benchmark's
  own grids for the cosine entries), the grid's losses in the table."""
  out = benchmark.main([
      '--quick', '--section', 'epoch', '--tune', '--mock_data', '300',
      '--methods', 'sibp_adam_cosine,sgd'])['epoch']
  assert list(out) == ['sibp_adam_cosine', 'sgd', 'adam']
  cosine = out['sibp_adam_cosine']
  assert cosine['learning_rate'] in benchmark.GRIDS['sibp_adam_cosine']
  for row in out.values():
    found = re.findall(r'([\d.e+-]+) \(([\d.e+-]+|inf)\)', row['grid'])
    losses = {float(lr): float(loss) for lr, loss in found}
    assert len(losses) == 3
    assert losses[row['learning_rate']] == min(losses.values())
    # The timed run repeats the tuning run's at the chosen rate.
    assert row['train_loss'] == pytest.approx(losses[row['learning_rate']],
                                              rel=1e-2)
