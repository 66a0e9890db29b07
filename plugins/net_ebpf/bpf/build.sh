#!/bin/sh
# Ahead-of-time build of Cube's eBPF objects (needs Debian clang + libbpf-dev; only uapi headers).
# Writes <cache>/<name>-<first 16 hex of sha256(source)>.o and prints its path; an object that
# already exists is reused (cube_net_ebpf.bpfobject computes the same name). Never committed.
#   usage: build.sh [SOURCE.bpf.c] [CACHE_DIR]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src=${1:-$here/egress.bpf.c}
cache=${2:-${CUBE_BPF_CACHE:-/var/cache/cube/bpf}}
clang=${CLANG:-clang}
arch_inc=/usr/include/$(uname -m)-linux-gnu
name=$(basename "$src" .bpf.c)
hash=$(sha256sum < "$src" | cut -c1-16)
out=$cache/$name-$hash.o
if [ ! -s "$out" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp "$cache/.$name.XXXXXX")
  "$clang" -O2 -g -target bpf -I"$arch_inc" -Wall -Werror -c "$src" -o "$tmp"
  mv -f "$tmp" "$out"
fi
echo "$out"
