"""A sandbox's processes for its page: one command over the node's control channel (the guest
agent's ``exec``, the path ``cube sandbox exec`` uses), reading ``/proc`` in the guest.

The listing runs ``python3`` (the guest agent's own interpreter, present in every guest) with no
site packages; it prints one tab-separated line per user-space process (kernel threads, which have
no command line, and the listing itself are left out).
"""

from __future__ import annotations

from dataclasses import dataclass

SCRIPT = r"""
import os, pwd
me = os.getpid()
for pid in sorted((int(p) for p in os.listdir('/proc') if p.isdigit())):
    if pid == me:
        continue
    try:
        cmd = open('/proc/%d/cmdline' % pid, 'rb').read().replace(b'\0', b' ').strip()
        status = dict(l.split(':', 1) for l in open('/proc/%d/status' % pid).read().splitlines() if ':' in l)
    except OSError:
        continue
    if not cmd:
        continue
    uid = int(status.get('Uid', '0').split()[0])
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    rss = status.get('VmRSS', '0 kB').split()[0]
    print('%d\t%s\t%s\t%s\t%s' % (pid, status.get('PPid', '').strip(), user, rss,
                                  cmd.decode('utf-8', 'replace').replace('\t', ' ')[:300]))
"""
COMMAND = ["python3", "-S", "-c", SCRIPT]
TIMEOUT_S = 5.0
"""The page waits this long for the listing (it renders with "unavailable" after)."""


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int | None
    user: str
    rss_kb: int | None
    cmd: str


def parse(stdout: str) -> list[Process]:
    """The listing's lines as processes; a line that is not one is skipped."""
    found = []
    for line in stdout.splitlines():
        parts = line.split("\t", 4)
        if len(parts) != 5 or not parts[0].isdigit():
            continue
        pid, ppid, user, rss, cmd = parts
        found.append(Process(pid=int(pid), ppid=int(ppid) if ppid.isdigit() else None, user=user,
                             rss_kb=int(rss) if rss.isdigit() else None, cmd=cmd))
    return found
