"""Smoke tests of examples/train.py on TFDS mock data (no download).

Every model × optimizer trains one short epoch; the data pipeline's splits
and scaling, the metrics file, the plots and the messages for a dataset that
cannot be had are checked on tiny sizes to fit the CI budget.
"""

import functools
import json
import math
import os
import pathlib
import subprocess
import sys
import types

import pytest

pytest.importorskip('tensorflow_datasets')
pytest.importorskip('tqdm')
pytest.importorskip('sklearn')
pytest.importorskip('matplotlib')

import jax
import jax.numpy as jnp
import optax

import sibp_jax

import compare
import config as config_lib
import input_pipeline
import models
import optimizers
import steps
import train

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / 'examples'

# 24 mock examples per split: 4 held out for validation, 8 trained on in
# 2 steps of 4; small enough for every model × optimizer within the budget.
TINY = dict(dataset='mnist', mock_data=24, train_examples=8, batch_size=4,
            epochs=1, eval_batch_size=16, progress=False)
HISTORY_KEYS = {'epoch', 'train_loss', 'train_accuracy', 'val_loss',
                'val_accuracy', 'test_loss', 'test_accuracy', 'seconds',
                'train_examples_per_second', 'skipped_steps',
                'unconverged_solves'}
_LAYERWISE = {'sibp', 'sibp_paper', 'sibp_linearized', 'proxbp'}
# Every optimizer trains paper_mlp; the papers' larger models train with
# each layer-wise rule (linearized, paper, ProxBP) and with the
# plain-gradient path (adam), which is the same code for every first-order
# optimizer. (The ConvNet with adam is test_convnet_adapts_to_cifar_shapes.)
# The residual models, which are not chains, train with the graph sweep:
# ResNet-20 with SIBP and its usual baseline, the residual MLP with SIBP
# and ProxBP (ProxBP's graph sweep is the same code on either model, and
# ResNet-20's compilation is the costliest of the suite); the paper variant
# refuses them (test_paper_variant_refuses_resnet20). The ViT trains with
# SIBP: attention, embeddings and LayerNorm on the graph sweep.
_CHAINS = ('proxprop_mlp', 'proxprop_convnet')
CASES = ([('paper_mlp', o) for o in train.OPTIMIZERS]
         + [(m, o) for m in _CHAINS
            for o in ('sibp', 'sibp_paper', 'proxbp', 'adam')
            if (m, o) != ('proxprop_convnet', 'adam')]
         + [('resnet20', o) for o in ('sibp', 'sgd_momentum')]
         + [('residual_mlp', o) for o in ('sibp', 'proxbp')]
         + [('vit', 'sibp')])


@functools.cache
def _conv_support() -> bool:
  """Whether the library reads nnx.Conv layers as SIBP/ProxBP problems.

  Traced only (``jax.eval_shape``): the count of problems is static.
  """
  layers = []

  def count():
    model = models.create_model('proxprop_convnet', (8, 8, 1), 10)
    _, _, problems = sibp_jax.nnx.value_grad_and_problems(
        model, jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32),
        loss_fn=optax.softmax_cross_entropy_with_integer_labels)
    layers.append(len(problems.layers))
    return problems.output_error

  try:
    jax.eval_shape(count)
  except ValueError:
    return False
  return layers == [4]


@pytest.mark.parametrize(('model', 'optimizer'), CASES)
def test_every_model_and_optimizer_trains_one_epoch(tmp_path, model,
                                                    optimizer):
  if model == 'proxprop_convnet' and optimizer in _LAYERWISE:
    # Not only "runs": the conv layers must be SIBP/ProxBP layers, not
    # parameters that fall back to a plain gradient step.
    assert _conv_support(), 'nnx.Conv layers are not read as problems'
  out = tmp_path / 'metrics.json'
  metrics = train.train_and_evaluate(
      {**TINY, 'model': model, 'optimizer': optimizer,
       'metrics_out': str(out)})
  assert len(metrics['history']) == 1
  entry = metrics['history'][0]
  assert set(entry) == HISTORY_KEYS
  assert entry['epoch'] == 1
  for key in HISTORY_KEYS:
    assert entry[key] is not None and math.isfinite(entry[key]), (key, entry)
  assert entry['seconds'] > 0 and entry['train_examples_per_second'] > 0
  assert 0 <= entry['train_accuracy'] <= 1
  assert metrics['config']['learning_rate'] == (
      optimizers.default_learning_rate(optimizer))
  assert metrics['data']['train'] == 8
  assert metrics['data']['steps_per_epoch'] == 2
  assert json.loads(out.read_text()) == metrics


def test_paper_variant_refuses_resnet20():
  with pytest.raises(ValueError, match="'stem'"):
    train.train_and_evaluate({**TINY, 'model': 'resnet20',
                              'optimizer': 'sibp_paper'})


def test_mock_splits_and_scaling():
  data = input_pipeline.load('mnist', mock_data=30)
  # A fifth of the 30 training examples is held out (5,000 for real data).
  assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (24, 6, 30)
  assert data.input_shape == (28, 28, 1) and data.classes == 10
  assert data.x_train.dtype.name == 'float32'
  assert 0 <= data.x_train.min() and data.x_train.max() <= 1
  cifar = input_pipeline.load('cifar10', mock_data=30, train_examples=10)
  assert cifar.input_shape == (32, 32, 3)
  assert len(cifar.x_train) == 10
  # CIFAR-10 is divided by the training maximum.
  assert cifar.x_train.max() == pytest.approx(1.0)


def test_convnet_adapts_to_cifar_shapes(tmp_path):
  plot = tmp_path / 'plot.png'
  metrics = train.main(
      ['--dataset', 'cifar10', '--mock_data', '12', '--train_examples', '4',
       '--batch_size', '2', '--epochs', '2', '--model', 'proxprop_convnet',
       '--optimizer', 'adam', '--eval_batch_size', '8', '--no_progress',
       '--metrics_out', str(tmp_path / 'm.json'), '--plot_out', str(plot)])
  assert metrics['data']['input_shape'] == [32, 32, 3]
  assert [e['epoch'] for e in metrics['history']] == [1, 2]
  for entry in metrics['history']:
    assert set(entry) == HISTORY_KEYS
    assert all(entry[k] is not None and math.isfinite(entry[k])
               for k in HISTORY_KEYS), entry
  assert metrics['config']['learning_rate'] == 1e-3
  seconds = [e['seconds'] for e in metrics['history']]
  assert 0 < seconds[0] < seconds[1]  # cumulative
  assert plot.stat().st_size > 0
  # The metrics file is replaced atomically: no temporary file is left.
  assert sorted(p.name for p in tmp_path.iterdir()) == ['m.json', 'plot.png']


def test_metrics_are_written_after_every_epoch(tmp_path, monkeypatch):
  written = []
  original = train.checkpoints.write_json_atomic

  def spy(path, obj):
    original(path, obj)
    written.append(json.loads(pathlib.Path(path).read_text()))

  monkeypatch.setattr(train.checkpoints, 'write_json_atomic', spy)
  train.train_and_evaluate({**TINY, 'optimizer': 'sgd', 'epochs': 3,
                            'metrics_out': str(tmp_path / 'm.json')})
  assert [len(w['history']) for w in written] == [1, 2, 3]


def test_help_states_default_learning_rates(capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main(['--help'])
  assert exit_info.value.code == 0
  text = ' '.join(capsys.readouterr().out.split())
  for name in ('sibp 0.1', 'proxbp 1', 'sgd 0.1', 'nesterov 0.05',
               'adam 0.001', 'muon 0.02', 'schedule_free_adamw 0.003',
               'proxbp_adam 0.001'):
    assert name in text
  # On/off flags state no default: --no_progress's stored one is True.
  assert 'hide the progress bars --checkpoint_dir' in text


def test_bad_dataset_name_is_a_message(capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main(['--dataset', 'imagenet'])
  assert exit_info.value.code == 2
  assert 'invalid choice' in capsys.readouterr().err
  with pytest.raises(train.UsageError, match='digits, mnist'):
    train.train_and_evaluate({'dataset': 'imagenet'})


def test_unprepared_dataset_without_tensorflow_is_a_message(tmp_path,
                                                            monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # import fails
  bad = tmp_path / 'no_such_dir'
  with pytest.raises(SystemExit) as exit_info:
    train.main(['--dataset', 'mnist', '--data_dir', str(bad), '--epochs',
                '0', '--no_progress'])
  message = str(exit_info.value.code)
  assert 'mnist' in message and str(bad) in message
  assert 'TensorFlow' in message and '--data_dir' in message
  assert 'Traceback' not in message


def test_failed_download_is_a_message(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  def offline(self, *args, **kwargs):
    raise ConnectionError('no route to the dataset host')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      offline)
  try:
    import tensorflow  # noqa: F401  # pylint: disable=import-outside-toplevel
  except ImportError:  # the check for TensorFlow must pass: a stand-in
    monkeypatch.setitem(sys.modules, 'tensorflow',
                        types.ModuleType('tensorflow'))
  with pytest.raises(SystemExit) as exit_info:
    train.main(['--dataset', 'fashion_mnist', '--data_dir',
                str(tmp_path), '--epochs', '0'])
  message = str(exit_info.value.code)
  assert 'ConnectionError' in message and '--data_dir' in message
  assert 'examples/train.py --dataset fashion_mnist' in message


def test_the_script_exits_without_a_traceback(tmp_path):
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [str(EXAMPLES.parent), os.environ.get('PYTHONPATH', '')])}
  done = subprocess.run(
      [sys.executable, str(EXAMPLES / 'train.py'), '--dataset', 'mnist',
       '--train_examples', '0', '--mock_data', '10'],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  assert done.returncode == 1
  assert 'train_examples=0' in done.stderr
  assert 'Traceback' not in done.stderr


def test_compare_labels_and_figure(tmp_path):
  base = {'dataset': 'mnist', 'model': 'paper_mlp', 'learning_rate': 0.1,
          'metrics_out': 'a.json'}
  configs = [{**base, 'optimizer': 'sibp'},
             {**base, 'optimizer': 'proxbp', 'learning_rate': 1.0,
              'metrics_out': 'b.json'}]
  assert compare.labels(configs) == ['sibp learning_rate=0.1',
                                     'proxbp learning_rate=1.0']
  paths = []
  for i, config in enumerate(configs):
    entry = {'epoch': 1, 'train_loss': 1.0, 'train_accuracy': 0.5,
             'val_loss': None, 'val_accuracy': 0.4, 'test_loss': 1.2,
             'test_accuracy': 0.4, 'seconds': 1.5 + i}
    path = tmp_path / f'{i}.json'
    path.write_text(json.dumps({'config': config, 'history': [entry]}))
    paths.append(str(path))
  out = tmp_path / 'cmp.png'
  assert compare.main([*paths, '--out', str(out)]) == compare.labels(configs)
  assert out.stat().st_size > 0


@pytest.mark.parametrize('optimizer', ['sibp', 'adam'])
def test_sweep_equals_separate_runs(tmp_path, optimizer):
  """``--sweep a,b``: one vmapped program, the same runs as two separate.

  Tolerance: 1e-4 relative on the losses and accuracies after 2 epochs.
  The batched step is another XLA program than the single one (batched
  matmuls may sum in another order, a few float32 ulps per sum, which the
  exact solves amplify by the condition number of ``FᵀF + Λ``).
  """
  rates = (0.05, 0.5) if optimizer == 'sibp' else (1e-3, 1e-2)
  settings = {**TINY, 'epochs': 2, 'optimizer': optimizer}
  out = tmp_path / 'sweep.json'
  train.main(['--dataset', 'mnist', '--mock_data', '24', '--train_examples',
              '8', '--batch_size', '4', '--epochs', '2', '--eval_batch_size',
              '16', '--no_progress', '--optimizer', optimizer, '--sweep',
              ','.join(map(str, rates)), '--metrics_out', str(out)])
  sweep = json.loads(out.read_text())
  assert sweep['config']['sweep'] == list(rates)
  assert len(sweep['sweep']) == len(rates)
  for lr, run in zip(rates, sweep['sweep'], strict=True):
    single = train.train_and_evaluate({**settings, 'learning_rate': lr})
    assert run['config']['learning_rate'] == lr
    assert len(run['history']) == len(single['history']) == 2
    for got, want in zip([run['initial'], *run['history']],
                         [single['initial'], *single['history']],
                         strict=True):
      for key in ('train_loss', 'train_accuracy', 'val_loss', 'test_loss'):
        assert got[key] == pytest.approx(want[key], rel=1e-4), (lr, key)
  # The two rates are different runs.
  assert (sweep['sweep'][0]['history'][-1]['train_loss']
          != sweep['sweep'][1]['history'][-1]['train_loss'])


def test_sweep_refuses_checkpoints_and_a_learning_rate(tmp_path):
  with pytest.raises(SystemExit, match='not checkpointed'):
    train.main(['--dataset', 'digits', '--sweep', '0.1,1',
                '--checkpoint_dir', str(tmp_path / 'ck')])
  with pytest.raises(SystemExit, match='drop --learning_rate'):
    train.main(['--dataset', 'digits', '--sweep', '0.1,1',
                '--learning_rate', '0.1'])


def test_presets_set_defaults_that_flags_override():
  c = train.parse_args(['--preset', 'proxprop_mlp'])
  assert (c.model, c.batch_size, c.epochs) == ('proxprop_mlp', 500, 5)
  c = train.parse_args(['--preset', 'proxprop_convnet', '--epochs', '1'])
  assert (c.model, c.batch_size, c.epochs) == ('proxprop_convnet', 500, 1)
  assert train.parse_args([]) == config_lib.Config()


def test_schedule_free_is_evaluated_at_its_averaged_iterate(monkeypatch):
  """The registry's eval_params hook reaches the evaluation."""
  calls = []
  method = optimizers.METHODS['schedule_free_adamw']
  hook = method.eval_params

  def spy(opt_state, params):
    calls.append(type(opt_state).__name__)
    return hook(opt_state, params)

  monkeypatch.setitem(optimizers.METHODS, 'schedule_free_adamw',
                      optimizers.dataclasses.replace(method, eval_params=spy))
  train.train_and_evaluate({**TINY, 'optimizer': 'schedule_free_adamw'})
  assert calls and set(calls) == {'ScheduleFreeState'}


def test_unconverged_solves_are_counted_per_epoch():
  # Three CG steps do not reach the 1e-2 tolerance on the first layer's
  # problem (785 columns, 8 rows); the exact solve always converges.
  tiny = {**TINY, 'batch_size': 8, 'optimizer': 'proxbp'}  # 1 step
  cg = train.train_and_evaluate({**tiny, 'proxbp_solver': 'cg3'})
  exact = train.train_and_evaluate(tiny)
  assert 1 <= cg['history'][0]['unconverged_solves'] <= 2  # of 2 layers
  assert exact['history'][0]['unconverged_solves'] == 0


def test_cosine_schedule_decays_to_zero_over_the_run():
  hp = optimizers.Hyperparameters(schedule='cosine')
  tx = optimizers.create('sgd_momentum', 0.1, hp, total_steps=4)
  params = {'w': jnp.ones(3)}
  state = tx.init(params)
  grads = {'w': jnp.ones(3)}
  sizes = []
  for _ in range(6):
    update, state = tx.update(grads, state, params)
    sizes.append(float(jnp.abs(update['w'][0])))
  # Step 0 takes the full rate (times the gradient plus weight decay), the
  # steps from 4 on none.
  assert sizes[0] == pytest.approx(0.1 * (1 + 5e-4), rel=1e-6)
  assert sizes[4] == sizes[5] == 0.0
  with pytest.raises(ValueError, match='total_steps'):
    optimizers.create('sgd_momentum', 0.1, hp)
  c = train.parse_args(['--preset', 'resnet20', '--schedule', 'cosine'])
  assert (c.model, c.batch_size, c.schedule) == ('resnet20', 128, 'cosine')


def test_warmup_cosine_schedule_rises_from_zero_then_decays():
  hp = optimizers.Hyperparameters(schedule='warmup_cosine')
  tx = optimizers.create('sgd', 1.0, hp, total_steps=40)  # warm-up: 2
  params, grads = {'w': jnp.ones(())}, {'w': jnp.ones(())}
  state, sizes = tx.init(params), []
  for _ in range(41):
    update, state = tx.update(grads, state, params)
    sizes.append(-float(update['w']))
  assert sizes[:3] == pytest.approx([0.0, 0.5, 1.0])
  assert sizes[3] < 1.0 and sizes[40] == pytest.approx(0.0, abs=1e-6)
  assert all(a >= b for a, b in zip(sizes[2:], sizes[3:]))


def test_step_loss_is_every_batch_loss_before_its_update(tmp_path):
  """``step_loss``: one per step, in order, the first the initial model's
  loss on the first batch; a sweep keeps one list per rate; a run
  interrupted mid-epoch and resumed has the uninterrupted run's list."""
  settings = {**TINY, 'optimizer': 'sgd', 'epochs': 2}
  metrics = train.train_and_evaluate(settings)
  losses = metrics['step_loss']
  assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
  data = input_pipeline.load('mnist', mock_data=24, train_examples=8)
  model = models.create_model('paper_mlp', data.input_shape, data.classes)
  first = steps.epoch_batches(8, 4, 0, 0)[0]
  want = jnp.mean(steps.LOSS(model(jnp.asarray(data.x_train[first])),
                             jnp.asarray(data.y_train[first])))
  assert losses[0] == pytest.approx(float(want), rel=1e-5)
  # Interrupted after step 3 (epoch 2, step 1), then resumed.
  ck = {**settings, 'checkpoint_dir': str(tmp_path / 'ck')}
  with pytest.raises(train.Interrupted):
    train.train_and_evaluate({**ck, 'stop_after_steps': 3})
  resumed = train.train_and_evaluate({**ck, 'resume': True})
  assert resumed['step_loss'] == losses
  sweep = train.train_and_evaluate({**settings, 'learning_rate': None,
                                    'sweep': (0.1, 0.01)})
  runs = [r['step_loss'] for r in sweep['sweep']]
  assert [len(r) for r in runs] == [4, 4]
  assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)  # one batch
  assert runs[0] == pytest.approx(losses, rel=1e-4)
  assert runs[0][-1] != runs[1][-1]


def test_compare_draws_the_step_losses(tmp_path):
  assert compare.smoothed([1.0, 2.0, 3.0, None, 5.0], 2).tolist()[:2] == [
      1.5, 2.5]
  assert compare.smoothed([1.0, 2.0], 5).tolist() == [1.0, 2.0]
  paths = []
  for i, losses in enumerate(([4.0, 3.5, 3.0, 2.9], [4.0, 3.0, None, 2.0])):
    path = tmp_path / f'{i}.json'
    path.write_text(json.dumps({
        'config': {'optimizer': 'sibp', 'learning_rate': 0.1 * (i + 1)},
        'history': [], 'step_loss': losses}))
    paths.append(str(path))
  out = tmp_path / 'steps.png'
  compare.main([*paths, '--steps', '--bits', '--smooth', '2', '--out',
                str(out)])
  assert out.stat().st_size > 0
  old = tmp_path / 'old.json'
  old.write_text(json.dumps({'config': {'optimizer': 'sgd'},
                             'history': []}))
  with pytest.raises(SystemExit):
    compare.main([str(old), '--steps', '--out', str(tmp_path / 'x.png')])
