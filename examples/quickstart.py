r"""Quickstart: SIBP against Adam on scikit-learn's handwritten digits.

Trains the same small MLP (64-128-10, ReLU, ``flax.nnx``) twice on the 8x8
digits bundled with scikit-learn (no download): once with semi-implicit back
propagation, ``sibp_jax.sibp(0.1)`` (the default linearized variant, exact
ridge solves per layer), and once with ``optax.adam(1e-3)`` on the plain
gradient. Both runs start from the same initial weights and see the same
shuffled minibatches in the same order, so the only difference is the
optimizer. It prints, per method, the loss on the full training set after
training, the test accuracy, and the seconds spent in the jitted update steps
(measured after a warm-up step that compiles them, so compilation is not
counted).

The SIBP step is the pattern to copy::

  optimizer = nnx.Optimizer(model, sibp_jax.sibp(0.1), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
        model, x, y, loss_fn=optax.softmax_cross_entropy_with_integer_labels)
    optimizer.update(model, grads, problems=problems)
    return loss

Run it from the repository root (needs the ``examples`` extra: scikit-learn
and tqdm)::

  python examples/quickstart.py --epochs 10 --seed 0 --batch_size 64

Add ``--json results.json`` to also write the results to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn import datasets
from sklearn import model_selection
from tqdm import tqdm

import sibp_jax

METHODS = ('sibp', 'adam')
TEST_SIZE = 360  # Of 1,797 digits: 1,437 to train on, 360 to test on.

_loss_fn = optax.softmax_cross_entropy_with_integer_labels


def load_digits_split(
    seed: int = 0, test_size: int = TEST_SIZE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Loads scikit-learn's digits and splits them into train and test sets.

  Args:
    seed: seed of the (stratified) split; the same seed gives the same split.
    test_size: number of test examples (default 360 of 1,797).

  Returns:
    ``(x_train, y_train, x_test, y_test)``: float32 pixels in ``[0, 1]`` of
    shape ``(n, 64)`` and int32 labels in ``0..9`` of shape ``(n,)``.
  """
  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32)  # Pixels are 0..16.
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=test_size, random_state=seed, stratify=y)
  return x_train, y_train, x_test, y_test


class MLP(nnx.Module):
  """A ``64-hidden-10`` perceptron with a ReLU hidden layer."""

  def __init__(self, din: int = 64, dhidden: int = 128, dout: int = 10, *,
               rngs: nnx.Rngs):
    self.hidden = nnx.Linear(din, dhidden, rngs=rngs)
    self.out = nnx.Linear(dhidden, dout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(nnx.relu(self.hidden(x)))


def make_model(seed: int = 0) -> MLP:
  """The MLP with its initial weights; the same seed gives the same weights.

  Args:
    seed: seed of the weight initialisation.

  Returns:
    A fresh :class:`MLP` (64-128-10).
  """
  return MLP(rngs=nnx.Rngs(seed))


def epoch_batches(num_examples: int, batch_size: int, seed: int,
                  epoch: int) -> np.ndarray:
  """Indices of one epoch's shuffled minibatches, the same for every method.

  The last partial batch is dropped so that every step has the same shape
  (and the jitted step compiles once).

  Args:
    num_examples: size of the training set.
    batch_size: examples per step.
    seed: shuffling seed.
    epoch: the epoch (each epoch has its own permutation).

  Returns:
    An int array of shape ``(num_examples // batch_size, batch_size)``.
  """
  steps = num_examples // batch_size
  if steps == 0:
    raise ValueError(f'batch_size={batch_size} is larger than the training '
                     f'set ({num_examples} examples).')
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return perm[:steps * batch_size].reshape(steps, batch_size)


def make_optimizer(method: str, model: nnx.Module,
                   learning_rate: float | None = None) -> nnx.Optimizer:
  """The optimizer of ``method`` for ``model``.

  Args:
    method: ``'sibp'`` or ``'adam'``.
    model: the model to optimize (its ``nnx.Param`` variables).
    learning_rate: SIBP's neuron step ``η`` (default 0.1) or Adam's step
      (default 1e-3).

  Returns:
    An ``nnx.Optimizer`` over ``model``'s ``nnx.Param`` variables.
  """
  if method == 'sibp':
    tx = sibp_jax.sibp(0.1 if learning_rate is None else learning_rate)
  elif method == 'adam':
    tx = optax.adam(1e-3 if learning_rate is None else learning_rate)
  else:
    raise ValueError(f'Unknown method {method!r}; expected one of {METHODS}.')
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def sibp_step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array,
              y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One SIBP step; returns the batch loss and whether the step was taken."""
  loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=_loss_fn)
  optimizer.update(model, grads, problems=problems)
  # sibp is chain(scale_by_sibp, scale_by_learning_rate): the first state
  # carries the step's diagnostics.
  return loss, jnp.asarray(optimizer.opt_state[0].info.finite)


@nnx.jit
def adam_step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array,
              y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One Adam step on the plain gradient; returns the loss and finiteness."""

  def mean_loss(model):
    return jnp.mean(_loss_fn(model(x), y))

  loss, grads = nnx.value_and_grad(mean_loss)(model)
  optimizer.update(model, grads)
  return loss, jnp.isfinite(loss)


_STEPS = {'sibp': sibp_step, 'adam': adam_step}


@nnx.jit
def evaluate(model: nnx.Module, x: jax.Array,
             y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
  logits = model(x)
  return (jnp.mean(_loss_fn(logits, y)),
          jnp.mean(jnp.argmax(logits, axis=-1) == y))


def train(
    method: str,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    learning_rate: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
  """Trains the MLP with one method and evaluates it.

  The initial weights and the minibatches depend only on ``seed`` (and
  ``batch_size``), not on ``method``, so two calls with the same settings
  compare the optimizers on identical runs.

  Args:
    method: ``'sibp'`` (``sibp_jax.sibp``) or ``'adam'`` (``optax.adam``).
    data: ``(x_train, y_train, x_test, y_test)``; default
      ``load_digits_split(seed)``.
    epochs: passes over the training set (default 10).
    batch_size: examples per step (default 64; the last partial batch of
      each epoch is dropped).
    seed: seed of the weights, the shuffling and (by default) the split.
    learning_rate: see :func:`make_optimizer` (default per method).
    progress: show a tqdm progress bar over epochs (default ``True``).

  Returns:
    A dict with ``method``, ``epochs``, ``steps``, ``initial_train_loss``
    (full training set, before any step), ``final_train_loss`` (full
    training set, after training), ``train_losses`` (after each epoch),
    ``test_accuracy``, ``update_seconds`` (wall time of the jitted update
    steps, excluding compilation and evaluation) and ``skipped_steps``
    (steps flagged as not finite).
  """
  if method not in _STEPS:
    raise ValueError(f'Unknown method {method!r}; expected one of {METHODS}.')
  if epochs < 0:
    raise ValueError(f'epochs must be >= 0, got {epochs}.')
  if data is None:
    data = load_digits_split(seed)
  x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in data)
  step = _STEPS[method]
  model = make_model(seed)
  optimizer = make_optimizer(method, model, learning_rate)
  initial_loss, _ = evaluate(model, x_train, y_train)

  # Compile on a throwaway copy so that the timed steps exclude compilation
  # and the real run is not moved by the warm-up step.
  warm_model, warm_optimizer = nnx.clone((model, optimizer))
  warm_idx = epoch_batches(len(x_train), batch_size, seed, 0)[0]
  jax.block_until_ready(step(warm_model, warm_optimizer, x_train[warm_idx],
                             y_train[warm_idx]))
  del warm_model, warm_optimizer

  seconds, steps, skipped, train_losses = 0.0, 0, 0, []
  bar = tqdm(range(epochs), desc=method, unit='epoch', disable=not progress,
             leave=False)
  for epoch in bar:
    idx = epoch_batches(len(x_train), batch_size, seed, epoch)
    # Gather the batches before starting the clock: the timer sees the
    # update steps only.
    batches = [(x_train[i], y_train[i]) for i in idx]
    jax.block_until_ready(batches)
    start = time.perf_counter()
    flags = [step(model, optimizer, x, y)[1] for x, y in batches]
    jax.block_until_ready((nnx.state(model), flags))
    seconds += time.perf_counter() - start
    steps += len(batches)
    skipped += int(len(flags) - np.sum(np.asarray(flags)))
    loss, _ = evaluate(model, x_train, y_train)
    train_losses.append(float(loss))
    bar.set_postfix(train_loss=f'{train_losses[-1]:.4f}')
  bar.close()

  final_loss, _ = evaluate(model, x_train, y_train)
  _, accuracy = evaluate(model, x_test, y_test)
  return {
      'method': method,
      'epochs': epochs,
      'steps': steps,
      'initial_train_loss': float(initial_loss),
      'final_train_loss': float(final_loss),
      'train_losses': train_losses,
      'test_accuracy': float(accuracy),
      'update_seconds': seconds,
      'skipped_steps': skipped,
  }


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """The results as a small fixed-width table.

  Args:
    results: dicts returned by :func:`train`.

  Returns:
    The table, one line per method under a header.
  """
  lines = [f'{"method":<8}{"train loss":>12}{"test acc":>10}'
           f'{"update s":>10}']
  for r in results:
    lines.append(f'{r["method"]:<8}{r["final_train_loss"]:>12.4f}'
                 f'{r["test_accuracy"]:>10.4f}{r["update_seconds"]:>10.3f}')
  return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses the command line (``argv`` without the program name)."""
  parser = argparse.ArgumentParser(
      description='SIBP vs Adam on scikit-learn digits (64-128-10 MLP).')
  parser.add_argument('--epochs', type=int, default=10,
                      help='passes over the training set (default 10)')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the split, weights and shuffling '
                      '(default 0)')
  parser.add_argument('--batch_size', type=int, default=64,
                      help='examples per step (default 64)')
  parser.add_argument('--json', metavar='FILE', default=None,
                      help='also write the settings and results to FILE')
  parser.add_argument('--no_progress', action='store_true',
                      help='hide the progress bars')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Runs both methods, prints the table and optionally writes JSON.

  Args:
    argv: command-line arguments without the program name (default
      ``sys.argv[1:]``).

  Returns:
    The results of :func:`train`, one dict per method.
  """
  args = parse_args(argv)
  data = load_digits_split(args.seed)
  print(f'digits: {len(data[0])} train / {len(data[2])} test, '
        f'batch {args.batch_size}, {args.epochs} epochs, seed {args.seed}, '
        f'{jax.devices()[0].platform}')
  results = [train(method, data, epochs=args.epochs,
                   batch_size=args.batch_size, seed=args.seed,
                   progress=not args.no_progress)
             for method in METHODS]
  print(format_table(results))
  for r in results:
    if r['skipped_steps'] or not math.isfinite(r['final_train_loss']):
      print(f'warning: {r["method"]}: {r["skipped_steps"]} non-finite steps, '
            f'final train loss {r["final_train_loss"]}', file=sys.stderr)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'settings': vars(args), 'results': results}, f, indent=2)
  return results


if __name__ == '__main__':
  main()
