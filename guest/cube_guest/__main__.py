"""``python3 -m cube_guest``: run the guest agent (envd + code interpreter + control channel)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from .agent import Agent, Options


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="cube_guest", description=__doc__)
    p.add_argument("--envd-port", type=int, default=49983)
    p.add_argument("--interpreter-port", type=int, default=49999)
    p.add_argument("--no-interpreter", action="store_true",
                   help="do not serve the code interpreter")
    p.add_argument("--ctl", default="/dev/virtio-ports/cube.ctl",
                   help="control port: a virtio-serial/char device, a Unix socket path, "
                        "or '' to disable; skipped while absent")
    p.add_argument("--home", default=None,
                   help="home directory of the default user (default: from passwd)")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--default-user", default="user")
    p.add_argument("--state-dir", default="/run/cube-guest")
    p.add_argument("--system-root", default="/",
                   help="root under which /etc/hostname, /etc/hosts, /etc/machine-id are written")
    p.add_argument("--no-system-calls", action="store_true",
                   help="never set the clock/hostname or reseed the kernel RNG (test harness)")
    p.add_argument("--log-level", default=os.environ.get("CUBE_GUEST_LOG", "INFO"))
    a = p.parse_args(argv)
    ctl = a.ctl or None
    if ctl and not ctl.startswith("unix:") and not os.path.exists(ctl):
        ctl = _find_virtio_port(ctl)
    return Options(
        envd_port=a.envd_port,
        interpreter_port=None if a.no_interpreter else a.interpreter_port,
        ctl=ctl,
        home=a.home,
        bind=a.bind,
        default_user=a.default_user,
        state_dir=a.state_dir,
        system_root=a.system_root,
        system_calls=not a.no_system_calls,
        extra={"log_level": a.log_level},
    )


def _find_virtio_port(path: str) -> str | None:
    """/dev/virtio-ports/<name> is a udev symlink; without udev find the port by name."""
    name = os.path.basename(path)
    base = "/sys/class/virtio-ports"
    try:
        ports = os.listdir(base)
    except OSError:
        return None
    for port in ports:
        try:
            with open(os.path.join(base, port, "name")) as fh:
                if fh.read().strip() == name:
                    return os.path.join("/dev", port)
        except OSError:
            continue
    return None


RUNTIME_ENV = ("CUBE_RUNTIME", "PYTHONHOME", "PYTHONPATH")
"""What cube-init sets to run the agent on the runtime bundle (images without python3): once the
interpreter has started they are not needed, and no process the agent spawns may inherit them."""


def drop_runtime_env(environ: dict[str, str] | os._Environ[str]) -> None:
    if environ.get("CUBE_RUNTIME"):
        for key in RUNTIME_ENV:
            environ.pop(key, None)


def main(argv: list[str] | None = None) -> int:
    drop_runtime_env(os.environ)
    opts = parse_args(argv)
    logging.basicConfig(
        level=str(opts.extra.get("log_level", "INFO")).upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if opts.ctl is None:
        logging.getLogger("cube_guest").info("no control port; control channel disabled")
    asyncio.run(Agent(opts).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
