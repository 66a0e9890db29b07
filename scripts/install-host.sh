#!/usr/bin/env bash
# Install the Debian packages Cube needs (scripts/apt-packages.txt: the first word of each line),
# once per machine: a stamp keyed by the list skips even the dpkg query when nothing changed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
list="$here/apt-packages.txt"
fallbacks="$here/apt-fallbacks.txt"
stamp_dir=${CUBE_CACHE:-/var/cache/cube}/stamps
key=$(grep -hv '^#' "$list" "$fallbacks" | sha256sum | cut -c1-16)
stamp="$stamp_dir/apt-$key"
[[ -f "$stamp" ]] && exit 0
mapfile -t pkgs < <(awk '!/^#/ && NF {print $1}' "$list")
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
# A command some installs of its package do not ship comes from its fallback package (apt-fallbacks.txt).
while read -r cmd pkg; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    [[ $(id -u) == 0 ]] || { echo "install-host: need root to apt-get install $pkg (for $cmd)" >&2; exit 1; }
    echo "install-host: $cmd is missing: installing $pkg"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$pkg"
  fi
done < <(awk '!/^#/ && NF == 2' "$fallbacks")
# Every command the list names must now be on PATH (a package that no longer ships one fails here).
# PostgreSQL's server programs (initdb, pg_ctl) live in /usr/lib/postgresql/<version>/bin, off PATH.
PATH="$PATH$(printf ':%s' /usr/lib/postgresql/*/bin)"
absent=$(awk '!/^#/ && NF > 1 {for (i = 2; i <= NF; i++) print $i}' "$list" \
  | while read -r cmd; do command -v "$cmd" >/dev/null 2>&1 || echo "$cmd"; done | tr '\n' ' ')
if [[ -n "$absent" ]]; then
  echo "install-host: commands still missing after install: $absent" >&2; exit 1
fi
mkdir -p "$stamp_dir"; touch "$stamp"
