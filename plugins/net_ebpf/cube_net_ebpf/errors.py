"""Translate netlink, OS and libbpf failures into :class:`cube_core.NetworkError` at one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from cube_core import CubeError, NetworkError
from pyroute2.netlink.exceptions import NetlinkError


@contextlib.contextmanager
def map_network_errors(what: str, **fields: object) -> Iterator[None]:
    """Re-raise netlink and OS errors from the block as ``NetworkError`` (``from exc``)."""
    try:
        yield
    except CubeError:
        raise
    except NetlinkError as exc:
        raise NetworkError(f"{what}: netlink error {exc.code}: {exc}", **fields) from exc
    except OSError as exc:
        raise NetworkError(f"{what}: {exc}", **fields) from exc
