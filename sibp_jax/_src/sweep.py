"""The backward sweep shared by SIBP (both variants) and ProxBP.

The sweep walks the layers from the output down. At layer ``i`` it holds the
error ``e_g`` on the layer's output ``g_i``: the sum, over every consumer of
``g_i`` (later layers' inputs, the logits), of that consumer's error pulled
back through the parameter-free code at the forward-pass point. It asks the
algorithm's rule for the layer's parameter change and chains the error to
the layer's input through the rule's choice of weights::

    e_f ← A_iᵀ(e_g; θ_chain)          (Dense: e_g W_chainᵀ)

In a chain, ``e_g = s_i'(g_i)ᵀ e_f`` with ``e_f`` the error on the next
layer's input. On a general graph (residual connections, branches,
normalisation over the batch) the sum over consumers is reverse-mode
accumulation through the replayed model, one pass for all layers
(:func:`_graph_sweep`); the paper variant, which fits through ``s_i``, is
defined on chains only.

The algorithms differ only in the rule (``rules.py``):

============  ==========================================  ==============
rule          subproblem                                  chain through
============  ==========================================  ==============
linearized    ridge fit of ``u = g - η e_g`` (exact/CG)   new weights
paper         fit ``s(A(f; θ)) ≈ t = f_i - η e_f``,        new weights
              weights then bias (nonlinear CG; the last
              layer, which is linear, exactly)
proxbp        ridge fit of ``τ = g - e_g / B``,           old weights
              ``Λ = 1/τ_prox`` (exact/CG)                 (backprop)
============  ==========================================  ==============

Everything runs in float32 (or the parameters' dtype if wider); the caller
casts the result back.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sibp_jax._src import kinds
from sibp_jax._src import problems as problems_lib
from sibp_jax._src import rules as rules_lib
from sibp_jax._src import solvers

LayerUpdate = rules_lib.LayerUpdate
Rule = rules_lib.LinearizedRule | rules_lib.PaperRule | rules_lib.ProxRule


def _split_rule(rule):
  """A rule's array fields (hyperparameters that may be traced) and the rest.

  Returns ``(arrays, rebuild)`` with ``rebuild(arrays)`` the rule again. The
  graph sweep hands the arrays to its custom VJP as explicit inputs: a
  custom VJP must not close over values traced by an outer ``jit`` or
  ``vmap`` (a learning rate from ``inject_hyperparams``, a vmapped
  ``τ_prox``).
  """
  fields = {f.name: getattr(rule, f.name) for f in dataclasses.fields(rule)}
  leaves, treedef = jax.tree.flatten(fields)
  dynamic = [i for i, leaf in enumerate(leaves)
             if isinstance(leaf, (jax.Array, np.ndarray))]

  def rebuild(arrays):
    new = list(leaves)
    for i, a in zip(dynamic, arrays):
      new[i] = a
    return dataclasses.replace(rule, **jax.tree.unflatten(treedef, new))

  return [jnp.asarray(leaves[i]) for i in dynamic], rebuild


def _compute_dtype(x, dtype):
  """``x`` in the compute dtype, unless it holds integers (token ids)."""
  return x if jnp.issubdtype(x.dtype, jnp.integer) else x.astype(dtype)


def _zero_tree(tree):
  return jax.tree.map(_zero_cotangent, tree)


def _zero_cotangent(x):
  if x is None:
    return None
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


def _frozen_update(kernel, bias) -> LayerUpdate:
  """A frozen layer's (zero) change: held at its weights, nothing solved."""
  zero = lambda a: None if a is None else jnp.zeros_like(a)
  return LayerUpdate(zero(kernel), zero(bias), solvers.SolveInfo(
      jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32),
      jnp.asarray(solvers.SolveStatus.CONVERGED, jnp.int32)))


def _implied_gradient(kind, inputs, kernel, e_g):
  """``A_iᵀ(e_g)`` for the kernel: the gradient of ``Σ w ℓ`` that the error
  reaching the layer implies (for the mismatch check)."""
  return jax.linear_transpose(lambda k: kind.apply(k, None, inputs),
                              kernel)(e_g)[0]


def _layer_op(layer, rebuild, chain_new, frozen, collect=False,
              report=False):
  """The custom-VJP stand-in for one linear layer in the graph replay.

  ``op(f, inputs, outputs, kernel, bias, weights, hyper, slot)`` returns
  the layer's
  recorded output ``outputs`` (in the compute dtype). Its backward pass
  receives the error ``e_g`` accumulated over every consumer of the output,
  solves the layer's subproblem with the rule, and returns as cotangents:
  for ``f`` (the replayed layer input), the error chained to the layer's
  input, ``A_iᵀ(e_g; θ_chain)``; for ``slot`` (a zero placeholder shaped
  like the update), the layer's :class:`LayerUpdate` (with ``report``,
  also the gradient ``e_g`` implies, :func:`_implied_gradient`); zeros for
  the rest.
  Every array the backward pass needs is an explicit input, so that nothing
  traced by an outer ``jit`` or ``vmap`` is closed over (``weights`` are
  the rows' ``(row_weights, row_fill)``); ``layer`` only supplies its static
  description. The rule is called with ``e_f=None``: on a graph the error
  on a layer's activation is not defined, and the linearized and ProxBP
  rules do not use it. A ``frozen`` layer solves nothing and passes the
  error through its weights. One application of a shared layer
  (``collect``) solves nothing either: it passes the error through the old
  weights and returns ``e_g`` itself as the slot's cotangent, for the one
  solve over all the layer's applications after the pass.
  """
  static = dataclasses.replace(layer, inputs=None, outputs=None,
                               segment=None, params=None, row_weights=None,
                               row_fill=None)

  @jax.custom_vjp
  def op(f, inputs, outputs, kernel, bias, weights, hyper, slot):
    del f, inputs, kernel, bias, weights, hyper, slot
    return outputs

  def fwd(f, inputs, outputs, kernel, bias, weights, hyper, slot):
    del slot
    return outputs, (f, inputs, outputs, kernel, bias, weights, hyper)

  def bwd(residuals, e_g):
    f, inputs, outputs, kernel, bias, weights, hyper = residuals
    e_g = e_g.astype(kernel.dtype)
    problem = dataclasses.replace(
        static, inputs=inputs, outputs=outputs, row_weights=weights[0],
        row_fill=weights[1]).counted(e_g)
    if collect:
      if jnp.issubdtype(f.dtype, jnp.integer):  # token ids: no error below
        e_f = _zero_cotangent(f)
      else:
        _, pullback = jax.vjp(
            lambda f_: static.kind.apply(kernel, None, f_), inputs)
        e_f = pullback(e_g)[0].astype(f.dtype)
      return (e_f, _zero_cotangent(inputs),
              _zero_cotangent(outputs), _zero_cotangent(kernel),
              _zero_cotangent(bias), _zero_tree(weights),
              [_zero_cotangent(h) for h in hyper], e_g)
    update = (_frozen_update(kernel, bias) if frozen else
              rebuild(hyper)(problem, kernel, bias, None, e_g))
    chain_kernel = kernel + update.kernel if chain_new else kernel
    _, pullback = jax.vjp(
        lambda f_: static.kind.apply(chain_kernel, None, f_), inputs)
    e_f = (_zero_cotangent(f) if jnp.issubdtype(f.dtype, jnp.integer) else
           pullback(e_g)[0].astype(f.dtype))
    # The report travels as cotangents in the compute dtype: small
    # integers (iterations, the status code) are exact there.
    info = tuple(jnp.asarray(v).astype(kernel.dtype) for v in update.info)
    slot = (update.kernel, update.bias, info) + (
        (_implied_gradient(static.kind, inputs, kernel, e_g),) if report
        else ())
    return (e_f, _zero_cotangent(inputs), _zero_cotangent(outputs),
            _zero_cotangent(kernel), _zero_cotangent(bias),
            _zero_tree(weights), [_zero_cotangent(h) for h in hyper],
            slot)

  op.defvjp(fwd, bwd)
  return op


def _graph_sweep(problems, params, rule, frozen, report):
  """The sweep over a general graph: one reverse pass through the model.

  The model is replayed once on the forward pass's input with every linear
  layer standing in as :func:`_layer_op`, and ``jax.vjp`` of the replay
  with the output error on the logits runs reverse-mode accumulation: the
  error reaching a layer's output is the sum over all its consumers (the
  logits, later layers through their inputs, residual additions,
  concatenations, normalisations), each layer's transpose taken at the
  rule's weights. Every layer's update is the cotangent of its slot; the
  cost is one forward and one backward pass of the parameter-free code plus
  the layers' solves, linear in depth.
  """
  layers = []
  for layer, (kernel, _) in zip(problems.layers, params):
    dtype = kernel.dtype
    layers.append(dataclasses.replace(
        layer, inputs=_compute_dtype(layer.inputs, dtype),
        outputs=layer.outputs.astype(dtype)))
  hyper, rebuild = _split_rule(rule)
  groups = _applications(layers)
  collect = [_solved_together(layers, groups[layer.key])
             and not is_frozen for layer, is_frozen in zip(layers, frozen)]
  ops = [_layer_op(layer, rebuild, rule.chain_new, is_frozen, shared,
                   i == report)
         for i, (layer, is_frozen, shared) in enumerate(
             zip(layers, frozen, collect))]
  zero = lambda a: None if a is None else jnp.zeros_like(a)
  # A shared application's slot receives its e_g: shaped, and split over
  # devices, like its output.
  slots = [jnp.zeros_like(layer.outputs, k.dtype) if shared else
           (zero(k), zero(b), (jnp.zeros((), k.dtype),) * 3) + (
               (zero(k),) if i == report else ())
           for i, ((k, b), layer, shared) in enumerate(
               zip(params, layers, collect))]
  model_dtypes = [layer.outputs.dtype for layer in problems.layers]

  def replay(slots):
    top = []

    def hook(index, f):
      kernel, bias = params[index]
      layer = layers[index]
      g = ops[index](f, layer.inputs, layer.outputs, kernel, bias,
                     (layer.row_weights, layer.row_fill), hyper,
                     slots[index])
      if index == len(layers) - 1:
        top.append(g)
      return g.astype(model_dtypes[index])

    problems.graph(hook)
    # The model's output is the last layer's output (checked when the
    # problems were built); its error enters in the compute dtype.
    return top[0]

  _, pullback = jax.vjp(replay, slots)
  e = problems.output_error.astype(params[-1][0].dtype)
  (found,) = pullback(e)
  updates, implied = [], None
  for shared, cotangent in zip(collect, found):
    if shared:  # e_g of one application, solved below
      updates.append(None)
      continue
    dk, db, (its, res, status) = cotangent[:3]
    if len(cotangent) > 3:
      implied = cotangent[3]
    updates.append(LayerUpdate(dk, db, solvers.SolveInfo(
        its.astype(jnp.int32), res.astype(jnp.float32),
        status.astype(jnp.int32))))
  for indices in groups.values():
    if not collect[indices[0]]:
      continue
    kernel, bias = params[indices[0]]
    # Each application's rows counted with the error it received.
    members = [layers[i].counted(found[i]) for i in indices]
    if any(isinstance(m.kind, kinds.Attend) for m in members):
      # A table used as the output projection (tied embeddings).
      pairs = [(m, found[i]) for m, i in zip(members, indices)]
      update = rules_lib.tied_update(
          rule, [p for p in pairs if isinstance(p[0].kind, kinds.Embed)],
          [p for p in pairs if isinstance(p[0].kind, kinds.Attend)], kernel)
      for i in indices:
        updates[i] = update
      continue
    # One problem whose rows are every application's, with the error each
    # received: the sum of the applications' data terms. The rows are
    # interleaved example by example (every application has the batch
    # axis first), so that a batch split over devices stays where it is.
    stack = lambda arrays: jnp.stack(arrays, axis=1).reshape(
        (-1,) + arrays[0].shape[1:])
    weights = [m.row_weights for m in members]
    if all(w is None for w in weights):
      weights = None
    else:
      weights = stack([jnp.ones(m.kind.row_shape(m.outputs.shape))
                       if w is None else w
                       for m, w in zip(members, weights)])
    stacked = dataclasses.replace(
        members[0], inputs=stack([m.inputs for m in members]),
        outputs=stack([m.outputs for m in members]), row_weights=weights)
    update = rule(stacked, kernel, bias, None,
                  stack([found[i] for i in indices]))
    for i in indices:
      updates[i] = update
  return updates, implied


def _solved_together(layers, indices) -> bool:
  """Whether a layer's applications are solved after the reverse pass:
  a shared layer, or a table used by ``attend``."""
  return len(indices) > 1 or isinstance(layers[indices[0]].kind,
                                        kinds.Attend)


def _applications(layers) -> dict:
  """Layer key -> the indices of the layer's applications, in order."""
  groups: dict = {}
  for i, layer in enumerate(layers):
    groups.setdefault(layer.key, []).append(i)
  return groups


def backward_sweep(problems: problems_lib.Problems, params, rule: Rule,
                   frozen=None) -> list[LayerUpdate]:
  """The layers' changes of :func:`sweep_and_report` alone."""
  return sweep_and_report(problems, params, rule, frozen)[0]


def check_layer(problems: problems_lib.Problems, frozen) -> int | None:
  """The layer whose gradient the mismatch check compares: the last one
  (in call order) that is solved on its own (neither frozen nor shared nor
  a tied table) with every later layer passing the error through its old
  weights (frozen, shared or tied), so that the error it receives is
  backprop's under every rule; ``None`` if there is none."""
  groups = _applications(problems.layers)
  for i in reversed(range(len(problems.layers))):
    if frozen[i]:
      continue
    if not _solved_together(problems.layers,
                            groups[problems.layers[i].key]):
      return i
  return None


def sweep_and_report(problems: problems_lib.Problems, params, rule: Rule,
                     frozen=None, report: int | None = None):
  """Runs the semi-implicit backward sweep.

  From the last layer to the first, the error reaching layer ``i``'s output
  ``g_i`` is the sum over all its consumers of their errors pulled back
  through the parameter-free code at the forward pass's point: the logits'
  output error, and every later layer's error chained through its input by
  the rule's weights (new for SIBP, old for ProxBP). For a chain this is
  ``e_g = s_i'(g_i)ᵀ A_{i+1}ᵀ(e_{g,i+1}; θ_chain)``; for a general graph
  (residual connections, branches) it is reverse-mode accumulation through
  the model, which :attr:`Problems.graph` makes possible.

  The linearized and ProxBP rules need only that error. The paper variant
  fits through each layer's segment ``s_i`` and its target ``f_i - η e_f``
  and is defined here for chains only: on a graph where a layer's output
  does not feed the next layer alone it raises ``ValueError`` naming the
  layer.

  A layer applied several times in one pass (shared weights: a block
  reused in a loop) appears once per application in ``problems.layers``.
  Its applications are one ridge problem whose rows are all of theirs,
  each with the error it received, solved after the reverse pass; each
  application passes its error on through the *old* weights (the new ones
  depend on every application's error, the last-applied's included). The
  paper variant refuses such a layer.

  Args:
    problems: the layers and output error from one forward pass.
    params: ``(kernel, bias)`` per layer, input to output, in the compute
      dtype (``bias`` is ``None`` for a layer without one).
    rule: a :class:`LinearizedRule`, :class:`PaperRule` or :class:`ProxRule`.
    frozen: a flag per layer (default none): a frozen layer's subproblem is
      not solved, its change is zero and the error passes through its
      ``params`` as they are.

    report: the index of a layer (:func:`check_layer`) whose implied
      gradient to return, or ``None``.

  Returns:
    ``(updates, implied)``: a list of :class:`LayerUpdate` (the changes of
    the parameters), input to output, and ``A_reportᵀ(e_g)``, the gradient
    of ``Σ w ℓ`` with respect to that layer's kernel that the error
    reaching it implies (``None`` without ``report``).
  """
  frozen = tuple(frozen or (False,) * len(problems.layers))
  paper = isinstance(rule, rules_lib.PaperRule)
  for indices in _applications(problems.layers).values():
    if (_solved_together(problems.layers, indices) and
        (paper or problems.graph is None)):
      raise ValueError(
          f"layer '{problems.layers[indices[0]].name}' is applied "
          f'{len(indices)} times (shared weights' + (
              ', as the output projection by attend'
              if any(isinstance(problems.layers[i].kind, kinds.Attend)
                     for i in indices) else '') + '): ' + (
              "variant='paper' fits each layer through the map to the next "
              "one and needs every layer once; use variant='linearized'."
              if paper else 'a shared layer needs the graph sweep, which '
              'problems without a graph (built by hand) cannot run.'))
  if paper:
    for layer in problems.layers[:-1]:
      if layer.segment is None:
        raise ValueError(
            f"variant='paper' fits each layer through the map to the next "
            f"layer, but the output of layer '{layer.name}' does not feed "
            'the next layer alone (a residual connection or a branch): the '
            "paper variant needs a chain; use variant='linearized' on this "
            'model.')
  if problems.graph is not None and not paper:
    return _graph_sweep(problems, params, rule, frozen, report)
  return _chain_sweep(problems, params, rule, frozen, report)


def _chain_sweep(problems, params, rule, frozen, report):
  """The sweep down a chain through its segments."""
  layers = problems.layers
  e_f = problems.output_error
  updates, implied = [None] * len(layers), None
  for i in reversed(range(len(layers))):
    layer = layers[i]
    kernel, bias = params[i]
    dtype = kernel.dtype
    layer = dataclasses.replace(layer,
                                inputs=_compute_dtype(layer.inputs, dtype),
                                outputs=layer.outputs.astype(dtype))
    e_f = e_f.astype(dtype)
    e_g = e_f if layer.segment is None else layer.segment.vjp(
        layer.outputs, e_f).astype(dtype)
    if i == report:
      implied = _implied_gradient(layer.kind, layer.inputs, kernel, e_g)
    updates[i] = (_frozen_update(kernel, bias) if frozen[i] else
                  rule(layer.counted(e_g), kernel, bias, e_f, e_g))
    if i:
      chain_kernel = kernel + updates[i].kernel if rule.chain_new else kernel
      _, pullback = jax.vjp(
          lambda f, k=chain_kernel, kind=layer.kind: kind.apply(k, None, f),
          layer.inputs)
      e_f = pullback(e_g)[0]
  return updates, implied
