"""Data parallelism over every device of every process: mesh, shardings, the compiled step,
global batches and multi-process start-up.

The global batch is split along the mesh's 'data' axis; parameters, BatchNorm statistics and
optimizer state are replicated. Both parallelisms (`config.parallelism`) keep the state and
the batch as global arrays with these shardings, so the loop, evaluation and checkpoints
are the same for both, and a checkpoint of one restores in the other:
- 'jit': one program over the mesh; XLA partitions it and inserts the reductions (BatchNorm
  statistics and gradients are those of the global batch).
- 'pmap': the pmap programming model. Each device runs the step on its replica of the state
  and its slice of the batch; gradients and metrics are averaged with `lax.pmean` over
  'data', and BatchNorm averages its statistics over 'data' (sync BN). It is written with
  `jax.shard_map` (with `check_vma=False`, as `jax.pmap` itself is built in JAX 0.10), which
  takes the global arrays as they are: no stacked [devices, ...] copies of the state.
"""
import functools
import os

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from segjax.errors import ConfigError

DATA_AXIS = 'data'
PARALLELISMS = ('jit', 'pmap')

# XLA:CPU (jaxlib 0.10) hands dot fusions, reductions and, by default, convolutions to
# YNNPACK. YNNPACK's convolution weight gradient is up to 3.3x slower than XLA's own kernel
# (3x3, 8 images of 128^2 x 64 channels: 43 vs 118 GFLOP/s), while its forward and input
# gradient are faster only on the largest maps, by at most 20%. So convolutions are kept
# out of it: U-Net 8x128^2 and DeepLab-R50 4x256^2 train steps 22% and 16% faster.
_YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
CPU_COMPILER_OPTIONS = {_YNN_FUSION_TYPE: 'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE'}


def make_mesh(devices=None):
  """A 1-D mesh over `devices` (default: every device of every process), axis 'data'."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def batch_sharding(mesh):
  """Leading (batch) dimension split over 'data', the rest whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def compiler_options(mesh):
  """XLA options segjax compiles its steps with on `mesh`'s platform: CPU_COMPILER_OPTIONS on
  CPU unless XLA_FLAGS sets that option itself (the user's choice wins), none elsewhere."""
  user_set = _YNN_FUSION_TYPE in os.environ.get('XLA_FLAGS', '')
  if mesh.devices.flat[0].platform != 'cpu' or user_set:
    return {}
  return dict(CPU_COMPILER_OPTIONS)


def compile_step(step, mesh, parallelism):
  """`step(state, batch, rng, axis_name=None) -> (state, metrics)` jitted over `mesh`.

  state and rng replicated, batch [B, ...] sharded on 'data', metrics replicated; the input
  state's buffers are donated. 'pmap' runs `step` per device with `axis_name='data'`, on
  the [B / devices, ...] slice of the batch; `step` must then average what it returns over
  that axis (see the module docstring).
  """
  if parallelism == 'pmap':
    step = jax.shard_map(
        functools.partial(step, axis_name=DATA_AXIS), mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(DATA_AXIS), PartitionSpec()),
        out_specs=PartitionSpec(), check_vma=False)
  elif parallelism != 'jit':
    raise ConfigError(f'unknown parallelism {parallelism!r}; valid: {", ".join(PARALLELISMS)}')
  return jax.jit(step, in_shardings=(replicated(mesh), batch_sharding(mesh), replicated(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0,
                 compiler_options=compiler_options(mesh))


def to_global(local_batch, mesh):
  """This process's batch (numpy, leading dim local) -> global arrays sharded on 'data'.

  The global batch is the processes' local batches concatenated in process order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def whole_to_global(batch, mesh):
  """A batch every process holds whole (numpy, identical everywhere) -> global arrays of the
  same shape sharded on 'data'; each device takes its own rows, so every example is in the
  global batch once however many processes read it (evaluation batches)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x, x.shape), batch)


def on_multi_process_cluster():
  """Whether this process looks like one of a Cloud TPU VM (single host or pod slice) or of
  a SLURM job of several tasks, where `jax.distributed.initialize()` finds its peers alone.

  A TPU VM is recognised by a Google PCI device (vendor 0x1ae0, the TPU chips) or the
  TPU_WORKER_HOSTNAMES variable (GKE); reading this touches no JAX backend.
  """
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True
  if os.environ.get('TPU_WORKER_HOSTNAMES'):
    return True
  pci = '/sys/bus/pci/devices'
  for device in os.listdir(pci) if os.path.isdir(pci) else ():
    try:
      with open(os.path.join(pci, device, 'vendor'), encoding='ascii') as f:
        if f.read().strip() == '0x1ae0':
          return True
    except OSError:
      continue
  return False


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """Joins a multi-process run; call before anything touches devices.

  With `coordinator_address` ('host:port' of process 0), `num_processes` and `process_id`
  (all three, e.g. from launch.py's flags) these are passed to `jax.distributed.initialize`;
  on CPU the processes' collectives go through gloo (JAX's default). With none, JAX detects
  them itself on a TPU pod or SLURM job (`on_multi_process_cluster`), and a plain single
  process does nothing. Returns whether `jax.distributed` was initialised.
  """
  explicit = [value is not None for value in (coordinator_address, num_processes, process_id)]
  if any(explicit) and not all(explicit):
    raise ConfigError('give all of --coordinator_address, --num_processes and --process_id, '
                      f'or none (got {coordinator_address!r}, {num_processes}, {process_id})')
  if all(explicit):
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if on_multi_process_cluster():
    jax.distributed.initialize()
    return True
  return False
