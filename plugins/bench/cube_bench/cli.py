"""``cube bench``: the benchmark commands, added to the ``cube`` command line through the ``cube.cli``
entry point ``bench`` (``cube bench restore``, ``cube bench create``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from cube_core import CubeError
from cube_core.cli import ConfigOpt, guard, with_node
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, help="Benchmarks: medians and p95 against a baseline in the same run.")
out = Console()
err = Console(stderr=True)


@app.command("restore")
def bench_restore(n: Annotated[int, typer.Option("--n", help="clones to restore (kept running together)")] = 20,
                  cold: Annotated[int, typer.Option(help="cold boots for the baseline")] = 1,
                  template: Annotated[str, typer.Option(help="template to clone")] = "base",
                  as_json: Annotated[bool, typer.Option("--json", help="one JSON object on the last line")] = False,
                  config: ConfigOpt = None) -> None:
    """Restore N clones of a template snapshot; latency p50/p95 and memory per idle clone, next to
    the cold-boot baseline."""
    from cube_core.models import DiskHandle, NetworkPolicy, VmSpec, VmState

    from cube_bench.restore import cold_boot_bench, restore_bench

    async def action(agent: Any) -> dict[str, Any]:
        tmpl = await agent.templates.ensure(template)
        if tmpl.snapshot is None:
            raise CubeError(f"the {type(agent.vmm).__name__} driver keeps no snapshots")
        state = VmState.model_validate(tmpl.snapshot.vm_state)
        layer = DiskHandle.model_validate(tmpl.snapshot.disk)
        disks: dict[str, Any] = {}
        nics: dict[str, Any] = {}

        async def spec_for(base: Path, vm_id: str) -> VmSpec:
            disks[vm_id] = await agent.storage.create_disk(vm_id, base)
            return state.clone_spec(vm_id, disks[vm_id], interpreter=tmpl.interpreter)

        async def nic_for(vm_id: str) -> Any:
            nics[vm_id] = await agent.network.allocate(vm_id, NetworkPolicy(allow_internet_access=False))
            return nics[vm_id]

        async def cleanup(vm_id: str) -> None:
            if vm_id in nics:
                await agent.network.release(nics.pop(vm_id))
            if vm_id in disks:
                await agent.storage.delete_disk(disks.pop(vm_id))

        baseline = await cold_boot_bench(agent.vmm, cold, nic_factory=nic_for, cleanup=cleanup,
                                         spec_factory=lambda vm_id: spec_for(Path(str(tmpl.rootfs)), vm_id))
        result = await restore_bench(agent.vmm, state, n, nic_factory=nic_for, cleanup=cleanup,
                                     spec_factory=lambda vm_id: spec_for(layer.path, vm_id))
        result["cold_boot_ms_p50"] = baseline["cold_boot_ms_p50"]
        result["cold_boot_ms_p95"] = baseline["cold_boot_ms_p95"]
        result["speedup_p50"] = round(baseline["cold_boot_ms_p50"] / max(result["answer_ms_p50"], 0.1), 1)
        return result

    result = with_node(config, action)
    table = Table("measure", "value")
    for key, value in result.items():
        table.add_row(key, str(value))
    (err if as_json else out).print(table)
    if as_json:
        print(json.dumps(result))


@app.command("create")
def bench_create(
        concurrency: Annotated[str, typer.Option(help="comma-separated concurrency levels")] = "1,10,50",
        n: Annotated[int, typer.Option("--n", help="creates per concurrency level")] = 200,
        as_json: Annotated[bool, typer.Option("--json", help="one JSON object on the last line")] = False,
        url: Annotated[str | None, typer.Option(help="measure this server as it is (default: start one "
                                                     "per mode on free ports)")] = None,
        out_dir: Annotated[Path, typer.Option("--out", help="where the JSON, PNG and serve logs go")] = Path(
            "bench-results"),
        idle: Annotated[int, typer.Option(help="idle sandboxes for the memory/CPU cost (at most --n)")] = 100,
        cold_n: Annotated[int, typer.Option("--cold-n", help="cold boots (concurrency 1 only)")] = 4,
        modes: Annotated[str, typer.Option(help="pool_hit,pool_miss,cold (ignored with --url)")] = (
            "pool_hit,pool_miss,cold"),
        api_key: Annotated[str | None, typer.Option(help="with --url (default: $E2B_API_KEY)")] = None,
        admin_url: Annotated[str | None, typer.Option(help="with --url: its metrics server, to wait "
                                                           "for the warm pool")] = None,
        profile: Annotated[bool, typer.Option(help="sample each server's Python stacks with py-spy during "
                                                   "the waves' creates (profile-<mode>-<time>.txt in --out)")] = False,
        clients: Annotated[int, typer.Option(help="client processes making each wave's creates between them "
                                                  "(1: the bench's one event loop, the reference)")] = 1,
) -> None:
    """Create sandboxes through the E2B SDK: create→201 and create→first command p50/p95/p99 at each
    concurrency, memory and CPU per idle sandbox; pool hit vs pool miss vs cold boot, side by side."""
    from cube_core.log import configure_logging

    from cube_bench.create import Options, run, tables

    configure_logging()
    try:
        levels = tuple(int(c) for c in concurrency.split(",") if c.strip())
    except ValueError:
        err.print(f"error: --concurrency wants numbers like 1,10,50, not {concurrency!r}")
        raise typer.Exit(2) from None
    opts = Options(concurrency=levels, n=n, idle=idle, cold_n=cold_n, url=url, api_key=api_key,
                   admin_url=admin_url, out=out_dir, profile=profile, clients=max(1, clients),
                   modes=tuple(m.strip().replace("-", "_") for m in modes.split(",") if m.strip()))
    result = guard(lambda: run(opts, lambda message: err.print(message, highlight=False)))
    for table in tables(result):
        (err if as_json else out).print(table)
    (err if as_json else out).print(f"written: {result['files']['json']}  {result['files']['plot'] or '(no plot)'}")
    if as_json:
        print(json.dumps(result))


@app.command("cluster")
def bench_cluster(
        concurrency: Annotated[str, typer.Option(help="comma-separated concurrency levels")] = "1,10",
        n: Annotated[int, typer.Option("--n", help="creates per concurrency level and setup")] = 40,
        setups: Annotated[str, typer.Option(help="serve,master_1node,master_2nodes")] = (
            "serve,master_1node,master_2nodes"),
        out_dir: Annotated[Path, typer.Option("--out", help="where the JSON and the logs go")] = Path("bench-results"),
        as_json: Annotated[bool, typer.Option("--json", help="one JSON object on the last line")] = False) -> None:
    """cube serve vs cube master + one node vs + two nodes on this box (a throwaway PostgreSQL):
    what the control plane's hop to a node adds to create p50/p95, and creates/s."""
    from cube_core.log import configure_logging

    from cube_bench.cluster import Options, run

    configure_logging()
    try:
        levels = tuple(int(c) for c in concurrency.split(",") if c.strip())
    except ValueError:
        err.print(f"error: --concurrency wants numbers like 1,10, not {concurrency!r}")
        raise typer.Exit(2) from None
    opts = Options(concurrency=levels, n=n, out=out_dir,
                   setups=tuple(s.strip() for s in setups.split(",") if s.strip()))
    result = guard(lambda: run(opts, lambda message: err.print(message, highlight=False)))
    table = Table("setup", "c", "create p50 ms", "create p95 ms", "first cmd p50 ms", "creates/s", "failures")
    for name, per_c in result["setups"].items():
        for c, row in per_c.items():
            table.add_row(name, c, str(row["create_ms_p50"]), str(row["create_ms_p95"]), str(row["first_cmd_ms_p50"]),
                          str(row["creates_per_s"]), str(row["failures"]))
    (err if as_json else out).print(table)
    for key, value in result["ratios"].items():
        (err if as_json else out).print(f"{key}: {value}")
    (err if as_json else out).print(f"written: {result['file']}")
    if as_json:
        print(json.dumps(result))


def _key_values(flag: str, items: list[str] | None) -> dict[str, Any]:
    """``key=value`` items (a JSON value, else the text) as a dict; exit 2 on one without ``=``."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            err.print(f"error: {flag} wants key=value, not {item!r}")
            raise typer.Exit(2)
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


@app.command("density")
def bench_density(
        max_sandboxes: Annotated[int, typer.Option("--max", help="stop at this many sandboxes alive")] = 400,
        min_available_pct: Annotated[float, typer.Option(help="stop before MemAvailable would drop under this "
                                                              "% of MemTotal")] = 15.0,
        concurrency: Annotated[int, typer.Option(help="creates at a time")] = 4,
        pool: Annotated[int, typer.Option(help="warm-pool size (0: every create restores the template; "
                                               "else every create waits for a full pool: a hit)")] = 0,
        warm_up: Annotated[bool, typer.Option(help="\\[core] pool.warm_up of the server")] = True,
        vmm: Annotated[list[str] | None, typer.Option("--vmm", help="extra \\[vmm.options] key=value (JSON "
                                                                     "value), repeatable")] = None,
        core: Annotated[list[str] | None, typer.Option("--core", help="extra \\[core] key=value (JSON value), "
                                                                       "repeatable")] = None,
        ksm: Annotated[str, typer.Option(help="on | off | keep: /sys/kernel/mm/ksm/run for the run")] = "keep",
        probe_every: Annotated[int, typer.Option(help="probe command latency every this many sandboxes "
                                                      "(0: --max // 20)")] = 0,
        probe_runs: Annotated[int, typer.Option(help="commands.run('true') per probe")] = 5,
        ksm_pages_to_scan: Annotated[int | None, typer.Option(help="with --ksm on: ksmd pages per "
                                                                   "wake-up for the run")] = None,
        zram: Annotated[str | None, typer.Option(help="set up a zram swap device of this size (e.g. 8G) "
                                                      "for the run, removed after (scripts/zram-swap.sh)")] = None,
        zram_algo: Annotated[str, typer.Option(help="the zram device's compressor (this kernel: lzo-rle, "
                                                    "lzo, lz4)")] = "lzo-rle",
        idle_wait: Annotated[float, typer.Option(help="seconds to wait after the fill before measuring "
                                                      "(idle reclaim)")] = 0.0,
        reclaim_wait: Annotated[float | None, typer.Option(help="at the memory floor, wait up to this many "
                                                                "seconds for the server's idle reclaim, then go "
                                                                "on if a sandbox fits (0: stop at the first "
                                                                "floor; default: 300 when the server reclaims)")
                                ] = None,
        out_dir: Annotated[Path, typer.Option("--out", help="where the JSON and the serve log go")] = Path(
            "bench-results"),
        idle_window: Annotated[float, typer.Option(help="seconds over which the idle CPU is attributed")] = 30.0,
        idle_profile: Annotated[bool, typer.Option(help="py-spy cube serve over the idle window")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="one JSON object on the last line")] = False) -> None:
    """Fill this host with idle sandboxes through the E2B SDK (own cube serve): how many fit, memory
    per sandbox and where it is, command p50 at 25/50/75/100 % of the count; all killed at the end."""
    from cube_core.log import configure_logging

    from cube_bench.density import Options, run

    configure_logging()
    options, core_options = _key_values("--vmm", vmm), _key_values("--core", core)
    if ksm not in ("on", "off", "keep"):
        err.print(f"error: --ksm is on, off or keep, not {ksm!r}")
        raise typer.Exit(2)
    opts = Options(max_sandboxes=max_sandboxes, min_available_pct=min_available_pct, concurrency=concurrency,
                   pool_size=pool, pool_warm_up=warm_up, vmm_options=options, core_options=core_options,
                   ksm=None if ksm == "keep" else ksm == "on",
                   ksm_pages_to_scan=ksm_pages_to_scan, probe_every=probe_every, probe_runs=probe_runs,
                   zram=zram, zram_algo=zram_algo, idle_wait_s=idle_wait, reclaim_wait_s=reclaim_wait,
                   out=out_dir, idle_window_s=idle_window,
                   idle_profile=idle_profile)
    result = guard(lambda: run(opts, lambda message: err.print(message, highlight=False)))
    table = Table("measure", "value")
    for key in ("count", "bound", "mib_per_sandbox", "per_sandbox_mib", "reclaim_waits", "pss_mib_median",
                "uss_mib_median", "swap_pss_mib_median",
                "mem_available_mib", "zram_mib", "cmd_ms_p50_at", "idle_sandbox_cmd_ms", "idle_cpu", "ksm",
                "fill_s", "file"):
        table.add_row(key, json.dumps(result.get(key)))
    parts = Table("part (median MiB)", "Rss", "Pss", "Private_Dirty", "Shared", "SwapPss", "Size")
    for name, v in result.get("breakdown_mib_median", {}).items():
        parts.add_row(name, *(str(v.get(k, "-")) for k in ("Rss", "Pss", "Private_Dirty", "Shared", "SwapPss",
                                                           "Size")))
    for t in (table, parts):
        (err if as_json else out).print(t)
    if as_json:
        print(json.dumps(result))
