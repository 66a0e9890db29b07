"""Benchmark: snapshots of idle clones, ``diff`` (changed pages only) against ``full`` (all RAM in
the migration stream), and restores from them. Not a test (no assertions on time); run it alone:

    flock /tmp/cube-host.lock .venv/bin/python plugins/vmm_kvm/tests/bench_snapshot.py --n 10

For each format, ``n`` times: restore a clone of the template, ping it, let it idle, then save it
the way the service does (pause → ``snapshot`` → resume) and time ``snapshot()``
(``--dirty-mib N``: the clone first writes N MiB of random bytes to its tmpfs). Then ``n``
restores from one of those snapshots, each timed to ``restore()`` returning and to the first
answer of the guest agent (then shut down before the next). Prints JSON: median and p95.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from cube_bench.restore import percentile  # noqa: E402
from cube_core import RootfsRecipe  # noqa: E402
from cube_core.log import configure_logging  # noqa: E402
from cube_storage_cow import CowConfig, CowStorage  # noqa: E402
from kvm_helpers import REPO, RUN_TOKEN, VmFactory, make_template, private_bytes  # noqa: E402

from cube_vmm_kvm import KvmConfig, KvmVmm  # noqa: E402


def stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "p95": round(percentile(values, 95), 1),
            "min": round(min(values), 1), "max": round(max(values), 1)}


async def bench(n: int, memory_mb: int, settle_s: float, dirty_mib: int) -> dict[str, Any]:
    kernel = Path(subprocess.run(["bash", str(REPO / "kernel" / "build.sh")], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1])
    root = Path(tempfile.mkdtemp(prefix="cube-bench-snap-"))
    storage = CowStorage(CowConfig(root=root / "storage", cache=Path("/var/cache/cube")))
    await storage.start()
    image = await storage.build_rootfs(RootfsRecipe(name="base"))
    config = KvmConfig(run_dir=root / "run", mem_dir=Path("/dev/shm") / f"cube-bench-{RUN_TOKEN}",
                       cgroup_parent="cube-test")
    kvm = KvmVmm(config)
    await kvm.start()
    factory = VmFactory(kvm, storage, image.path, kernel, memory_mb=memory_mb)
    results: dict[str, Any] = {"n": n, "guest_memory_mib": memory_mb, "dirty_mib_written": dirty_mib,
                               "isolation": kvm.isolation}
    try:
        template = await make_template(kvm, factory, "btmpl")
        for fmt in ("diff", "full"):
            kvm.config = config.model_copy(update={"clone_snapshot": fmt})
            snapshot_ms, save_ms, sizes, dirty = [], [], [], []
            keep = None
            for i in range(n):
                clone = await factory.restore(template.state, f"{fmt}-src{i}", template.disk)
                await kvm.guest_call(clone, "ping", timeout=60)
                if dirty_mib:
                    await kvm.guest_call(clone, "exec", {"cmd": [
                        "sh", "-c", f"head -c {dirty_mib}M /dev/urandom > /tmp/dirt"]}, timeout=120)
                await asyncio.sleep(settle_s)
                assert clone.pid is not None
                dirty.append(private_bytes(clone.pid, template.state.memory_file) / 2**20)
                await kvm.pause(clone)
                started = time.monotonic()
                state = await kvm.snapshot(clone, storage.snapshot_dir(factory.vm_id(f"{fmt}-snap{i}")))
                snapshot_ms.append((time.monotonic() - started) * 1000)
                await kvm.resume(clone)
                assert state.data["format"] == fmt, state.data
                save_ms.append(state.data["save_ms"])
                files = {state.memory_file, state.device_state}
                sizes.append(sum(f.stat().st_size for f in files) / 2**20)
                if keep is None:
                    disk = await storage.freeze_disk(factory.disks[clone.vm_id], factory.vm_id(f"{fmt}-snap{i}"))
                    keep = (state, disk.path)
                await kvm.shutdown(clone)
            assert keep is not None
            restore_ms, answer_ms, owned = [], [], []
            for i in range(n):
                spec = await factory.spec(f"{fmt}-r{i}", keep[1], keep[0].memory_mb)
                started = time.monotonic()
                vm = await kvm.restore(keep[0], spec, None)
                restored = time.monotonic()
                await kvm.guest_call(vm, "ping", timeout=60)
                answered = time.monotonic()
                restore_ms.append((restored - started) * 1000)
                answer_ms.append((answered - started) * 1000)
                assert vm.pid is not None
                owned.append(private_bytes(vm.pid, template.state.memory_file) / 2**20 if fmt == "diff" else 0)
                await kvm.shutdown(vm)
                await storage.delete_disk(factory.disks.pop(vm.vm_id))
            results[fmt] = {
                "clone_private_mib_before_save": stats(dirty),
                "snapshot_call_ms": stats(snapshot_ms), "save_ms_vm_stopped": stats(save_ms),
                "snapshot_files_mib": stats(sizes),
                "restore_ms": stats(restore_ms), "restore_to_first_answer_ms": stats(answer_ms),
            }
            if fmt == "diff":
                results[fmt]["restored_clone_private_mib"] = stats(owned)
    finally:
        kvm.config = config
        await factory.cleanup()
        await kvm.close()
        await storage.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(config.mem_dir, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--memory-mb", type=int, default=512)
    parser.add_argument("--settle-s", type=float, default=1.0)
    parser.add_argument("--dirty-mib", type=int, default=0)
    args = parser.parse_args()
    configure_logging(level=os.environ.get("CUBE_LOG_LEVEL", "warning"), json=False)
    print(json.dumps(asyncio.run(bench(args.n, args.memory_mb, args.settle_s, args.dirty_mib)), indent=1))


if __name__ == "__main__":
    main()
