"""The registry of Flax layers: which modules the sweep solves, and how.

One table, :data:`LAYERS`, says which module classes are linear layers: the
kind of their map, the names of their parameters and how their static
settings are read. Both adapters read it, so a new kind of layer is one
entry here (and its kind in ``problems``). :data:`NORMALISATION` names the
modules whose parameters (a scale and a bias) no layer owns by design: the
sweep holds them at their current values and the transformations hand them
the incoming gradient. Any other parameter is one the sweep would not solve,
and :func:`unsolved_parameters` finds it so that the adapters can name it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence

import flax.linen as nn
import jax
from flax import nnx

from sibp_jax._src import kinds
from sibp_jax._src import problems as problems_lib

Path = problems_lib.Path
UNSOLVED = ('raise', 'gradient')


@dataclasses.dataclass(frozen=True)
class LayerType:
  """One entry of the registry.

  Attributes:
    nnx: the ``flax.nnx`` classes of this layer (subclasses match too).
    linen: the ``flax.linen`` classes.
    kernel: the name of the kernel parameter.
    bias: the name of the bias parameter, or ``None`` if the layer has none.
    describe: ``describe(module, name, input_shape)`` returns the layer's
      static kind (:class:`sibp_jax.Dense`, ...) or raises ``ValueError``
      naming the layer for settings the sweep cannot treat as a linear map
      of the input.
    also: other methods of the module that apply its kernel to their one
      argument (an embedding's ``attend``, the tied output projection),
      each with the ``describe`` of that map: a call is one more
      application of the layer, solved with the others (shared weights).
    fixed: call arguments that would change the map from the one the
      module's attributes describe (an ``Einsum``'s ``einsum_str``): a call
      that passes one is refused.
    settings: module attributes that change the map itself (a custom
      ``dot_general`` such as a quantisation hook, a custom convolution or
      einsum, a custom ``promote_dtype``): sibp_jax solves the layer as its
      plain map, so each must keep the default of the registered class
      (compared by identity; see :meth:`check_module`). Attributes that
      only change rounding (``precision``, ``dtype``, ``param_dtype``,
      ``preferred_element_type``) are not among them: the map stays the
      same linear map, and the sweep forms and solves its problems at
      ``HIGHEST`` precision, in at least float32, whatever the forward
      pass used.
  """

  nnx: tuple[type, ...]
  linen: tuple[type, ...]
  kernel: str
  bias: str | None
  describe: Callable[[object, str, Sequence[int]], Hashable]
  also: tuple[tuple[str, Callable[[object, str, Sequence[int]],
                                   Hashable]], ...] = ()
  fixed: tuple[str, ...] = ()
  settings: tuple[str, ...] = ()

  def names(self, module) -> tuple[str, str | None]:
    """The kernel's and the bias's names (``None``: no bias in ``module``)."""
    with_bias = (self.bias is not None and getattr(module, 'use_bias', True)
                 and getattr(module, self.bias, True) is not None)
    return self.kernel, self.bias if with_bias else None

  def use(self, module, method: str):
    """``(names, describe)`` of a call of ``module``'s ``method``: its own
    call (kernel and bias), or a method of :attr:`also` (the kernel alone,
    with that method's kind). ``describe`` first refuses a module whose map
    is not the plain one (:meth:`check_module`), so every recorded call is
    checked."""
    if method == '__call__':
      names, describe = self.names(module), self.describe
    else:
      names, describe = (self.kernel, None), dict(self.also)[method]

    def checked(module, name: str, input_shape: Sequence[int]) -> Hashable:
      self.check_module(module, name, method)
      return describe(module, name, input_shape)

    return names, checked

  def check_call(self, name: str, args, kwargs) -> None:
    """Refuses a call that passes one of the :attr:`fixed` arguments."""
    given = [k for k in self.fixed if kwargs.get(k) is not None]
    if self.fixed and (args or given):
      raise ValueError(
          f"layer '{name}': called with {', '.join(given) or 'arguments'} "
          f'that change its map; set {", ".join(self.fixed)} on the module '
          'so that sibp_jax reads the map the call applies.')

  def check_module(self, module, name: str, method: str = '__call__'
                   ) -> None:
    """Refuses a module whose map is not the plain one sibp_jax solves.

    The registered class's map is what the sweep solves. A module is
    refused if one of its :attr:`settings` is not that class's default
    (the same object: for nnx classes the default of ``__init__``'s
    parameter, for linen classes the dataclass field's), or if its class
    defines its own ``method`` (``__call__``, or a method of :attr:`also`
    such as ``attend``) between its type and the registered class. Flax's
    own subclasses are no such override: they apply the registered class's
    map through ``super()`` (``nnx.LoRALinear`` adds a LoRA branch, whose
    parameters are then named as unsolved; linen's lifted transforms such
    as ``nn.remat(nn.Dense)`` rewrap the methods). Only the attributes the
    module has are checked (Flax versions differ).

    Args:
      module: the nnx or linen module a recorded call applies.
      name: the layer's name in messages (``'layers/0'``).
      method: the method the call applies.

    Raises:
      ValueError: naming the layer and the setting or method.
    """
    mro = type(module).__mro__
    base = next(c for c in mro if c in self.nnx + self.linen)
    what = f"{'nnx' if base in self.nnx else 'linen'}.{base.__name__}"
    solved = (f"sibp_jax solves the layer as {what}'s plain map (its "
              "parameters through Flax's default computation), so")
    todo = 'express the change with parameter-free code around the layer'
    for cls in mro[:mro.index(base)]:
      if method in vars(cls) and not _from_flax(cls):
        raise ValueError(
            f"layer '{name}': {cls.__name__} overrides {what}.{method} with "
            f'its own computation; {solved} a different computation would '
            f'be solved wrongly. Use {what} itself and {todo}.')
    defaults = _defaults(base)
    for setting in self.settings:
      if (setting in defaults and hasattr(module, setting) and
          getattr(module, setting) is not defaults[setting]):
        raise ValueError(
            f"layer '{name}': {setting} is not {what}'s default; {solved} a "
            f'setting that changes the map would be solved wrongly. Leave '
            f'{setting} at its default and {todo} (settings that only '
            'change rounding, such as precision, dtype, param_dtype and '
            'preferred_element_type, are fine).')


def _from_flax(cls: type) -> bool:
  """Whether ``cls`` is one of Flax's own classes."""
  return cls.__module__ == 'flax' or cls.__module__.startswith('flax.')


@functools.cache
def _defaults(cls: type) -> dict[str, object]:
  """The defaults of ``cls``'s settings: a linen class's dataclass fields,
  an nnx class's ``__init__`` parameters."""
  if issubclass(cls, nn.Module):
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}
  return {n: p.default
          for n, p in inspect.signature(cls.__init__).parameters.items()
          if p.default is not inspect.Parameter.empty}


def _per_axis(value, nd: int, what: str, name: str) -> tuple[int, ...]:
  if value is None:
    value = 1
  if isinstance(value, int):
    return (value,) * nd
  value = tuple(value)
  if len(value) != nd:
    raise ValueError(f"layer '{name}': {what} {value} does not match a "
                     f'{nd}-D convolution')
  return value


def _dense(module, name, input_shape):
  del module, name, input_shape
  return kinds.Dense()


def _conv(module, name: str, input_shape: Sequence[int]):
  """The :class:`sibp_jax.Conv` of an ``nnx.Conv`` / ``linen.Conv``.

  Raises:
    ValueError: for convolution settings the sweep cannot treat as a plain
      linear map of its input (grouped, input-dilated, masked, or with
      circular/reflect/causal padding), naming the layer.
  """
  nd = len(input_shape) - 2
  if nd not in (1, 2, 3):
    raise ValueError(
        f"layer '{name}': a convolution needs inputs of shape (batch, "
        f'spatial..., channels) with 1 to 3 spatial axes, got {input_shape}')
  if module.feature_group_count != 1:
    raise ValueError(f"layer '{name}': grouped convolutions "
                     '(feature_group_count > 1) are not supported')
  if any(d != 1 for d in _per_axis(module.input_dilation, nd,
                                   'input_dilation', name)):
    raise ValueError(f"layer '{name}': input dilation is not supported")
  if module.mask is not None:
    raise ValueError(f"layer '{name}': masked kernels are not supported")
  window = _per_axis(module.kernel_size, nd, 'kernel_size', name)
  strides = _per_axis(module.strides, nd, 'strides', name)
  dilation = _per_axis(module.kernel_dilation, nd, 'kernel_dilation', name)
  padding = nn.linear.canonicalize_padding(module.padding, nd)
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      raise ValueError(f"layer '{name}': {padding} padding is not supported; "
                       "use 'SAME', 'VALID' or explicit zero padding")
    dilated = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
    padding = jax.lax.padtype_to_pads(tuple(input_shape[1:-1]), dilated,
                                      strides, padding)
  return kinds.Conv(
      strides=strides,
      padding=tuple((int(lo), int(hi)) for lo, hi in padding),
      kernel_dilation=dilation)


def _transpose_pads(window, strides, dilation, padding):
  """Explicit pads of a transposed convolution's ``'SAME'``/``'VALID'``
  padding, as ``lax.conv_transpose`` sets them (per axis: the dilated
  kernel's size ``k`` and the stride ``s``)."""
  pads = []
  for k, s, d in zip(window, strides, dilation):
    k = (k - 1) * d + 1
    if padding == 'SAME':
      total = k + s - 2
      low = k - 1 if s > k - 1 else -(-total // 2)
    else:
      total = k + s - 2 + max(k - s, 0)
      low = k - 1
    pads.append((low, total - low))
  return tuple(pads)


def _conv_transpose(module, name: str, input_shape: Sequence[int]):
  """The :class:`sibp_jax.Conv` (input-dilated) of a ``ConvTranspose``.

  Raises:
    ValueError: for a flipped kernel (``transpose_kernel=True``), a masked
      kernel or circular padding, naming the layer.
  """
  nd = len(input_shape) - 2
  if nd not in (1, 2, 3):
    raise ValueError(
        f"layer '{name}': a transposed convolution needs inputs of shape "
        f'(batch, spatial..., channels) with 1 to 3 spatial axes, got '
        f'{input_shape}')
  if module.transpose_kernel:
    raise ValueError(f"layer '{name}': transpose_kernel=True (a flipped "
                     'kernel) is not supported')
  if module.mask is not None:
    raise ValueError(f"layer '{name}': masked kernels are not supported")
  window = _per_axis(module.kernel_size, nd, 'kernel_size', name)
  strides = _per_axis(module.strides, nd, 'strides', name)
  dilation = _per_axis(module.kernel_dilation, nd, 'kernel_dilation', name)
  padding = nn.linear.canonicalize_padding(module.padding, nd)
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      raise ValueError(f"layer '{name}': {padding} padding is not supported; "
                       "use 'SAME', 'VALID' or explicit zero padding")
    padding = _transpose_pads(window, strides, dilation, padding)
  return kinds.Conv(
      strides=(1,) * nd,
      padding=tuple((int(lo), int(hi)) for lo, hi in padding),
      kernel_dilation=dilation, input_dilation=strides)


def _dense_general(module, name: str, input_shape: Sequence[int]):
  """The :class:`sibp_jax.DenseGeneral` of a LinearGeneral / DenseGeneral."""
  ndim = len(input_shape)
  batch = getattr(module, 'batch_axis', None) or getattr(
      module, 'batch_dims', ())
  if batch:
    raise ValueError(f"layer '{name}': batch axes shared by the input and the "
                     'kernel (batch_axis / batch_dims) are not supported')
  axis = module.axis
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  if any(not -ndim <= a < ndim for a in axis):
    raise ValueError(f"layer '{name}': axis {axis} does not fit an input of "
                     f'shape {tuple(input_shape)}')
  axis = tuple(a % ndim for a in axis)
  if 0 in axis:
    raise ValueError(f"layer '{name}': contracting the batch axis 0 mixes the "
                     'examples; SIBP and ProxBP need a map of each example')
  features = getattr(module, 'out_features', None)
  if features is None:
    features = module.features
  return kinds.DenseGeneral(
      axis, 1 if isinstance(features, int) else len(features))


def _embed(module, name, input_shape):
  del name, input_shape
  return kinds.Embed(module.num_embeddings)


def _attend(module, name, input_shape):
  del name, input_shape
  return kinds.Attend(module.num_embeddings)


def _einsum(module, name: str, input_shape: Sequence[int]):
  """The :class:`sibp_jax.DenseGeneral` of an ``Einsum`` whose string is a
  general dense map: ``'<input>,<kernel>-><output>'`` where the kernel's
  letters are the contracted input letters then the feature letters, and
  the output is the other input letters, in order, then the features (a
  leading ``...`` in input and output allowed), e.g. ``'btd,dnh->btnh'``.
  """
  spec = (module.einsum_str or '').replace(' ', '')
  refuse = ValueError(
      f"layer '{name}': einsum {spec!r} is not a dense map of the input that "
      "sibp_jax solves (input letters, then kernel letters = contracted "
      "input letters + feature letters, output = the other input letters + "
      "the features, e.g. 'btd,dnh->btnh')")
  if spec.count('->') != 1 or spec.count(',') != 1:
    raise refuse
  operands, output = spec.split('->')
  inputs, kernel = operands.split(',')
  if inputs.startswith('...') != output.startswith('...') or (
      '...' in kernel):
    raise refuse
  if inputs.startswith('...'):
    extra = len(input_shape) - len(inputs) + 3
    letters = ''.join(chr(0x100 + i) for i in range(max(extra, 0)))
    inputs, output = letters + inputs[3:], letters + output[3:]
  if '.' in inputs + output or len(inputs) != len(input_shape) or len(
      set(inputs)) != len(inputs) or len(set(kernel)) != len(kernel):
    raise refuse
  contracted = [c for c in kernel if c in inputs]
  features = kernel[len(contracted):]
  kept = [c for c in inputs if c not in contracted]
  if (kernel[:len(contracted)] != ''.join(contracted) or not features or
      any(c in inputs or c in contracted for c in features) or
      output != ''.join(kept) + features or inputs[0] in contracted):
    raise refuse
  return kinds.DenseGeneral(tuple(inputs.index(c) for c in contracted),
                            len(features))


# Settings that change a layer's map: they must keep the registered class's
# default (:attr:`LayerType.settings`; rounding settings are not listed).
_DOT = ('dot_general', 'dot_general_cls', 'promote_dtype')
_CONV = ('conv_general_dilated', 'conv_general_dilated_cls', 'promote_dtype')

LAYERS: tuple[LayerType, ...] = (
    LayerType((nnx.Linear,), (nn.Dense,), 'kernel', 'bias', _dense,
              settings=_DOT),
    LayerType((nnx.Conv,), (nn.Conv,), 'kernel', 'bias', _conv,
              settings=_CONV),
    LayerType((nnx.ConvTranspose,), (nn.ConvTranspose,), 'kernel', 'bias',
              _conv_transpose, settings=('promote_dtype',)),
    LayerType((nnx.LinearGeneral,), (nn.DenseGeneral,), 'kernel', 'bias',
              _dense_general, settings=_DOT),
    LayerType((nnx.Embed,), (nn.Embed,), 'embedding', None, _embed,
              also=(('attend', _attend),), settings=('promote_dtype',)),
    LayerType((nnx.Einsum,), (nn.Einsum,), 'kernel', 'bias', _einsum,
              fixed=('einsum_str',), settings=('einsum_op', 'promote_dtype')),
)

# Modules whose parameters no layer owns by design (held at their values in
# the sweep, given the incoming gradient by the transformations).
NORMALISATION = (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm,
                 nnx.InstanceNorm, nn.BatchNorm, nn.LayerNorm, nn.GroupNorm,
                 nn.RMSNorm, nn.InstanceNorm)

NNX_CLASSES = tuple(c for t in LAYERS for c in t.nnx)


def lookup(module) -> LayerType | None:
  """The registry's entry for ``module``, or ``None`` if it is no layer."""
  for entry in LAYERS:
    if isinstance(module, entry.nnx + entry.linen):
      return entry
  return None


def check_unsolved(unsolved: str) -> None:
  if unsolved not in UNSOLVED:
    raise ValueError(f'unsolved must be one of {UNSOLVED}, got {unsolved!r}')


def unsolved_parameters(param_paths, owned, modules) -> list[str]:
  """The parameters that neither a recorded layer nor a norm layer owns.

  Args:
    param_paths: the paths of the trainable parameters.
    owned: the paths of the recorded layers' kernels and biases.
    modules: module path -> module class, for the modules of the model.

  Returns:
    One description per module holding unsolved parameters: their paths
    and the module's class, with a hint where the module is a layer the
    registry knows (then the forward pass did not record its call).
  """
  by_module: dict[Path, list[Path]] = {}
  for path in param_paths:
    cls = modules.get(path[:-1])
    if path in owned or (cls is not None and issubclass(cls, NORMALISATION)):
      continue
    by_module.setdefault(path[:-1], []).append(path)
  found = []
  for module, paths in by_module.items():
    cls = modules.get(module)
    names = ', '.join(f"'{problems_lib.path_str(p)}'" for p in paths)
    if cls is None:
      found.append(names)
    elif any(issubclass(cls, t.nnx + t.linen) for t in LAYERS):
      found.append(f'{names} (a {cls.__name__} that the forward pass did '
                   'not apply itself: unused, or called on a copy of the '
                   'module, or inside a transformation sibp_jax does not '
                   'unroll such as jax.vmap)')
    else:
      found.append(f'{names} ({cls.__name__})')
  return found


def _solved_names() -> str:
  return ', '.join([f'nnx.{c.__name__}' for t in LAYERS for c in t.nnx] +
                   [f'linen.{c.__name__}' for t in LAYERS for c in t.linen])


def check_parameters(param_paths, owned, modules, unsolved: str) -> None:
  """Refuses parameters no layer solves, unless ``unsolved='gradient'``.

  Args: as :func:`unsolved_parameters`, and ``unsolved`` (``'raise'`` or
  ``'gradient'``).

  Raises:
    ValueError: naming every unsolved parameter, for ``unsolved='raise'``.
  """
  found = unsolved_parameters(param_paths, owned, modules)
  if not found or unsolved == 'gradient':
    return
  raise ValueError(
      'these parameters belong to no layer that sibp_jax solves, so SIBP '
      'and ProxBP would only hand them the plain gradient: '
      + ', '.join(found) + f'. sibp_jax solves {_solved_names()} '
      '(normalisation scales and biases take the gradient by design). '
      'Express these layers with those, or pass '
      "unsolved='gradient' to value_grad_and_problems to let them take the "
      "incoming gradient (sibp: its optimizer 'others', by default Adam for "
      'vectors and a plain step of size learning_rate for matrices; '
      'proxbp: its outer optimizer).')
