"""``python3 -m cube_guest.supervise [agent args...]``: keep the agent running.

Restarts ``python3 -m cube_guest`` whenever it exits (back-off up to 5 s), marks
itself a child subreaper and reaps every orphan that is handed to it. The VM's
``cube-init`` does the same in shell; use this where the agent is not started by
that init script (or in place of its loop). SIGTERM/SIGINT stop the agent and exit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except OSError:
        pass
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    delay = 0.5
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "cube_guest", *args])
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid == child.pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                break
        if stopping:
            break
        print(f"cube-supervise: agent exited ({child.returncode}); restarting",
              file=sys.stderr, flush=True)
        delay = 0.5 if time.monotonic() - started > 30 else min(delay * 2, 5.0)
        time.sleep(delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
