"""A node holding more than FD_SETSIZE (1024) descriptors still builds and removes slots, and
the driver's start raises a soft open-files limit of 1024 so that it can hold them.

libnftables waits on its netlink socket with ``select()``; on a descriptor >= 1024 glibc aborts
the whole process ("bit out of range 0 - FD_SETSIZE on fd_set"). ``cube bench density`` hit it
at 486 idle sandboxes (about two descriptors each). The driver runs in a child process here, so
the abort shows as its exit status instead of killing pytest.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import textwrap

import pytest

from cube_net_ebpf import EbpfNetConfig, EbpfNetwork, nat

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

NODE = "test-node-fd"
SUBNET = "192.0.2.0/24"

CHILD = textwrap.dedent("""
    import asyncio, os, resource, sys
    from cube_core import NetworkError, NetworkPolicy
    from cube_net_ebpf import EbpfNetConfig, EbpfNetwork, nftables

    async def main() -> None:
        config = EbpfNetConfig(subnet=sys.argv[1], pool_size=0,
                               dns_upstreams=("198.18.0.53",)).for_node(sys.argv[2])
        driver = EbpfNetwork(config)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert hard > 1200, hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # systemd's default soft limit
        await driver.start()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)  # raised by start
        filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
        assert min(filler) < 1024 < max(filler)
        probe = os.open("/dev/null", os.O_RDONLY)
        assert probe > 1024, probe  # every descriptor opened from here on is past FD_SETSIZE
        os.close(probe)
        try:
            nics = [await driver.allocate(f"fd{i}", NetworkPolicy()) for i in range(3)]
            await driver.update_policy(nics[0], NetworkPolicy(allow_out=("198.18.0.10",)))
            listed = nftables.run("list tables", json_output=True)
            assert config.names.nft_table in listed, listed
            try:
                nftables.run("list table inet no-such-table")
                raise AssertionError("nft accepted a missing table")
            except NetworkError as exc:
                assert "No such file or directory" in str(exc), exc
            for nic in nics:
                await driver.release(nic)
            low = nftables._library()[2].numbers
            assert max(low) < 1024 and all(os.readlink(f"/proc/self/fd/{fd}") == "/dev/null"
                                           for fd in low), low
            print("slots-ok", len(nics))
        finally:
            for fd in filler:
                os.close(fd)
            await driver.sweep(())
            await driver.close()

    asyncio.run(main())
""")


async def _sweep(config: EbpfNetConfig) -> None:
    driver = EbpfNetwork(config)
    await driver.start()
    await driver.sweep(())
    await driver.close()


def test_slots_past_fd_setsize() -> None:
    config = EbpfNetConfig(subnet=SUBNET, pool_size=0, dns_upstreams=("198.18.0.53",)).for_node(NODE)
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, SUBNET, NODE], capture_output=True,
                              text=True, timeout=120)
    finally:
        asyncio.run(_sweep(config))  # what a crashed child left behind
        nat.remove_host(config.names)
        shutil.rmtree(config.state_dir, ignore_errors=True)
        shutil.rmtree(config.bpf_pin_dir, ignore_errors=True)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert "slots-ok 3" in proc.stdout
