"""Find (or build once) the compiled egress filter object.

The object is named by a hash of its C source: ``<cache>/egress-<sha256[:16]>.o``, the name
``bpf/build.sh`` writes. Building needs clang and libbpf-dev; loading needs neither.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import structlog
from cube_core import NetworkError

log = structlog.get_logger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
SOURCE = BPF_DIR / "egress.bpf.c"
BUILD = BPF_DIR / "build.sh"


def source_hash(source: Path = SOURCE) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()[:16]


def object_path(cache_dir: Path, source: Path = SOURCE) -> Path:
    return cache_dir / f"{source.name.removesuffix('.bpf.c')}-{source_hash(source)}.o"


def find_or_build(cache_dir: Path, explicit: Path | None = None) -> Path:
    if explicit is not None:
        if not explicit.is_file():
            raise NetworkError(f"bpf_object {explicit} does not exist")
        return explicit
    if not SOURCE.is_file():
        raise NetworkError(f"no eBPF source at {SOURCE}; set bpf_object to a prebuilt object")
    path = object_path(cache_dir)
    if path.is_file() and path.stat().st_size > 0:
        return path
    if shutil.which("clang") is None:
        raise NetworkError(f"{path} is missing and clang is not installed: run {BUILD} where "
                           "clang and libbpf-dev are installed")
    log.info("building the eBPF egress filter", output=str(path))
    result = subprocess.run([str(BUILD), str(SOURCE), str(cache_dir)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0 or not path.is_file():
        raise NetworkError(f"eBPF build failed: {result.stderr.strip()[-2000:]}")
    return path
