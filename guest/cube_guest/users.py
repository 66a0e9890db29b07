"""Sandbox users and path rules (E2B_PROTOCOL.md §5.1).

Requests act as a named Unix user (``user`` by default, or ``root``). Relative paths
resolve against that user's home; ``~`` expands to it. The agent runs as root and
gives files it creates to the acting user.
"""

from __future__ import annotations

import grp
import os
import posixpath
import pwd
from dataclasses import dataclass
from functools import lru_cache


class UnknownUserError(LookupError):
    pass


@dataclass(frozen=True)
class UserInfo:
    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...]


@lru_cache(maxsize=64)
def _lookup(name: str) -> UserInfo:
    try:
        pw = pwd.getpwnam(name)
    except KeyError as exc:
        raise UnknownUserError(f"user '{name}' not found") from exc
    try:
        groups = tuple(os.getgrouplist(name, pw.pw_gid))
    except OSError:
        groups = (pw.pw_gid,)
    return UserInfo(name=name, uid=pw.pw_uid, gid=pw.pw_gid, home=pw.pw_dir, groups=groups)


def lookup_user(name: str, home_override: str | None = None) -> UserInfo:
    info = _lookup(name)
    if home_override:
        return UserInfo(info.name, info.uid, info.gid, home_override, info.groups)
    return info


@lru_cache(maxsize=256)
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@lru_cache(maxsize=256)
def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def expand_path(path: str, user: UserInfo, base: str | None = None) -> str:
    """Absolute, normalised form of ``path`` as seen by ``user``.

    ``~`` and ``~/x`` expand to the user's home; other relative paths are taken
    relative to ``base`` (default: the user's home).
    """
    if path == "~" or path.startswith("~/"):
        path = user.home + path[1:]
    if not path:
        path = base or user.home
    elif not path.startswith("/"):
        path = posixpath.join(base or user.home, path)
    return posixpath.normpath(path) if path != "/" else "/"


def chown_quiet(path: str, user: UserInfo, follow: bool = True) -> None:
    """Give ``path`` to ``user``; ignored when not permitted (agent not root)."""
    try:
        os.chown(path, user.uid, user.gid, follow_symlinks=follow)
    except PermissionError:
        pass


def makedirs_as(path: str, user: UserInfo) -> list[str]:
    """``mkdir -p`` that gives every directory it creates to ``user``."""
    missing: list[str] = []
    cur = path
    while cur and not os.path.lexists(cur):
        missing.append(cur)
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            continue
        chown_quiet(d, user)
    return list(reversed(missing))
