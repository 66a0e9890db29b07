"""Every external command that Cube's code, scripts and tests run on the host is installed by the
project's own set-up: it is named by a line of scripts/apt-packages.txt (the package first, then
its commands), or it is a Python entry point of this project.

Commands are found statically, so a command that only a fresh machine lacks still fails here:
- Python (cube_core, plugins, tests, guest/tests; not the guest agent, which runs inside the VM,
  nor examples/, which run in sandboxes): the literal program of ``subprocess.*``,
  ``asyncio.create_subprocess_exec``, ``os.posix_spawn*``, ``shutil.which``, storage_cow's
  ``commands.run`` / ``require_tool``, lists assigned to a name that is then run, and calls of
  local wrappers that hand their ``*args`` to one of those (``sh("ip", ...)``);
- PostgreSQL's server programs, which the code finds with ``server_program("initdb")``
  (Debian keeps them in /usr/lib/postgresql/<version>/bin, off PATH);
- shell scripts: their ``need CMD PACKAGE`` checks (the PACKAGE must be the line that names CMD).
Where a listed package is installed, its commands must come from it (``dpkg -S``) or, for a
metapackage such as ``postgresql``, from a package it depends on, so the list cannot claim a
command for the wrong package.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = REPO / "scripts" / "apt-packages.txt"
PY_ROOTS = ("cube_core", "plugins", "tests", "guest/tests", "scripts")
SPAWN_FUNCS = {"run", "Popen", "check_output", "check_call", "call", "getoutput", "create_subprocess_exec",
               "posix_spawn", "posix_spawnp", "execv", "execvp", "which"}
SPAWN_MODULES = {"subprocess", "asyncio", "os", "shutil", "commands"}
SPAWN_NAMES = {"require_tool"}
SERVER_PROGRAM_FUNCS = {"server_program"}  # cube_core.testing.postgres: name -> path off PATH
EXTRA_BIN_DIRS = ("/usr/lib/postgresql/*/bin",)
PROJECT_SCRIPTS = {"cube"}  # console scripts of this project's own distributions
PYTHON_SCRIPTS = {"py-spy"}  # console scripts of Python dependencies pinned in a pyproject.toml (in the venv)
NEED_RE = re.compile(r"(?:^|;)\s*need\s+([A-Za-z0-9_.+-]+)\s+([a-z0-9][a-z0-9.+-]+)")


def package_lines() -> dict[str, str]:
    """command -> package, from scripts/apt-packages.txt."""
    owners: dict[str, str] = {}
    for raw in PACKAGES.read_text().splitlines():
        words = raw.split("#", 1)[0].split()
        for cmd in words[1:]:
            assert cmd not in owners, f"{cmd} is listed for both {owners[cmd]} and {words[0]}"
            owners[cmd] = words[0]
    return owners


FALLBACKS = REPO / "scripts" / "apt-fallbacks.txt"


def fallback_packages() -> dict[str, str]:
    """command -> the package install-host.sh installs when the listed package did not ship it."""
    return {w[0]: w[1] for w in (raw.split("#", 1)[0].split() for raw in FALLBACKS.read_text().splitlines())
            if len(w) == 2}


def test_fallbacks_name_listed_commands() -> None:
    assert set(fallback_packages()) <= set(package_lines()), "a fallback for a command no line names"


def listed_packages() -> list[str]:
    return [w[0] for w in (raw.split("#", 1)[0].split() for raw in PACKAGES.read_text().splitlines()) if w]


def _is_spawn(func: ast.expr, wrappers: set[str]) -> bool:
    if isinstance(func, ast.Attribute):  # module.function only: never sandbox.commands.run(...)
        return isinstance(func.value, ast.Name) and (
            (func.value.id in SPAWN_MODULES and func.attr in SPAWN_FUNCS) or func.attr in wrappers)
    return isinstance(func, ast.Name) and (func.id in SPAWN_NAMES or func.id in wrappers)


def _program(arg: ast.expr, lists: dict[str, str]) -> str | None:
    """The program an argv expression starts with, when the source says it literally."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value.split()[0] if arg.value.split() else None
    if isinstance(arg, (ast.List, ast.Tuple)) and arg.elts:
        first = arg.elts[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
        if isinstance(first, ast.Starred) and isinstance(first.value, ast.Name):
            return lists.get(first.value.id)
    if isinstance(arg, ast.Name):
        return lists.get(arg.id)
    return None


def _wrappers(tree: ast.AST) -> set[str]:
    """Functions that pass their ``*args`` straight to a spawn call (``def sh(*args): run(args)``)."""
    found = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.args.vararg:
            name = fn.args.vararg.arg
            for call in ast.walk(fn):
                if (isinstance(call, ast.Call) and _is_spawn(call.func, set()) and call.args
                        and isinstance(call.args[0], ast.Name) and call.args[0].id == name):
                    found.add(fn.name)
    return found


def python_files() -> list[Path]:
    files = []
    for root in PY_ROOTS:
        files += [p for p in (REPO / root).rglob("*.py") if ".venv" not in p.parts]
    return files


def commands_in_python() -> dict[str, set[str]]:
    trees = {path: ast.parse(path.read_text(), str(path)) for path in python_files()}
    wrappers = set().union(*(_wrappers(t) for t in trees.values()))
    used: dict[str, set[str]] = defaultdict(set)
    for path, tree in trees.items():
        lists: dict[str, str] = {}
        for node in ast.walk(tree):  # name = ["prog", ...] (also annotated): resolvable argv names
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            for target in targets:
                prog = _program(value, {}) if isinstance(value, (ast.List, ast.Tuple)) else None
                if isinstance(target, ast.Name) and prog:
                    lists[target.id] = prog
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SERVER_PROGRAM_FUNCS
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                used[node.args[0].value].add(f"{path.relative_to(REPO)}:{node.lineno}")
            if isinstance(node, ast.Call) and node.args and _is_spawn(node.func, wrappers):
                prog = _program(node.args[0], lists)
                if prog:
                    used[Path(prog).name if prog.startswith("/") else prog].add(
                        f"{path.relative_to(REPO)}:{node.lineno}")
    return used


def commands_in_scripts() -> dict[str, tuple[str, str]]:
    """command -> (package the script says, where) from ``need CMD PACKAGE`` in every shell script."""
    found = {}
    for path in sorted(REPO.rglob("*.sh")):
        if ".venv" in path.parts:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("need()"):
                continue
            for cmd, pkg in NEED_RE.findall(line):
                found[cmd] = (pkg, f"{path.relative_to(REPO)}:{lineno}")
    return found


def test_scanner_finds_what_the_code_runs() -> None:
    """The scanner itself: commands we know the code runs are found (else the test proves nothing)."""
    used = commands_in_python()
    for cmd in ("debootstrap", "qemu-img", "mkfs.ext4", "ip", "tar", "clang", "initdb", "pg_ctl"):
        assert cmd in used, f"scanner lost {cmd}"
    assert {"depmod", "make", "strip"} <= set(commands_in_scripts())


def test_every_command_the_code_runs_is_installed_by_the_setup() -> None:
    owners = package_lines()
    missing = {cmd: sorted(where)[:3] for cmd, where in commands_in_python().items()
               if cmd not in owners and cmd not in PROJECT_SCRIPTS | PYTHON_SCRIPTS}
    assert not missing, ("commands run by the code but not named in scripts/apt-packages.txt "
                         f"(add '<package> <command>' lines): {missing}")


def test_every_script_need_names_its_package_line() -> None:
    owners = package_lines()
    wrong = {cmd: (pkg, where, owners.get(cmd)) for cmd, (pkg, where) in commands_in_scripts().items()
             if owners.get(cmd) != pkg}
    assert not wrong, f"need CMD PACKAGE lines that scripts/apt-packages.txt does not back: {wrong}"


def test_qemu_binary_default_is_installed_by_the_setup() -> None:
    kvm_config = pytest.importorskip("cube_vmm_kvm.config")
    binary = kvm_config.KvmConfig().qemu_binary
    assert Path(binary).name in package_lines()


def _dpkg_owner(path: str) -> set[str]:
    out = subprocess.run(["dpkg-query", "-S", path], capture_output=True, text=True)
    return {part.strip().split(":")[0] for line in out.stdout.splitlines()
            for part in line.split(": ", 1)[0].split(",")} if out.returncode == 0 else set()


def _depends(pkg: str) -> set[str]:
    """The packages ``pkg`` depends on directly (a metapackage's commands come from them)."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Depends}", pkg], capture_output=True, text=True)
    return {alt.split()[0] for dep in out.stdout.split(",") for alt in dep.split("|") if alt.split()}


def _find_command(cmd: str) -> str | None:
    path = ":".join(("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     *sorted(str(d) for pattern in EXTRA_BIN_DIRS for d in Path("/").glob(pattern.lstrip("/")))))
    return shutil.which(cmd, path=path)


def test_listed_commands_come_from_their_package() -> None:
    """On a set-up machine, each listed command exists and belongs to the package named for it."""
    wrong = {}
    for cmd, pkg in package_lines().items():
        installed = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if "install ok installed" not in installed.stdout:
            continue  # not installed here: the other tests still check the list itself
        path = _find_command(cmd)
        if path is None:
            wrong[cmd] = f"{pkg} is installed but {cmd} is not on PATH (nor in {', '.join(EXTRA_BIN_DIRS)})"
            continue
        candidates = {path, str(Path(path).resolve())}
        candidates |= {c.replace("/usr/", "/", 1) for c in set(candidates) if c.startswith("/usr/")}
        owners = set().union(*(_dpkg_owner(c) for c in candidates))
        if pkg not in owners and not owners & _depends(pkg) and fallback_packages().get(cmd) not in owners:
            wrong[cmd] = f"listed for {pkg}, but {path} belongs to {sorted(owners) or 'no package'}"
    assert not wrong, wrong


def test_install_script_reads_the_same_package_names() -> None:
    out = subprocess.run(["awk", "!/^#/ && NF {print $1}", str(PACKAGES)], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == listed_packages()
    assert "kmod" in listed_packages()  # kernel/stock.sh's depmod: missing on a fresh box once
