#!/usr/bin/env python3
"""Parent of every daemon of an e2e cluster.

    supervisor.py --rc-file F --pid-file P --log L -- CMD...

Becomes a child subreaper, runs CMD (the script that starts the daemons in the background and
exits), writes CMD's exit code to F, then reaps every process re-parented to it (the daemons,
containerd shims) until none is left, and exits. So no daemon ever becomes a zombie of a PID 1
that does not reap. Its stdio are handed to CMD and then dropped, so a caller reading its output
through a pipe is not held open by the long-lived daemons.
"""
import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rc-file", required=True)
    ap.add_argument("--pid-file", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        ap.error("missing command")

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("supervisor: PR_SET_CHILD_SUBREAPER failed", file=sys.stderr)
        return 1
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with open(args.pid_file + ".tmp", "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(args.pid_file + ".tmp", args.pid_file)

    child = subprocess.Popen(cmd)
    # Hand our stdio over: from now on we write only to our own log.
    log = open(args.log, "a", buffering=1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.dup2(log.fileno(), 2)

    def note(msg: str) -> None:
        log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    note(f"supervisor {os.getpid()} started {cmd!r} as {child.pid}")
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        code = os.waitstatus_to_exitcode(status)
        if pid == child.pid:
            rc = code if code >= 0 else 128 - code
            with open(args.rc_file + ".tmp", "w") as f:
                f.write(f"{rc}\n")
            os.replace(args.rc_file + ".tmp", args.rc_file)
            note(f"start script exited {rc}")
        else:
            note(f"reaped {pid} exit {code}")
    note("no children left; exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
