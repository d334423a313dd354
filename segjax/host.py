"""The host process: the entry points run under tcmalloc where it is installed.

XLA:CPU allocates a step's temporaries afresh at every execution, hundreds of MB at a time
(DeepLab v3 R50 at 4 x 256^2: ~450 MB). glibc's malloc serves blocks over 32 MB with mmap
and unmaps them when freed, so every step faults that memory in again page by page: ~250,000
minor faults and 0.5-1 s of kernel time per DeepLab step on 2 cores. tcmalloc keeps freed
memory for reuse. On this 2-core CPU it made train steps 8-25% faster, each alone in its
process (U-Net 8 x 128^2 3.53 -> 3.26 s, DeepLab-R50 4 x 256^2 1.91 -> 1.72 s, ViT-Ti/16
8 x 256^2 0.98 -> 0.73 s), and XLA compilations 5-15% faster. glibc's own knobs (one
arena, no mmap, no trimming) removed the faults too, but slowed compilation by ~25%, left
U-Net's step as slow and grew its resident memory by 0.8 GB (2.6 -> 3.4 GB; under tcmalloc
2.5 GB). Both grow the ViT's by 0.7 GB (2.1 -> 2.8 GB).
"""
import ctypes.util
import os
import sys

# SEGJAX_TCMALLOC=0 keeps the C library's malloc.
OPT_OUT = 'SEGJAX_TCMALLOC'
# Marks a re-executed process, which never re-executes again.
_PRELOADED = 'SEGJAX_TCMALLOC_PRELOADED'
INSTALL_HINT = ('apt install libtcmalloc-minimal4 (Debian/Ubuntu), dnf install '
                'gperftools-libs (Fedora) or conda install gperftools')


def _tcmalloc_wanted():
  """Linux (where LD_PRELOAD works as used here) and no SEGJAX_TCMALLOC=0."""
  return sys.platform.startswith('linux') and os.environ.get(OPT_OUT) != '0'


def find_tcmalloc():
  """The installed tcmalloc shared library as the dynamic loader names it (e.g.
  'libtcmalloc_minimal.so.4'), or None."""
  for name in ('tcmalloc_minimal', 'tcmalloc'):
    library = ctypes.util.find_library(name)
    if library:
      return library
  return None


def malloc_in_use():
  """'tcmalloc', 'jemalloc' or 'mimalloc' where this process has one loaded, else 'system'."""
  try:
    with open('/proc/self/maps', encoding='utf-8') as f:
      maps = f.read()
  except OSError:
    return 'system'
  return next((name for name in ('tcmalloc', 'jemalloc', 'mimalloc') if name in maps),
              'system')


def tcmalloc_environment(environ, library):
  """A copy of `environ` that preloads `library` and marks the process as re-executed.

  tcmalloc's reports of allocations over 1 GB (a stack trace on stderr each) are turned off
  unless `environ` sets their threshold.
  """
  env = dict(environ)
  env['LD_PRELOAD'] = ':'.join(filter(None, (library, environ.get('LD_PRELOAD'))))
  env.setdefault('TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD', str(2**60))
  env[_PRELOADED] = '1'
  return env


def preload_tcmalloc():
  """Re-executes this Python process with tcmalloc preloaded: `os.execve` keeps its pid, its
  command line and the interpreter's options, so the caller starts over under tcmalloc.
  Call it first thing, before any work worth keeping. Returns (and changes nothing) off
  Linux, where tcmalloc is not installed, with SEGJAX_TCMALLOC=0, in a process that was
  re-executed already, or where LD_PRELOAD already names an allocator.
  """
  if (not _tcmalloc_wanted() or os.environ.get(_PRELOADED)
      or 'malloc' in os.environ.get('LD_PRELOAD', '')):
    return
  library = find_tcmalloc()
  if library is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, tcmalloc_environment(os.environ, library))


def tcmalloc_advice(backend):
  """For a run on the CPU `backend` ('cpu', as jax.default_backend() names it) under the
  system malloc of Linux: a one-line suggestion to install tcmalloc; else None."""
  if backend != 'cpu' or not _tcmalloc_wanted() or malloc_in_use() != 'system':
    return None
  return ('XLA:CPU train steps ran 6-25% faster under tcmalloc, which segjax preloads where '
          f'installed: {INSTALL_HINT}; {OPT_OUT}=0 silences this.')
