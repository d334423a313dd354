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
from segjax import report
from segjax import semi
from segjax import visualize
from segjax import weights
from segjax.data import pipeline
from segjax.data import transforms
from segjax.errors import ConfigError, SegjaxError


class TrainState(train_state.TrainState):
  batch_stats: Any
  # Semi-supervised mean teacher: the EMA {'params', 'batch_stats'} (segjax/semi.py); else None.
  teacher: Any = None


# ---------------------------------------------------------------------------- pure functions

def create_train_state(rng, model, config, input_shape):
  """Initialises parameters, BatchNorm statistics and optimizer state.

  input_shape: [B, H, W, C] of one batch (only its shape is used).
  """
  variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  return TrainState.create(
      apply_fn=model.apply, params=params, batch_stats=batch_stats,
      tx=optim.create_optimizer(config),
      teacher=semi.initial_teacher(params, batch_stats, config.semi_supervised))


def train_step(state, batch, rng, *, pixel_loss, aux_loss_weight, learning_rate_fn,
               grad_accum_steps=1, axis_name=None):
  """One optimisation step on a batch -> (new state, scalar metrics).

  batch: `image` float32 [B, H, W, C], `label` int32 [B, H, W]. Under jit `batch` is the
  global batch and BatchNorm statistics are computed over all of it (the mesh makes the
  reduction global). With `axis_name` (the 'pmap' parallelism, see `segjax.parallel`) this
  runs per device on its slice of the batch: gradients and metrics are averaged over
  `axis_name`, BatchNorm statistics too (sync BN), and each device draws its own dropout.
  The loss is then the mean of the devices' pixel-mean losses (as in PyTorch DDP): the
  global batch's when every device has as many labelled pixels, close to it otherwise.
  pixel_loss: `(logits, labels) -> (loss, {term name: value})`, from `losses.make_loss`.
  A model with an auxiliary head sows its logits [B, H, W, C] as 'aux_logits' in
  'intermediates'; their loss is added with weight `aux_loss_weight`.

  grad_accum_steps k > 1 splits the batch into k micro-batches (rows j, j + k, j + 2k, ... form
  micro-batch j, so each device keeps its share of every one), averages their gradients and
  updates once: for a mean-over-pixels loss, micro-batches with equal numbers of labelled
  pixels and a model without BatchNorm in training mode this is the step on the whole batch
  (up to float rounding), with the activation memory of one micro-batch. BatchNorm normalises each micro-batch with its own statistics, and its
  running averages are updated once per micro-batch, in order (the state keeps the last).
  Metrics: 'loss', 'grad_norm', 'learning_rate', '<term>_loss' for each term of the main
  head's loss when there are several, and 'main_loss', 'aux_loss' with an auxiliary head;
  losses are means over the micro-batches.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  if axis_name:
    step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))

  def loss_fn(params, batch_stats, micro_batch, dropout_rng):
    logits, aux_logits, batch_stats = models_lib.train_forward(
        state.apply_fn, {'params': params, 'batch_stats': batch_stats}, micro_batch['image'],
        dropout_rng, axis_name)
    loss, loss_metrics = losses.supervised_loss(pixel_loss, logits, aux_logits,
                                                micro_batch['label'], aux_loss_weight)
    return loss, (batch_stats, loss_metrics)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    (_, (batch_stats, loss_metrics)), grads = grad_fn(
        state.params, state.batch_stats, batch, step_rng)
  else:
    micro_batches = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(-1, grad_accum_steps, *x.shape[1:]), 0, 1), batch)

    def accumulate(carry, inputs):
      grad_sum, batch_stats = carry
      index, micro_batch = inputs
      (_, (batch_stats, loss_metrics)), grads = grad_fn(
          state.params, batch_stats, micro_batch, jax.random.fold_in(step_rng, index))
      return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats), loss_metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grad_sum, batch_stats), loss_metrics = jax.lax.scan(
        accumulate, (zeros, state.batch_stats), (jnp.arange(grad_accum_steps), micro_batches))
    grads = jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)
    loss_metrics = jax.tree.map(jnp.mean, loss_metrics)
  if axis_name:
    grads, loss_metrics = jax.lax.pmean((grads, loss_metrics), axis_name)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return new_state, {**loss_metrics, 'grad_norm': optax.tree.norm(grads),
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


def with_published_weights(state, path, model, sharding):
  """-> (`state` with the parameters and statistics the file at `path` has for `model`,
  'model' or 'backbone': what it held; see `segjax.weights.load`). Prints what it loaded."""
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  variables, part, message = weights.load(path, model, variables)
  if jax.process_index() == 0:
    print(message, flush=True)
  loaded = jax.device_put(variables, sharding)
  return state.replace(params=loaded['params'], batch_stats=loaded['batch_stats']), part


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
    if config.half_precision:  # bfloat16 compute; parameters, BN statistics, logits float32
      self.model = self.model.clone(dtype=jnp.bfloat16)
    self.mesh = parallel.make_mesh()
    replicated = parallel.replicated(self.mesh)
    batch_sharding = parallel.batch_sharding(self.mesh)

    init_rng, self.train_rng = jax.random.split(jax.random.key(config.seed))
    init = functools.partial(create_train_state, model=self.model, config=config,
                             input_shape=transforms.model_input_shape(config.dataset))
    self.initial_state = jax.jit(init, out_shardings=replicated)(init_rng)
    self.init_part = None  # what config.init_from held: 'model', 'backbone' (or None)
    if config.init_from:
      self.initial_state, self.init_part = with_published_weights(
          self.initial_state, config.init_from, self.model, replicated)

    self.labelled_source, self.unlabelled_source = semi.split_sources(
        self.sources['train'], config.semi_supervised)
    self.class_weights = loss_class_weights(config, self.spec, self.labelled_source)
    pixel_loss = losses.make_loss(config.loss, ignore_label=self.spec.ignore_label,
                                  class_weights=self.class_weights)
    step_options = dict(pixel_loss=pixel_loss, aux_loss_weight=config.loss.aux_weight,
                        learning_rate_fn=optim.learning_rate_schedule(config))
    if self.unlabelled_source is None:
      step = functools.partial(train_step, **step_options,
                               grad_accum_steps=config.grad_accum_steps)
    else:
      step = functools.partial(semi.semi_train_step, **step_options,
                               semi_config=config.semi_supervised)
    step = with_nonfinite_check(step, skip=config.nonfinite == 'skip')
    self.train_step = parallel.compile_step(step, self.mesh, config.parallelism)
    self.predict = evaluate_lib.make_predict(
        self.model, config.evaluation, num_classes=self.spec.num_classes,
        crop_size=config.dataset.image_size)
    eval_step = evaluate_lib.make_eval_step(
        self.predict, num_classes=self.spec.num_classes, ignore_label=self.spec.ignore_label)
    self.eval_step = jax.jit(eval_step, in_shardings=(replicated, batch_sharding),
                             out_shardings=replicated,
                             compiler_options=parallel.compiler_options(self.mesh))
    self.checkpoints = checkpoint_lib.Checkpoints(workdir, config.max_to_keep)

  def train_batches(self, start_step):
    """Training batches from `start_step` on; semi-supervised, with an 'unlabelled' batch."""
    where = dict(start_step=start_step, process_index=jax.process_index(),
                 process_count=jax.process_count())
    batches = pipeline.train_batches(self.labelled_source, self.spec, self.config, **where)
    batches = pipeline.checked(batches, self.spec, 'train split',
                               self.config.dataset.check_label_batches)
    if self.unlabelled_source is None:
      return batches
    return semi.with_unlabelled(batches, semi.unlabelled_batches(
        self.unlabelled_source, self.spec, self.config, **where))

  def evaluate(self, state):
    """Metrics of `state` over the whole validation split."""
    batches = pipeline.eval_batches(self.sources['validation'], self.spec, self.config)
    batches = pipeline.checked(batches, self.spec, 'validation split',
                               self.config.dataset.check_label_batches)
    return evaluate_lib.evaluate(self.eval_step, semi.inference_variables(state), batches,
                                 self.mesh)


def with_nonfinite_check(step_fn, *, skip):
  """Wraps a train step `(state, batch, rng, **kw) -> (state, metrics)` to flag bad steps.

  Adds the metric 'nonfinite': 1.0 for a step whose loss or gradient norm is NaN or Inf,
  else 0.0; the loop reads it with the other metrics (no extra host sync per step). With
  `skip`, such a step keeps the old params, batch_stats and opt_state (the step counter
  still advances, so the following batches and dropout draws are those of an uninterrupted
  run; optax's own step count lags by the skipped steps). The choice is made inside the
  compiled step because the input state's buffers are donated.
  """
  def step(state, batch, rng, **kwargs):
    new_state, metrics = step_fn(state, batch, rng, **kwargs)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    if skip:
      keep = lambda new, old: jnp.where(finite, new, old)
      new_state = new_state.replace(**{
          field: jax.tree.map(keep, getattr(new_state, field), getattr(state, field))
          for field in ('params', 'batch_stats', 'opt_state', 'teacher')})
    return new_state, {**metrics, 'nonfinite': 1.0 - finite.astype(jnp.float32)}
  return step


def _nonfinite_steps(pending_metrics, done):
  """The step numbers (as logged: 1 after the first step) among the last
  len(pending_metrics) steps up to `done` whose loss or gradient norm was not finite."""
  flags = jax.device_get([metrics['nonfinite'] for metrics in pending_metrics])
  first = done - len(flags) + 1
  return [first + index for index, flag in enumerate(flags) if np.any(flag)]


def _raise_if_diverged(pending_metrics, done, checkpoints):
  """Stops training at a non-finite step (nonfinite='stop'), naming it and the last good
  checkpoint; the state of that step is never saved."""
  bad = _nonfinite_steps(pending_metrics, done)
  if not bad:
    return
  checkpoints.wait()
  latest = checkpoints.latest_step()
  last_good = (f'step {latest} ({checkpoints.path(latest)})' if latest is not None
               else 'none (no checkpoint was saved yet)')
  raise SegjaxError(
      f'training diverged: the loss or gradient norm is NaN or Inf at step {bad[0]} (and at '
      f'{len(bad) - 1} later step(s) up to {done}); nothing after it was saved. The last good '
      f'checkpoint is {last_good}. Lower optimizer.learning_rate, set grad_clip_norm, or set '
      "nonfinite='skip' to skip such steps.")


def _train_summary(pending_metrics, done):
  """Means of the pending steps' metrics, over the finite steps, and 'skipped_steps': how
  many were not finite (skipped under nonfinite='skip'; 'stop' raised before)."""
  bad = _nonfinite_steps(pending_metrics, done)
  fetched = jax.device_get(pending_metrics)
  first = done - len(fetched) + 1
  kept = [metrics for index, metrics in enumerate(fetched) if first + index not in bad]
  logged = jax.tree.map(lambda *xs: float(np.mean(xs)), *(kept or fetched))
  del logged['nonfinite']
  logged['skipped_steps'] = len(bad)
  if bad:
    tqdm.tqdm.write(f'warning: skipped step(s) {bad} (NaN or Inf loss or gradient norm; '
                    "nonfinite='skip' kept the parameters of the step before)")
  return logged


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
  """Logs validation metrics and image panels, keeps the best checkpoint, prints a line or the
  whole table."""
  summary = metrics_lib.summary(result, experiment.spec.class_names)
  step = int(state.step)
  writer.write(step, 'val', summary)
  visualize.log_validation_panels(experiment, writer, state)
  experiment.checkpoints.save_if_best(state, result['miou'])
  if full_table:
    tqdm.tqdm.write(f'\nValidation at step {step}:\n'
                    + metrics_lib.format_table(result, experiment.spec.class_names))
    _write_evaluation(experiment, step, result, experiment.checkpoints.path(step))
  else:
    tqdm.tqdm.write(f"step {step}: val mIoU {100 * result['miou']:.2f}  "
                    f"mAcc {100 * result['macc']:.2f}  aAcc {100 * result['aacc']:.2f}")


def _write_evaluation(experiment, step, result, checkpoint):
  """Writes the metrics, table and confusion plot of `result` to <workdir>/eval_<step>/."""
  if jax.process_index() != 0:
    return
  config = experiment.config
  directory = report.write(
      os.path.join(experiment.workdir, f'eval_{step}'), result, experiment.spec.class_names,
      step=step, checkpoint=str(checkpoint),
      evaluation=evaluate_lib.settings(config.evaluation, config.dataset.image_size))
  tqdm.tqdm.write(f'Metrics, table and confusion matrix written to {directory}')


# ---------------------------------------------------------------------------- the loop

def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns final metrics."""
  experiment = Experiment(config, workdir)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))
  checkpoints = experiment.checkpoints

  state = checkpoints.restore(experiment.initial_state) or experiment.initial_state
  start_step = int(state.step)
  # Records after the restored step are of steps done again now: they are dropped, so that
  # the log of a resumed run equals that of an uninterrupted one.
  writer = metric_writer.MetricWriter(workdir, enabled=is_main, start_step=start_step)
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
  stop_on_nonfinite = config.nonfinite == 'stop'
  with _StopSignal() as stop:
    for step in range(start_step, config.total_steps):
      batch = parallel.to_global(next(batches), experiment.mesh)
      state, step_metrics = experiment.train_step(state, batch, experiment.train_rng)
      pending_metrics.append(step_metrics)
      progress.update()
      done = step + 1

      log_now = done % config.log_every == 0 or done == config.total_steps
      save_now = done % config.checkpoint_every == 0 or done == config.total_steps
      eval_now = done % config.eval_every == 0 or done == config.total_steps
      if stop_on_nonfinite and (log_now or save_now or eval_now):
        _raise_if_diverged(pending_metrics, done, checkpoints)

      if log_now:
        logged = _train_summary(pending_metrics, done)
        pending_metrics = []
        logged['steps_per_second'] = (done - start_step) / (time.time() - started)
        writer.write(done, 'train', logged)
        progress.set_postfix(loss=f"{logged['loss']:.4f}", lr=f"{logged['learning_rate']:.2e}")
      if save_now:
        checkpoints.save(state)
      if eval_now:
        result = experiment.evaluate(state)
        _report(experiment, writer, state, result, full_table=done == config.total_steps)
      if stop.received:
        if stop_on_nonfinite:
          _raise_if_diverged(pending_metrics, done, checkpoints)
        checkpoints.save(state)
        checkpoints.wait()
        progress.close()
        raise SegjaxError(
            f'stopped by {stop.received} after step {done}; checkpoint saved to '
            f'{checkpoints.path(done)}. Rerun the same command to resume.')
  progress.close()
  checkpoints.wait()
  writer.close()
  return result


def require_whole_model(part, path):
  """Raises SegjaxError unless the init_from file held the whole model (`part` 'model'):
  evaluating or predicting with a backbone alone would score untrained heads."""
  if part != 'model':
    raise SegjaxError(f'init_from {path} holds only backbone weights for this model, and the '
                      'workdir has no checkpoint: train first (same --config and --workdir), '
                      'or pass a whole segmentation checkpoint of this recipe')


def evaluate_checkpoint(config, workdir):
  """Evaluates the best checkpoint of `workdir` (else its latest; else, with no checkpoint,
  the whole model of `config.init_from`); prints the table and writes the report (see
  `segjax.report`) to <workdir>/eval_<step>/."""
  experiment = Experiment(config, workdir)
  state, which = experiment.checkpoints.restore_best_or_latest(experiment.initial_state)
  if state is None and config.init_from:
    require_whole_model(experiment.init_part, config.init_from)
    state, source = experiment.initial_state, config.init_from
    what = f'the published weights {source}'
    print(f'No checkpoint in {workdir}: evaluating {what} with '
          f'{evaluate_lib.settings(config.evaluation, config.dataset.image_size)}')
  elif state is None:
    raise SegjaxError(f'no checkpoint in {workdir}; train first (same --config and --workdir), '
                      'or evaluate published weights with --config.init_from=FILE')
  else:
    source = experiment.checkpoints.path(int(state.step), which)
    what = f'the checkpoint at step {int(state.step)} in {workdir}'
  step = int(state.step)
  result = experiment.evaluate(state)
  print(f'Evaluation of {what}:\n'
        + metrics_lib.format_table(result, experiment.spec.class_names))
  _write_evaluation(experiment, step, result, source)
  return result
