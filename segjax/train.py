"""The segjax trainer: `train_and_evaluate(config, workdir)`, readable top to bottom.

Pure pieces first (`create_train_state`, `train_step`), then the loop that feeds them,
evaluates, logs and checkpoints. Rerunning with the same workdir resumes from the latest
checkpoint; SIGTERM or Ctrl-C saves a checkpoint before exiting.
"""
import functools
import itertools
import os
import signal
import tempfile
import time
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from segjax import checkpoint as checkpoint_lib
from segjax import configs
from segjax import data as data_lib
from segjax import evaluate as evaluate_lib
from segjax import losses
from segjax import metric_writer
from segjax import metrics as metrics_lib
from segjax import models as models_lib
from segjax import optim
from segjax import parallel
from segjax import pretrained
from segjax.data import pipeline
from segjax.data import transforms
from segjax.errors import ConfigError, SegjaxError


class TrainState(train_state.TrainState):
  batch_stats: Any


# ---------------------------------------------------------------------------- pure functions

def create_train_state(rng, model, config, input_shape):
  """Initialises parameters, BatchNorm statistics and optimizer state.

  input_shape: [B, H, W, C] of one batch (only its shape is used).
  """
  variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
  return TrainState.create(
      apply_fn=model.apply, params=variables['params'],
      batch_stats=variables.get('batch_stats', {}),
      tx=optim.create_optimizer(config))


def train_step(state, batch, rng, *, pixel_loss, aux_loss_weight, learning_rate_fn):
  """One optimisation step on a global batch -> (new state, scalar metrics).

  batch: `image` float32 [B, H, W, C], `label` int32 [B, H, W]. BatchNorm statistics are
  computed over the whole global batch (the mesh makes the reduction global under jit).
  pixel_loss: `(logits, labels) -> (loss, {term name: value})`, from `losses.make_loss`.
  A model with an auxiliary head sows its logits [B, H, W, C] as 'aux_logits' in
  'intermediates'; their loss is added with weight `aux_loss_weight`.
  Metrics: 'loss', 'grad_norm', 'learning_rate', '<term>_loss' for each term of the main
  head's loss when there are several, and 'main_loss', 'aux_loss' with an auxiliary head.
  """
  step_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats', 'intermediates'], rngs={'dropout': step_rng})
    loss, terms = pixel_loss(logits, batch['label'])
    parts = {f'{name}_loss': value for name, value in terms.items()} if len(terms) > 1 else {}
    aux_logits = updates.get('intermediates', {}).get('aux_logits', ())
    if aux_logits:
      aux_loss = sum(pixel_loss(aux, batch['label'])[0] for aux in aux_logits)
      parts.update(main_loss=loss, aux_loss=aux_loss)
      loss = loss + aux_loss_weight * aux_loss
    return loss, (updates.get('batch_stats', state.batch_stats), parts)

  (loss, (batch_stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return new_state, {'loss': loss, **parts, 'grad_norm': optax.tree.norm(grads),
                     'learning_rate': learning_rate_fn(state.step)}


# ---------------------------------------------------------------------------- setup

def _check_workdir(workdir):
  """Creates `workdir` and proves it writable, or fails with one clear line."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ConfigError(f'workdir {workdir!r} is not writable ({e.strerror}); '
                      'pass a writable --workdir') from e


def _with_pretrained_backbone(state, path, model, sharding):
  """`state` with its backbone parameters and statistics read from the file at `path`."""
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  loaded = jax.device_put(pretrained.load_backbone(path, model, variables), sharding)
  return state.replace(params=loaded['params'], batch_stats=loaded['batch_stats'])


def loss_class_weights(config, spec, train_source):
  """The cross-entropy class weights: config.loss.class_weights (None if empty), or computed
  from the labels of the first loss.class_weighting_batches training batches, augmented as
  in training; every process reads the same batches, so all get the same weights."""
  loss = config.loss
  if loss.class_weighting == 'none':
    return tuple(loss.class_weights) or None
  batches = pipeline.train_batches(train_source, spec, config, start_step=0)
  labels = (batch['label'] for batch in itertools.islice(batches, loss.class_weighting_batches))
  counts = losses.count_label_pixels(labels, spec.num_classes, spec.ignore_label)
  weights = tuple(losses.class_weights_from_counts(*counts, loss.class_weighting).tolist())
  if jax.process_index() == 0:
    print(f'{loss.class_weighting} class weights from {loss.class_weighting_batches} training '
          'batches: ' + ', '.join(f'{name} {weight:.3g}'
                                  for name, weight in zip(spec.class_names, weights)))
  return weights


class Experiment:
  """Everything built from a config: data, model, mesh, jitted steps, checkpoints."""

  def __init__(self, config, workdir):
    configs.validate(config)
    _check_workdir(workdir)
    self.config = config
    self.workdir = workdir
    self.spec = data_lib.get_spec(config.dataset)
    self.sources = data_lib.load_sources(config.dataset)
    self.model = models_lib.get_model(config.model, self.spec.num_classes)
    self.mesh = parallel.make_mesh()
    replicated = parallel.replicated(self.mesh)
    batch_sharding = parallel.batch_sharding(self.mesh)

    channels = len(config.dataset.mean)
    input_shape = (1, *transforms.height_width(config.dataset.image_size), channels)
    init_rng, self.train_rng = jax.random.split(jax.random.key(config.seed))
    init = functools.partial(create_train_state, model=self.model, config=config,
                             input_shape=input_shape)
    self.initial_state = jax.jit(init, out_shardings=replicated)(init_rng)
    if config.init_from:
      self.initial_state = _with_pretrained_backbone(self.initial_state, config.init_from,
                                                     self.model, replicated)

    self.class_weights = loss_class_weights(config, self.spec, self.sources['train'])
    pixel_loss = losses.make_loss(config.loss, ignore_label=self.spec.ignore_label,
                                  class_weights=self.class_weights)
    step = functools.partial(
        train_step, pixel_loss=pixel_loss, aux_loss_weight=config.loss.aux_weight,
        learning_rate_fn=optim.learning_rate_schedule(config))
    self.train_step = jax.jit(
        step, in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated), donate_argnums=0)
    eval_step = evaluate_lib.make_eval_step(
        self.model, num_classes=self.spec.num_classes, ignore_label=self.spec.ignore_label)
    self.eval_step = jax.jit(eval_step, in_shardings=(replicated, batch_sharding),
                             out_shardings=replicated)
    self.checkpoints = checkpoint_lib.Checkpoints(workdir, config.max_to_keep)

  def train_batches(self, start_step):
    batches = pipeline.train_batches(
        self.sources['train'], self.spec, self.config, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())
    return pipeline.checked(batches, self.spec, 'train split',
                            self.config.dataset.check_label_batches)

  def evaluate(self, state):
    """Metrics of `state` over the whole validation split."""
    batches = pipeline.eval_batches(self.sources['validation'], self.spec, self.config)
    batches = pipeline.checked(batches, self.spec, 'validation split',
                               self.config.dataset.check_label_batches)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return evaluate_lib.evaluate(self.eval_step, variables, batches, self.mesh)


class _StopSignal:
  """Records SIGTERM / SIGINT so the loop can checkpoint and exit between steps.

  A second signal raises KeyboardInterrupt at once.
  """

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received:  # a second signal: stop now, without the checkpoint
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    tqdm.tqdm.write(f'{self.received} received: saving a checkpoint after this step '
                    '(send it again to quit at once) ...')

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _report(experiment, writer, state, result, *, full_table):
  """Logs validation metrics, keeps the best checkpoint, prints a line or the whole table."""
  summary = metrics_lib.summary(result, experiment.spec.class_names)
  step = int(state.step)
  writer.write(step, 'val', summary)
  experiment.checkpoints.save_if_best(state, result['miou'])
  if full_table:
    tqdm.tqdm.write(f'\nValidation at step {step}:\n'
                    + metrics_lib.format_table(result, experiment.spec.class_names))
  else:
    tqdm.tqdm.write(f"step {step}: val mIoU {100 * result['miou']:.2f}  "
                    f"mAcc {100 * result['macc']:.2f}  aAcc {100 * result['aacc']:.2f}")


# ---------------------------------------------------------------------------- the loop

def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns final metrics."""
  experiment = Experiment(config, workdir)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = metric_writer.MetricWriter(workdir, enabled=is_main)
  checkpoints = experiment.checkpoints

  state = checkpoints.restore(experiment.initial_state) or experiment.initial_state
  start_step = int(state.step)
  if start_step >= config.total_steps:
    print(f'Training is complete (step {start_step} of {config.total_steps}); '
          f'evaluating the final checkpoint in {workdir}.')
    result = experiment.evaluate(state)
    _report(experiment, writer, state, result, full_table=True)
    checkpoints.wait()
    writer.close()
    return result
  if start_step:
    print(f'Resuming from the checkpoint at step {start_step} in {workdir}.')

  batches = experiment.train_batches(start_step)
  pending_metrics = []
  progress = tqdm.tqdm(total=config.total_steps, initial=start_step, unit='step',
                       desc='train', dynamic_ncols=True, mininterval=1.0, disable=not is_main)
  started = time.time()
  with _StopSignal() as stop:
    for step in range(start_step, config.total_steps):
      batch = parallel.to_global(next(batches), experiment.mesh)
      state, step_metrics = experiment.train_step(state, batch, experiment.train_rng)
      pending_metrics.append(step_metrics)
      progress.update()
      done = step + 1

      if done % config.log_every == 0 or done == config.total_steps:
        logged = jax.tree.map(lambda *xs: float(np.mean(xs)), *jax.device_get(pending_metrics))
        pending_metrics = []
        if not np.isfinite(logged['loss']):
          raise SegjaxError(
              f"training diverged: mean loss {logged['loss']} over steps up to {done}; the "
              f'last good checkpoint is step {checkpoints.latest_step()} in {workdir}. Lower '
              'optimizer.learning_rate or set grad_clip_norm.')
        logged['steps_per_second'] = (done - start_step) / (time.time() - started)
        writer.write(done, 'train', logged)
        progress.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['learning_rate']:.2e}")

      if done % config.checkpoint_every == 0 or done == config.total_steps:
        checkpoints.save(state)
      if done % config.eval_every == 0 or done == config.total_steps:
        result = experiment.evaluate(state)
        _report(experiment, writer, state, result, full_table=done == config.total_steps)
      if stop.received:
        checkpoints.save(state)
        checkpoints.wait()
        progress.close()
        raise SegjaxError(
            f'stopped by {stop.received} after step {done}; checkpoint saved in {workdir}. '
            'Rerun the same command to resume.')
  progress.close()
  checkpoints.wait()
  writer.close()
  return result


def evaluate_checkpoint(config, workdir, which='best'):
  """Evaluates the `which` ('best' or 'latest') checkpoint of `workdir`; prints the table."""
  experiment = Experiment(config, workdir)
  state = experiment.checkpoints.restore(experiment.initial_state, which)
  if state is None and which == 'best':
    state = experiment.checkpoints.restore(experiment.initial_state, 'latest')
  if state is None:
    raise SegjaxError(f'no checkpoint in {workdir}; train first (same --config and --workdir)')
  result = experiment.evaluate(state)
  print(f'Evaluation of the checkpoint at step {int(state.step)} in {workdir}:\n'
        + metrics_lib.format_table(result, experiment.spec.class_names))
  return result
