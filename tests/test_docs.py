"""The README's code and the docstrings' examples run; citations agree."""

import doctest
import pathlib
import re

import pytest

import sibp_jax
from sibp_jax._src import alias
from sibp_jax._src import flax_linen
from sibp_jax._src import flax_nnx
from sibp_jax._src import transform

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()


def _blocks(language):
  return re.findall(rf'```{language}\n(.*?)```', README, flags=re.S)


@pytest.mark.parametrize('index', range(len(_blocks('python'))))
def test_readme_python_blocks_run(index, capsys):
  exec(compile(_blocks('python')[index], f'README block {index}', 'exec'), {})


def test_readme_commands_match_ci():
  quickstart = README.split('## Quickstart', 1)[1]
  first = re.search(r'```bash\n(.*?)```', quickstart, flags=re.S).group(1)
  assert 'examples/quickstart.py' in first and 'pip install' in first
  tests = README.split('## Tests', 1)[1]
  command = re.search(r'```bash\n(.*?)```', tests, flags=re.S).group(1)
  ci = (ROOT / '.ci' / 'run').read_text()
  for line in command.strip().splitlines():
    line = line.replace('pip install', 'python -m pip install --quiet')
    assert line in ci, line


@pytest.mark.parametrize('module', [alias, transform, flax_nnx, flax_linen])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0


def test_bibtex_matches_citation_cff():
  cff = (ROOT / 'CITATION.cff').read_text()
  preferred = cff.split('preferred-citation:', 1)[1]
  bib = _blocks('bibtex')[0]
  field = lambda name: re.search(rf'{name}\s*=\s*\{{(.*?)\}},?\n', bib).group(1)
  assert f'title: "{field("title")}"' in preferred
  assert f'journal: "{field("journal")}"' in preferred
  assert f'year: {field("year")}' in preferred
  assert f'url: "{field("url")}"' in preferred
  authors = re.findall(r'family-names: (\w+)\n\s+given-names: (\w+)',
                       preferred)
  assert ' and '.join(f'{f}, {g}' for f, g in authors) == field('author')
  assert f'version: {sibp_jax.__version__}' in cff
