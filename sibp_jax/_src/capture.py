"""Recording a forward pass: the machinery shared by the Flax adapters.

The adapters intercept every recognised linear layer of a model and hand the
call to the active :class:`Tape`. A recording tape keeps each layer's input
and output. A graph tape replays the model with every layer's output given
by a hook: the model's parameter-free code as a function of all layers'
outputs, which the sweep differentiates once for the whole graph. A segment
tape replays the model with one layer's output replaced by a given value and
keeps the next layer's input: in a chain, the parameter-free map ``s_i``
between two layers, which the SIBP paper variant fits through. Nothing here
imports Flax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable
from collections.abc import Hashable
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp

from sibp_jax._src import kinds
from sibp_jax._src import problems as problems_lib

Path = problems_lib.Path
_ACTIVE = threading.local()


@dataclasses.dataclass
class Record:
  path: Path
  inputs: jax.Array
  outputs: jax.Array
  # The kernel's and the bias's parameters: names beside ``path`` (a Flax
  # module's), or whole paths (a tagged model's, whose ``path`` is then its
  # kernel's).
  names: tuple
  kind: Hashable
  params: tuple  # the kernel's and the bias's values (None: no bias)
  # The slice of stacked parameters this call used (a layer of a scan over
  # layers: one index per scan), () for the parameters themselves.
  index: tuple[int, ...] = ()

  @property
  def key(self) -> tuple[Path, tuple[int, ...]]:
    """Tells one layer from another: its path and the slice it uses."""
    return self.path, self.index

  @property
  def param_paths(self) -> tuple[Path, Path | None]:
    """The kernel's and the bias's paths (``None``: no bias)."""
    return tuple(None if n is None else n if isinstance(n, tuple) else
                 self.path + (n,) for n in self.names)


def layer_str(path: Path, index: tuple[int, ...] = ()) -> str:
  return problems_lib.path_str(path) + ''.join(f'[{i}]' for i in index)


def stacked_elsewhere(what: str) -> ValueError:
  return ValueError(
      f'{what} is applied in a scan over layers whose stacked parameters are '
      'not sliced along their first axis (variable_axes or in_axes other '
      "than 0): sibp_jax solves each step's layer as the slice [i] of the "
      'stacked parameter. Stack the layers along axis 0.')


class Tape:
  """Receives the calls of intercepted linear layers.

  Three modes. Without arguments it records every call. With ``source`` it
  returns ``value`` in place of that layer's output and keeps the input of
  the layer at ``target`` in :attr:`captured` (a chain's segment). With
  ``hook`` and the recorded layers' ``keys`` it returns ``hook(index,
  inputs)`` in place of every layer's output, ``index`` counting the calls
  (the graph replay of the sweep). Layers are told apart by their key:
  their path and the slice of stacked parameters they use
  (:attr:`Record.key`).

  While a tape is active, scans and remat within the model that apply
  layers run in the model's own trace (see :func:`transparent`), so that
  every call is seen. :meth:`origin` says which stacked array a scan step's
  slice came from.
  """

  def __init__(self, source=None, value=None, target=None, *, hook=None,
               keys: tuple = ()):
    self.source, self.value, self.target = source, value, target
    self.hook, self.keys = hook, keys
    self.records: list[Record] = []
    # Module path -> class of every module called (the linen adapter fills
    # it), to tell normalisation parameters from unsolved ones.
    self.modules: dict[Path, type] = {}
    self.captured = None
    self.calls = 0
    # The JAX trace the tape records in: a layer called under another one
    # runs inside a transformation of the model's own code.
    self.trace = jex.get_opaque_trace_state()
    # Layers seen inside a transformation the tape does not unroll, with
    # the number of records made by then.
    self.nested: list[tuple[Path, int]] = []
    # While > 0, a trace made only to learn shapes: calls just compute.
    self.dry = 0
    self.dry_calls = 0
    # id(slice) -> (slice, stacked array, index), for the scans unrolled.
    self.slices: dict[int, tuple] = {}
    self.pending: list[tuple] = []  # remat calls to run in this trace
    # id() of the model's parameter arrays, where an adapter sets them: a
    # scan over layers must slice these themselves.
    self.param_ids: set[int] = set()

  def origin(self, value) -> tuple[Any, tuple[int, ...]]:
    """The array ``value`` was sliced from by the unrolled scans (itself if
    none), and the indices of the slice, outermost first."""
    index = ()
    while True:
      entry = self.slices.get(id(value))
      if entry is None or entry[0] is not value:
        return value, index
      value, index = entry[1], (entry[2],) + index

  def stacked_slice(self, value, what: str) -> tuple[int, ...]:
    """The index of ``value`` in the stacked parameter it was sliced from by
    a scan over layers (``()`` if it was not sliced).

    Raises:
      ValueError: naming ``what``, for a slice of an array that is not a
        parameter of the model itself (stacked along another axis, moved to
        the front before the scan).
    """
    root, index = self.origin(value)
    if index and id(root) not in self.param_ids:
      raise stacked_elsewhere(what)
    return index

  def visit(self, path: Path, inputs, compute: Callable[[], Any],
            names: tuple[str, str | None], kind: Callable[[], Hashable],
            params: Callable[[], tuple], index: tuple[int, ...] = ()):
    """Handles one call of a linear layer; ``kind()`` describes it.

    ``names`` are the kernel's and the bias's parameter names (the bias's
    ``None`` for a layer without one), ``params()`` their values, ``index``
    the slice of stacked parameters the call uses.
    """
    key = (path, index)
    if self.dry:
      self.dry_calls += 1
      return compute()
    if jex.get_opaque_trace_state() != self.trace:
      # A transformation the tape does not unroll (vmap, cond, ...), or a
      # shape-only trace of Flax's own (linen's scan traces its body once
      # just before the loop, which :meth:`unroll` then forgives): refused
      # by :meth:`check_nested` at the end.
      self.nested.append((path, len(self.records)))
      return compute()
    if self.hook is not None:
      call = self.calls
      if call >= len(self.keys) or self.keys[call] != key:
        raise ValueError(
            f"replaying the model called layer '{layer_str(*key)}' as "
            f'linear layer {call}, but the forward pass called '
            + (f"'{layer_str(*self.keys[call])}'"
               if call < len(self.keys) else 'fewer layers')
            + ': the model must apply the same layers in the same order '
            'every time it is called.')
      self.calls += 1
      return self.hook(call, inputs)
    if self.source is None:
      # Describe the layer before running it, so that an unsupported one is
      # named by us rather than failing inside Flax in its own words.
      layer_kind = kind()
      outputs = compute()
      self.records.append(Record(path, inputs, outputs, names, layer_kind,
                                 params(), index))
      return outputs
    if key == self.target:
      self.captured = inputs
    if key == self.source:
      return self.value
    return compute()

  def other(self, compute: Callable[[], Any]):
    """Runs a layer call that is none of the model's layers (a module the
    forward pass made, or one seen in a shape-only trace of a scan's body,
    where slices are not known yet): counted in a dry run."""
    if self.dry:
      self.dry_calls += 1
    return compute()

  def check_nested(self) -> None:
    """Refuses layers applied inside a transformation of the model's own
    code that the tape could not run in its trace."""
    if self.nested:
      raise ValueError(
          f"the linear layer '{problems_lib.path_str(self.nested[0][0])}' "
          'is applied '
          'inside a JAX transformation within the model (jax.vmap, '
          'lax.cond, lax.while_loop, ...): sibp_jax records every layer\'s '
          "input and output in the model's own forward pass and cannot see "
          'into one. Scans (nnx.scan, nn.scan, jax.lax.scan) and remat '
          '(nnx.remat, nn.remat, jax.checkpoint) are supported; apply the '
          'layer directly or under one of those.')

  @contextlib.contextmanager
  def dry_run(self):
    """Calls only compute (a trace for shapes); counts them."""
    self.dry += 1
    try:
      yield
    finally:
      self.dry -= 1

  def unroll(self, f, init, xs, length, reverse):
    """``lax.scan`` as a Python loop in the current trace, every slice of
    ``xs`` noted for :meth:`origin`."""
    leaves, treedef = jax.tree.flatten(xs)
    start = len(self.records)
    carry, ys = init, []
    for i in (reversed(range(length)) if reverse else range(length)):
      sliced = []
      for leaf in leaves:
        part = leaf[i]
        self.slices[id(part)] = (part, leaf, i)
        sliced.append(part)
      carry, y = f(carry, jax.tree.unflatten(treedef, sliced))
      ys.append(y)
    if reverse:
      ys.reverse()
    # A trace of the body made just before this scan (linen's, for its
    # broadcast values) saw the layers the loop has now recorded.
    done = {r.path for r in self.records[start:]}
    self.nested = [(path, made) for path, made in self.nested
                   if path not in done or made != start]
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)

  @contextlib.contextmanager
  def active(self):
    stack = getattr(_ACTIVE, 'stack', [])
    _ACTIVE.stack = stack + [self]
    try:
      with transparent():
        yield self
    finally:
      _ACTIVE.stack = stack


# Running scans and remat of the model in the tape's trace. A layer under
# ``lax.scan`` or ``jax.checkpoint`` would be called with the tracers of a
# trace of its own, whose values cannot leave it; while a tape is active
# (the forward pass and the sweep's replays) the two run in the caller's
# trace instead, where the tape sees every call: a scan whose body applies
# a layer as a Python loop over its steps (a scan over layers gives one
# layer per step, each with its slice of the stacked parameters), remat as
# a plain call (the problems hold every layer's input and output, which is
# what remat would recompute). Both compute the same values; scans without
# layers, and every thread without an active tape, get JAX's own.
_PATCH_LOCK = threading.Lock()
_PATCHED = [0]
try:  # remat: the call site in jax.checkpoint's wrapper
  from jax._src import ad_checkpoint as _checkpoint
  _TRACE_REMAT = _checkpoint._trace_to_jaxpr  # pylint: disable=protected-access
  _BIND_REMAT = _checkpoint.remat_p.bind
except (ImportError, AttributeError):  # another JAX: remat stays refused
  _checkpoint = None
_SCAN = jax.lax.scan


def _active_tape():
  tape = current_tape()
  return None if tape is None or tape.dry else tape


def _scan(f, init, xs=None, length=None, reverse=False, unroll=1,
          _split_transpose=False):
  tape = _active_tape()
  leaves = jax.tree.leaves(xs)
  if length is None and leaves:
    length = leaves[0].shape[0]
  if tape is not None and length:
    # Unrolled only if the body applies a layer: one shape-only trace.
    step = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                        xs)
    calls = tape.dry_calls
    with tape.dry_run():
      jax.eval_shape(f, init, step)
    if tape.dry_calls > calls:
      return tape.unroll(f, init, xs, length, reverse)
  return _SCAN(f, init, xs, length=length, reverse=reverse, unroll=unroll,
               _split_transpose=_split_transpose)


def _trace_remat(fun, in_tree, in_avals, debug):
  tape = _active_tape()
  if tape is None:
    return _TRACE_REMAT(fun, in_tree, in_avals, debug)
  with tape.dry_run():
    jaxpr, consts, out_tree = _TRACE_REMAT(fun, in_tree, in_avals, debug)
  tape.pending.append((jaxpr, fun, in_tree, out_tree, len(consts)))
  return jaxpr, consts, out_tree


def _bind_remat(*args, jaxpr, **params):
  tape = _active_tape()
  if tape is not None and tape.pending and tape.pending[-1][0] is jaxpr:
    _, fun, in_tree, out_tree, n_consts = tape.pending.pop()
    call_args, call_kwargs = jax.tree.unflatten(in_tree, args[n_consts:])
    return out_tree.flatten_up_to(fun(*call_args, **call_kwargs))
  return _BIND_REMAT(*args, jaxpr=jaxpr, **params)


@contextlib.contextmanager
def transparent():
  """Installs the scan and remat above while the block runs (nested blocks
  and other threads share one installation)."""
  with _PATCH_LOCK:
    if not _PATCHED[0]:
      jax.lax.scan = _scan
      if _checkpoint is not None:
        _checkpoint._trace_to_jaxpr = _trace_remat
        _checkpoint.remat_p.bind = _bind_remat
    _PATCHED[0] += 1
  try:
    yield
  finally:
    with _PATCH_LOCK:
      _PATCHED[0] -= 1
      if not _PATCHED[0]:
        jax.lax.scan = _SCAN
        if _checkpoint is not None:
          _checkpoint._trace_to_jaxpr = _TRACE_REMAT
          _checkpoint.remat_p.bind = _BIND_REMAT


def current_tape() -> Tape | None:
  stack = getattr(_ACTIVE, 'stack', [])
  return stack[-1] if stack else None


@dataclasses.dataclass(frozen=True)
class SegmentFn:
  """``s_i`` as a static function of ``(data, g)``, by replaying the model.

  ``runner(data, x)`` runs the model on ``x`` with interception on. The
  replay feeds zeros as the input: in a chain, the next layer's input does
  not depend on the model input once this layer's output is given (checked
  by :func:`chain_links`), and XLA removes the dead computation of the
  layers below and above.
  """

  runner: Hashable
  input_struct: jax.ShapeDtypeStruct
  source: tuple  # the layers' keys (Record.key)
  target: tuple

  def replay(self, data, x, g):
    tape = Tape(self.source, g, self.target)
    with tape.active():
      self.runner(data, x)
    if tape.captured is None:
      raise ValueError(
          f"replaying the model with the output of '"
          f"{layer_str(*self.source)}' given never reached "
          f"'{layer_str(*self.target)}': the model's layers are not a fixed "
          'chain.')
    return tape.captured

  def __call__(self, data, g):
    x = jnp.zeros(self.input_struct.shape, self.input_struct.dtype)
    return self.replay(data, x, g)


@dataclasses.dataclass(frozen=True)
class GraphFn:
  """The model as a function of its layers' outputs (:class:`Graph`'s fn).

  ``runner(data, x)`` runs the model on ``x`` with interception on;
  ``keys`` are the linear layers of the forward pass in call order
  (:attr:`Record.key`).
  """

  runner: Hashable
  keys: tuple

  def __call__(self, data, x, hook):
    tape = Tape(hook=hook, keys=self.keys)
    with tape.active():
      out = self.runner(data, x)
    if tape.calls != len(self.keys):
      raise ValueError(
          f'replaying the model called {tape.calls} linear layers, the '
          f'forward pass {len(self.keys)}: the model must apply the same '
          'layers every time it is called.')
    return out


def _dependencies(jaxpr, groups) -> list[frozenset]:
  """For each output of ``jaxpr``, the groups of invars it depends on.

  ``groups[k]`` is the group of invar ``k``. Calls of sub-programs are
  treated as a whole (every output depends on every input), which can only
  add dependencies.
  """
  deps = {v: frozenset([g]) for v, g in zip(jaxpr.invars, groups)}
  none = frozenset()
  for eqn in jaxpr.eqns:
    found = none.union(*[deps.get(v, none) for v in eqn.invars
                         if isinstance(v, jex.Var)])
    for v in eqn.outvars:
      deps[v] = found
  return [deps.get(v, none) if isinstance(v, jex.Var) else none
          for v in jaxpr.outvars]


def chain_links(graph: GraphFn, data, x, records) -> list[bool]:
  """Reads the graph of the linear layers off the traced replay.

  Returns, for every layer but the last, whether the next layer's input is
  a function of this layer's output alone and no other layer's input
  depends on it (a chain link, for which the segment ``s_i`` is defined).
  Raises ``ValueError``, naming the layer, when a layer's output reaches no
  later layer (its update would not follow the loss), or when the replay
  gives a layer an input of another shape than the forward pass did; and,
  naming the parameter, when a layer's kernel or bias is read outside the
  layer's calls (the replay, every call replaced by its output, still
  depends on it). The
  trace costs nothing at run time.
  """
  n = len(records)
  # The layers' own parameters as they sit in ``data`` (by the end of their
  # path there): the replay must not read them, since every call of a layer
  # is replaced by its recorded output.
  flat, treedef = jax.tree_util.tree_flatten_with_path(data)
  names = [tuple(problems_lib.key_name(k) for k in path) for path, _ in flat]
  owned = {p for rec in records for p in rec.param_paths if p is not None}
  # Data leaf index -> the parameter's path (the layer's path and name).
  found = {i: p for i, name in enumerate(names) for p in owned
           if name[len(name) - len(p):] == p}
  own = sorted(found)

  def replay(x, outputs, params):
    leaves = [leaf for _, leaf in flat]
    for i, value in zip(own, params):
      leaves[i] = value
    inputs = [None] * n

    def hook(index, f):
      inputs[index] = f
      return outputs[index]
    out = graph(jax.tree.unflatten(treedef, leaves), x, hook)
    return inputs + [out]

  closed = jax.make_jaxpr(replay)(x, [r.outputs for r in records],
                                  [flat[i][1] for i in own])
  n_x = len(jax.tree.leaves(x))
  groups = (['x'] * n_x + list(range(n)) +
            [('param', i) for i in own])
  deps = _dependencies(closed.jaxpr, groups)
  for group in sorted(frozenset().union(*deps), key=str):
    if isinstance(group, tuple):
      raise ValueError(
          f"the parameter '{problems_lib.path_str(found[group[1]])}' of a "
          'linear layer is also used outside that layer\'s calls (read '
          'directly by other code): SIBP and ProxBP solve a layer from its '
          "calls alone and would not see that use. Use the layer's own "
          'methods (a call, Embed.attend), or another parameter.')
  deps = deps[:n]
  for rec, aval in zip(records, closed.out_avals):
    if aval.shape != rec.inputs.shape:
      raise ValueError(
          f"replaying layer '{layer_str(*rec.key)}' gave an "
          f'input of shape {aval.shape}, but the forward pass had '
          f'{rec.inputs.shape}.')
  for i, rec in enumerate(records[:-1]):
    if not any(i in d for d in deps[i + 1:]):
      raise ValueError(
          f"the output of layer '{layer_str(*rec.key)}' does "
          "not reach any later linear layer, so it does not reach the "
          "model's output: every linear layer must contribute to the "
          'output.')
  return [deps[i + 1] == frozenset([i]) and
          not any(i in d for d in deps[i + 2:]) for i in range(n - 1)]


def shared_layers(records: list[Record]) -> set:
  """The keys of the layers applied more than once (shared weights).

  Their applications are solved as one problem whose rows are all of
  theirs, so they must agree in kind and in every axis but the first
  (an embedding table's lookups and ``attend`` projections excepted,
  which the tied solve takes in any shape); otherwise a ``ValueError``
  names the layer.
  """
  seen: dict = {}
  shared = set()
  tied = {r.key for r in records if isinstance(r.kind, kinds.Attend)}
  for rec in records:
    first = seen.setdefault(rec.key, rec)
    if first is rec:
      continue
    shared.add(rec.key)
    if rec.key in tied:  # lookups and attends: rows of any shape
      continue
    if (rec.kind != first.kind or rec.inputs.shape[1:] !=
        first.inputs.shape[1:] or rec.outputs.shape[1:] !=
        first.outputs.shape[1:]):
      raise ValueError(
          f"the linear layer '{layer_str(*rec.key)}' is applied "
          'more than once with inputs of different shapes ('
          f'{first.inputs.shape} and {rec.inputs.shape}) or settings: its '
          'applications are solved as one problem whose rows are all of '
          'theirs, which needs them to agree in every axis but the first.')
  return shared
