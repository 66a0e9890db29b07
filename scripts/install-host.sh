#!/usr/bin/env bash
# Install the Debian packages Cube needs, once per machine (stamp keyed by the package list).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
list="$here/apt-packages.txt"
stamp_dir=${CUBE_CACHE:-/var/cache/cube}/stamps
key=$(grep -v '^#' "$list" | sha256sum | cut -c1-16)
stamp="$stamp_dir/apt-$key"
[[ -f "$stamp" ]] && exit 0
mapfile -t pkgs < <(grep -v '^#' "$list" | grep -v '^$')
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "install-host: need root to apt-get install: ${missing[*]}" >&2; exit 1
  fi
  echo "install-host: installing ${#missing[@]} Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q -o Dpkg::Progress-Fancy=1 --no-install-recommends "${missing[@]}"
fi
mkdir -p "$stamp_dir"; touch "$stamp"
