"""``python -m worker.die_with_parent PPID COMMAND...``: run COMMAND, ended when process PPID dies.

The worker starts each multi-process job's launcher (torchrun / accelerate launch) through this
shim: it asks Linux to send it SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, which an
``exec`` keeps), checks that the parent (the worker, pid PPID) has not died already, and then
becomes COMMAND. A worker killed outright (SIGKILL, OOM killer) thus takes its launcher, and the
launcher its ranks, with it. Done here rather than in ``preexec_fn``, which is not safe in a
worker that runs threads. Elsewhere than Linux it only runs COMMAND.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    parent, command = int(argv[0]), argv[1:]
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the lease expiry and the reaper remain
        pass
    if os.getppid() != parent:  # the worker died before the request took effect
        sys.exit(1)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
