#!/usr/bin/env bash
# Build the Cube guest kernel (an uncompressed, stripped vmlinux booted through PVH) from Debian's
# linux-source package, cached by a hash of everything that affects the result.
#
#   kernel/build.sh [--print-key]        builds if needed, prints the vmlinux path on the last line
#
# Environment: CUBE_CACHE (default /var/cache/cube), CUBE_KERNEL_FRAGMENTS (space-separated names
# from configs/fragments/, default "ci"), JOBS (default: nproc).
set -euo pipefail
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
key=$( { echo "$src_tar $src_ver"; cat "$0" "${frag_files[@]}"; } | sha256sum | cut -c1-16)
if [[ "${1:-}" == "--print-key" ]]; then echo "$key"; exit 0; fi
out="$cache/$key"
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
