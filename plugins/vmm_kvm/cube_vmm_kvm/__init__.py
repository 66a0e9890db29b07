"""Cube's QEMU ``microvm`` VMM plugin: boot, snapshot, copy-on-write clones, pause, re-attach."""

from __future__ import annotations

from .accel import AccelReport, detect
from .config import KvmConfig
from .driver import KvmVmm
from .plugin import KvmPlugin

__all__ = ["AccelReport", "KvmConfig", "KvmPlugin", "KvmVmm", "detect"]
