#!/usr/bin/env bash
# RAM-backed (compressed) swap for Cube's idle reclaim (plugins/vmm_kvm/README.md, "Idle
# reclaim"): a zram device of its own, used as swap, and its teardown. Opt-in: Cube never sets up
# swap by itself; `cube bench density --zram SIZE` runs this for the length of a run.
#
#   scripts/zram-swap.sh setup [SIZE [COMPRESSOR]]   # default 4G lzo-rle; prints the device
#   scripts/zram-swap.sh teardown                   # swapoff, reset and remove that device
#   scripts/zram-swap.sh status
#
# SIZE is the most uncompressed data the device takes (zram's disksize; what it holds costs RAM
# only once written, compressed, ~1/3 of it for idle VM memory). The device set up is recorded in
# $CUBE_ZRAM_STATE (default /run/cube/zram-swap.dev) so teardown removes only ours; a zram device
# that was there before (zram0 of the module's load) is never touched. Setup also sets
# vm.page-cluster to 0 (no swap readahead: see below); teardown puts the old value back.
set -euo pipefail
state=${CUBE_ZRAM_STATE:-/run/cube/zram-swap.dev}
control=/sys/class/zram-control
need_root() { [[ $(id -u) == 0 ]] || { echo "zram-swap: must run as root" >&2; exit 1; }; }

setup() {
  local size=${1:-4G} algo=${2:-lzo-rle} id dev
  need_root
  if [[ -s $state ]] && grep -q "^/dev/$(cat "$state") " /proc/swaps; then
    echo "zram-swap: /dev/$(cat "$state") is already set up (teardown first)" >&2; exit 1
  fi
  [[ -e $control/hot_add ]] || modprobe zram num_devices=0 2>/dev/null || true
  [[ -e $control/hot_add ]] || { echo "zram-swap: no zram in this kernel ($control/hot_add)" >&2; exit 1; }
  id=$(cat "$control/hot_add"); dev=zram$id
  mkdir -p "$(dirname "$state")"; echo "$dev" > "$state"
  if ! grep -qw -- "$algo" "/sys/block/$dev/comp_algorithm"; then
    echo "zram-swap: compressor $algo not offered: $(cat "/sys/block/$dev/comp_algorithm")" >&2
    teardown; exit 1
  fi
  echo "$algo" > "/sys/block/$dev/comp_algorithm"
  echo "$size" > "/sys/block/$dev/disksize"
  mkswap -q "/dev/$dev" >/dev/null
  swapon -p 100 "/dev/$dev"
  # no swap readahead: a page faulted back from zram costs a decompression, not a disk seek, and
  # readahead would bring back 8 neighbours an idle VM does not touch (put back at teardown)
  cat /proc/sys/vm/page-cluster > "$state.page-cluster"
  echo 0 > /proc/sys/vm/page-cluster
  echo "/dev/$dev"
}

teardown() {
  need_root
  [[ -s $state ]] || { echo "zram-swap: nothing set up ($state)" >&2; return 0; }
  local dev; dev=$(cat "$state")
  if grep -q "^/dev/$dev " /proc/swaps; then swapoff "/dev/$dev"; fi
  if [[ -e /sys/block/$dev ]]; then
    echo 1 > "/sys/block/$dev/reset"
    echo "${dev#zram}" > "$control/hot_remove"
  fi
  if [[ -s $state.page-cluster ]]; then cat "$state.page-cluster" > /proc/sys/vm/page-cluster; fi
  rm -f "$state" "$state.page-cluster"
}

status() {
  cat /proc/swaps
  [[ -s $state ]] && { local dev; dev=$(cat "$state"); echo "ours: /dev/$dev"; cat "/sys/block/$dev/mm_stat" 2>/dev/null || true; }
  return 0
}

case ${1:-} in
  setup) shift; setup "$@" ;;
  teardown) teardown ;;
  status) status ;;
  *) echo "usage: $0 setup [SIZE [COMPRESSOR]] | teardown | status" >&2; exit 2 ;;
esac
