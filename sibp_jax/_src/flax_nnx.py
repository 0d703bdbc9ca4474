"""The flax.nnx adapter: problems from one forward pass of an nnx module."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any

import jax.numpy as jnp
from flax import nnx

from sibp_jax._src import capture
from sibp_jax._src import flax_layers
from sibp_jax._src import forward as forward_lib

# The unpatched methods, taken once: nested interception must never call an
# already-patched method (it would record a layer twice).
_CALLS = {cls: cls.__call__ for cls in flax_layers.NNX_CLASSES}
# Other methods that use a layer's parameters (``Embed.attend``).
_OTHER = {(cls, name): getattr(cls, name) for entry in flax_layers.LAYERS
          for cls in entry.nnx for name, _ in entry.also}
_LOCK = threading.RLock()


def _layer_paths(model) -> tuple[dict[int, tuple], dict[int, tuple]]:
  """The paths of ``model``'s layers by the id of the module and by the id
  of its kernel's value (for the copies nnx.scan and nnx.remat make)."""
  layers = [(tuple(path), m) for path, m in nnx.iter_modules(model)
            if flax_layers.lookup(m) is not None]
  return ({id(m): path for path, m in layers},
          {id(getattr(m, flax_layers.lookup(m).kernel)[...]): path
           for path, m in layers})


@contextlib.contextmanager
def _intercept(model):
  """Routes the calls of ``model``'s linear layers to the active tape.

  nnx has no method interceptor, so the ``__call__`` of every nnx class of
  the layer registry is swapped for the duration of the block (under a
  lock, restored on exit). Instances of other models are unaffected: only
  layers of ``model`` are looked up.
  """
  paths, by_kernel = _layer_paths(model)

  def patched(original, method='__call__'):
    def call(self, inputs, *args, **kwargs):
      tape = capture.current_tape()
      compute = lambda: original(self, inputs, *args, **kwargs)
      if tape is None:
        return compute()
      path, index = paths.get(id(self)), ()
      entry = flax_layers.lookup(self)
      if path is None:
        # A copy of a layer made by nnx.scan (its kernel a slice of the
        # stacked one) or nnx.remat (the same kernel).
        root, index = tape.origin(getattr(self, entry.kernel)[...])
        path = by_kernel.get(id(root))
        if index and path is None:  # sliced from a moved copy
          raise capture.stacked_elsewhere(f'an nnx.{type(self).__name__}')
      if path is None:  # not a layer of this model
        return tape.other(compute)
      name = capture.layer_str(path, index)
      if method == '__call__':
        entry.check_call(name, args, kwargs)
      names, describe = entry.use(self, method)
      return tape.visit(
          path, inputs, compute, names,
          lambda: describe(self, name, inputs.shape),
          lambda: tuple(None if n is None else getattr(self, n)[...]
                        for n in names), index)
    return call

  with _LOCK:
    saved = {cls: cls.__call__ for cls in _CALLS}
    saved_other = {key: getattr(*key) for key in _OTHER}
    for cls, original in _CALLS.items():
      cls.__call__ = patched(original)
    for (cls, name), original in _OTHER.items():
      setattr(cls, name, patched(original, name))
    try:
      yield
    finally:
      for cls, method in saved.items():
        cls.__call__ = method
      for (cls, name), method in saved_other.items():
        setattr(cls, name, method)


@dataclasses.dataclass(frozen=True)
class _Runner:
  """Replays an nnx model from its graph definition and variables."""

  graphdef: Any

  def __call__(self, data, x):
    model = nnx.merge(self.graphdef, data)
    with _intercept(model):
      return model(x)


def value_grad_and_problems(model: nnx.Module, x, y, *, loss_fn,
                            check_chain: bool = True,
                            unsolved: str = 'raise', weights=None):
  """Loss, gradient and layer-wise problems from one forward pass.

  Runs ``model(x)`` once, recording the input ``f_{i-1}`` and output
  ``g_i`` of every layer of the registry it applies (``nnx.Linear``,
  ``nnx.Conv``, ``nnx.LinearGeneral``, ``nnx.Embed``, ``nnx.Einsum``: see
  the README's table), and differentiates the mean loss ``J`` with
  respect to the model's ``nnx.Param`` variables, as ``nnx.value_and_grad``
  does: the forward pass updates the model's ``BatchStat`` variables and
  advances its random streams as usual.

  The recognised layers, in call order, may form any graph: between them
  runs any parameter-free code, including residual additions, branches,
  concatenation, pooling, normalisation (``BatchNorm``, ``LayerNorm``,
  ``GroupNorm``: their scale and bias are held at their current values in
  the sweep and take the incoming gradient) and ``Dropout``. The sweep
  replays the model from the state the forward pass started from, so it
  sees the forward pass's dropout mask and batch statistics. A layer
  applied several times (shared weights) and an ``Embed`` also used by
  ``attend`` (tied embeddings) are solved from all their uses. Layers
  under ``nnx.scan`` and ``nnx.remat`` (or ``jax.lax.scan``,
  ``jax.checkpoint``) are solved as in the same model written without
  them: a scan over layers stacked by ``nnx.vmap`` is one layer per step,
  each owning its slice of the stacked parameters (named
  ``blocks/linear[2]``); a scan over time that applies one layer at every
  step is that layer shared by the steps. The forward pass and the sweep
  run such scans as Python loops (a scan whose body applies no layer
  stays a scan), so their programs grow with the number of steps. Refused
  with a ``ValueError`` naming the layer: a layer applied twice to inputs of
  different shapes, a layer applied inside another transformation within the
  model (``nnx.vmap``, ``jax.vmap``, ``lax.cond``), a layer whose output
  reaches no later layer, an unsupported convolution, a model whose output is
  not its last linear layer's output; and, naming the parameters, any
  ``nnx.Param`` that no recorded layer owns and no normalisation layer holds
  (a custom module's kernel, an ``nnx.LoRA`` adapter, a layer the forward
  pass did not call), unless ``unsolved='gradient'``.

  Args:
    model: an ``nnx.Module`` built from ``nnx.Linear`` / ``nnx.Conv`` layers.
    x: the batch of inputs, leading axis the batch.
    y: the labels (any array with the same leading axis).
    loss_fn: ``loss_fn(logits, labels)`` returning unreduced losses:
      one loss per example ``(B,)`` or per position ``(B, T, ...)``, e.g.
      ``optax.softmax_cross_entropy_with_integer_labels``. Every loss term
      is then an example of the sweep: ``J`` is their mean, the output
      error ``e = ∂ℓ/∂z`` is each term's own gradient (not divided by the
      number of terms), and ``η`` moves each token's logits as it moves an
      example's.
    check_chain: read the layers' graph off one extra trace (default
      ``True``; nothing at run time): refuse layers that reach no output,
      and tell chain links (where the SIBP paper variant's segments are
      defined) from the rest. With ``False`` the model is taken to be a
      chain for the paper variant.
    unsolved: what to do with trainable parameters that no layer solves
      (normalisation scales and biases aside): ``'raise'`` (default)
      refuses the model with a ``ValueError`` naming them; ``'gradient'``
      lets the transformations hand them the incoming gradient (``sibp``:
      its ``others`` optimizer: by default Adam for vectors, a plain step
      of size ``learning_rate`` for matrices; ``proxbp``: its outer
      optimizer).
    weights: ``None``, or a weight per example ``(B,)`` or per position
      ``(B, T, ...)`` (padding, a prompt: 0 drops the term). The mean
      loss becomes ``J = Σ w ℓ / Σ w`` (per-position weights broadcast
      over a per-position loss; a per-example loss takes each example's
      largest weight). A weight multiplies its term once: the output error
      is ``w ⊙ ∂ℓ/∂z``, so every layer's error is that of ``Σ w ℓ``, and a
      row of a layer's regression counts as its own term's weight, as the
      batch's largest weight where it has none but carries error (a prompt
      token that later tokens attend to), and not at all where it reaches
      no weighted term (docs/algorithms.md, "Weights"). Which axis of
      each layer's input and output holds the batch is read from one more
      trace of the model, shapes only, at another batch size.

  Returns:
    ``(loss, grads, problems)``: the mean loss, the gradient (the same
    ``nnx.State`` that ``nnx.grad`` gives) and the :class:`sibp_jax.Problems`
    to pass to ``optimizer.update(model, grads, problems=problems)``.

  Example:
    >>> import jax.numpy as jnp, optax, sibp_jax
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
    ...                        nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
    >>> loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
    ...     model, jnp.ones((5, 4)), jnp.zeros((5,), jnp.int32),
    ...     loss_fn=optax.softmax_cross_entropy_with_integer_labels)
    >>> [layer.inputs.shape for layer in problems.layers]
    [(5, 4), (5, 8)]
  """
  flax_layers.check_unsolved(unsolved)
  forward = forward_lib.Forward(jnp.asarray(x), jnp.asarray(y), loss_fn,
                                weights)
  # The sweep replays the model from the state the forward pass started
  # from: the same random state draws the same dropout mask, and what the
  # replay changes (BatchStat, RngCount) is discarded with its copy. The
  # values are read now: the split state shares its Variables with the
  # model, which the forward pass updates in place.
  graphdef, state = nnx.split(model)
  start = nnx.as_pure(state)

  def mean_loss(model):
    def run():
      with _intercept(model):
        return model(forward.x), None
    return forward.loss(run)

  (loss, aux), grads = nnx.value_and_grad(mean_loss, has_aux=True)(model)
  flax_layers.check_parameters(
      [tuple(path) for path, v in nnx.iter_graph(model)
       if isinstance(v, nnx.Param)], forward.owned(),
      {tuple(path): type(m) for path, m in nnx.iter_modules(model)}, unsolved)
  problems = forward.problems(loss, aux, runner=_Runner(graphdef),
                              data=start, check=check_chain)
  return loss, grads, problems
