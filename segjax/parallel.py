"""Device mesh and shardings for data parallelism under `jax.jit`.

The global batch is split along the mesh's 'data' axis; parameters and optimizer state are
replicated. `to_global` builds global arrays from each process's local batch, which is the
same call on one process and on many.
"""
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA_AXIS = 'data'


def make_mesh():
  """A 1-D mesh over every device of every process, axis 'data'."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh):
  """Leading (batch) dimension split over 'data', the rest whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def to_global(local_batch, mesh):
  """This process's batch (numpy, leading dim local) -> global arrays sharded on 'data'."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
