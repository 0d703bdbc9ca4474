"""Quickstart: SIBP against Adam on scikit-learn's handwritten digits.

Trains one MLP (64-128-10) with ``sibp_jax.sibp(0.1)`` and with
``optax.adam(1e-3)`` from the same weights on the same batches, and prints
the training loss, test accuracy and seconds in update steps of each.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn import datasets
from sklearn import model_selection
from tqdm import tqdm

import sibp_jax

loss_fn = optax.softmax_cross_entropy_with_integer_labels


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 128, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


@nnx.jit
def sibp_step(model, optimizer, x, y):
  # SIBP needs the layer-wise problems, which come with the gradient.
  loss, grads, problems = sibp_jax.nnx.value_grad_and_problems(
      model, x, y, loss_fn=loss_fn)
  optimizer.update(model, grads, problems=problems)
  return loss


@nnx.jit
def adam_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(
      lambda model: jnp.mean(loss_fn(model(x), y)))(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def evaluate(model, x, y):
  logits = model(x)
  return jnp.mean(loss_fn(logits, y)), jnp.mean(logits.argmax(-1) == y)


def train(method, tx, step, data, epochs, batch_size, seed, progress=True):
  x_train, y_train, x_test, y_test = data
  model = MLP(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed)  # the same batches for both methods
  n = len(x_train) // batch_size * batch_size
  batches = [rng.permutation(len(x_train))[:n].reshape(-1, batch_size)
             for _ in range(epochs)]
  warm = nnx.clone((model, optimizer))  # compile on a copy, outside the clock
  step(*warm, x_train[:batch_size], y_train[:batch_size])
  seconds = 0.0
  for epoch in tqdm(batches, desc=method, disable=not progress, leave=False):
    for idx in epoch:
      x, y = jax.block_until_ready((x_train[idx], y_train[idx]))
      start = time.perf_counter()
      jax.block_until_ready(step(model, optimizer, x, y))
      seconds += time.perf_counter() - start
  return {'method': method,
          'final_train_loss': float(evaluate(model, x_train, y_train)[0]),
          'test_accuracy': float(evaluate(model, x_test, y_test)[1]),
          'update_seconds': seconds}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--json', metavar='FILE', help='also write results')
  parser.add_argument('--no_progress', action='store_true')
  args = parser.parse_args(argv)
  digits = datasets.load_digits()  # 1,797 images of 8x8 pixels in 0..16
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      (digits.data / 16).astype(np.float32), digits.target.astype(np.int32),
      test_size=360, random_state=args.seed, stratify=digits.target)
  data = tuple(jnp.asarray(a) for a in (x_train, y_train, x_test, y_test))
  results = [
      train(method, tx, step, data, args.epochs, args.batch_size, args.seed,
            progress=not args.no_progress)
      for method, tx, step in (('sibp', sibp_jax.sibp(0.1), sibp_step),
                               ('adam', optax.adam(1e-3), adam_step))]
  print('method  train loss  test acc  update s')
  for r in results:
    print(f'{r["method"]:<8}{r["final_train_loss"]:>10.4f}'
          f'{r["test_accuracy"]:>10.4f}{r["update_seconds"]:>10.3f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'settings': vars(args), 'results': results}, f, indent=2)
  return results


if __name__ == '__main__':
  main()
