"""Writes docs/api.md, the API reference, from the public names' docstrings.

Run from the repository root after changing a public name or its docstring::

  python docs/make_api.py           # rewrites docs/api.md
  python docs/make_api.py --check   # exits 1 when docs/api.md is out of date

The page lists ``sibp_jax.__all__``, then ``sibp_jax.nnx.__all__``,
``sibp_jax.linen.__all__`` and ``sibp_jax.tag.__all__``, in that order:
each function's signature and docstring, each class's signature,
docstring and public methods. The
docstrings' reStructuredText (Google style) becomes Markdown: ````code````
becomes `code`, roles such as ``:func:`x``` become `x`, ``.. math::`` and
``::`` blocks become fenced text, doctest examples fenced ``pycon``, and
``Args:``-style sections lists. The output depends on the code only: no
memory addresses, no paths of this machine, no annotations that other
libraries evaluate.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import pathlib
import re
import sys
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTPUT = ROOT / 'docs' / 'api.md'
COMMAND = 'python docs/make_api.py'

HEADER = f"""# API reference

Generated from the docstrings by `{COMMAND}`; edit the
docstrings, not this page. Import everything from `sibp_jax`,
`sibp_jax.nnx`, `sibp_jax.linen` and `sibp_jax.tag` as named here.
"""

# Google-style sections whose entries are ``name: text``.
LIST_SECTIONS = ('Args', 'Arguments', 'Attributes', 'Raises')
TEXT_SECTIONS = ('Returns', 'Yields', 'References', 'Note', 'Notes',
                 'Example', 'Examples', 'See also', 'Warning')


def _inline(text: str) -> str:
  """RST inline markup as Markdown (also across the lines of a paragraph)."""
  text = re.sub(r'`([^`<]+?)\s*<([^>]+)>`_', r'[\1](\2)', text)
  text = re.sub(r':[\w:]+:`~?([^`]+)`', r'`\1`', text)
  return re.sub(r'``(.+?)``', r'`\1`', text, flags=re.S)


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _fence(lines: list[str], language: str) -> list[str]:
  body = inspect.cleandoc('\n'.join(lines)).splitlines()
  return [f'```{language}', *body, '```']


def _body(lines: list[str]) -> Iterator[str]:
  """Paragraphs, literal blocks and doctests of dedented ``lines``."""
  paragraph: list[str] = []
  i = 0
  while i <= len(lines):
    line = lines[i] if i < len(lines) else ''
    stripped = line.strip()
    literal = stripped == '.. math::' or stripped.endswith('::')
    if stripped and not stripped.startswith('>>>') and not literal:
      paragraph.append(stripped)
      i += 1
      continue
    if literal and stripped != '.. math::':
      paragraph.append(stripped[:-1])
    if paragraph:
      yield _inline('\n'.join(paragraph))
      paragraph = []
    if stripped.startswith('>>>'):
      block = []
      while i < len(lines) and lines[i].strip():
        block.append(lines[i])
        i += 1
      yield from _fence(block, 'pycon')
      yield ''
      continue
    if literal:
      base, block = _indent(line), []
      i += 1
      while i < len(lines) and (not lines[i].strip()
                                or _indent(lines[i]) > base):
        block.append(lines[i])
        i += 1
      while block and not block[-1].strip():
        block.pop()
      yield from _fence(block, 'text')
      yield ''
      continue
    yield ''
    i += 1


def _entries(lines: list[str]) -> Iterator[str]:
  """``name: text`` entries (continued on deeper lines) as a list."""
  base = min(_indent(line) for line in lines if line.strip())
  entry: list[str] = []
  for line in [*lines, '']:
    if line.strip() and _indent(line) == base or not line.strip():
      if entry:
        name, _, text = ' '.join(entry).partition(':')
        yield f'- `{name.strip()}`: {_inline(text.strip())}'
      entry = [line.strip()] if line.strip() else []
    else:
      entry.append(line.strip())


def _section(line: str) -> str | None:
  """The name of the Google-style section ``line`` opens, if any."""
  name = line.strip()[:-1]
  if line.strip().endswith(':') and name in LIST_SECTIONS + TEXT_SECTIONS:
    return name
  return None


def markdown(doc: str) -> str:
  """A Google-style docstring as Markdown."""
  lines = inspect.cleandoc(doc).splitlines()
  out: list[str] = []
  i = 0
  while i < len(lines):
    section = _section(lines[i])
    if section:
      block = []
      i += 1
      while i < len(lines) and (not lines[i].strip() or _indent(lines[i])):
        block.append(lines[i])
        i += 1
      out += ['', f'**{section}:**', '']
      if section in LIST_SECTIONS:
        out += _entries(block)
      else:
        out += _body(inspect.cleandoc('\n'.join(block)).splitlines())
      out.append('')
      continue
    start = i
    while i < len(lines) and not _section(lines[i]):
      i += 1
    out += _body(lines[start:i])
  text = '\n'.join(out)
  text = re.sub(r'\n{3,}', '\n\n', text)
  return text.strip() + '\n'


def _clean(text: str) -> str:
  """Removes what differs between runs or machines from a repr."""
  text = re.sub(r' at 0x[0-9a-fA-F]+', '', text)
  return re.sub(r"(<function [\w.<>]+)>", r'\1>', text)


class _Text:
  """An annotation shown as written (``'int'`` without the quotes)."""

  def __init__(self, text: str):
    self.text = text

  def __repr__(self) -> str:
    return self.text


def _annotation(annotation):
  """Annotations as sibp_jax's modules write them (strings, under
  ``from __future__ import annotations``); evaluated ones, which come from
  other libraries' base classes and whose repr changes with their
  versions, are left out."""
  if isinstance(annotation, str):
    return _Text(annotation)
  return inspect.Parameter.empty


def signature(obj, name: str) -> str:
  try:
    sig = inspect.signature(obj)
  except (TypeError, ValueError):
    return name
  params = list(sig.parameters.values())
  if [p.kind for p in params] == [inspect.Parameter.VAR_POSITIONAL,
                                  inspect.Parameter.VAR_KEYWORD]:
    return name
  sig = sig.replace(
      parameters=[p.replace(annotation=_annotation(p.annotation))
                  for p in params],
      return_annotation=(inspect.Signature.empty if inspect.isclass(obj)
                         else _annotation(sig.return_annotation)))
  text = _clean(f'{name}{sig}')
  if len(text) <= 79:
    return text
  # One parameter a line, as black would wrap it.
  returns = ('' if sig.return_annotation is inspect.Signature.empty
             else f' -> {sig.return_annotation!r}')
  lines, previous = [], None
  for p in sig.parameters.values():
    if (p.kind == p.KEYWORD_ONLY and previous not in (p.VAR_POSITIONAL,
                                                      p.KEYWORD_ONLY)):
      lines.append('*')
    if previous == p.POSITIONAL_ONLY and p.kind != p.POSITIONAL_ONLY:
      lines.append('/')
    lines.append(str(p))
    previous = p.kind
  body = ''.join(f'    {line},\n' for line in lines)
  return _clean(f'{name}(\n{body}){returns}')


def _methods(cls) -> Iterator[tuple[str, object]]:
  """Public methods that ``cls`` (or a sibp_jax base) defines, in order."""
  seen = set()
  for klass in cls.__mro__:
    if not klass.__module__.startswith('sibp_jax'):
      continue
    for name, member in vars(klass).items():
      if name.startswith('_') or name in seen:
        continue
      seen.add(name)
      func = getattr(member, '__func__', member)
      if (inspect.isfunction(func) and func.__doc__
          and func.__module__.startswith('sibp_jax')):
        yield name, func


def _kind(obj) -> str:
  if inspect.isclass(obj):
    if dataclasses.is_dataclass(obj):
      return 'dataclass'
    if issubclass(obj, tuple) and hasattr(obj, '_fields'):
      return 'NamedTuple'
    return 'class'
  return 'function'


def entry(qualname: str, obj) -> list[str]:
  """The section of one public name."""
  out = [f'### `{qualname}`', '', f'*{_kind(obj)}*', '', '```python',
         signature(obj, qualname), '```', '']
  if obj.__doc__:
    out += [markdown(obj.__doc__)]
  if inspect.isclass(obj):
    for name, method in _methods(obj):
      out += [f'#### `{qualname}.{name}`', '', '```python',
              signature(method, name), '```', '', markdown(method.__doc__)]
  return out


def render() -> str:
  """The whole page."""
  import sibp_jax  # pylint: disable=import-outside-toplevel

  modules = {'sibp_jax': sibp_jax, 'sibp_jax.nnx': sibp_jax.nnx,
             'sibp_jax.linen': sibp_jax.linen, 'sibp_jax.tag': sibp_jax.tag}
  names = {module: [n for n in vars(modules[module])['__all__']
                    if not inspect.ismodule(getattr(modules[module], n))]
           for module in modules}
  out = [HEADER]
  for module, public in names.items():
    out += [f'- `{module}`: ' + ', '.join(
        f'[`{n}`](#{_anchor(f"{module}.{n}")})' for n in public)]
  out.append('')
  for module, public in names.items():
    out += [f'## `{module}`', '']
    doc = modules[module].__doc__
    if doc:
      out += [markdown(doc)]
    for name in public:
      out += entry(f'{module}.{name}', getattr(modules[module], name))
  text = '\n'.join(out)
  return re.sub(r'\n{3,}', '\n\n', text).rstrip() + '\n'


def _anchor(qualname: str) -> str:
  """GitHub's anchor of the heading ``### `qualname```."""
  return re.sub(r'[^\w-]', '', qualname.lower())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--check', action='store_true',
                      help='exit 1 when docs/api.md is out of date')
  args = parser.parse_args(argv)
  text = render()
  if args.check:
    if OUTPUT.read_text() != text:
      print(f'docs/api.md is out of date: run {COMMAND}', file=sys.stderr)
      return 1
    return 0
  OUTPUT.write_text(text)
  return 0


if __name__ == '__main__':
  sys.path.insert(0, str(ROOT))
  sys.exit(main())
