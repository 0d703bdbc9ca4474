"""examples/reproduce.py: the grid runs, skips finished runs, and summarizes."""

import json
import math
import os

import numpy as np
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


def test_selection_by_validation_loss(tmp_path):
  """The lowest final validation loss picks the rate; a NaN one never."""
  paths = [_metrics(tmp_path / f'sgd_lr{lr:g}_seed0.json', lr, loss)
           for lr, loss in ((0.1, 0.5), (1.0, 0.3), (3.0, 0.2))]
  for path, val_loss in zip(paths, (0.6, 0.7, None)):
    with open(path) as f:
      metrics = json.load(f)
    metrics['history'][-1]['val_loss'] = val_loss
    with open(path, 'w') as f:
      json.dump(metrics, f)
  assert reproduce.summarize(paths)[1]['sgd']['lr'] == 3.0
  assert reproduce.summarize(paths, 'val_loss')[1]['sgd']['lr'] == 0.1


def test_every_run_table_reads_the_step_losses(tmp_path):
  """Bits are the loss over ln 2; the last window's mean against the
  lowest one (and the step it ends at) tells a loss that turned back up."""
  ln2 = math.log(2)
  path = tmp_path / 'sibp_lambda10_lr0.3_seed0.json'
  # Batch losses (in bits) 5, 4, 3, 2, 3, 4: lowest 2-step mean 2.5 at
  # step 4 or 5, the last one 3.5.
  entry = {'train_loss': 2.0 * ln2, 'val_loss': 2.5 * ln2,
           'test_accuracy': 0.5, 'seconds': 1.0, 'skipped_steps': 1}
  path.write_text(json.dumps({
      'config': {'learning_rate': 0.3, 'seed': 0},
      'history': [entry],
      'step_loss': [v * ln2 for v in (5, 4, 3, 2, 3, 4)]}))
  table = reproduce.every_run([str(path)], window=2)
  assert table.splitlines()[0].startswith('| method | learning rate |')
  assert table.splitlines()[2] == (
      '| sibp_lambda10 | 0.3 | 0 | 2.500 | 2.000 | 3.500 | 2.500 (4) | 1 |')
  # A run without per-step losses (an older file) shows dashes there.
  path.write_text(json.dumps({'config': {'learning_rate': 0.3},
                              'history': [{**entry, 'val_loss': None}]}))
  assert reproduce.every_run([str(path)]).splitlines()[2] == (
      '| sibp_lambda10 | 0.3 | 0 | – | 2.000 | – | – | 1 |')


def test_char_lm_fortunes_setting_on_a_text_file(tmp_path):
  """--text_file reaches every run; the preset's lambda reaches SIBP."""
  rng = np.random.default_rng(0)
  words = ['the ', 'cat ', 'sat ', 'on ', 'a mat\n']
  text = ''.join(words[i] for i in rng.integers(0, len(words), 900))
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(text, encoding='utf-8')
  out = tmp_path / 'runs'
  argv = ['--setting', 'char_lm_fortunes', '--dataset', 'text_file',
          '--text_file', str(corpus), '--out_dir', str(out), '--seeds', '0',
          '--train_examples', '32', '--methods', 'sibp_lambda10',
          '--middle_rate_only', '--select', 'val_loss', '--every_run']
  reproduce.main(argv)
  rates = reproduce.config_lib.PRESETS['char_lm_fortunes']['methods'][
      'sibp_lambda10'][2]
  lr = rates[len(rates) // 2]
  metrics = json.loads((out / f'sibp_lambda10_lr{lr:g}_seed0.json')
                       .read_text())
  config = metrics['config']
  assert (config['text_file'], config['lambda_w'], config['lambda_b'],
          config['batch_size'], config['seq_len']) == (str(corpus), 10.0,
                                                       10.0, 32, 64)
  assert metrics['data']['steps_per_epoch'] == 1
  assert len(metrics['step_loss']) == 1
  runs = (out / 'runs.md').read_text().splitlines()
  assert len(runs) == 3
  assert runs[2].startswith(f'| sibp_lambda10 | {lr:g} | 0 |')
