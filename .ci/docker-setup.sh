#!/usr/bin/env bash
# Make a Docker engine and segmap's CPU base image available on this machine (root, Debian). Idempotent:
#   1. installs docker.io and debootstrap with apt when they are missing;
#   2. starts dockerd (no iptables, no bridge: no registry or network is needed) unless an engine answers;
#   3. waits until the engine answers;
#   4. makes segmap/base-cpu:bookworm-tini (Python, tini, binutils for the build) with debootstrap + docker import unless the engine already holds it.
# Every failure prints one line saying what failed and where to look, and exits non-zero.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
base_image="${SEGMAP_BASE_IMAGE:-segmap/base-cpu:bookworm-tini}"
log_file="${DOCKERD_LOG:-/var/log/segmap-dockerd.log}"
wait_s="${DOCKERD_WAIT_S:-60}"
python="${PYTHON:-}"
if [ -z "${python}" ]; then
    if [ -x "${here}/.venv/bin/python" ]; then python="${here}/.venv/bin/python"; else python="python3"; fi
fi

say() { echo "docker-setup: $*"; }
die() { echo "docker-setup: error: $*" >&2; exit 1; }

engine_up() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

# 1. Packages.
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "need root to install ${missing[*]} (or install them yourself)"
    command -v apt-get >/dev/null 2>&1 || die "no apt-get here: install ${missing[*]} by hand"
    say "installing ${missing[*]}"
    apt-get update -q >/tmp/segmap-apt.log 2>&1 || die "apt-get update failed (see /tmp/segmap-apt.log)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>/tmp/segmap-apt.log 2>&1 \
        || die "apt-get install ${missing[*]} failed (see /tmp/segmap-apt.log)"
fi
command -v docker >/dev/null 2>&1 || die "the docker client is missing although docker.io is installed"

# 2. + 3. Engine.
if engine_up; then
    say "Docker engine is running ($(docker version --format '{{.Server.Version}}'))"
else
    if ! pgrep -x dockerd >/dev/null 2>&1; then
        [ "$(id -u)" -eq 0 ] || die "dockerd is not running and starting it needs root"
        say "starting dockerd (log: ${log_file})"
        mkdir -p "$(dirname "${log_file}")"
        # setsid: the engine outlives the shell (and the CI step) that started it.
        setsid nohup dockerd --iptables=false --bridge=none >>"${log_file}" 2>&1 < /dev/null &
    else
        say "dockerd is starting; waiting for it"
    fi
    for _ in $(seq "${wait_s}"); do
        engine_up && break
        sleep 1
    done
    engine_up || die "the Docker engine did not answer within ${wait_s} s (see ${log_file}: $(tail -n 1 "${log_file}" 2>/dev/null))"
    say "Docker engine is running ($(docker version --format '{{.Server.Version}}'))"
fi

# 4. Base image.
if docker image inspect "${base_image}" >/dev/null 2>&1; then
    say "${base_image} is present"
else
    say "making ${base_image} with debootstrap (about two minutes)"
    start=$(date +%s)
    PYTHONPATH="${here}/src${PYTHONPATH:+:${PYTHONPATH}}" "${python}" -m segmap.packager.baseimage --name "${base_image}" \
        || die "making ${base_image} failed (see the lines above)"
    say "${base_image} made in $(( $(date +%s) - start )) s"
fi
