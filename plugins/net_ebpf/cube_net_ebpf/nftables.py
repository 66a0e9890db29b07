"""cffi binding (ABI mode) to libnftables: run nft scripts in-process.

In-process matters: the ``nft`` binary costs about 16 ms per run here, ``libnftables`` about
0.3 ms. The netlink socket of a context is opened in the calling thread's network namespace, so
a context is made per call (0.1 ms) and used only inside the namespace it was made in. ABI mode
because Debian ships no libnftables headers. The raw ``ffi``/``lib`` objects stay in this module.
"""

from __future__ import annotations

import threading
from typing import Any

from cffi import FFI
from cube_core import NetworkError

_ffi = FFI()
_ffi.cdef("""
struct nft_ctx;
struct nft_ctx *nft_ctx_new(uint32_t flags);
void nft_ctx_free(struct nft_ctx *ctx);
int nft_ctx_buffer_output(struct nft_ctx *ctx);
int nft_ctx_buffer_error(struct nft_ctx *ctx);
const char *nft_ctx_get_output_buffer(struct nft_ctx *ctx);
const char *nft_ctx_get_error_buffer(struct nft_ctx *ctx);
unsigned int nft_ctx_output_get_flags(struct nft_ctx *ctx);
void nft_ctx_output_set_flags(struct nft_ctx *ctx, unsigned int flags);
int nft_run_cmd_from_buffer(struct nft_ctx *nft, const char *buf);
""")
NFT_CTX_OUTPUT_JSON = 1 << 4

_lib: Any = None
_lib_lock = threading.Lock()


def _library() -> Any:
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                _lib = _ffi.dlopen("libnftables.so.1")
            except OSError as exc:
                raise NetworkError("libnftables.so.1 not found (install Debian's libnftables1 / "
                                   "nftables)") from exc
        return _lib


def ensure_loaded() -> None:
    """Load libnftables now; :class:`NetworkError` says what to install when it is missing."""
    _library()


def run(script: str, *, json_output: bool = False) -> str:
    """Run an nft script in the calling thread's namespace; return its output.

    Raises :class:`cube_core.NetworkError` with nft's own message when the script fails.
    """
    lib = _library()
    ctx = lib.nft_ctx_new(0)
    if ctx == _ffi.NULL:
        raise NetworkError("nft_ctx_new failed")
    try:
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        if json_output:
            lib.nft_ctx_output_set_flags(ctx, lib.nft_ctx_output_get_flags(ctx) | NFT_CTX_OUTPUT_JSON)
        rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
        if rc != 0:
            err = _ffi.string(lib.nft_ctx_get_error_buffer(ctx)).decode(errors="replace").strip()
            raise NetworkError(f"nft failed: {err or 'error ' + str(rc)}")
        return str(_ffi.string(lib.nft_ctx_get_output_buffer(ctx)).decode(errors="replace"))
    finally:
        lib.nft_ctx_free(ctx)
