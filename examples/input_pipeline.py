r"""Datasets for the examples: train / validation / test arrays in memory.

* ``mnist``, ``fashion_mnist``, ``cifar10`` come through TFDS's random-access
  ``tfds.data_source`` (array_record files, no TensorFlow needed to read
  them). The validation set is held out from the training split: the first
  5,000 images for the MNIST-like sets (as TensorFlow's classic MNIST
  reader, whose split the SIBP authors' setting matches), the last 5,000
  for CIFAR-10 (45k / 5k, as in the ProxBP authors' code). Pixels:
  MNIST-like divided by 255 to ``[0, 1]``; CIFAR-10 divided by the maximum of
  the training images (no mean subtraction, no augmentation), as ProxBP.
* ``digits``: scikit-learn's bundled 8×8 digits (pixels ``/16``), for
  machines without internet; 360 test images (a stratified split, seed 0),
  the validation set held out from the rest.
* ``tiny_shakespeare``: TFDS's one text per split (about 1M characters of
  Shakespeare to train on, 55k each to validate and test, on the
  validation split rather than a held-out part of training). Characters
  become ids of a vocabulary of the training text's characters (sorted; a
  last id stands for any character of the other splits that training
  lacks, where there is one); the text is cut into windows of
  ``seq_len + 1`` characters, consecutive windows sharing one, and a
  window's first ``seq_len`` ids are the input and its last ``seq_len`` the
  targets: ``x``, ``y`` int32 ``(n, seq_len)``, each the next character's
  id, so every character but the first is a target once.
* ``text_file``: local UTF-8 text, for machines without internet:
  ``text_file`` is a path, or several separated by commas, each a file or a
  directory; a directory gives its files (not its subdirectories), except
  hidden ones and ``.dat`` files (the binary indexes of ``fortune``'s
  files). All these files are read in sorted order of their paths, a file
  reached twice (a link, such as Debian's ``fortunes/NAME.u8 -> NAME``)
  once, and concatenated (a newline added between two files where the
  first lacks a final one). The vocabulary is the sorted characters of the
  whole text. The last ``validation_fraction`` of the characters (default
  10%) is held out for validation, the rest is trained on, each cut into
  windows as ``tiny_shakespeare``'s, so no window of the training set
  reaches a validation character. There is no test text: the test split is the
  validation split (the same windows). A path missing, a file not valid
  UTF-8 or holding a NUL byte (binary), an empty text, or one too short for
  a window of ``seq_len + 1`` characters on both sides of the cut is a
  ``ValueError`` that names the file.
* ``mock_data=N``: ``tfds.testing.mock_data`` with ``N`` random examples per
  split (for tests); shapes as the real dataset. For ``tiny_shakespeare``
  that is ``N`` short random strings per split, joined by newlines into the
  split's text.

Where the validation size (default 5,000) is not below a fifth of the
training split (digits, mock data), a fifth is held out instead. A TFDS
dataset not prepared yet is downloaded and prepared (array_record) once,
which needs TensorFlow (``pip install ".[examples,prepare]"`` brings
``tensorflow-cpu``) and internet; when that is impossible,
:class:`DatasetUnavailableError` says what to run or which ``data_dir`` to
pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import numpy as np

DATASETS = ('digits', 'mnist', 'fashion_mnist', 'cifar10', 'tiny_shakespeare',
            'text_file')
# Datasets of token sequences (for models.SEQUENCE_MODELS).
TEXT_DATASETS = ('tiny_shakespeare', 'text_file')
VALIDATION_EXAMPLES = 5000
VALIDATION_FRACTION = 0.1  # text_file: the share of the text held out
SEQ_LEN = 64
DIGITS_TEST_EXAMPLES = 360  # of 1,797
_READ_CHUNK = 10_000


class DatasetUnavailableError(RuntimeError):
  """The dataset is neither prepared nor preparable here; says what to do."""


@dataclasses.dataclass(frozen=True)
class Data:
  """One dataset in memory: float32 images ``(n, H, W, C)`` and int32
  labels ``(n,)``, or (text) int32 character ids ``(n, seq_len)`` and the
  next characters' ids ``(n, seq_len)``, ``classes`` of them, whose
  characters ``vocabulary`` lists in id order (``''`` for images; with
  a last unknown character, ``classes`` is one more)."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  classes: int
  vocabulary: str = ''

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.x_train.shape[1:])

  def sizes(self) -> dict[str, Any]:
    return {'train': len(self.x_train), 'validation': len(self.x_val),
            'test': len(self.x_test), 'input_shape': list(self.input_shape),
            'classes': self.classes}


def _unavailable(name: str, data_dir: str | None, why: str,
                 what: str) -> DatasetUnavailableError:
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser(
      '~/tensorflow_datasets')
  return DatasetUnavailableError(
      f'Dataset {name!r} is not available in {where}: {why}\n{what}\n'
      f'Or pass --data_dir DIR of a TFDS data directory where {name} is '
      'prepared in array_record format, run --dataset digits (bundled with '
      'scikit-learn, no download), or --mock_data N (random data).')


def _prepare(builder, name: str, data_dir: str | None) -> None:
  """Downloads and prepares ``builder`` in array_record format."""
  try:
    import tensorflow  # noqa: F401  # pylint: disable=unused-import
  except ImportError:
    raise _unavailable(
        name, data_dir, 'it is not prepared, and preparing it needs '
        'TensorFlow, which is not installed.',
        'Install it with `pip install ".[examples,prepare]"` (which '
        'brings tensorflow-cpu), then run the same command again to download '
        'and prepare it.') from None
  print(f'Downloading and preparing {name} in {builder.data_dir} (once; '
        'without internet this fails after the downloader\'s retries, a few '
        'minutes).', flush=True)
  try:
    builder.download_and_prepare()
  except Exception as e:  # noqa: BLE001 (network, disk, checksums, ...)
    first_line = (str(e).splitlines() or [''])[0][:300]
    raise _unavailable(
        name, data_dir, 'downloading and preparing it failed '
        f'({type(e).__name__}: {first_line}).',
        'On a machine with internet, prepare it with `python '
        f'examples/train.py --dataset {name} --data_dir DIR --epochs 0` and '
        'copy DIR here.') from None


def _records(source) -> list:
  """All records of a TFDS data source, read in chunks."""
  records = []
  for start in range(0, len(source), _READ_CHUNK):
    keys = list(range(start, min(start + _READ_CHUNK, len(source))))
    try:
      records.extend(source.__getitems__(keys))
    except TypeError:
      # tfds.testing.mock_data's __getitems__ is not bound to the source
      # (tfds 4.9): read the random examples one by one.
      records.extend(source[k] for k in keys)
  return records


def _read(source) -> tuple[np.ndarray, np.ndarray]:
  """All images and labels of a TFDS data source."""
  records = _records(source)
  return (np.stack([np.asarray(r['image']) for r in records]),
          np.asarray([r['label'] for r in records], np.int32))


def _load_tfds(name: str, data_dir: str | None, mock_data: int | None,
               splits=('train', 'test'), read=None):
  """Raw ``(x_train, y_train, x_test, y_test, classes)`` from TFDS; with
  ``read``, ``[read(source) for each of splits]``."""
  try:
    import tensorflow_datasets as tfds  # examples extra
  except ImportError:
    raise DatasetUnavailableError(
        'Reading TFDS datasets needs tensorflow-datasets: '
        'pip install ".[examples]"') from None
  if mock_data is not None and mock_data < 2:
    raise ValueError(f'mock_data must be at least 2, got {mock_data}')
  with (contextlib.nullcontext() if mock_data is None else
        tfds.testing.mock_data(num_examples=mock_data)):
    builder = tfds.builder(name, data_dir=data_dir,
                           file_format='array_record')
    if mock_data is None and not builder.is_prepared():
      _prepare(builder, name, data_dir)
    try:
      if read is not None:
        return [read(builder.as_data_source(split=s)) for s in splits]
      train = _read(builder.as_data_source(split='train'))
      test = _read(builder.as_data_source(split='test'))
    except NotImplementedError as e:  # prepared as TFRecord: no random access
      raise _unavailable(
          name, data_dir, f'it is prepared in a format without random access '
          f'({str(e).splitlines()[0]}).',
          'Prepare it again in array_record format in another directory '
          f'(`python examples/train.py --dataset {name} --data_dir NEW_DIR '
          '--epochs 0`).') from None
    classes = builder.info.features['label'].num_classes
  return (*train, *test, classes)


def _load_digits():
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  from sklearn import model_selection  # pylint: disable=import-outside-toplevel
  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=DIGITS_TEST_EXAMPLES, random_state=0, stratify=y)
  return x_train, y_train, x_test, y_test, 10


def _text(source) -> str:
  """A text split's records joined by newlines (the real dataset has one)."""
  texts = [r['text'] for r in _records(source)]
  return '\n'.join(t.decode('utf-8') if isinstance(t, bytes) else str(t)
                   for t in texts)


def char_windows(text: str, vocabulary: str,
                 seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """``text`` as ids of ``vocabulary`` (a character it lacks: the id
  ``len(vocabulary)``), cut into ``(inputs, targets)`` int32 ``(n,
  seq_len)`` as the module docstring says."""
  index = {c: i for i, c in enumerate(vocabulary)}
  ids = np.fromiter((index.get(c, len(vocabulary)) for c in text), np.int32,
                    len(text))
  n = (len(ids) - 1) // seq_len
  return (ids[:n * seq_len].reshape(n, seq_len),
          ids[1:n * seq_len + 1].reshape(n, seq_len))


def _load_text(name: str, data_dir: str | None, mock_data: int | None,
               seq_len: int, train_examples: int | None) -> Data:
  if seq_len < 1:
    raise ValueError(f'seq_len must be at least 1, got {seq_len}')
  train, val, test = _load_tfds(name, data_dir, mock_data,
                                ('train', 'validation', 'test'), _text)
  vocabulary = ''.join(sorted(set(train)))
  classes = len(vocabulary) + (not set(val + test) <= set(vocabulary))
  windows = {k: char_windows(t, vocabulary, seq_len)
             for k, t in (('train', train), ('val', val), ('test', test))}
  for k, (x, _) in windows.items():
    if not len(x):
      raise ValueError(f'{name}: the {k} text has fewer than seq_len + 1 = '
                       f'{seq_len + 1} characters')
  (x_train, y_train), (x_val, y_val), (x_test, y_test) = windows.values()
  if train_examples is not None:
    if not 0 < train_examples <= len(x_train):
      raise ValueError(f'train_examples={train_examples}: {name} has '
                       f'{len(x_train)} training sequences of {seq_len}')
    x_train, y_train = x_train[:train_examples], y_train[:train_examples]
  return Data(name, x_train, y_train, x_val, y_val, x_test, y_test, classes,
              vocabulary)


def text_files(text_file: str) -> list[str]:
  """The files that ``text_file`` names, in reading order.

  Args:
    text_file: a path, or several separated by commas; each a file or a
      directory (its files: not hidden, not ``.dat``, not in
      subdirectories).

  Returns:
    The paths, sorted, each file once (the first of the names that lead to
    it).

  Raises:
    ValueError: a path that does not exist, or a directory without files.
  """
  found = []
  for path in (p.strip() for p in text_file.split(',')):
    if not path:
      continue
    if os.path.isdir(path):
      inside = [e.path for e in os.scandir(path) if e.is_file()
                and not e.name.startswith('.') and not e.name.endswith('.dat')]
      if not inside:
        raise ValueError(f'text_file: the directory {path!r} holds no text '
                         'files (hidden and .dat files are skipped)')
      found.extend(inside)
    elif os.path.isfile(path):
      found.append(path)
    else:
      raise ValueError(f'text_file: {path!r} does not exist (or is neither a '
                       'file nor a directory)')
  if not found:
    raise ValueError(f'text_file={text_file!r} names no file')
  files, seen = [], set()
  for path in sorted(found):
    real = os.path.realpath(path)
    if real not in seen:
      seen.add(real)
      files.append(path)
  return files


def read_text_files(text_file: str) -> str:
  """The text of :func:`text_files`, concatenated.

  Args:
    text_file: as :func:`text_files`.

  Returns:
    The files' text in their order, a newline added between two files where
    the first does not end with one.

  Raises:
    ValueError: as :func:`text_files`, or a file that is not valid UTF-8 or
      holds a NUL byte (binary), naming it.
  """
  texts = []
  for path in text_files(text_file):
    with open(path, 'rb') as f:
      raw = f.read()
    try:
      text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
      raise ValueError(
          f'text_file: {path!r} is not valid UTF-8 (byte {e.start}: '
          f'{e.reason}); convert it (iconv -t UTF-8) or leave it out by '
          'listing the other files, separated by commas') from None
    if '\0' in text:
      raise ValueError(f'text_file: {path!r} holds a NUL byte (at byte '
                       f'{raw.index(0)}): a binary file, not text')
    if texts and texts[-1] and not texts[-1].endswith('\n'):
      texts[-1] += '\n'  # the next file starts on a line of its own
    texts.append(text)
  return ''.join(texts)


def _load_text_file(text_file: str | None, seq_len: int,
                    train_examples: int | None,
                    validation_fraction: float) -> Data:
  """The ``text_file`` dataset, as the module docstring says."""
  if not text_file:
    raise ValueError('the text_file dataset needs text_file: the path of a '
                     'UTF-8 text (or several, separated by commas)')
  if seq_len < 1:
    raise ValueError(f'seq_len must be at least 1, got {seq_len}')
  if not 0 < validation_fraction < 1:
    raise ValueError('validation_fraction must be in (0, 1), got '
                     f'{validation_fraction}')
  text = read_text_files(text_file)
  if not text:
    raise ValueError(f'text_file: {text_file!r} is empty')
  cut = len(text) - round(len(text) * validation_fraction)
  train, val = text[:cut], text[cut:]
  if min(len(train), len(val)) < seq_len + 1:
    raise ValueError(
        f'text_file: {text_file!r} is too short: its {len(text)} characters '
        f'split into {len(train)} to train on and {len(val)} to validate '
        f'(validation_fraction {validation_fraction:g}), and each needs at '
        f'least seq_len + 1 = {seq_len + 1}')
  vocabulary = ''.join(sorted(set(text)))
  x_train, y_train = char_windows(train, vocabulary, seq_len)
  x_val, y_val = char_windows(val, vocabulary, seq_len)
  if train_examples is not None:
    if not 0 < train_examples <= len(x_train):
      raise ValueError(f'train_examples={train_examples}: {text_file!r} has '
                       f'{len(x_train)} training sequences of {seq_len}')
    x_train, y_train = x_train[:train_examples], y_train[:train_examples]
  return Data('text_file', x_train, y_train, x_val, y_val, x_val, y_val,
              len(vocabulary), vocabulary)


def teacher_data(n: int, input_shape=(28, 28, 1), classes: int = 10,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``n`` random images in [0, 1] labelled by a random linear teacher:
  unlike TFDS's mock data, learnable labels (for the benchmark's tests)."""
  rng = np.random.default_rng(seed)
  d = int(np.prod(input_shape))
  x = rng.random((n, d)).astype(np.float32)
  teacher = rng.normal(size=(d, classes)).astype(np.float32)
  y = np.argmax((x - 0.5) @ teacher, axis=1).astype(np.int32)
  return x.reshape(n, *input_shape), y


def load(name: str, data_dir: str | None = None, *,
         validation_examples: int = VALIDATION_EXAMPLES,
         train_examples: int | None = None,
         mock_data: int | None = None, seq_len: int = SEQ_LEN,
         text_file: str | None = None,
         validation_fraction: float = VALIDATION_FRACTION) -> Data:
  """Loads one of :data:`DATASETS` as the module docstring says, from
  ``data_dir`` (TFDS; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``);
  keeps the first ``train_examples`` training images (default all) after the
  validation set is held out (text: the first training sequences of
  ``seq_len`` characters; ``validation_examples`` does not apply). The
  ``text_file`` dataset reads ``text_file`` (a path, or several separated by
  commas) and holds out its last ``validation_fraction``. Raises
  :class:`DatasetUnavailableError`, or ``ValueError`` for an unknown name,
  an impossible size, or a text file that cannot be read or is too short."""
  if name not in DATASETS:
    raise ValueError(f'unknown dataset {name!r}; expected one of {DATASETS}')
  if name == 'text_file':
    if mock_data is not None:
      raise ValueError('mock_data is for the TFDS datasets, not text_file')
    return _load_text_file(text_file, seq_len, train_examples,
                           validation_fraction)
  if name in TEXT_DATASETS:
    return _load_text(name, data_dir, mock_data, seq_len, train_examples)
  if name == 'digits':
    if mock_data is not None:
      raise ValueError('mock_data is for the TFDS datasets, not digits')
    x_train, y_train, x_test, y_test, classes = _load_digits()
  else:
    x_train, y_train, x_test, y_test, classes = _load_tfds(name, data_dir,
                                                           mock_data)
  n_val = min(validation_examples, len(x_train) // 5)
  if name == 'cifar10':  # ProxBP: the last 5,000 training images.
    cut = len(x_train) - n_val  # (x[:-n_val] is empty for n_val = 0)
    x_train, x_val = x_train[:cut], x_train[cut:]
    y_train, y_val = y_train[:cut], y_train[cut:]
  else:  # MNIST-like (and digits): the first ones.
    x_val, x_train = x_train[:n_val], x_train[n_val:]
    y_val, y_train = y_train[:n_val], y_train[n_val:]
  if train_examples is not None:
    if not 0 < train_examples <= len(x_train):
      raise ValueError(f'train_examples={train_examples}: {name} has '
                       f'{len(x_train)} training images after holding out '
                       f'{n_val} for validation')
    x_train, y_train = x_train[:train_examples], y_train[:train_examples]
  if name == 'cifar10':  # ProxBP: the training maximum (255; 0 for mock)
    scale = float(x_train.max()) or 1.0
  else:
    scale = 1.0 if name == 'digits' else 255.0  # digits: already /16
  prep = lambda x: (x.astype(np.float32) / np.float32(scale))
  return Data(name, prep(x_train), y_train, prep(x_val), y_val, prep(x_test),
              y_test, classes)
