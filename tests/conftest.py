"""Session settings: fast compilation, one compilation cache, long files first.

The suite's time is mostly XLA compiling small programs, so:

- XLA runs with most of its optimisations off (JAX's own
  ``JAX_DISABLE_MOST_OPTIMIZATIONS``) and, at that level, with XLA:CPU's
  older loop emitters for fusions (``--xla_cpu_use_fusion_emitters=false``
  added to ``XLA_FLAGS`` unless they name it): the test programs compile
  several times faster than with XLA's defaults and run slower, which
  costs far less. Results differ from the optimised programs' by float32
  round-off, and the suite's tolerances hold at both levels: run
  ``JAX_DISABLE_MOST_OPTIMIZATIONS=0 python -m pytest -q tests`` for what
  users get (XLA's defaults; ``.ci/run`` runs both). ``--durations=20``
  with and without the variable shows the difference.
- Several tests compile the same program (the same step built in two tests,
  an example's script re-run in a fresh process to check a resume). JAX's
  persistent compilation cache, in a folder made for this session and
  removed after it, lets each program compile once. The folder is named by
  an environment variable, so the subprocesses the tests start and
  pytest-xdist's workers share it. A cache folder that the caller already
  set (``JAX_COMPILATION_CACHE_DIR``) is used as it is and kept.
- pytest-xdist hands out whole files in collection order
  (``--dist loadfile --no-loadscope-reorder``); the longest files are
  collected first so that no long file starts last.
"""

import os
import shutil
import tempfile

_VARIABLE = 'JAX_COMPILATION_CACHE_DIR'
_SETTINGS = {
    # Cache every program, however small or quick to compile.
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1',
}
_made = None
if _VARIABLE not in os.environ:
  _made = os.environ[_VARIABLE] = tempfile.mkdtemp(prefix='sibp-jax-tests-')
for _name, _value in _SETTINGS.items():
  os.environ.setdefault(_name, _value)
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# As jax reads the variable.
_UNOPTIMISED = os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'].lower() in (
    'y', 'yes', 't', 'true', 'on', '1')
# XLA reads its flags when the first backend starts (after this file); the
# tests' subprocesses inherit them.
_EMITTERS = '--xla_cpu_use_fusion_emitters'
if _UNOPTIMISED and _EMITTERS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = ' '.join(
      filter(None, [os.environ.get('XLA_FLAGS'), f'{_EMITTERS}=false']))

import jax  # noqa: E402  (after the variables, which jax reads on import)
import pytest  # noqa: E402

jax.config.update('jax_compilation_cache_dir', os.environ[_VARIABLE])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
# In case jax was imported before this file.
jax.config.update('jax_disable_most_optimizations', _UNOPTIMISED)

# Test files by their time on 2 CPU cores, longest first (measured with
# ``--durations=0``); files not named here follow in their usual order.
_LONGEST_FIRST = ('test_contract.py', 'test_graph.py', 'test_train.py',
                  'test_sharding.py', 'test_docs.py', 'test_adapters.py',
                  'test_resume.py')


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config):
  del config
  if _made is not None and os.environ.get(_VARIABLE) == _made:
    shutil.rmtree(_made, ignore_errors=True)


@pytest.fixture
def x64():
  """float64 for one test (``pytest.mark.usefixtures('x64')``)."""
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', previous)
