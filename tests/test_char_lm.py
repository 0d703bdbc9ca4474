"""The character language model example: data, model and a smoke run.

``tiny_shakespeare`` comes from ``tfds.testing.mock_data`` (no download):
each split is then a few short random strings of the letters ``a``–``j``
and spaces, which the pipeline joins by newlines into one text, as the
real dataset holds one text per split.
"""

import math

import pytest

pytest.importorskip('tensorflow_datasets')
pytest.importorskip('tqdm')

import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

import input_pipeline
import models
import train
from checkpoints import UsageError

TINY = dict(dataset='tiny_shakespeare', model='char_lm', mock_data=48,
            seq_len=12, train_examples=16, batch_size=8, epochs=2,
            eval_batch_size=32, progress=False)


def _mock_train_text(examples):
  """The mock train split's text, read here without the pipeline."""
  with tfds.testing.mock_data(num_examples=examples):
    source = tfds.builder('tiny_shakespeare').as_data_source(split='train')
    return '\n'.join(source[k]['text'] for k in range(len(source)))


def test_char_windows_are_next_character_pairs():
  x, y = input_pipeline.char_windows('abcabxab', 'abc', 3)
  # x: 'abc', 'abx'; y: 'bca', 'bxa'; 'x' is not in the vocabulary: id 3.
  np.testing.assert_array_equal(x, [[0, 1, 2], [0, 1, 3]])
  np.testing.assert_array_equal(y, [[1, 2, 0], [1, 3, 0]])
  assert x.dtype == y.dtype == np.int32
  # Too short for one window of seq_len + 1 characters: none.
  assert input_pipeline.char_windows('abc', 'abc', 3)[0].shape == (0, 3)


def test_mock_tiny_shakespeare_is_the_split_text_in_windows():
  data = input_pipeline.load('tiny_shakespeare', mock_data=30, seq_len=8)
  text = _mock_train_text(30)
  assert data.vocabulary == ''.join(sorted(set(text)))
  assert data.classes == len(data.vocabulary)  # mock splits share letters
  assert data.input_shape == (8,)
  for x, y in ((data.x_train, data.y_train), (data.x_val, data.y_val),
               (data.x_test, data.y_test)):
    assert x.dtype == y.dtype == np.int32 and x.shape == y.shape
    assert len(x) and x.shape[1] == 8
    # Targets are the inputs shifted by one; windows follow each other.
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    np.testing.assert_array_equal(x[1:, 0], y[:-1, -1])
  # The first character and every target spell the text from its start.
  spelled = ''.join(data.vocabulary[i] for i in
                    [data.x_train[0, 0], *data.y_train.reshape(-1)])
  assert len(spelled) == len(data.x_train) * 8 + 1
  assert text.startswith(spelled)
  assert len(text) - len(spelled) < 8
  short = input_pipeline.load('tiny_shakespeare', mock_data=30, seq_len=8,
                              train_examples=5)
  np.testing.assert_array_equal(short.x_train, data.x_train[:5])


def test_char_lm_is_causal_and_predicts_every_token():
  model = models.create_model('char_lm', (10,), 7)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 7, size=(3, 10)), jnp.int32)
  logits = model(ids)
  assert logits.shape == (3, 10, 7)
  changed = model(ids.at[:, 6].set((ids[:, 6] + 1) % 7))
  moved = np.abs(np.asarray(changed - logits)).max(axis=(0, 2))
  assert not moved[:6].any(), moved  # tokens before 6 do not see it
  assert moved[6:].min() > 0, moved
  with pytest.raises(ValueError, match='more than its context of 10'):
    model(jnp.zeros((1, 11), jnp.int32))
  with pytest.raises(ValueError, match='char_lm needs token sequences'):
    models.create_model('char_lm', (28, 28, 1), 10)


@pytest.mark.parametrize('optimizer', ['sibp', 'adamw'])
def test_char_lm_trains_on_mock_tiny_shakespeare(optimizer):
  metrics = train.train_and_evaluate({**TINY, 'optimizer': optimizer})
  assert metrics['data']['steps_per_epoch'] == 2
  classes = metrics['data']['classes']
  initial, history = metrics['initial'], metrics['history']
  # An untrained model is close to guessing: per-token loss near log(V).
  assert abs(initial['train_loss'] - math.log(classes)) < 0.5, initial
  for entry in history:
    for key, value in entry.items():
      assert value is not None and math.isfinite(value), (key, entry)
    assert entry['skipped_steps'] == 0
    assert 0 <= entry['train_accuracy'] <= 1
  losses = [initial['train_loss']] + [e['train_loss'] for e in history]
  assert losses[-1] < losses[0], losses


def test_text_data_needs_a_sequence_model():
  for model, dataset in (('paper_mlp', 'tiny_shakespeare'),
                         ('char_lm', 'mnist')):
    with pytest.raises(UsageError, match='does not fit'):
      train.train_and_evaluate({**TINY, 'model': model, 'dataset': dataset})


def test_char_lm_preset():
  c = train.parse_args(['--preset', 'char_lm', '--seq_len', '32'])
  assert (c.model, c.dataset, c.seq_len) == ('char_lm', 'tiny_shakespeare',
                                             32)
