"""``GET /files`` (download) and ``POST /files`` (upload) (E2B_PROTOCOL.md §5.3, §5.4).

Both stream: uploads go to disk chunk by chunk (multipart or octet-stream, optionally
gzip), downloads are sent from the file (with Range support) or gzip-compressed on
the fly when the client accepts gzip.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mimetypes
import os
import re
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, web

from .auth import TOKEN_HEADER, UNAUTHORIZED_MESSAGE, json_error
from .filesystem import read_metadata, write_metadata
from .state import AgentState
from .users import UnknownUserError, UserInfo, chown_quiet, expand_path, makedirs_as

log = logging.getLogger(__name__)

CHUNK = 256 << 10
GZIP_LEVEL = 1  # the guest CPU may be emulated: favour speed over ratio
METADATA_HEADER = "x-metadata-"
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")
_KEY = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")


class FilesError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _os_error(exc: OSError, path: str) -> FilesError:
    if exc.errno == errno.ENOSPC:
        return FilesError(507, f"not enough disk space available: {path}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return FilesError(403, f"permission denied: {path}")
    if exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL):
        return FilesError(400, f"invalid path '{path}': {exc.strerror}")
    if exc.errno == errno.ENOENT:
        return FilesError(404, f"path '{path}' does not exist")
    return FilesError(500, f"error accessing '{path}': {exc.strerror or exc}")


class FilesHandler:
    def __init__(self, state: AgentState) -> None:
        self.state = state

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/files", self.download)
        app.router.add_post("/files", self.upload)

    # -- auth -------------------------------------------------------------------

    def _authorize(self, request: web.Request, operation: str) -> UserInfo:
        query = request.query
        username = query.get("username", "")
        if self.state.access_token and not self.state.token_ok(
            request.headers.get(TOKEN_HEADER)
        ):
            signature = query.get("signature")
            if not signature:
                raise FilesError(401, UNAUTHORIZED_MESSAGE)
            expiration = query.get("signature_expiration")
            if expiration:
                try:
                    expired = int(expiration) < int(time.time())
                except ValueError as exc:
                    raise FilesError(401, "invalid signature expiration") from exc
                if expired:
                    raise FilesError(401, "signature is already expired")
            if not self.state.signature_ok(
                query.get("path", ""), operation, username, signature, expiration
            ):
                raise FilesError(401, "invalid signature")
        try:
            return self.state.user(username or None)
        except UnknownUserError as exc:
            raise FilesError(401, str(exc)) from exc

    # -- download ------------------------------------------------------------------

    async def download(self, request: web.Request) -> web.StreamResponse:
        try:
            user = self._authorize(request, "read")
            raw = request.query.get("path", "")
            path = expand_path(raw, user)
            try:
                st = os.stat(path)
            except OSError as exc:
                raise _os_error(exc, path) from exc
            if os.path.isdir(path):
                raise FilesError(400, f"path '{path}' is a directory")
            if not os.access(path, os.R_OK):
                raise FilesError(403, f"permission denied: {path}")
        except FilesError as err:
            return json_error(err.status, err.message)
        name = os.path.basename(path)
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        headers = {
            "Content-Disposition": f'inline; filename="{name}"',
            "Vary": "Accept-Encoding",
        }
        wants_gzip = _explicit_gzip(request.headers.get("Accept-Encoding", ""))
        wants_gzip = wants_gzip and "Range" not in request.headers
        if not wants_gzip:
            file_resp = web.FileResponse(path, chunk_size=CHUNK, headers=headers)
            file_resp.content_type = ctype
            return file_resp
        resp = web.StreamResponse(headers={**headers, "Content-Encoding": "gzip"})
        resp.content_type = ctype
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        loop = asyncio.get_running_loop()
        with open(path, "rb") as fh:
            log.debug("gzip download of %s (%d bytes)", path, st.st_size)
            while True:
                block = await loop.run_in_executor(None, fh.read, CHUNK)
                if not block:
                    break
                out = compressor.compress(block)
                if out:
                    await resp.write(out)
        await resp.write(compressor.flush())
        await resp.write_eof()
        return resp

    # -- upload ----------------------------------------------------------------------

    def _metadata(self, request: web.Request) -> dict[str, str] | None:
        meta: dict[str, str] = {}
        for key, value in request.headers.items():
            if key.lower().startswith(METADATA_HEADER):
                name = key[len(METADATA_HEADER) :].lower()
                if not name or not _KEY.match(name) or not _PRINTABLE.match(value):
                    raise FilesError(400, f"invalid metadata header {key!r}")
                meta[name] = value
        return meta or None

    async def upload(self, request: web.Request) -> web.StreamResponse:
        try:
            user = self._authorize(request, "write")
            metadata = self._metadata(request)
            query_path = request.query.get("path")
            ctype = request.content_type
            results: list[dict[str, object]] = []
            if ctype.startswith("multipart/"):
                reader = await request.multipart()
                while True:
                    part = await reader.next()
                    if part is None:
                        break
                    if not isinstance(part, BodyPartReader) or part.name != "file":
                        await part.release()
                        continue
                    target = query_path or part_filename(part)
                    if not target:
                        raise FilesError(400, "file part without a destination path")
                    path = expand_path(target, user)
                    await self._write(path, user, _part_chunks(part), metadata)
                    results.append(self._result(path))
            else:
                if not query_path:
                    raise FilesError(400, "the 'path' query parameter is required")
                path = expand_path(query_path, user)
                chunks = _body_chunks(request)
                encoding = request.headers.get("Content-Encoding", "").lower().strip()
                if encoding == "gzip":
                    chunks = _gunzip(chunks)
                elif encoding not in ("", "identity"):
                    raise FilesError(400, f"unsupported Content-Encoding {encoding!r}")
                await self._write(path, user, chunks, metadata)
                results.append(self._result(path))
            if not results:
                raise FilesError(400, "no file in the request")
        except FilesError as err:
            return json_error(err.status, err.message)
        return web.json_response(results)

    def _result(self, path: str) -> dict[str, object]:
        out: dict[str, object] = {
            "path": path, "name": os.path.basename(path), "type": "file"
        }
        meta = read_metadata(path)
        if meta:
            out["metadata"] = meta
        return out

    async def _write(
        self,
        path: str,
        user: UserInfo,
        chunks: AsyncIterator[bytes],
        metadata: dict[str, str] | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        if os.path.isdir(path):
            raise FilesError(400, f"path '{path}' is a directory")
        try:
            await loop.run_in_executor(None, makedirs_as, os.path.dirname(path), user)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _os_error(exc, path) from exc
        try:
            async for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = await loop.run_in_executor(None, os.write, fd, view)
                    view = view[n:]
            chown_quiet(path, user)
            # every upload replaces the whole set: one without metadata clears an earlier write's
            write_metadata(path, metadata or {})
        except OSError as exc:
            raise _os_error(exc, path) from exc
        finally:
            os.close(fd)


_FILENAME_EXT = re.compile(r"filename\*\s*=\s*([^']*)'[^']*'([^;\s]*)", re.I)
_FILENAME_QUOTED = re.compile(r'filename\s*=\s*"((?:[^"\\]|\\.)*)"', re.I)
_FILENAME_TOKEN = re.compile(r"filename\s*=\s*([^;\s\"]+)", re.I)


def part_filename(part: BodyPartReader) -> str | None:
    """The part's filename exactly as sent (aiohttp strips a leading ``/``).

    The SDK puts the destination path there, absolute or relative.
    """
    header = part.headers.get("Content-Disposition", "")
    m = _FILENAME_EXT.search(header)
    if m:
        return urllib.parse.unquote(m.group(2), encoding=m.group(1) or "utf-8")
    m = _FILENAME_QUOTED.search(header)
    if m:
        value = re.sub(r"\\(.)", r"\1", m.group(1))
        return value.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")
    m = _FILENAME_TOKEN.search(header)
    return m.group(1) if m else None


def _explicit_gzip(accept: str) -> bool:
    """True when the client asked for gzip specifically (the SDK's ``gzip=True``).

    HTTP clients send ``gzip, deflate, ...`` by default; compressing every download
    for them would cost guest CPU for nothing, so only a lone ``gzip`` counts.
    """
    codings = [c.split(";")[0].strip().lower() for c in accept.split(",") if c.strip()]
    return codings == ["gzip"]


async def _body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    while True:
        chunk = await request.content.read(CHUNK)
        if not chunk:
            return
        yield chunk


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        chunk = await part.read_chunk(CHUNK)
        if not chunk:
            return
        yield chunk


async def _gunzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        async for chunk in chunks:
            data = chunk
            while data:
                out = decomp.decompress(data, CHUNK)
                if out:
                    yield out
                data = decomp.unconsumed_tail
                if decomp.eof and decomp.unused_data:  # concatenated gzip members
                    data = decomp.unused_data
                    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
        tail = decomp.flush()
        if tail:
            yield tail
    except zlib.error as exc:
        raise FilesError(400, f"invalid gzip body: {exc}") from exc
