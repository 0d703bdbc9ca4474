"""Checkpoints and resuming of examples/train.py, held to bitwise equality.

An interrupted run resumed from its orbax checkpoint must end with the very
parameters (and optimizer state) of an uninterrupted run: on one machine
every step is a deterministic function of the state and of a batch order
fixed by ``(seed, epoch)``, so any difference means something was not saved
or not restored. The reference is an uninterrupted in-process run; resumed
runs go through a fresh process (the script), an in-process interruption
after a given step, and a real SIGINT. Sizes are tiny (scikit-learn's digits,
64 training images, 16 steps of 4 per epoch) to fit the CI budget.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip('orbax.checkpoint')
pytest.importorskip('sklearn')
pytest.importorskip('tqdm')

import checkpoints
import train

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / 'examples'

# 16 steps of 4 per epoch; the evaluation batch covers a split at once.
ARGS = ['--dataset', 'digits', '--train_examples', '64', '--batch_size', '4',
        '--eval_batch_size', '512', '--no_progress']
EPOCHS = 2


@pytest.fixture(scope='module')
def script(tmp_path_factory):
  """Starts examples/train.py in a fresh process: ``script(*args)``.

  The processes share a persistent compilation cache (this module's own),
  which halves their start-up; it stores the compiled programs, so a cached
  step computes what a fresh compilation does.
  """
  env = {**os.environ,
         'PYTHONPATH': os.pathsep.join([str(EXAMPLES.parent),
                                        os.environ.get('PYTHONPATH', '')]),
         'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('jax')),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1'}

  def start(*args):
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / 'train.py'), *ARGS, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

  return start


def _finish(process, timeout=120):
  out, err = process.communicate(timeout=timeout)
  return process.returncode, out, err


def _params(path) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    # Bitwise, not close: a resumed run must be the same computation.
    assert np.array_equal(a[key], b[key]), key


def _checkpoint(directory) -> tuple[dict[str, np.ndarray], dict]:
  """The latest checkpoint's state leaves (by path) and its progress."""
  import jax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  manager = checkpoints.checkpoint_manager(str(directory))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore())).state
  progress = checkpoints.read_progress(manager, step)
  manager.close()
  leaves = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path(state)[0]}
  return leaves, progress


def _run(tmp, optimizer, *extra):
  """An in-process run of ``EPOCHS`` epochs; returns its files."""
  tmp.mkdir(parents=True, exist_ok=True)
  files = {'params': tmp / 'params.npz', 'metrics': tmp / 'metrics.json',
           'checkpoints': tmp / 'checkpoints'}
  train.main([*ARGS, '--optimizer', optimizer, '--epochs', str(EPOCHS),
              '--params_out', str(files['params']),
              '--metrics_out', str(files['metrics']),
              '--checkpoint_dir', str(files['checkpoints']), *extra])
  return files


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """Uninterrupted runs, one per optimizer, made on first use."""
  runs = {}

  def get(optimizer):
    if optimizer not in runs:
      runs[optimizer] = _run(tmp_path_factory.mktemp(optimizer), optimizer)
    return runs[optimizer]

  return get


@pytest.mark.parametrize('optimizer', ['sibp', 'adam'])
def test_same_seed_is_bitwise_equal(tmp_path, reference, optimizer):
  first = reference(optimizer)
  again = _run(tmp_path, optimizer)
  _assert_bitwise_equal(_params(first['params']), _params(again['params']))
  state, progress = _checkpoint(first['checkpoints'])
  _assert_bitwise_equal(state, _checkpoint(again['checkpoints'])[0])
  assert (progress['epoch'], progress['step']) == (EPOCHS, 0)
  assert progress['global_step'] == EPOCHS * 16
  # Not vacuous: training moved the parameters away from another seed's.
  other = tmp_path / 'seed1.npz'
  train.main([*ARGS, '--optimizer', optimizer, '--epochs', '0', '--seed',
              '1', '--params_out', str(other)])
  assert not np.array_equal(_params(other)['hidden/kernel'],
                            _params(again['params'])['hidden/kernel'])


def test_sigint_leaves_a_resumable_checkpoint(tmp_path, reference, script):
  ck, metrics = tmp_path / 'checkpoints', tmp_path / 'metrics.json'
  process = script('--optimizer', 'sibp', '--epochs', '1000',
                    '--checkpoint_dir', str(ck), '--metrics_out',
                    str(metrics))
  # A real Ctrl-C once the first epoch is reported; where it lands (mid
  # epoch or in an evaluation) depends on timing, and either must resume.
  deadline = time.monotonic() + 120
  for line in process.stdout:
    if line.startswith('epoch   1 '):
      break
    assert time.monotonic() < deadline
  else:
    pytest.fail(f'no epoch finished: {_finish(process)}')
  process.send_signal(signal.SIGINT)
  rc, _, err = _finish(process)
  assert rc == train.INTERRUPTED_STATUS, err
  assert 'Traceback' not in err
  assert 'checkpoint saved in' in err and '--resume' in err
  _, progress = _checkpoint(ck)
  done = progress['epoch']
  saved = json.loads(metrics.read_text())
  assert [e['epoch'] for e in saved['history']] == list(range(1, done + 1))
  # Finish the interrupted epoch and compare with an uninterrupted run.
  epochs = done + 1
  if epochs == EPOCHS:
    ref_params = reference('sibp')['params']
  else:
    ref_params = tmp_path / 'ref.npz'
    train.main([*ARGS, '--epochs', str(epochs), '--params_out',
                str(ref_params)])
  train.main([*ARGS, '--epochs', str(epochs), '--checkpoint_dir', str(ck),
              '--resume', '--params_out', str(tmp_path / 'p.npz')])
  _assert_bitwise_equal(_params(ref_params), _params(tmp_path / 'p.npz'))


def test_resume_in_a_fresh_process_is_bitwise_equal(tmp_path, reference,
                                                    script):
  # ProxBP's Nesterov outer step has a momentum trace that must come back
  # with the parameters; SIBP's state is its count and info.
  optimizers = ('sibp', 'proxbp')
  dirs = {o: tmp_path / o for o in optimizers}
  # The two optimizers' processes run side by side to save wall time.
  first = {o: script('--optimizer', o, '--epochs', '1', '--checkpoint_dir',
                      str(dirs[o] / 'checkpoints'), '--metrics_out',
                      str(dirs[o] / 'metrics.json')) for o in optimizers}
  for process in first.values():
    rc, _, err = _finish(process)
    assert rc == 0, err
  resumed = {o: script('--optimizer', o, '--epochs', str(EPOCHS),
                        '--checkpoint_dir', str(dirs[o] / 'checkpoints'),
                        '--metrics_out', str(dirs[o] / 'metrics.json'),
                        '--params_out', str(dirs[o] / 'params.npz'),
                        '--resume') for o in optimizers}
  for o, process in resumed.items():
    rc, out, err = _finish(process)
    assert rc == 0, err
    assert 'Resumed from' in out and 'step 16: epoch 2, step 0 of 16' in out
    ref = reference(o)
    _assert_bitwise_equal(_params(ref['params']),
                          _params(dirs[o] / 'params.npz'))
    ref_state, ref_progress = _checkpoint(ref['checkpoints'])
    state, progress = _checkpoint(dirs[o] / 'checkpoints')
    _assert_bitwise_equal(ref_state, state)  # optimizer state included
    assert progress['global_step'] == ref_progress['global_step'] == 32
    if o == 'proxbp':
      assert any('trace' in key for key in state), sorted(state)
    history = json.loads((dirs[o] / 'metrics.json').read_text())['history']
    ref_history = json.loads(ref['metrics'].read_text())['history']
    assert [e['epoch'] for e in history] == [1, 2]
    for entry, ref_entry in zip(history, ref_history):
      for key in ('train_loss', 'val_loss', 'test_accuracy'):
        assert entry[key] == ref_entry[key], (o, key)


def test_interruption_mid_epoch_resumes_bitwise(tmp_path, reference):
  ck, metrics = tmp_path / 'checkpoints', tmp_path / 'metrics.json'
  config = dict(dataset='digits', train_examples=64, batch_size=4,
                eval_batch_size=512, progress=False, optimizer='sibp',
                epochs=EPOCHS, checkpoint_dir=str(ck),
                metrics_out=str(metrics))
  # As a Ctrl-C after the 21st step: epoch 2, after its 5th step.
  with pytest.raises(train.Interrupted, match='--resume') as info:
    train.train_and_evaluate({**config, 'stop_after_steps': 21})
  assert info.value.checkpoint_step == 21
  assert 'epoch 2 after step 5 of 16' in info.value.message
  _, progress = _checkpoint(ck)
  assert (progress['epoch'], progress['step']) == (1, 5)
  # The finished epoch's metrics are on disk; the partial one is not.
  saved = json.loads(metrics.read_text())
  assert [e['epoch'] for e in saved['history']] == [1]
  assert progress['metrics']['history'] == saved['history']
  out = train.train_and_evaluate({**config, 'resume': True,
                                  'params_out': str(tmp_path / 'p.npz')})
  assert [e['epoch'] for e in out['history']] == [1, 2]
  assert json.loads(metrics.read_text()) == out
  ref = reference('sibp')
  _assert_bitwise_equal(_params(ref['params']), _params(tmp_path / 'p.npz'))
  _assert_bitwise_equal(_checkpoint(ref['checkpoints'])[0],
                        _checkpoint(ck)[0])


def test_resume_with_other_settings_is_refused(reference, capsys):
  ck = str(reference('sibp')['checkpoints'])
  with pytest.raises(SystemExit) as info:
    train.main([*ARGS[:4], '--batch_size', '8', *ARGS[6:], '--optimizer',
                'adam', '--epochs', '3', '--checkpoint_dir', ck, '--resume'])
  message = str(info.value.code)
  assert message.startswith('train.py: error: cannot resume from')
  for setting in ("optimizer (checkpoint 'sibp', command line 'adam')",
                  'batch_size (checkpoint 4, command line 8)',
                  'learning_rate (checkpoint 0.1, command line 0.001)'):
    assert setting in message
  assert 'seed' not in message  # only what differs is named
  # Without --resume, a directory holding checkpoints is not overwritten.
  with pytest.raises(SystemExit, match='pass --resume'):
    train.main([*ARGS, '--epochs', '3', '--checkpoint_dir', ck])
  assert _checkpoint(ck)[1]['global_step'] == 32


def test_resume_without_a_checkpoint_starts_afresh(tmp_path, capsys):
  train.main([*ARGS, '--epochs', '0', '--checkpoint_dir',
              str(tmp_path / 'none'), '--resume'])
  assert 'No checkpoint in' in capsys.readouterr().out
  with pytest.raises(SystemExit, match='--resume needs --checkpoint_dir'):
    train.main([*ARGS, '--resume'])
