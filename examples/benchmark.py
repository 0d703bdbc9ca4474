r"""Benchmarks: step cost against optax baselines, and loss after one epoch.

Everything is measured in ONE process, with jitted steps, compilation
excluded, and reported as medians and ratios to Adam, because absolute
times on shared machines are noisy.

* ``--section step``: median wall time of one train step (forward pass,
  problems or gradient, update) of each method on the SIBP authors' network
  (784-500-10, ReLU) at batch 100, on random data. Methods are timed in
  interleaved rounds so that machine noise hits them alike. Also the
  compiled step's temporary memory as a ratio to Adam's.
* ``--section epoch``: one epoch of real Fashion-MNIST (``--data_dir``, a
  prepared TFDS directory) with the same initial weights and the same
  batches for every method; prints the full training-set loss after the
  epoch and the seconds spent in update steps.

Run::

  python examples/benchmark.py --section step
  python examples/benchmark.py --section epoch --data_dir ~/tensorflow_datasets

On CPU, set ``OPENBLAS_NUM_THREADS=1`` on a machine whose cores are busy:
the exact solves' triangular solves go through OpenBLAS, whose threads
spin-wait badly when they share the cores.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sibp_jax

from models import PaperMLP

LOSS = optax.softmax_cross_entropy_with_integer_labels


# name -> (transformation factory, needs problems)
METHODS: dict[str, tuple[Callable[[], optax.GradientTransformation], bool]] = {
    'sibp_linearized': (lambda: sibp_jax.sibp(0.1), True),
    'sibp_paper': (lambda: sibp_jax.sibp(0.1, variant='paper'), True),
    'proxbp': (lambda: sibp_jax.proxbp(1.0, tau_prox=0.05), True),
    'proxbp_cg3': (lambda: sibp_jax.proxbp(
        1.0, tau_prox=0.05, solver=sibp_jax.ConjugateGradient(3)), True),
    'sgd': (lambda: optax.sgd(0.1), False),
    'adam': (lambda: optax.adam(1e-3), False),
}


def make_step(model: nnx.Module, tx: optax.GradientTransformation,
              needs_problems: bool):
  """A pure jitted step ``(state, x, y) -> (state, loss)``.

  Returns:
    ``(step, state, model_of)``: the step, the initial state of model and
    optimizer, and ``model_of(state)`` giving the model back.
  """
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    if needs_problems:
      loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
          model, x, y, loss_fn=LOSS)
      optimizer.update(model, grads, problems=problems)
    else:
      loss, grads = nnx.value_and_grad(
          lambda m: jnp.mean(LOSS(m(x), y)))(model)
      optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  def model_of(state):
    return nnx.merge(graphdef, state)[0]

  return jax.jit(step, donate_argnums=0), state, model_of


def step_cost(methods: Sequence[str], batch: int = 100, rounds: int = 30,
              seed: int = 0) -> dict[str, Any]:
  """Median step time and compiled temporary memory of each method."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.random((batch, 784)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
  steps, states, memory = {}, {}, {}
  for name in methods:
    factory, needs = METHODS[name]
    steps[name], states[name], _ = make_step(PaperMLP(seed=seed),
                                             factory(), needs)
    compiled = steps[name].lower(states[name], x, y).compile()
    analysis = compiled.memory_analysis()
    memory[name] = None if analysis is None else int(
        analysis.temp_size_in_bytes)
    states[name], loss = steps[name](states[name], x, y)  # warm-up
    jax.block_until_ready(loss)
  times = {name: [] for name in methods}
  for _ in range(rounds):
    for name in methods:
      start = time.perf_counter()
      states[name], loss = steps[name](states[name], x, y)
      jax.block_until_ready((states[name], loss))
      times[name].append(time.perf_counter() - start)
  base = float(np.median(times['adam']))
  return {
      name: {
          'median_ms': 1e3 * float(np.median(times[name])),
          'ratio_to_adam': float(np.median(times[name])) / base,
          'temp_bytes': memory[name],
          'memory_ratio_to_adam': (
              None if memory[name] is None or not memory['adam'] else
              memory[name] / memory['adam']),
      } for name in methods}


def load_tfds(name: str, data_dir: str | None, split: str):
  """Images as float32 in [0, 1] and int32 labels, via ``tfds.data_source``."""
  import tensorflow_datasets as tfds  # examples extra
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  records = source.__getitems__(list(range(len(source))))
  x = np.stack([r['image'] for r in records]).astype(np.float32) / 255.0
  y = np.asarray([r['label'] for r in records], np.int32)
  return x.reshape(len(x), -1), y


def one_epoch(methods: Sequence[str], data_dir: str | None,
              dataset: str = 'fashion_mnist', batch: int = 100,
              seed: int = 0) -> dict[str, Any]:
  """Training loss after one epoch, same initial weights and batches."""
  x, y = load_tfds(dataset, data_dir, 'train')
  order = np.random.default_rng(seed).permutation(len(x))
  batches = order[:len(x) // batch * batch].reshape(-1, batch)
  xs, ys = jnp.asarray(x), jnp.asarray(y)

  @nnx.jit
  def full_loss(model):
    return jnp.mean(LOSS(model(xs), ys))

  results = {}
  for name in methods:
    factory, needs = METHODS[name]
    model = PaperMLP(seed=seed)
    start_loss = float(full_loss(model))
    step, state, model_of = make_step(model, factory(), needs)
    # Compile on a copy of the state: the run itself starts untouched.
    warm = jax.tree.map(jnp.copy, state)
    jax.block_until_ready(step(warm, xs[batches[0]], ys[batches[0]]))
    seconds = 0.0
    for idx in batches:
      xb, yb = jax.block_until_ready((xs[idx], ys[idx]))
      begin = time.perf_counter()
      state, _ = step(state, xb, yb)
      jax.block_until_ready(state)
      seconds += time.perf_counter() - begin
    results[name] = {'start_loss': start_loss,
                     'train_loss': float(full_loss(model_of(state))),
                     'update_seconds': seconds}
  return results


def _table(results: dict[str, Any], columns: Sequence[str]) -> str:
  lines = ['| method | ' + ' | '.join(columns) + ' |',
           '|---' * (len(columns) + 1) + '|']
  for name, row in results.items():
    cells = []
    for c in columns:
      v = row[c]
      cells.append('n/a' if v is None else f'{v:.4g}' if isinstance(
          v, float) else str(v))
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--section', choices=('step', 'epoch', 'all'),
                      default='step')
  parser.add_argument('--methods', default=','.join(METHODS),
                      help='comma-separated subset of ' + ', '.join(METHODS))
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data directory holding the dataset')
  parser.add_argument('--dataset', default='fashion_mnist')
  parser.add_argument('--rounds', type=int, default=30)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default=None, help='write results here')
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(',') if m]
  unknown = set(methods) - set(METHODS)
  if unknown:
    parser.error(f'unknown methods {sorted(unknown)}')
  if 'adam' not in methods:
    methods.append('adam')
  out: dict[str, Any] = {'device': jax.devices()[0].device_kind,
                         'backend': jax.default_backend()}
  print(f'# device: {out["device"]} ({out["backend"]})')
  if args.section in ('step', 'all'):
    out['step'] = step_cost(methods, rounds=args.rounds, seed=args.seed)
    print('\n## step cost, 784-500-10 MLP, batch 100\n')
    print(_table(out['step'], ['median_ms', 'ratio_to_adam',
                               'memory_ratio_to_adam']))
  if args.section in ('epoch', 'all'):
    out['epoch'] = one_epoch(methods, args.data_dir, args.dataset,
                             seed=args.seed)
    print(f'\n## one epoch of {args.dataset}, batch 100, seed {args.seed}\n')
    print(_table(out['epoch'], ['start_loss', 'train_loss',
                                'update_seconds']))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == '__main__':
  main()
