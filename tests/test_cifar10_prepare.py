"""TFDS's real CIFAR-10 preparation, fed a synthetic archive, then training.

``examples/train.py --dataset cifar10`` prepares the dataset with TFDS's own
``cifar10`` builder on its first run. Without internet, this test writes a
small archive in CIFAR-10's binary format (the real file layout: a
``cifar-10-batches-bin/`` folder with five training batches, a test batch
and the label names; each record one label byte and 3,072 pixel bytes,
red, green, blue planes of 32×32), hands it to the builder through a
patched download manager, and trains one epoch on what TFDS prepared.
Needs TensorFlow (``pip install ".[prepare]"``).
"""

import importlib.util
import io
import tarfile

import numpy as np
import pytest

tfds = pytest.importorskip('tensorflow_datasets')
pytest.importorskip('sklearn')
# Found, not imported: TFDS's builder imports TensorFlow when the test runs,
# which spares every pytest-xdist worker its import (seconds) at collection.
if importlib.util.find_spec('tensorflow') is None:
  pytest.skip('needs TensorFlow: pip install ".[prepare]"',
              allow_module_level=True)

import input_pipeline  # noqa: E402
import train  # noqa: E402

PER_FILE = 10  # images per batch file: 50 training, 10 test images
NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
         'horse', 'ship', 'truck']


def _batch(rng) -> tuple[bytes, np.ndarray, np.ndarray]:
  labels = rng.integers(0, 10, PER_FILE).astype(np.uint8)
  images = rng.integers(0, 256, (PER_FILE, 32, 32, 3)).astype(np.uint8)
  planes = images.transpose(0, 3, 1, 2).reshape(PER_FILE, 3072)
  records = np.concatenate([labels[:, None], planes], axis=1)
  return records.tobytes(), images, labels


def _archive(path) -> tuple[np.ndarray, np.ndarray]:
  """Writes the archive; returns the test images and labels."""
  rng = np.random.default_rng(0)
  files = {f'data_batch_{i}.bin': _batch(rng) for i in range(1, 6)}
  files['test_batch.bin'] = _batch(rng)
  with tarfile.open(path, 'w:gz') as tar:
    contents = {name: data for name, (data, _, _) in files.items()}
    contents['batches.meta.txt'] = ('\n'.join(NAMES) + '\n\n').encode()
    for name, data in contents.items():
      info = tarfile.TarInfo(f'cifar-10-batches-bin/{name}')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return files['test_batch.bin'][1], files['test_batch.bin'][2]


def test_prepare_then_train_one_epoch(tmp_path, monkeypatch):
  archive = tmp_path / 'cifar-10-binary.tar.gz'
  test_images, test_labels = _archive(archive)
  urls = []

  def download_and_extract(self, url_or_urls):
    urls.append(url_or_urls)
    return self.extract(str(archive))  # TFDS's own extraction

  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract',
                      download_and_extract)
  data_dir = tmp_path / 'tfds'
  metrics = train.main([
      '--dataset', 'cifar10', '--data_dir', str(data_dir), '--epochs', '1',
      '--batch_size', '10', '--no_progress', '--optimizer', 'sibp'])
  assert urls == ['https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz']
  # 50 training images, a fifth (10) held out: the last ones, as ProxBP.
  assert metrics['data'] == {
      'train': 40, 'validation': 10, 'test': 10, 'input_shape': [32, 32, 3],
      'classes': 10, 'steps_per_epoch': 4}
  entry = metrics['history'][0]
  assert all(np.isfinite(entry[k]) for k in ('train_loss', 'test_loss'))
  # The prepared files hold the archive's pixels and labels (TFDS shuffles
  # the records).
  data = input_pipeline.load('cifar10', str(data_dir))
  assert data.x_test.dtype == np.float32
  # Divided by the training maximum, 255 for 40 random images.
  pixels = np.rint(data.x_test * 255).astype(np.uint8)
  records = lambda images, labels: sorted(
      bytes([label]) + image.tobytes() for image, label in zip(images, labels))
  assert records(pixels, data.y_test) == records(test_images, test_labels)
  builder = tfds.builder('cifar10', data_dir=str(data_dir))
  assert builder.info.features['label'].names == NAMES
