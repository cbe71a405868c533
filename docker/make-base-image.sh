#!/usr/bin/env bash
# Make a Debian bookworm root filesystem with python3 (+ venv) by debootstrap, as a tarball for
# `docker import`. No registry is needed: the packages come from the Debian mirror over apt.
#
#   docker/make-base-image.sh OUT.tar [MIRROR]
#
# The tarball is trimmed (apt caches, docs, man pages, locales): they are ~100 MB an edge image
# never reads. Reuses OUT.tar if it exists (debootstrap takes about a minute).
set -euo pipefail
out=${1:?usage: make-base-image.sh OUT.tar [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
if [[ -s $out ]]; then
    echo "base rootfs: reusing $out"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
root=$(mktemp -d "${TMPDIR:-/tmp}/qwt-rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
t0=$(date +%s)
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror" > "$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true
"$root/usr/bin/python3" -c 'import sys' 2>/dev/null || true
tar -C "$root" --numeric-owner -cf "$out.tmp" .
mv "$out.tmp" "$out"
echo "base rootfs: debootstrap minbase bookworm + python3 in $(( $(date +%s) - t0 )) s, $(du -m "$out" | cut -f1) MB -> $out"
