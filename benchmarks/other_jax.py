"""The same train step under another JAX: a worker process in another Python environment.

JAX 0.11+ needs Python 3.12, and PyTorch's small CPU build here exists for 3.11 only, so the
newest JAX cannot share a process with the benchmarks' other variants. `Worker` starts this
file under another interpreter (e.g. a Python 3.12 venv with segjax's dependencies: JAX
0.12), which imports this checkout's segjax, compiles the step of the same config
(`train_step.warm_step`: the same random batch, one warm-up step) and takes one step
per request; `Worker.step` fits `train_step.alternate`, so the two JAX versions
take turns in one timing loop.

Protocol, one line each way per message: the parent writes the config (a Python literal of
`config.to_dict()`), the worker answers {'jax', 'params', 'gflops', 'compile_s', 'peak_mb',
'first_loss' (of its warm-up step)} (JSON); then each 'step' line is answered {'loss',
'seconds'}, the step's time measured in the worker (pipe and parent excluded). End of
input ends the worker. The worker inherits the parent's environment (XLA_FLAGS, the
tcmalloc preload of `segjax.host`).
"""
import ast
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


class Worker:
  """The worker for ml_collections `config` (its model, batch size, crop, optimiser,
  half_precision) under interpreter `python`, once its step is compiled and warmed up:
  `figures` ({'jax', 'params', 'gflops', 'compile_s', 'peak_mb', 'first_loss'}) and
  `step()` -> (loss, seconds). Close it (or use `with`) to end the process."""

  def __init__(self, python, config):
    self._process = subprocess.Popen(  # pylint: disable=consider-using-with
        [python, os.path.abspath(__file__)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, cwd=os.path.dirname(HERE))
    self.figures = self._ask(repr(config.to_dict()))

  def _ask(self, line):
    self._process.stdin.write(line + '\n')
    self._process.stdin.flush()
    answer = self._process.stdout.readline()
    if not answer:
      raise RuntimeError(f'the JAX worker ({self._process.args[0]}) ended without an answer, '
                         f'exit status {self._process.wait()}; its errors are above')
    return json.loads(answer)

  def step(self):
    answer = self._ask('step')
    return answer['loss'], answer['seconds']

  def close(self):
    self._process.stdin.close()
    self._process.wait()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def serve(lines, write):
  """The worker's loop: the config line, then one step per 'step' line."""
  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import jax
  import ml_collections
  sys.path[:0] = [HERE, os.path.dirname(HERE)]  # this checkout's benchmarks and segjax
  import train_step
  # pylint: enable=g-import-not-at-top,import-outside-toplevel
  config = ml_collections.ConfigDict(ast.literal_eval(next(lines)))
  compiled, state, batch, key, figures = train_step.warm_step(config)
  write({**figures, 'jax': jax.__version__})
  for line in lines:
    if line.strip() != 'step':
      raise ValueError(f'unknown request {line!r}; expected "step"')
    state, metrics, seconds = train_step.run_step(compiled, state, batch, key)
    write({'loss': float(metrics['loss']), 'seconds': seconds})


def main():
  # Answers go to a copy of stdout; anything else that prints (libraries, C code) to stderr.
  answers = os.fdopen(os.dup(1), 'w')
  os.dup2(2, 1)

  def write(answer):
    answers.write(json.dumps(answer) + '\n')
    answers.flush()

  serve(iter(sys.stdin.readline, ''), write)


if __name__ == '__main__':
  main()
