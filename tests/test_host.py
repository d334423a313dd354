"""segjax.host: entry points re-execute themselves under tcmalloc where it is installed."""
import os
import subprocess
import sys

import pytest

from segjax import host

needs_tcmalloc = pytest.mark.skipif(
    not sys.platform.startswith('linux') or host.find_tcmalloc() is None,
    reason=f'tcmalloc is not installed ({host.INSTALL_HINT})')

# Prints its pid (once per process image), then preloads and reports.
_ENTRY_POINT = """
import os, sys
print('start', os.getpid(), flush=True)
from segjax import host
host.preload_tcmalloc()
print('end', os.getpid(), host.malloc_in_use(), ' '.join(sys.argv[1:]), sys.flags.optimize)
"""


def _run_entry_point(**env):
  environ = {k: v for k, v in os.environ.items()
             if k not in ('LD_PRELOAD', host.OPT_OUT) and not k.startswith('SEGJAX_')}
  result = subprocess.run([sys.executable, '-O', '-c', _ENTRY_POINT, 'a', '--b=c'],
                          capture_output=True, text=True, check=True, env={**environ, **env})
  return [line.split() for line in result.stdout.splitlines()]


@needs_tcmalloc
def test_preload_reexecutes_the_same_command_under_tcmalloc():
  (start, first_pid), (start_again, second_pid), end = _run_entry_point()
  # execve: the same process (pid), started over with the same arguments and options.
  assert start == start_again == 'start' and first_pid == second_pid
  assert end == ['end', first_pid, 'tcmalloc', 'a', '--b=c', '1']


def test_preload_opt_out_keeps_the_system_malloc():
  lines = _run_entry_point(**{host.OPT_OUT: '0'})
  assert lines[0][0] == 'start' and lines[1][:3] == ['end', lines[0][1], 'system']
  assert len(lines) == 2  # not re-executed


def test_tcmalloc_environment_preloads_and_marks_the_process():
  env = host.tcmalloc_environment({'PATH': '/bin', 'LD_PRELOAD': 'libfoo.so'},
                                  'libtcmalloc_minimal.so.4')
  assert env['LD_PRELOAD'] == 'libtcmalloc_minimal.so.4:libfoo.so'
  assert env['PATH'] == '/bin'
  assert int(env['TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD']) >= 2**40
  # A re-executed process does not re-execute again, whatever LD_PRELOAD then says.
  assert env['SEGJAX_TCMALLOC_PRELOADED'] == '1'
  env = host.tcmalloc_environment({'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': '5'}, 'lib.so')
  assert env['TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD'] == '5' and env['LD_PRELOAD'] == 'lib.so'


def test_tcmalloc_advice_only_for_cpu_runs_under_the_system_malloc(monkeypatch):
  monkeypatch.delenv(host.OPT_OUT, raising=False)
  monkeypatch.setattr(host, 'malloc_in_use', lambda: 'system')
  if sys.platform.startswith('linux'):
    assert host.INSTALL_HINT in host.tcmalloc_advice('cpu')
  assert host.tcmalloc_advice('gpu') is None
  monkeypatch.setenv(host.OPT_OUT, '0')
  assert host.tcmalloc_advice('cpu') is None
  monkeypatch.delenv(host.OPT_OUT)
  monkeypatch.setattr(host, 'malloc_in_use', lambda: 'tcmalloc')
  assert host.tcmalloc_advice('cpu') is None
