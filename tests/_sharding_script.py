"""Data-parallel sibp_jax steps on simulated CPU devices, for test_sharding.py.

JAX fixes the number of CPU devices when it starts, so the tests run this
file in a fresh process with the flag set::

  # 1 device against 8, and the collectives at batch B and 2B, per case:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python tests/_sharding_script.py check
  # two processes with 4 devices each, on this machine (loopback only):
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
      python tests/_sharding_script.py multihost --process_id 0 --port 12355 &
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
      python tests/_sharding_script.py multihost --process_id 1 --port 12355

Every mode prints one JSON object per line. The step is the plain JAX one a
data-parallel user writes: the batch sharded over a ``'data'`` mesh axis,
parameters and optimizer state replicated, one ``jax.jit`` around
``value_grad_and_problems`` and ``update``; no communication is written by
hand.
"""

import argparse
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sibp_jax  # noqa: E402

from _models import MLP  # noqa: E402
from _models import Block  # noqa: E402
from _models import ConvNet  # noqa: E402
from _models import ResNet  # noqa: E402
from _models import arch_data  # noqa: E402
from _models import classification  # noqa: E402
from _models import xent  # noqa: E402

# An MLP 100-120-10: d_in + 1 = 101 and 121 columns against a global batch
# of 40 or 80 rows, so on one device Ridge('auto') solves both layers in
# batch space (Woodbury) and the data-parallel runs exercise the switch to
# Cholesky. No layer width equals a batch size, so a batch-sized array in a
# collective is recognisable by its shape. The ConvNet (8×8×2 inputs, two
# convs, a dense layer) checks the im2col rows of a sharded batch; the
# ResNet (BatchNorm, identity and projection shortcuts) the graph sweep,
# whose BatchNorm statistics are sums over the sharded batch too. The
# transformer block (5 tokens of 6 features, width 8, 2 heads) checks
# attention, the position Embed (whose rows are every token of the sharded
# batch) and LayerNorm: attention mixes tokens within an example only, so
# it too must need no communication of activations. It runs under GSPMD:
# its position ids, a broadcast iota, are replicated, and under explicit
# sharding the backward pass of adding the replicated lookup to the sharded
# tokens gathers the batch's cotangent, in plain backprop as much as in
# SIBP. The token model (`tokens`: Embed of ids sharded with the batch,
# tanh, mean over tokens, a dense head) checks the embedding's lookup,
# counts and scatter under explicit sharding; the tied one (`tied`: the
# same table as the output projection through `attend`, a per-token loss)
# the tied solve's counts, scatter and `d × d` Gram; the scanned one
# (`scanned`) a scan over stacked layers and a layer applied twice.
SIZES = (100, 120, 10)
BATCH = 40
TOKENS = 5


VOCAB = 11


class TokenModel(nnx.Module):
  """Embed ids ``(batch, TOKENS)``, tanh, mean over tokens, Linear head."""

  def __init__(self, seed=0):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(VOCAB, 8, rngs=rngs)
    self.head = nnx.Linear(8, SIZES[-1], rngs=rngs)

  def __call__(self, ids):
    spec = jax.typeof(ids).sharding.spec
    # Under explicit sharding the lookup is told how its rows are split.
    split = P(spec[0], None, None) if spec and spec[0] else None
    h = self.embed(ids, out_sharding=split)
    return self.head(jnp.tanh(h).mean(axis=1))


class TiedModel(nnx.Module):
  """Embed ids ``(batch, TOKENS)``, tanh, Linear, tanh, and the table
  again as the output projection: the next id's logits at every token."""

  def __init__(self, seed=0):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(VOCAB, 8, rngs=rngs)
    self.mix = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, ids):
    spec = jax.typeof(ids).sharding.spec
    split = P(spec[0], None, None) if spec and spec[0] else None
    h = self.embed(ids, out_sharding=split)
    return self.embed.attend(jnp.tanh(self.mix(jnp.tanh(h))))


class ScannedModel(nnx.Module):
  """Linear, a scan over two stacked Linear layers (one layer per step,
  each its slice of the stacked kernel), a Linear applied twice (shared:
  one problem with both applications' rows), Linear head."""

  def __init__(self, seed=0):
    rngs = nnx.Rngs(seed)
    self.a = nnx.Linear(SIZES[0], 16, rngs=rngs)

    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(16, 16, rngs=rngs)

    self.blocks = make(rngs)
    self.mix = nnx.Linear(16, 16, rngs=rngs)
    self.head = nnx.Linear(16, SIZES[-1], rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.a(x))
    h = nnx.scan(lambda h, layer: jnp.tanh(layer(h)),
                 in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(h, self.blocks)
    h = jnp.tanh(self.mix(jnp.tanh(self.mix(h))))
    return self.head(h)


def _data(arch, batch, seed=0):
  if arch == 'tied':  # the next id, per token
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, VOCAB, (batch, TOKENS)), jnp.int32)
    return ids, (ids + 1) % VOCAB
  if arch == 'tokens':
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.integers(0, VOCAB, (batch, TOKENS)), jnp.int32),
            jnp.asarray(rng.integers(0, SIZES[-1], batch), jnp.int32))
  if arch in ('mlp', 'scanned'):
    return classification(batch=batch, d_in=SIZES[0], seed=seed)
  if arch == 'transformer':
    x, y = classification(batch=batch, d_in=TOKENS * 6, seed=seed)
    return x.reshape(batch, TOKENS, 6), y
  return arch_data(arch, batch=batch, seed=seed)


def _model(arch):
  if arch == 'mlp':
    return MLP(SIZES)
  if arch == 'transformer':
    return Block(np.float32, tokens=TOKENS)
  if arch == 'tokens':
    return TokenModel()
  if arch == 'tied':
    return TiedModel()
  if arch == 'scanned':
    return ScannedModel()
  return ResNet() if arch == 'resnet' else ConvNet()


def _cases(cholesky: bool):
  """The transformations compared; ``cholesky`` pins the exact solves."""
  ridge = sibp_jax.Ridge('cholesky') if cholesky else 'exact'
  last = sibp_jax.Ridge('cholesky') if cholesky else None
  inner = (sibp_jax.NonlinearCG(space='parameters') if cholesky else
           sibp_jax.NonlinearCG())
  return {
      'sibp_linearized': lambda: sibp_jax.sibp(0.1, solver=ridge),
      'sibp_linearized_cg': lambda: sibp_jax.sibp(
          0.1, solver=sibp_jax.ConjugateGradient(5)),
      'sibp_paper': lambda: sibp_jax.sibp(
          0.1, variant='paper', nonlinear_solver=inner,
          last_layer_solver=last),
      'proxbp_exact': lambda: sibp_jax.proxbp(1.0, tau_prox=0.05,
                                              solver=ridge),
      'proxbp_cg3': lambda: sibp_jax.proxbp(
          1.0, tau_prox=0.05, solver=sibp_jax.ConjugateGradient(3)),
  }


# Explicit sharding (the default axis type of jax.make_mesh): Ridge('auto')
# sees the sharded batch and takes Cholesky by itself. Automatic (GSPMD)
# sharding: the user pins Ridge('cholesky'). 'gspmd_default' keeps the
# shape-based default under GSPMD, the configuration that would gather the
# batch; it is the negative control of the collectives check.
MODES = {
    'explicit': (AxisType.Explicit, False),
    'gspmd': (AxisType.Auto, True),
    'gspmd_default': (AxisType.Auto, False),
}
EXACT = ('sibp_linearized', 'sibp_paper', 'proxbp_exact')
# (mode, arch, case) checked by `check`: under explicit sharding the MLP
# with every SIBP variant and exact ProxBP, the ConvNet with exact SIBP and
# ProxBP's CG, the ResNet (graph sweep, BatchNorm) with exact SIBP; under
# GSPMD the two solves whose method the user pins (the exact ridge solve
# and the paper variant's parameter-space CG), and the transformer block
# with exact SIBP (see below); the negative control once.
# Each row compiles three programs; ProxBP's exact rule on the ResNet and
# under GSPMD is left out, as it sums over the batch exactly as SIBP's does
# (the same Gram matrix and right-hand side, another scale and Λ), and
# its sharded solve is checked on the MLP.
CHECKS = ([('explicit', 'mlp', c) for c in EXACT + ('sibp_linearized_cg',)] +
          [('explicit', 'convnet', c) for c in ('sibp_linearized',
                                                'proxbp_cg3')] +
          [('explicit', 'resnet', 'sibp_linearized')] +
          [('explicit', a, 'sibp_linearized')
           for a in ('tokens', 'tied', 'scanned')] +
          [('gspmd', 'mlp', c) for c in EXACT[:2]] +
          [('gspmd', 'transformer', 'sibp_linearized')] +
          [('gspmd_default', 'mlp', 'sibp_linearized')])


def make_step(tx, graphdef):
  """The pure train step ``(variables, opt_state, x, y) -> (..., loss)``.

  ``variables`` is ``(params, rest)``: the ``nnx.Param`` state, trained,
  and everything else (BatchNorm statistics), carried.
  """

  def step(variables, opt_state, x, y):
    params, rest = variables
    model = nnx.merge(graphdef, params, rest)
    loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=xent)
    updates, opt_state = tx.update(nnx.as_pure(grads), opt_state, params,
                                   problems=problems)
    _, _, rest = nnx.split(model, nnx.Param, ...)
    return ((optax.apply_updates(params, updates), nnx.as_pure(rest)),
            opt_state, loss)

  return step


def _setup(case, cholesky, arch='mlp'):
  graphdef, params, rest = nnx.split(_model(arch), nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  tx = _cases(cholesky)[case]()
  return make_step(tx, graphdef), (params, rest), tx.init(params)


def _mesh(axis_type):
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(axis_type,))


def _max_diff(a, b):
  """Largest ``|a - b|`` and the largest ``|b|`` over all leaves."""
  a, b = jax.device_get((a, b))
  diff = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  scale = max(float(np.max(np.abs(np.asarray(v)))) for v in jax.tree.leaves(b))
  return diff, scale


COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
               'collective-permute')
_COLLECTIVE = re.compile(
    r'=\s*(\(.*?\)|\S+)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
_ARRAY = re.compile(r'([a-z]+[0-9]*)\[([0-9,]*)\]')


def collectives(hlo_text):
  """``[(op, [shape, ...]), ...]`` of the collectives in compiled HLO text.

  A combined collective (XLA merges all-reduces into one with a tuple
  result) lists every array it carries.
  """
  found = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      shapes = [tuple(int(d) for d in dims.split(',') if d)
                for _, dims in _ARRAY.findall(m.group(1))]
      found.append((m.group(2), shapes))
  return found


def _run(run_step, params, opt_state, batches, put=lambda a: a):
  for x, y in batches:
    params, opt_state, loss = run_step(params, opt_state, put(x), put(y))
  return params, loss


def check(steps=2):
  """Per (mode, arch, case): 1 device against 8, collectives at B and 2B.

  The reference is the plain one-device step with the default solvers
  (batch-space solves at this size), run on the batches and, as a yardstick
  of float32 round-off, on the same batches with their rows permuted: the
  same sums in another order, as a sharded batch adds them. The sharded
  step is compiled once per batch size; its compiled HLO lists the
  collectives, and the program compiled for B runs the comparison.
  """
  reference = {}
  for mode, arch, case in CHECKS:
    batches = [_data(arch, BATCH, seed=s) for s in range(steps)]
    if (arch, case) not in reference:
      step, params, opt_state = _setup(case, False, arch)
      jitted = jax.jit(step)
      perm = np.random.default_rng(0).permutation(BATCH)
      reference[arch, case] = (
          _run(jitted, params, opt_state, batches),
          _run(jitted, params, opt_state,
               [(x[perm], y[perm]) for x, y in batches])[0])
    (ref, ref_loss), permuted = reference[arch, case]
    axis_type, cholesky = MODES[mode]
    mesh = _mesh(axis_type)
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    put = lambda a, data=data: jax.device_put(a, data)
    step, params, opt_state = _setup(case, cholesky, arch)
    params, opt_state = jax.device_put((params, opt_state), rep)
    row = {'mode': mode, 'arch': arch, 'case': case,
           'devices': jax.device_count(), 'batch': BATCH, 'steps': steps}
    with jax.set_mesh(mesh):
      compiled = {}
      for b in (BATCH, 2 * BATCH):
        x, y = _data(arch, b)
        compiled[b] = jax.jit(step).lower(params, opt_state, put(x),
                                          put(y)).compile()
        row[f'collectives_{b}'] = collectives(compiled[b].as_text())
      params, loss = _run(compiled[BATCH], params, opt_state, batches, put)
    diff, scale = _max_diff(params, ref)
    row.update(max_abs_diff=diff, max_abs_param=scale,
               permuted_diff=_max_diff(permuted, ref)[0],
               loss_1=float(ref_loss), loss_n=float(loss),
               replicated=all(a.sharding.is_fully_replicated
                              for a in jax.tree.leaves(params)))
    print(json.dumps(row), flush=True)


def _global(a, sharding):
  """A global array from a host value that every process holds in full."""
  host = np.asarray(a)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


def multihost(process_id, port, num_processes=2,
              cases=('sibp_linearized', 'sibp_paper', 'proxbp_exact')):
  """One data-parallel step across processes against a local one-device run.

  Every process builds the same global batch from the seed and contributes
  its own rows with ``jax.make_array_from_process_local_data``; the
  parameters come back replicated, so every process can read them.
  """
  jax.distributed.initialize(
      coordinator_address=f'127.0.0.1:{port}', num_processes=num_processes,
      process_id=process_id, initialization_timeout=60)
  mesh = _mesh(AxisType.Explicit)
  data, rep = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  x, y = _data('mlp', BATCH)
  rows = BATCH // num_processes
  mine = slice(process_id * rows, (process_id + 1) * rows)
  xs = jax.make_array_from_process_local_data(data, np.asarray(x)[mine])
  ys = jax.make_array_from_process_local_data(data, np.asarray(y)[mine])
  local = jax.local_devices()[0]
  for case in cases:
    step, params, opt_state = _setup(case, False)
    gparams, gstate = jax.tree.map(lambda a: _global(a, rep),
                                   (params, opt_state))
    with jax.set_mesh(mesh):
      new, _, loss = jax.jit(step)(gparams, gstate, xs, ys)
    new = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), new)
    ref, _, ref_loss = jax.jit(step)(*jax.device_put(
        (params, opt_state, x, y), local))
    diff, scale = _max_diff(new, ref)
    print(json.dumps({
        'process_id': jax.process_index(),
        'process_count': jax.process_count(),
        'devices': jax.device_count(),
        'local_devices': jax.local_device_count(), 'case': case,
        'max_abs_diff': diff, 'max_abs_param': scale,
        'loss_global': float(np.asarray(loss.addressable_data(0))),
        'loss_local': float(ref_loss)}), flush=True)
  jax.distributed.shutdown()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('mode', choices=('check', 'multihost'))
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--port', type=int, default=12355)
  args = parser.parse_args()
  if args.mode == 'check':
    check()
  else:
    multihost(args.process_id, args.port)


if __name__ == '__main__':
  main()
