#!/usr/bin/env bash
# Build the Cube guest kernel (an uncompressed, stripped vmlinux booted through PVH) from Debian's
# linux-source package, cached by a hash of everything that affects the result.
#
#   kernel/build.sh [--print-key]        builds if needed, prints the vmlinux path on the last line
#
# Environment: CUBE_CACHE (default /var/cache/cube), CUBE_KERNEL_FRAGMENTS (space-separated names
# from configs/fragments/, default "ci"), JOBS (default: nproc).
set -euo pipefail
need() { command -v "$1" >/dev/null 2>&1 || { echo "kernel/build.sh: $1 not found (install $2)" >&2; exit 3; }; }
need make make; need gcc gcc; need flex flex; need bison bison; need bc bc
need strip binutils; need tar tar; need flock util-linux; need dpkg-query dpkg
here=$(cd "$(dirname "$0")" && pwd)
cache=${CUBE_CACHE:-/var/cache/cube}/kernel
fragments=${CUBE_KERNEL_FRAGMENTS:-ci}
jobs=${JOBS:-$(nproc)}
src_tar=$(ls /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n 1 || true)
if [[ -z "$src_tar" ]]; then
  echo "kernel/build.sh: no /usr/src/linux-source-*.tar.xz; install it: apt-get install linux-source" >&2
  exit 3
fi
src_ver=$(dpkg-query -W -f='${Version}' "$(basename "$src_tar" .tar.xz)" 2>/dev/null || stat -c %s "$src_tar")
frag_files=("$here/configs/microvm-x86_64.config")
for f in $fragments; do frag_files+=("$here/configs/fragments/$f.config"); done
# Comments and the tool checks do not change the kernel: they stay out of the key.
key=$( { echo "$src_tar $src_ver"; grep -v -e '^#' -e '^need ' "$0"; cat "${frag_files[@]}"; } | sha256sum | cut -c1-16)
if [[ "${1:-}" == "--print-key" ]]; then echo "$key"; exit 0; fi
out="$cache/$key"
if [[ -s "$out/vmlinux" ]]; then echo "$out/vmlinux"; exit 0; fi
# One build per key at a time (cube serve and `cube kernel build` may start together).
mkdir -p "$cache"
exec 9>"$cache/.build-$key.lock"
flock 9
if [[ -s "$out/vmlinux" ]]; then echo "$out/vmlinux"; exit 0; fi

work="$cache/build-$key"
rm -rf "$work"; mkdir -p "$work" "$out"
echo "extracting $src_tar"
tar -xf "$src_tar" -C "$work"
tree=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n 1)
cd "$tree"
make ARCH=x86_64 tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m .config "${frag_files[@]}" >/dev/null
make ARCH=x86_64 olddefconfig >/dev/null
# Every option the fragments ask for must have survived olddefconfig.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) grep -qxF "$line" .config || { echo "option lost after olddefconfig: $line" >&2; missing=1; } ;;
    "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}; ! grep -q "^$opt=" .config || { echo "option should be off: $opt" >&2; missing=1; } ;;
  esac
done < <(cat "${frag_files[@]}")
[[ $missing == 0 ]] || exit 4
make ARCH=x86_64 -j"$jobs" vmlinux
strip -o "$out/vmlinux.tmp" vmlinux
cp .config "$out/config"
mv "$out/vmlinux.tmp" "$out/vmlinux"
cd /; rm -rf "$work"
echo "$out/vmlinux"
