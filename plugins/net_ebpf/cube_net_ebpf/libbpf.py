"""cffi binding to the system libbpf (Debian ``libbpf1``): load an object, use its maps, read
its ring buffer.

ABI mode (``ffi.dlopen``): no C compiler at install or run time, and every call used here takes
only pointers and integers, so no struct layout has to be mirrored (pinning uses
``bpf_map__set_pin_path`` rather than the opts struct). The raw ``ffi``/``lib`` objects never
leave this module; errors become :class:`cube_core.NetworkError`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
from cffi import FFI
from cube_core import NetworkError

log = structlog.get_logger(__name__)

_ffi = FFI()
_ffi.cdef("""
struct bpf_object;
struct bpf_program;
struct bpf_map;
struct ring_buffer;

struct bpf_object *bpf_object__open_file(const char *path, const void *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj, const char *name);
struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);
struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);
const char *bpf_map__name(const struct bpf_map *map);
int bpf_map__set_pin_path(struct bpf_map *map, const char *path);
int bpf_program__fd(const struct bpf_program *prog);
int bpf_map__fd(const struct bpf_map *map);
long libbpf_get_error(const void *ptr);

int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);

typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb, void *ctx,
                                     const void *opts);
int ring_buffer__poll(struct ring_buffer *rb, int timeout_ms);
void ring_buffer__free(struct ring_buffer *rb);
""")

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPFFS = Path("/sys/fs/bpf")
_BPF_FS_MAGIC = 0xCAFE4A11

_lib: Any = None
_lib_lock = threading.Lock()


def _library() -> Any:
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                _lib = _ffi.dlopen("libbpf.so.1")
            except OSError as exc:
                raise NetworkError("libbpf.so.1 not found (install Debian's libbpf1)") from exc
        return _lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise NetworkError(f"{what}: {os.strerror(-rc)}", errno=-rc)
    return rc


def ensure_bpffs(path: Path = BPFFS) -> None:
    """Mount the BPF filesystem at ``path`` unless it is already there."""
    path.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    class _StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]

    st = _StatFs()
    if libc.statfs(str(path).encode(), ctypes.byref(st)) == 0 and st.f_type == _BPF_FS_MAGIC:
        return
    if libc.mount(b"bpf", str(path).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise NetworkError(f"mount bpffs on {path}: {os.strerror(err)}")


class BpfObject:
    """A loaded BPF ELF object. Maps are pinned under ``pin_dir`` (and reused from there if
    a previous process pinned them), so filters attached by an earlier run keep sharing the
    maps of this one."""

    def __init__(self, path: Path, pin_dir: Path | None = None) -> None:
        lib = _library()
        self._lib = lib
        obj = lib.bpf_object__open_file(str(path).encode(), _ffi.NULL)
        err = lib.libbpf_get_error(obj)
        if err:
            raise NetworkError(f"bpf_object__open_file({path}): {os.strerror(-err)}")
        self._obj: Any = obj
        try:
            if pin_dir is not None:
                pin_dir.mkdir(parents=True, exist_ok=True)
                m = lib.bpf_object__next_map(obj, _ffi.NULL)
                while m != _ffi.NULL:
                    name = _ffi.string(lib.bpf_map__name(m)).decode()
                    if not name.startswith("."):
                        _check(lib.bpf_map__set_pin_path(m, str(pin_dir / name).encode()),
                               f"pin path of map {name}")
                    m = lib.bpf_object__next_map(obj, m)
            _check(lib.bpf_object__load(obj), f"load {path}")
        except BaseException:
            self.close()
            raise

    def prog_fd(self, name: str) -> int:
        prog = self._lib.bpf_object__find_program_by_name(self._obj, name.encode())
        if prog == _ffi.NULL:
            raise NetworkError(f"no program {name!r} in BPF object")
        return int(self._lib.bpf_program__fd(prog))

    def map_fd(self, name: str) -> int:
        found = self._lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if found == _ffi.NULL:
            raise NetworkError(f"no map {name!r} in BPF object")
        return int(self._lib.bpf_map__fd(found))

    def close(self) -> None:
        if self._obj is not None:
            self._lib.bpf_object__close(self._obj)
            self._obj = None


class BpfMap:
    """Bytes in, bytes out view of a map fd (callers pack keys and values with ``struct``)."""

    def __init__(self, fd: int, key_size: int, value_size: int) -> None:
        self._lib = _library()
        self.fd, self.key_size, self.value_size = fd, key_size, value_size

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        _check(self._lib.bpf_map_update_elem(self.fd, key, value, flags), "map update")

    def lookup(self, key: bytes) -> bytes | None:
        out = _ffi.new("char[]", self.value_size)
        rc = self._lib.bpf_map_lookup_elem(self.fd, key, out)
        if rc == -errno.ENOENT:
            return None
        _check(rc, "map lookup")
        return bytes(_ffi.buffer(out, self.value_size))

    def delete(self, key: bytes) -> bool:
        rc = self._lib.bpf_map_delete_elem(self.fd, key)
        if rc == -errno.ENOENT:
            return False
        _check(rc, "map delete")
        return True

    def keys(self) -> Iterator[bytes]:
        cur: Any = _ffi.NULL
        nxt = _ffi.new("char[]", self.key_size)
        while self._lib.bpf_map_get_next_key(self.fd, cur, nxt) == 0:
            key = bytes(_ffi.buffer(nxt, self.key_size))
            yield key
            cur = _ffi.new("char[]", key)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value


class RingBuffer:
    """libbpf's ring buffer reader; ``callback(bytes)`` runs in the thread that polls."""

    def __init__(self, map_fd: int, callback: Callable[[bytes], None]) -> None:
        self._lib = _library()
        self._callback = callback

        def _sample(_ctx: Any, data: Any, size: int) -> int:
            try:
                self._callback(bytes(_ffi.buffer(data, size)))
            except Exception:  # never let an exception cross into C
                log.exception("audit event handler failed")
            return 0

        self._sample = _ffi.callback("int(void *, void *, size_t)", _sample)  # kept alive here
        rb = self._lib.ring_buffer__new(map_fd, self._sample, _ffi.NULL, _ffi.NULL)
        err = self._lib.libbpf_get_error(rb)
        if err or rb == _ffi.NULL:
            raise NetworkError(f"ring_buffer__new: {os.strerror(-err) if err else 'failed'}")
        self._rb: Any = rb

    def poll(self, timeout_ms: int) -> int:
        if self._rb is None:
            return 0
        rc = int(self._lib.ring_buffer__poll(self._rb, timeout_ms))
        if rc < 0 and rc != -errno.EINTR:
            _check(rc, "ring_buffer__poll")
        return max(rc, 0)

    def close(self) -> None:
        if self._rb is not None:
            self._lib.ring_buffer__free(self._rb)
            self._rb = None


_ffi.cdef("""
struct bpf_test_run_opts {
    size_t sz; const void *data_in; void *data_out; uint32_t data_size_in; uint32_t data_size_out;
    const void *ctx_in; void *ctx_out; uint32_t ctx_size_in; uint32_t ctx_size_out;
    uint32_t retval; int repeat; uint32_t duration; uint32_t flags; uint32_t cpu;
    uint32_t batch_size;
};
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
""")

SK_BUFF_CTX_SIZE = 192  # sizeof(struct __sk_buff) in the uapi of kernels >= 5.x
SK_BUFF_IFINDEX_OFFSET = 40


def prog_test_run(prog_fd: int, packet: bytes, *, ifindex: int = 0,
                  repeat: int = 1) -> tuple[int, int]:
    """Run a tc program on ``packet`` (BPF_PROG_TEST_RUN): (return code, average ns per run).

    ``ifindex`` sets ``skb->ifindex`` (kernels >= 5.11). Used by tests and benchmarks only.
    """
    retval, duration, _ = _test_run(prog_fd, packet, ifindex, repeat)
    return retval, duration


def prog_test_output(prog_fd: int, packet: bytes, *, ifindex: int = 0) -> tuple[int, bytes]:
    """Like :func:`prog_test_run` (one run): (return code, the packet as the program left it)."""
    retval, _, out = _test_run(prog_fd, packet, ifindex, 1)
    return retval, out


def _test_run(prog_fd: int, packet: bytes, ifindex: int, repeat: int) -> tuple[int, int, bytes]:
    lib = _library()
    opts = _ffi.new("struct bpf_test_run_opts *")
    opts.sz = _ffi.sizeof("struct bpf_test_run_opts")
    data_in = _ffi.new("char[]", packet)
    data_out = _ffi.new("char[]", len(packet) + 256)
    opts.data_in = data_in
    opts.data_size_in = len(packet)
    opts.data_out = data_out
    opts.data_size_out = len(packet) + 256
    ctx = bytearray(SK_BUFF_CTX_SIZE)
    ctx[SK_BUFF_IFINDEX_OFFSET:SK_BUFF_IFINDEX_OFFSET + 4] = ifindex.to_bytes(4, "little")
    ctx_in = _ffi.new("char[]", bytes(ctx))
    opts.ctx_in = ctx_in
    opts.ctx_size_in = len(ctx)
    opts.repeat = repeat
    _check(lib.bpf_prog_test_run_opts(prog_fd, opts), "bpf_prog_test_run_opts")
    return int(opts.retval), int(opts.duration), bytes(_ffi.buffer(data_out, opts.data_size_out))
