"""The character language model example: data, model and a smoke run.

``tiny_shakespeare`` comes from ``tfds.testing.mock_data`` (no download):
each split is then a few short random strings of the letters ``a``–``j``
and spaces, which the pipeline joins by newlines into one text, as the
real dataset holds one text per split. The ``text_file`` dataset reads a
small text generated here into ``tmp_path``.
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


TEXT_TINY = {**TINY, 'dataset': 'text_file', 'mock_data': None,
             'train_examples': None, 'seq_len': 8, 'batch_size': 4,
             'validation_fraction': 0.2}


def _text(characters=1000, seed=0, alphabet='abcdé ü\n日'):
  """A random text of ``alphabet`` with a few repeated words (learnable)."""
  rng = np.random.default_rng(seed)
  words = ['the ', 'cat ', 'sat ', 'on ', 'a mat\n']
  pieces = [words[i % len(words)] if rng.random() < 0.7
            else str(rng.choice(list(alphabet))) for i in range(characters)]
  return ''.join(pieces)[:characters]


def _write(path, text):
  path.write_bytes(text.encode('utf-8'))
  return str(path)


def _spell(vocabulary, x, y):
  """The text that windows ``x``, ``y`` cover, from their first character."""
  return ''.join(vocabulary[i] for i in [x[0, 0], *y.reshape(-1)])


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


def test_text_file_holds_out_its_tail_for_validation(tmp_path):
  # The last fifth (200 characters) starts with a character ('Z') that the
  # rest lacks: no training window may contain its id.
  head = _text(800)
  tail = 'Z' + _text(199, seed=1)
  text = head + tail
  path = _write(tmp_path / 'corpus.txt', text)
  data = input_pipeline.load('text_file', text_file=path, seq_len=8,
                             validation_fraction=0.2)
  assert data.vocabulary == ''.join(sorted(set(text)))
  assert 'é' in data.vocabulary and '日' in data.vocabulary  # UTF-8 read
  assert data.classes == len(data.vocabulary)  # no unknown id
  assert data.input_shape == (8,)
  assert len(data.x_train) == (800 - 1) // 8
  assert len(data.x_val) == (200 - 1) // 8
  for x, y in ((data.x_train, data.y_train), (data.x_val, data.y_val),
               (data.x_test, data.y_test)):
    assert x.dtype == y.dtype == np.int32 and x.shape == y.shape
    assert x.shape[1] == 8 and x.min() >= 0 and x.max() < data.classes
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
  # Training windows spell the head from its start, validation windows the
  # tail from its start; the test split is the validation split.
  train_text = _spell(data.vocabulary, data.x_train, data.y_train)
  val_text = _spell(data.vocabulary, data.x_val, data.y_val)
  assert head.startswith(train_text) and len(head) - len(train_text) < 8
  assert tail.startswith(val_text) and len(tail) - len(val_text) < 8
  z = data.vocabulary.index('Z')
  assert z not in data.x_train and z not in data.y_train
  assert data.x_val[0, 0] == z
  np.testing.assert_array_equal(data.x_test, data.x_val)
  np.testing.assert_array_equal(data.y_test, data.y_val)
  # The default holds out a tenth; the model takes the batches as they are.
  default = input_pipeline.load('text_file', text_file=path, seq_len=8)
  assert len(default.x_val) == (100 - 1) // 8
  assert default.vocabulary == data.vocabulary
  model = models.create_model('char_lm', data.input_shape, data.classes)
  assert model(jnp.asarray(data.x_train[:4])).shape == (4, 8, data.classes)


def test_text_files_of_a_directory_and_a_list(tmp_path):
  corpus = tmp_path / 'corpus'
  (corpus / 'sub').mkdir(parents=True)
  b = _write(corpus / 'b', 'second\n')
  a = _write(corpus / 'a', 'first')  # no final newline: one is added
  (corpus / 'a.dat').write_bytes(bytes(range(256)))  # fortune's index
  (corpus / 'a.u8').symlink_to('a')  # fortune's UTF-8 name of the same file
  _write(corpus / '.hidden', 'hidden\n')
  _write(corpus / 'sub' / 'c', 'in a subdirectory\n')
  other = _write(tmp_path / 'other.txt', 'other')
  assert input_pipeline.text_files(str(corpus)) == [a, b]
  assert input_pipeline.read_text_files(str(corpus)) == 'first\nsecond\n'
  # A list is read in sorted order too, each file once.
  listed = f'{other}, {corpus},{a}'
  assert input_pipeline.text_files(listed) == [a, b, other]
  assert (input_pipeline.read_text_files(listed)
          == 'first\nsecond\nother')


def test_text_file_errors_name_the_file(tmp_path):
  missing = str(tmp_path / 'missing.txt')
  empty = _write(tmp_path / 'empty.txt', '')
  short = _write(tmp_path / 'short.txt', 'x' * 40)
  latin1 = tmp_path / 'latin1.txt'
  latin1.write_bytes('caf\xe9 au lait\n'.encode('latin-1'))
  binary = tmp_path / 'index.dat'
  binary.write_bytes(b'text\0\0\0\1')
  (tmp_path / 'nothing').mkdir()
  load = lambda path, **kw: input_pipeline.load(
      'text_file', text_file=path, seq_len=8, **kw)
  cases = [(missing, 'missing.txt.*does not exist'),
           (empty, 'empty.txt.*is empty'),
           # 40 characters: 36 to train on, 4 (< 9) to validate.
           (short, 'short.txt.*too short.*36 to train on and 4'),
           (str(latin1), 'latin1.txt.*not valid UTF-8'),
           (str(binary), 'index.dat.*NUL byte'),
           (str(tmp_path / 'nothing'), 'nothing.*holds no text files'),
           (f'{short},{missing}', 'missing.txt.*does not exist')]
  for path, message in cases:
    with pytest.raises(ValueError, match=message):
      load(path)
  load(short, validation_fraction=0.5)  # 20 and 20: long enough
  with pytest.raises(ValueError, match='needs text_file'):
    load(None)
  with pytest.raises(ValueError, match='validation_fraction'):
    load(short, validation_fraction=1.0)
  # train.py says the same, as a usage error.
  with pytest.raises(UsageError, match='empty.txt.*is empty'):
    train.train_and_evaluate({**TEXT_TINY, 'text_file': empty})


def test_text_file_settings_are_checked(tmp_path):
  path = _write(tmp_path / 'corpus.txt', _text(200))
  for settings, message in (
      ({'text_file': None}, 'needs --text_file'),
      ({'text_file': path, 'dataset': 'tiny_shakespeare'},
       'for --dataset text_file'),
      ({'text_file': path, 'validation_fraction': 0.0}, r'in \(0, 1\)'),
      ({'text_file': path, 'mock_data': 8}, 'not text_file'),
      ({'text_file': path, 'model': 'paper_mlp'}, 'does not fit')):
    with pytest.raises(UsageError, match=message):
      train.train_and_evaluate({**TEXT_TINY, **settings})
  c = train.parse_args(['--preset', 'char_lm', '--dataset', 'text_file',
                        '--text_file', path, '--validation_fraction', '0.2'])
  assert (c.dataset, c.text_file, c.validation_fraction) == ('text_file',
                                                             path, 0.2)


def test_char_lm_trains_on_a_text_file(tmp_path):
  path = _write(tmp_path / 'corpus.txt', _text(400))
  metrics = train.train_and_evaluate({**TEXT_TINY, 'text_file': path,
                                      'optimizer': 'adamw'})
  # 400 characters: 320 to train on (39 windows of 8, 9 steps of 4 per
  # epoch), 80 to validate (9 windows).
  assert metrics['config']['validation_fraction'] == 0.2
  assert metrics['data']['steps_per_epoch'] == 9
  assert (metrics['data']['train'], metrics['data']['validation'],
          metrics['data']['test']) == (39, 9, 9)
  classes = metrics['data']['classes']
  assert classes == len(set(open(path, encoding='utf-8').read()))
  initial, history = metrics['initial'], metrics['history']
  assert abs(initial['train_loss'] - math.log(classes)) < 0.5, initial
  for entry in history:
    for key, value in entry.items():
      assert value is not None and math.isfinite(value), (key, entry)
    assert entry['val_loss'] == entry['test_loss']
  losses = [initial['train_loss']] + [e['train_loss'] for e in history]
  assert losses[-1] < losses[0], losses
