#!/usr/bin/env bash
# Builds the runtime image `signpost:latest` locally, without pulling anything from a registry:
#   1. a minimal Debian bookworm root filesystem made with `debootstrap --variant=minbase`,
#      cached as a tarball under ~/.cache/signpost/ and `docker import`ed as
#      signpost-base:bookworm (the tag deploy/docker/Dockerfile's FROM names);
#   2. the release binary, stripped, and `docker build` of deploy/docker/Dockerfile on top.
# Idempotent: the tarball and the base image are only made when missing, and `docker build`
# reuses its layer cache when the binary has not changed, so a second run takes seconds.
#
# Environment:
#   SIGNPOST_BIN       the release binary (default: $CARGO_TARGET_DIR/release/signpost,
#                      else ~/.cache/signpost/target/release/signpost, else target/release/signpost)
#   SIGNPOST_IMAGE     the tag to build (default signpost:latest)
#   DEBIAN_MIRROR      the mirror debootstrap uses (default http://deb.debian.org/debian)
#   SIGNPOST_REBUILD_BASE=1  remake the base tarball and image even if present
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache="${SIGNPOST_CACHE:-$HOME/.cache/signpost}"
base_tag=signpost-base:bookworm
image="${SIGNPOST_IMAGE:-signpost:latest}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base_tar="$cache/base/bookworm-minbase.tar.gz"

# Keep the FROM line and this script in agreement: a mismatch would make `docker build` try
# to pull the base from a registry, which is what this script exists to avoid.
grep -qx "FROM $base_tag" "$here/Dockerfile" || {
  echo "build-image: deploy/docker/Dockerfile must say 'FROM $base_tag'" >&2
  exit 1
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
t0=$(now)

# --- Step 1: the base image --------------------------------------------------------------------
if [ "${SIGNPOST_REBUILD_BASE:-0}" = 1 ]; then
  rm -f "$base_tar"
  docker image rm -f "$base_tag" >/dev/null 2>&1 || true
fi

if docker image inspect "$base_tag" >/dev/null 2>&1; then
  echo "build-image: base image $base_tag present, skipping debootstrap and import"
else
  if [ ! -s "$base_tar" ]; then
    t1=$(now)
    if ! command -v debootstrap >/dev/null 2>&1; then
      [ "$(id -u)" = 0 ] || { echo "build-image: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
      echo "build-image: installing debootstrap"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    # debootstrap creates device nodes and root-owned files: it needs root.
    [ "$(id -u)" = 0 ] || { echo "build-image: debootstrap needs root" >&2; exit 1; }
    mkdir -p "$cache/base"
    rootfs=$(mktemp -d "$cache/base/rootfs.XXXXXX")
    # Remove a half-made root filesystem on any exit; only the finished tarball is kept.
    trap 'rm -rf "$rootfs"' EXIT
    echo "build-image: debootstrap --variant=minbase bookworm (a few minutes, once)"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/base/debootstrap.log" 2>&1 || {
      tail -20 "$cache/base/debootstrap.log" >&2
      echo "build-image: debootstrap failed; full log in $cache/base/debootstrap.log" >&2
      exit 1
    }
    # Nothing at run time needs apt's downloaded lists and packages, documentation or
    # translations (nor /dev: the container runtime mounts its own). Relative paths inside
    # the root file system, so no expansion can ever name the host's own directories.
    (
      cd "$rootfs"
      rm -rf ./var/cache/apt/archives/*.deb ./var/cache/apt/*.bin ./var/lib/apt/lists/* \
        ./usr/share/doc/* ./usr/share/man/* ./usr/share/info/* ./usr/share/locale/* \
        ./var/log/*.log ./var/log/apt/* ./tmp/* ./dev/*
    )
    # Write the tarball under a temporary name and rename it, so an interrupted run never
    # leaves a truncated tarball that a later run would trust.
    tar --numeric-owner --xattrs -C "$rootfs" -czf "$base_tar.part" .
    mv "$base_tar.part" "$base_tar"
    rm -rf "$rootfs"
    trap - EXIT
    echo "build-image: base rootfs tarball $base_tar ($(du -h "$base_tar" | cut -f1)) in $(since "$t1")"
  else
    echo "build-image: reusing cached base tarball $base_tar"
  fi
  t1=$(now)
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase bookworm" \
    "$base_tar" "$base_tag" >/dev/null
  echo "build-image: imported $base_tag in $(since "$t1")"
fi

# --- Step 2: the runtime image -----------------------------------------------------------------
bin="${SIGNPOST_BIN:-}"
if [ -z "$bin" ]; then
  for c in ${CARGO_TARGET_DIR:+"$CARGO_TARGET_DIR/release/signpost"} \
    "$cache/target/release/signpost" "$repo/target/release/signpost"; do
    if [ -x "$c" ]; then bin=$c; break; fi
  done
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  echo "build-image: no release binary found (set SIGNPOST_BIN, or build with" \
    "'cargo build --release -p signpost-cli')" >&2
  exit 1
fi

# The build context holds only the Dockerfile's inputs (the stripped binary), not the
# repository: sending gigabytes of target/ to the daemon would dominate the build time.
ctx="$cache/image-context"
mkdir -p "$ctx"
# Debug symbols are most of a Rust release binary's size and the image has no debugger.
if command -v strip >/dev/null 2>&1; then
  strip --strip-unneeded -o "$ctx/signpost.tmp" "$bin"
else
  objcopy --strip-debug --strip-unneeded "$bin" "$ctx/signpost.tmp"
fi
chmod 0755 "$ctx/signpost.tmp"
# Replace the context's copy only when the bytes differ, so its metadata stays put and
# `docker build` keeps its cache.
if cmp -s "$ctx/signpost.tmp" "$ctx/signpost"; then rm "$ctx/signpost.tmp"; else mv "$ctx/signpost.tmp" "$ctx/signpost"; fi
echo "build-image: binary $bin: $(stat -c %s "$bin") bytes, stripped $(stat -c %s "$ctx/signpost") bytes ($(du -h "$ctx/signpost" | cut -f1))"

t1=$(now)
# The classic builder: it resolves FROM in the local image store (nothing is pulled) and needs
# no buildx plugin, which Debian's docker.io lacks. It prints a deprecation notice; harmless.
DOCKER_BUILDKIT=0 docker build --quiet -f "$here/Dockerfile" -t "$image" "$ctx" >/dev/null
echo "build-image: built $image in $(since "$t1")"
size=$(docker image inspect -f '{{.Size}}' "$image")
echo "build-image: $image size $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.1f MB", s / 1e6 }')), total $(since "$t0")"
