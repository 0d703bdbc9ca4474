"""Session settings: one compilation cache for the whole test run.

Several tests compile the same program (the same step built in two tests,
an example's script re-run in a fresh process to check a resume). JAX's
persistent compilation cache, in a folder made for this session and removed
after it, lets each program compile once. The folder is named by an
environment variable, so the subprocesses the tests start and pytest-xdist's
workers share it. A cache folder that the caller already set
(``JAX_COMPILATION_CACHE_DIR``) is used as it is and kept.
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

import jax  # noqa: E402  (after the variables, which jax reads on import)

jax.config.update('jax_compilation_cache_dir', os.environ[_VARIABLE])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def pytest_unconfigure(config):
  del config
  if _made is not None and os.environ.get(_VARIABLE) == _made:
    shutil.rmtree(_made, ignore_errors=True)
