"""Checkpoints, resuming, Ctrl-C and atomic files for ``train.py``.

A checkpoint (orbax) holds ``state``, the ``nnx.split`` state of model and
optimizer as a pure dict, and ``progress``, a JSON record of everything
else the next step depends on: the position (epoch, step), the settings
that decide the trajectory, the seconds and sums so far, and the metrics.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

FORMAT = 1
# Exit status of an interrupted run (128 + SIGINT, as a shell reports it).
INTERRUPTED_STATUS = 130


class UsageError(ValueError):
  """A setting or a size that cannot work; the message says which."""


class Interrupted(KeyboardInterrupt):
  """Training stopped by Ctrl-C (or ``stop_after_steps``) between steps:
  ``message`` says how to resume, from the checkpoint at ``checkpoint_step``
  (``None`` without a ``checkpoint_dir``)."""

  def __init__(self, message: str, checkpoint_step: int | None):
    super().__init__(message)
    self.message = message
    self.checkpoint_step = checkpoint_step


def _replace_atomically(path: str, write, mode: str = 'w') -> None:
  """Writes through a temporary file in the same directory, then renames."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.',
                             suffix='.tmp', dir=directory)
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON; a reader never sees a half-written file."""
  _replace_atomically(path, lambda f: f.write(
      json.dumps(obj, indent=2, allow_nan=False) + '\n'))


def write_params_npz(path: str, graphdef, state) -> None:
  """Writes the model's ``nnx.Param`` arrays to ``path`` (``.npz``), keyed
  by their paths joined by ``/`` (``hidden/kernel``)."""
  model = nnx.merge(graphdef, state)[0]
  flat = jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
  arrays = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
            for path, v in flat}
  _replace_atomically(path, lambda f: np.savez(f, **arrays), 'wb')


def checkpoint_manager(directory: str):
  """An orbax ``CheckpointManager`` on ``directory`` (created if needed),
  keeping the two latest. Saves are synchronous: the next step donates the
  state's buffers, and a checkpoint must be on disk when its epoch is
  reported."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  options = ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager, state, progress: dict[str, Any]) -> None:
  """Saves at ``progress['global_step']``, unless saved there already."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  if progress['global_step'] not in manager.all_steps():
    manager.save(progress['global_step'], args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
        progress=ocp.args.JsonSave(progress)))
    manager.wait_until_finished()


def read_progress(manager, step: int) -> dict[str, Any]:
  """The JSON ``progress`` of the checkpoint at ``step``."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return manager.restore(step, args=ocp.args.Composite(
      progress=ocp.args.JsonRestore())).progress


def restore_state(manager, step: int, state):
  """``state`` with the checkpoint's arrays; its tree gives the shapes."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          nnx.to_pure_dict(state))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract))).state
  nnx.replace_by_pure_dict(state, restored)
  return state


def open_for(directory: str, resume: bool, settings: dict[str, Any],
             data_sizes: dict[str, Any]):
  """Opens ``directory`` for a run; returns ``(manager, progress or None)``.

  Raises ``UsageError`` where the directory holds checkpoints and ``resume``
  is off, or its checkpoint has other ``settings`` or data sizes.
  """
  manager = checkpoint_manager(directory)
  latest = manager.latest_step()
  try:
    if latest is None:
      if resume:
        print(f'No checkpoint in {directory}: starting afresh.', flush=True)
      return manager, None
    if not resume:
      raise UsageError(
          f'{directory} holds checkpoints already (latest step {latest}): '
          'pass --resume to continue from it, or another --checkpoint_dir '
          'to start afresh')
    progress = read_progress(manager, latest)
    if progress.get('format') != FORMAT:
      raise UsageError(f'the checkpoint in {directory} has format '
                       f'{progress.get("format")!r}, this script reads '
                       f'{FORMAT}')
    saved, saved_data = progress['config'], progress['metrics']['data']
    differ = [f'{k} (checkpoint {saved.get(k)!r}, command line {v!r})'
              for k, v in settings.items() if saved.get(k) != v]
    differ += [f'data {k} (checkpoint {saved_data.get(k)!r}, now {v!r})'
               for k, v in data_sizes.items() if saved_data.get(k) != v]
    if differ:
      raise UsageError(
          f'cannot resume from {directory}: its checkpoint was written with '
          f'other settings: {"; ".join(differ)}. Pass the checkpoint\'s '
          'settings, or another --checkpoint_dir to start afresh.')
  except UsageError:
    manager.close()
    raise
  return manager, progress


def resume_command(argv: Sequence[str]) -> str:
  """The command that resumes a run started with ``argv``."""
  args, skip = [], False
  for a in argv:  # drop --resume and the test hook, which would stop again
    if skip or a == '--resume' or a.startswith('--stop_after_steps='):
      skip = False
      continue
    skip = a == '--stop_after_steps'
    if not skip:
      args.append(a)
  return shlex.join(['python', 'examples/train.py', *args, '--resume'])


class InterruptGuard:
  """Turns the first Ctrl-C into a request to stop between steps.

  A Ctrl-C inside a step would lose the donated state; instead the loop
  stops before the next step. A second Ctrl-C raises ``KeyboardInterrupt``
  at once. Outside the main thread Ctrl-C is left as it is.
  """

  requested = False
  _previous = None

  def _handle(self, signum, frame):
    del signum, frame
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print('\nInterrupted: stopping after the current step '
          '(Ctrl-C again to stop at once).', file=sys.stderr, flush=True)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None
    return False
