"""cffi binding (ABI mode) to libnftables: run nft scripts in-process.

In-process matters: the ``nft`` binary costs about 16 ms per run here, ``libnftables`` about
0.3 ms. The netlink socket of a context is opened in the calling thread's network namespace, so
a context is made per call (0.1 ms) and used only inside the namespace it was made in. ABI mode
because Debian ships no libnftables headers. The raw ``ffi``/``lib`` objects stay in this module.

libnftables waits for netlink answers with ``select()``, which only takes descriptors below
``FD_SETSIZE`` (1024): on a higher one glibc aborts the whole process ("bit out of range 0 -
FD_SETSIZE on fd_set"). A node holds about two descriptors per sandbox, so past ~500 sandboxes a
fresh socket lands there. Hence :class:`_LowDescriptors`: a few numbers below 1024, reserved
while the process is young (placeholders on ``/dev/null``); each call moves its context's
socket onto one of them (``dup2``, atomic) and puts the placeholder back once the context is
freed. That reads two private layouts, both unchanged for years and checked on every call:
``struct nft_ctx`` starts with its ``struct mnl_socket *nf_sock`` (nftables 0.9 to 1.1) and
``struct mnl_socket`` with its ``int fd`` (libmnl 1.0).
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
from collections.abc import Iterator
from typing import Any

from cffi import FFI
from cube_core import NetworkError

_ffi = FFI()
_ffi.cdef("""
struct nft_ctx;
struct mnl_socket;
struct nft_ctx *nft_ctx_new(uint32_t flags);
void nft_ctx_free(struct nft_ctx *ctx);
int nft_ctx_buffer_output(struct nft_ctx *ctx);
int nft_ctx_buffer_error(struct nft_ctx *ctx);
const char *nft_ctx_get_output_buffer(struct nft_ctx *ctx);
const char *nft_ctx_get_error_buffer(struct nft_ctx *ctx);
unsigned int nft_ctx_output_get_flags(struct nft_ctx *ctx);
void nft_ctx_output_set_flags(struct nft_ctx *ctx, unsigned int flags);
int nft_run_cmd_from_buffer(struct nft_ctx *nft, const char *buf);
int mnl_socket_get_fd(const struct mnl_socket *nl);
""")
NFT_CTX_OUTPUT_JSON = 1 << 4
FD_SETSIZE = 1024
LOW_DESCRIPTORS = 16
"""How many nft calls can run at once (the driver has at most 16 workers); more wait."""
_NETLINK_NETFILTER = 12

_lib: Any = None
_mnl: Any = None
_low: _LowDescriptors | None = None
_lib_lock = threading.Lock()


class _LowDescriptors:
    """Descriptor numbers below ``FD_SETSIZE``, held by ``/dev/null`` placeholders until lent."""

    def __init__(self, count: int) -> None:
        self._null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        held = [os.dup(self._null) for _ in range(count)]
        if max(held) >= FD_SETSIZE:
            for fd in (*held, self._null):
                os.close(fd)
            raise NetworkError(f"libnftables needs {count} descriptors below {FD_SETSIZE}, "
                               f"the process already holds too many", fd=max(held))
        self.numbers = tuple(held)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for fd in held:
            self._free.put(fd)

    @contextlib.contextmanager
    def lend(self) -> Iterator[int]:
        fd = self._free.get()
        try:
            yield fd
        finally:
            os.dup2(self._null, fd, inheritable=False)  # whatever was moved there is dropped
            self._free.put(fd)


def _library() -> tuple[Any, Any, _LowDescriptors]:
    global _lib, _mnl, _low
    with _lib_lock:
        if _lib is None:
            try:
                _lib = _ffi.dlopen("libnftables.so.1")
                _mnl = _ffi.dlopen("libmnl.so.0")
            except OSError as exc:
                raise NetworkError("libnftables.so.1 not found (install Debian's libnftables1 / "
                                   "nftables)") from exc
        if _low is None:
            _low = _LowDescriptors(LOW_DESCRIPTORS)
        return _lib, _mnl, _low


def ensure_loaded() -> None:
    """Load libnftables and reserve its low descriptors now (call it early: while they are
    free); :class:`NetworkError` says what to install when it is missing."""
    _library()


def _socket_field(ctx: Any) -> Any:
    """``&ctx->nf_sock->fd``, after checking it holds this context's netfilter netlink socket."""
    sock = _ffi.cast("struct mnl_socket **", ctx)[0]
    if sock == _ffi.NULL:
        raise NetworkError("libnftables context has no netlink socket (unknown nft_ctx layout)")
    field = _ffi.cast("int *", sock)
    fd = int(field[0])
    if fd != _mnl.mnl_socket_get_fd(sock) or not _is_netfilter_socket(fd):
        raise NetworkError("libnftables' netlink socket not found where expected "
                           "(unknown nft_ctx / mnl_socket layout)", fd=fd)
    return field


def _is_netfilter_socket(fd: int) -> bool:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return bool(sock.family == socket.AF_NETLINK and sock.proto == _NETLINK_NETFILTER)
    finally:
        sock.detach()


def run(script: str, *, json_output: bool = False) -> str:
    """Run an nft script in the calling thread's namespace; return its output.

    Raises :class:`cube_core.NetworkError` with nft's own message when the script fails.
    """
    lib, _, low = _library()
    with low.lend() as low_fd:
        ctx = lib.nft_ctx_new(0)
        if ctx == _ffi.NULL:
            raise NetworkError("nft_ctx_new failed")
        try:
            field = _socket_field(ctx)
            opened = int(field[0])
            os.dup2(opened, low_fd, inheritable=False)
            field[0] = low_fd
            os.close(opened)
            try:
                return _run_in(lib, ctx, script, json_output)
            finally:
                # low_fd stays ours: nft_ctx_free closes nothing (close(-1)), lend() drops the
                # socket by putting the placeholder back
                field[0] = -1
        finally:
            lib.nft_ctx_free(ctx)


def _run_in(lib: Any, ctx: Any, script: str, json_output: bool) -> str:
    lib.nft_ctx_buffer_output(ctx)
    lib.nft_ctx_buffer_error(ctx)
    if json_output:
        lib.nft_ctx_output_set_flags(ctx, lib.nft_ctx_output_get_flags(ctx) | NFT_CTX_OUTPUT_JSON)
    rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
    if rc != 0:
        err = _ffi.string(lib.nft_ctx_get_error_buffer(ctx)).decode(errors="replace").strip()
        raise NetworkError(f"nft failed: {err or 'error ' + str(rc)}")
    return str(_ffi.string(lib.nft_ctx_get_output_buffer(ctx)).decode(errors="replace"))
