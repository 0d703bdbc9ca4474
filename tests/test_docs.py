"""The README's and docs' code runs, their references exist, citations agree."""

import doctest
import importlib
import importlib.util
import pathlib
import re
import shlex

import numpy as np
import pytest

import sibp_jax
from sibp_jax._src import alias
from sibp_jax._src import flax_linen
from sibp_jax._src import flax_nnx
from sibp_jax._src import transform
from sibp_jax._src.solvers import base as solvers_base
from sibp_jax._src.solvers import conjugate_gradient
from sibp_jax._src.solvers import nonlinear_cg
from sibp_jax._src.solvers import ridge

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = {p.relative_to(ROOT).as_posix(): p.read_text()
         for p in [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]}
README = PAGES['README.md']


def _blocks(text, language):
  return re.findall(rf'```{language}\n(.*?)```', text, flags=re.S)


# docs/api.md's python blocks are signatures, generated: not run.
PYTHON = [(page, i) for page, text in PAGES.items() if page != 'docs/api.md'
          for i in range(len(_blocks(text, 'python')))]
# Command blocks that run an example on bundled data (no dataset needed).
COMMANDS = [(page, block) for page, text in PAGES.items()
            for block in _blocks(text, 'bash')
            if block.startswith('python examples/')]


def test_docs_pages_exist():
  assert {'docs/algorithms.md', 'docs/api.md', 'docs/experiments.md',
          'docs/performance.md', 'docs/scaling.md'} <= set(PAGES)
  assert len(README.splitlines()) <= 250


@pytest.mark.parametrize(('page', 'index'), PYTHON)
def test_python_blocks_run(page, index, capsys):
  code = _blocks(PAGES[page], 'python')[index]
  exec(compile(code, f'{page} block {index}', 'exec'), {})


@pytest.mark.parametrize(('page', 'block'), COMMANDS,
                         ids=[f'{p}-{i}' for i, (p, _) in enumerate(COMMANDS)])
def test_example_commands_run(page, block, tmp_path, monkeypatch):
  """Each ``python examples/X.py ...`` line, in-process, in a fresh folder."""
  monkeypatch.chdir(tmp_path)
  for line in block.strip().splitlines():
    _, script, *args = shlex.split(line)
    main = importlib.import_module(pathlib.Path(script).stem).main
    try:
      main(args)
    except SystemExit as e:
      # An interruption by --stop_after_steps exits as Ctrl-C does.
      assert e.code == 130, (page, line, e.code)
  if (tmp_path / 'resumed.npz').exists():  # the resumed run is the same run
    with np.load(tmp_path / 'full.npz') as a, np.load(
        tmp_path / 'resumed.npz') as b:
      assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_every_referenced_file_exists():
  for page, text in PAGES.items():
    base = (ROOT / page).parent
    for link in re.findall(r'\]\(([^)#:]+)(?:#[^)]*)?\)', text):
      assert (base / link).exists(), (page, link)
    for path in re.findall(r'`((?:examples|tests|docs|sibp_jax)/[\w./]+)',
                           text):
      assert (ROOT / path).exists(), (page, path)


def test_no_references_outside_the_repository():
  # Pages, example code and tests may cite only what a clone has.
  files = [*PAGES.items(), *[
      (p.relative_to(ROOT).as_posix(), p.read_text())
      for p in [*(ROOT / 'examples').glob('*.py'),
                *(ROOT / 'tests').glob('test_*.py')]
      if p.name in EXAMPLE_SIDE or p.parent.name == 'examples']]
  for name, text in files:
    for bad in ('SIBP' + '.md', '../' + 'shared', '/wo' + 'rk/'):
      assert bad not in text, (name, bad)
  for page, text in PAGES.items():
    assert not re.search(r'\bcommits? `?[0-9a-f]{7,40}\b', text), page
    assert not re.search(r'\bissue \d+', text), page


EXAMPLE_SIDE = {'test_train.py', 'test_resume.py', 'test_benchmark.py',
                'test_reproduce.py', 'test_quickstart.py', 'test_docs.py',
                'test_cifar10_prepare.py'}


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


@pytest.mark.parametrize('module', [
    alias, transform, flax_nnx, flax_linen, solvers_base, ridge,
    conjugate_gradient, nonlinear_cg])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0


def test_api_reference_is_current():
  spec = importlib.util.spec_from_file_location('make_api',
                                                ROOT / 'docs' / 'make_api.py')
  make_api = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_api)
  text = make_api.render()
  assert str(ROOT) not in text and not re.search(r' at 0x[0-9a-f]+', text)
  assert PAGES['docs/api.md'] == text, (
      f'docs/api.md is out of date: run {make_api.COMMAND}')


def test_bibtex_matches_citation_cff():
  cff = (ROOT / 'CITATION.cff').read_text()
  preferred = cff.split('preferred-citation:', 1)[1]
  bib = _blocks(README, 'bibtex')[0]
  field = lambda name: re.search(rf'{name}\s*=\s*\{{(.*?)\}},?\n', bib).group(1)
  assert f'title: "{field("title")}"' in preferred
  assert f'journal: "{field("journal")}"' in preferred
  assert f'year: {field("year")}' in preferred
  assert f'url: "{field("url")}"' in preferred
  authors = re.findall(r'family-names: (\w+)\n\s+given-names: (\w+)',
                       preferred)
  assert ' and '.join(f'{f}, {g}' for f, g in authors) == field('author')
  assert f'version: {sibp_jax.__version__}' in cff
