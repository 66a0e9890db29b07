"""The login profile of the built-in (Debian) templates, made to spawn nothing.

``commands.run`` runs ``/bin/bash -l -c CMD`` (as E2B does), so every command reads /etc/profile
and ~/.profile. Debian's stock files fork+exec twice there: ``$(id -u)`` in /etc/profile and, for
root, ``mesg n`` in /root/.profile: about 50-100 ms each under TCG. The rewrite keeps what they do:

* ``$(id -u)`` -> ``${EUID:-$(id -u)}``: bash knows its EUID (no process); a shell without it
  (dash reading /etc/profile as ``sh -l``) still asks ``id``;
* ``mesg n`` only runs when stdin is a terminal (``mesg`` acts on stdin's tty and fails quietly
  otherwise), so a PTY session still gets it and a plain command no longer pays for it.

Only exact stock lines are touched; a file that does not have them is left as it is.
"""

from __future__ import annotations

from pathlib import Path

from cube_storage_cow import inroot

ID_CALL = '"$(id -u)"'
ID_FAST = '"${EUID:-$(id -u)}"'
MESG_LINE = "mesg n 2> /dev/null || true"
MESG_FAST = "if [ -t 0 ]; then mesg n 2> /dev/null || true; fi"
PROFILES: tuple[tuple[str, str, str], ...] = (
    ("/etc/profile", ID_CALL, ID_FAST),
    ("/root/.profile", MESG_LINE, MESG_FAST),
)


def quiet_profiles(tree: Path) -> list[str]:
    """Rewrite the stock lines of /etc/profile and /root/.profile in ``tree``; the files changed."""
    changed: list[str] = []
    for guest_path, old, new in PROFILES:
        text = inroot.read_text(tree, guest_path)
        if text is None or old not in text:
            continue
        if guest_path == "/root/.profile":  # the whole stock line, so a user's own mesg stays
            fixed = "\n".join(new if line.strip() == old else line for line in text.split("\n"))
        else:
            fixed = text.replace(old, new)
        if fixed != text:
            inroot.write_file(tree, guest_path, fixed.encode(errors="surrogateescape"), mode=0o644)
            changed.append(guest_path)
    return changed
