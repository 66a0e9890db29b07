#!/usr/bin/env bash
# The fallback guest kernel: Debian's stock kernel (an uncompressed vmlinux extracted from its
# bzImage, booted through PVH) + a generated initramfs that loads the virtio/ext4 modules and
# switch_roots into the sandbox's /sbin/cube-init. Used when kernel/build.sh cannot build the Cube
# kernel (or with [core] kernel = "stock"). Nothing is installed on the host.
#
#   kernel/stock.sh [--print-key]     prepares if needed; last stdout line: "<vmlinux> <initrd>"
#
# Environment: CUBE_CACHE (default /var/cache/cube), CUBE_STOCK_PACKAGE (default: the package
# linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64).
set -euo pipefail
cache=${CUBE_CACHE:-/var/cache/cube}/kernel
MODULES=(virtio_mmio virtio_blk virtio_net virtio_console virtio-rng crc32c_generic ext4)

need() { command -v "$1" >/dev/null 2>&1 || { echo "kernel/stock.sh: $1 not found (install $2)" >&2; exit 3; }; }
need apt-get apt; need dpkg-deb dpkg; need depmod kmod; need readelf binutils; need cpio cpio
need gzip gzip; need unxz xz-utils
busybox=/bin/busybox
if ! "$busybox" --list 2>/dev/null | grep -qx switch_root || readelf -lW "$busybox" | grep -q INTERP; then
  echo "kernel/stock.sh: $busybox is not a static busybox (apt-get install busybox-static)" >&2
  exit 3
fi

# The kernel package: the one the linux-image-amd64 metapackage points at.
package_of_meta() { apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n 1; }
package=${CUBE_STOCK_PACKAGE:-$(package_of_meta)}
if [[ -z "$package" ]]; then
  apt-get update -qq >&2 || true
  package=$(package_of_meta)
fi
if [[ -z "$package" ]]; then
  echo "kernel/stock.sh: apt knows no linux-image-amd64 (check /etc/apt/sources.list)" >&2
  exit 3
fi
version=$(apt-cache show --no-all-versions "$package" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1)
[[ -n "$version" ]] || { echo "kernel/stock.sh: no version of $package in apt" >&2; exit 3; }
busybox_version=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || sha256sum "$busybox" | cut -c1-16)

key=$( { echo "$package $version busybox $busybox_version ${MODULES[*]}"; cat "$0"; } | sha256sum | cut -c1-16)
if [[ "${1:-}" == "--print-key" ]]; then echo "$key"; exit 0; fi
out="$cache/stock-$key"
if [[ -s "$out/vmlinux" && -s "$out/initrd.cpio.gz" ]]; then echo "$out/vmlinux $out/initrd.cpio.gz"; exit 0; fi

mkdir -p "$cache"
exec 9>"$cache/.stock-$key.lock"
flock 9   # another process may be preparing the same key: wait for it, then reuse its result
if [[ -s "$out/vmlinux" && -s "$out/initrd.cpio.gz" ]]; then echo "$out/vmlinux $out/initrd.cpio.gz"; exit 0; fi

work=$(mktemp -d "$cache/.stock-build-XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"   # apt-get download drops privileges to _apt when it can
echo "downloading $package $version" >&2
(cd "$work" && apt-get -q -o APT::Sandbox::User=root download "$package=$version" >&2)
deb=$(ls "$work"/*.deb)
dpkg-deb -x "$deb" "$work/pkg"
vmlinuz=$(ls "$work"/pkg/boot/vmlinuz-* | head -n 1)
release=${vmlinuz##*/vmlinuz-}
moddir=$work/pkg/lib/modules/$release
depmod -b "$work/pkg" "$release"   # the package ships no modules.dep (its postinst makes it)

# -- vmlinux: the logic of the kernel tree's scripts/extract-vmlinux --------------------------
# Find each compression magic in the bzImage, decompress from there, keep the first valid ELF.
# The result is the kernel's own ELF, with the Xen PVH entry note QEMU's -kernel needs.
extract_vmlinux() {  # <image> <output>
  local img=$1 dest=$2 tmp=$work/vmlinux.try
  try_decompress() {  # <magic> <tr-placeholder> <decompressor...>
    local magic=$1 mark=$2 pos; shift 2
    # The obscure tr maps the magic to a line start + marker so grep -abo reports its offset.
    for pos in $(tr "$magic\n$mark" "\n$mark=" < "$img" | grep -abo "^$mark"); do
      pos=${pos%%:*}
      tail -c+"$pos" "$img" | "$@" > "$tmp" 2>/dev/null || true
      if readelf -h "$tmp" >/dev/null 2>&1; then mv "$tmp" "$dest"; return 0; fi
    done
    return 1
  }
  try_decompress '\037\213\010' xy gunzip && return 0
  try_decompress '\3757zXZ\000' abcde unxz && return 0
  try_decompress 'BZh' xy bunzip2 && return 0
  try_decompress '\135\0\0\0' xxx unlzma && return 0
  try_decompress '(\265/\375' xxx unzstd && return 0
  if readelf -h "$img" >/dev/null 2>&1; then cp "$img" "$dest"; return 0; fi
  echo "kernel/stock.sh: cannot find a vmlinux in $img" >&2
  return 1
}
extract_vmlinux "$vmlinuz" "$work/vmlinux"
if ! readelf -n "$work/vmlinux" | grep -q 'Xen.*0x00000012'; then
  echo "kernel/stock.sh: $release has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); QEMU cannot boot it" >&2
  exit 4
fi

# -- initramfs ------------------------------------------------------------------------------
root=$work/initramfs
mkdir -p "$root"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$busybox" "$root/bin/busybox"
for applet in sh mount umount insmod switch_root mkdir cat echo sleep ls; do ln -s busybox "$root/bin/$applet"; done
declare -A seen=()
order=()
dep_line() { grep -m1 -E "(^|/)$1\.ko(\.[a-z]+)?:" "$moddir/modules.dep" || true; }
add_module() {  # <module name>: its dependencies first (recursively), then itself
  local name=$1 line path dep
  line=$(dep_line "$name")
  [[ -n "$line" ]] || line=$(dep_line "${name//_/-}")
  [[ -n "$line" ]] || line=$(dep_line "${name//-/_}")
  if [[ -z "$line" ]]; then
    if grep -qE "/${name//-/[-_]}\.ko$" "$moddir/modules.builtin"; then return 0; fi
    echo "kernel/stock.sh: module $name is neither in modules.dep nor built in" >&2
    exit 5
  fi
  path=${line%%:*}
  [[ -z "${seen[$path]:-}" ]] || return 0
  seen[$path]=1
  for dep in ${line#*:}; do
    dep=${dep##*/}
    add_module "${dep%%.ko*}"
  done
  order+=("$path")
}
for m in "${MODULES[@]}"; do add_module "$m"; done
: > "$root/modules.order"
for path in "${order[@]}"; do
  cp "$moddir/$path" "$root/lib/modules/"
  echo "${path##*/}" >> "$root/modules.order"
done
cat > "$root/init" <<'EOF'
#!/bin/sh
# Cube stock-kernel initramfs: load the virtio/ext4 modules, mount /dev/vda, switch_root to the
# sandbox's init (init=..., default /sbin/cube-init). Generated by kernel/stock.sh.
export PATH=/bin
mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
for m in $(cat /modules.order); do insmod "/lib/modules/$m" || echo "initramfs: insmod $m failed" > /dev/console; done
init=/sbin/cube-init; root=/dev/vda; fstype=ext4; mode=rw
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    init=*) init=${arg#init=} ;;
    root=/dev/*) root=${arg#root=} ;;
    rootfstype=*) fstype=${arg#rootfstype=} ;;
    ro) mode=ro ;;
    rw) mode=rw ;;
  esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done
if ! mount -t "$fstype" -o "$mode" "$root" /newroot; then
  echo "initramfs: cannot mount $root ($fstype, $mode); devices: $(ls /dev)" > /dev/console
  sleep 2
  exit 1
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot "$init"
EOF
chmod 755 "$root/init"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -9n > "$work/initrd.cpio.gz")

# -- publish atomically ---------------------------------------------------------------------
stage=$work/out
mkdir -p "$stage"
mv "$work/vmlinux" "$stage/vmlinux"
mv "$work/initrd.cpio.gz" "$stage/initrd.cpio.gz"
cp "$work/pkg/boot/config-$release" "$stage/config"
echo "$release" > "$stage/release"
echo "$package $version" > "$stage/package"
cp "$root/modules.order" "$stage/modules.order"
rm -rf "$out"
mv "$stage" "$out"
echo "stock kernel $release ($package $version): $(du -h "$out/vmlinux" | cut -f1) vmlinux, $(du -h "$out/initrd.cpio.gz" | cut -f1) initrd" >&2
echo "$out/vmlinux $out/initrd.cpio.gz"
