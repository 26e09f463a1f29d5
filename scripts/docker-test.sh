#!/usr/bin/env bash
# `make docker-test`: build the image and run it for real, then check what a user relies on.
#
# Idempotent on a fresh Debian machine without an image registry (installs docker.io and debootstrap,
# starts dockerd without iptables or a bridge, makes a local stand-in for python:3.11-slim with
# debootstrap, serves the local CPU torch wheel to the build over loopback); on a normal Docker host it
# builds with the Dockerfile's defaults. Needs root (apt, dockerd, debootstrap) unless docker already runs.
#
# The container runs as deploy/ runs it: a read-only root filesystem with a tmpfs /tmp (the only path the
# server writes besides the registry volume), every capability dropped, no privilege escalation.
# Checks: /health, one generation with an example adapter, the lone-row decode step left eager and decode
# attention left to SDPA (no C++ compiler in the image), each said in the log, HEALTHCHECK turning healthy,
# the server's uid (not root), the root read-only and /tmp writable, an upload refused (403) by the default command without
# an admin key, `docker stop` with a request in flight (answered in full, exit code 0); then with
# REFT_ADMIN_KEY: an upload accepted and kept on the volume across a restart, a pyreft archive over 1 MiB
# (spooled and unpacked in /tmp) imported and served, and an idle `docker stop`. Prints its figures; exit
# status 1 if a check failed.
# The container runs with `--network none`: its default command binds 0.0.0.0, and nothing outside the
# container may reach it here; the checks run inside it (scripts/docker_probe.py, stdlib only).
#
# Environment: IMAGE (default reft-serve:test), BASE_IMAGE (skip the stand-in logic and build on it),
# REFT_DOCKER_WORK (scratch directory, default /var/tmp/reft-docker), TORCH_VERSION (2.13.0).
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-reft-serve:test}
STANDIN=reft-serve-base:bookworm-standin
WORK=${REFT_DOCKER_WORK:-/var/tmp/reft-docker}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
NAME=reft-serve-docker-test
VOLUME=reft-serve-docker-test-adapters
ADMIN_KEY=docker-test-$RANDOM$RANDOM
mkdir -p "$WORK"

FAILED=0
declare -a FIGURES=()
say() { printf '== %s\n' "$*"; }
check() {  # check DESCRIPTION COMMAND...: run, print PASS/FAIL with the command's output
    local what=$1 out
    shift
    if out=$("$@" 2>&1); then printf 'PASS  %s: %s\n' "$what" "$out"
    else printf 'FAIL  %s: %s\n' "$what" "$out"; FAILED=1; fi
}
figure() { FIGURES+=("$1: $2"); printf 'FIGURE %s: %s\n' "$1" "$2"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---- 1. tools ---------------------------------------------------------------------------------------
missing=()
command -v docker >/dev/null || missing+=(docker.io)
command -v dockerd >/dev/null || missing+=(docker.io)
if [ -z "${BASE_IMAGE:-}" ]; then command -v debootstrap >/dev/null || missing+=(debootstrap); fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

# ---- 2. the daemon ----------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (log: $WORK/dockerd.log)"
    nohup dockerd --iptables=false --ip6tables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start; see $WORK/dockerd.log" >&2; exit 1; }
fi

# ---- 3. the base image ------------------------------------------------------------------------------
debian_mirror() {  # the Debian mirror apt already uses (deb822 .sources or one-line sources.list)
    local uri
    uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v -- '-security' | head -1)
    [ -n "$uri" ] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '{print $2}' | grep -i debian | grep -v -- '-security' | head -1)
    echo "${uri:-http://deb.debian.org/debian}"
}

build_standin() {  # Debian bookworm minbase + python3 venv on PATH + this machine's CA certificates
    local rootfs=$WORK/rootfs mirror
    mirror=$(debian_mirror)
    say "building the stand-in base image $STANDIN from $mirror (once)"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; return 1; }
    chroot "$rootfs" python3 -m venv /opt/venv
    # This machine reaches the package index through its own CA: only the stand-in carries it.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$STANDIN" >/dev/null
    rm -rf "$rootfs"
}

build_args=()
WHEEL_PID=
cleanup() {
    docker rm -f "$NAME" >/dev/null 2>&1 || true
    if [ -n "$WHEEL_PID" ]; then kill "$WHEEL_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

if [ -n "${BASE_IMAGE:-}" ]; then
    base=$BASE_IMAGE
elif docker image inspect "$STANDIN" >/dev/null 2>&1; then
    base=$STANDIN
elif timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
    base=python:3.11-slim
else
    t0=$(now)
    build_standin
    figure "stand-in base image made (debootstrap + import, s)" "$(since "$t0")"
    base=$STANDIN
fi
say "base image: $base"

if [ "$base" = "$STANDIN" ]; then
    # The PyTorch wheel index is not reachable from such a machine: serve the local CPU wheel over loopback.
    mkdir -p "$WORK/wheels"
    if ! ls "$WORK/wheels"/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1; then
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
            --platform manylinux_2_28_x86_64 -d "$WORK/wheels" "torch==$TORCH_VERSION"
    fi
    # A fixed port when free: the URL is a build argument, and the same value keeps the layer cache valid.
    port=$(python3 -c '
import socket
for port in (18765, 0):
    try:
        s = socket.socket(); s.bind(("127.0.0.1", port)); print(s.getsockname()[1]); break
    except OSError:
        pass')
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$WORK/wheels" >"$WORK/wheels.log" 2>&1 &
    WHEEL_PID=$!
    for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
    build_args=(--build-arg "BASE_IMAGE=$base" --build-arg TORCH_INDEX= \
                --build-arg "TORCH_FIND_LINKS=http://127.0.0.1:$port/")
elif [ "$base" != python:3.11-slim ]; then
    build_args=(--build-arg "BASE_IMAGE=$base")
fi

# ---- 4. build ---------------------------------------------------------------------------------------
say "docker build -t $IMAGE (log: $WORK/build.log)"
t0=$(now)
if ! docker build --network host "${build_args[@]}" -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
    tail -30 "$WORK/build.log" >&2
    exit 1
fi
figure "build time (s)" "$(since "$t0")"
figure "image size (GB)" "$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f", $1 / 1e9}')"

# ---- 5. run the default command ---------------------------------------------------------------------
probe() { docker exec -i "$NAME" python - "$@" <scripts/docker_probe.py; }
probe_stdin() { docker exec -i "$NAME" python -c "$(cat scripts/docker_probe.py)" "$@"; }  # stdin: data
# deploy/base/deployment.yaml's securityContext; `exec` as a Kubernetes emptyDir allows it (--compile's
# inductor loads the kernels it writes there)
HARDENED=(--read-only --tmpfs /tmp:rw,exec,nosuid,nodev,size=1g,mode=1777 --cap-drop ALL
          --security-opt no-new-privileges)
wait_health() {  # seconds until /health answers 200 inside the container (from t0)
    for _ in $(seq 600); do
        if probe health >/dev/null 2>&1; then since "$1"; return 0; fi
        sleep 0.2
    done
    return 1
}

docker rm -f "$NAME" >/dev/null 2>&1 || true
docker volume rm "$VOLUME" >/dev/null 2>&1 || true
say "docker run ${HARDENED[*]} (default command, no admin key)"
t_run=$(now)
# A drain long enough for 32 tokens on a loaded machine (over 1.5 s a token at a load of 20 on 2 cores):
# the check below is that an in-flight request is finished, not how fast.
docker run -d --name "$NAME" --network none "${HARDENED[@]}" -e REFT_DRAIN_SECONDS=120 \
    -v "$VOLUME:/srv/adapters" "$IMAGE" >/dev/null
if secs=$(wait_health "$t_run"); then figure "seconds from docker run to /health 200" "$secs"
else echo "FAIL  /health never answered; container log:"; docker logs --tail 30 "$NAME"; exit 1; fi
check "/health" probe health
check "generation with the example adapter emoji" probe generate emoji
# The image has no C++ compiler: the lone-row decode step must say so and run eagerly, not fail the start.
check "no C++ compiler: the lone-row decode step runs eagerly, said in the log" \
    sh -c "docker logs '$NAME' 2>&1 | grep -q 'no C++ compiler for torch.compile'"
check "no C++ compiler: decode attention runs through SDPA, said in the log" \
    sh -c "docker logs '$NAME' 2>&1 | grep -q 'no C++ compiler for the decode attention kernel'"
check "example adapters listed" probe models emoji pirate shout
pid=$(docker inspect -f '{{.State.Pid}}' "$NAME")
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
check "server (PID 1 of the container) runs as a non-root user" test "$uid" != 0
echo "      (uid $uid; docker exec id: $(docker exec "$NAME" id))"
check "root filesystem read-only (code, home, the image's model cache)" \
    probe read-only / /app /home/reft /var/cache/reft-serve
check "writable: /tmp and the registry volume" probe writable /tmp /srv/adapters
check "upload refused (403) without an admin key: default command, bound to 0.0.0.0" probe upload refused 403
health=starting
for _ in $(seq 180); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
    [ "$health" = starting ] || break
    sleep 0.5
done
check "HEALTHCHECK status turns healthy" test "$health" = healthy
figure "seconds from docker run to healthy" "$(since "$t_run")"
# SIGTERM with a request in flight: it must be answered in full, then the server exits 0.
probe generate emoji 32 >"$WORK/drain.out" 2>&1 &
drain_pid=$!
sleep 1
t0=$(now)
docker stop -t 150 "$NAME" >/dev/null
figure "docker stop with a 32-token generation in flight (s)" "$(since "$t0")"
drained=0
wait "$drain_pid" || drained=$?
check "in-flight request answered in full during the SIGTERM drain" test "$drained" = 0
echo "      ($(cat "$WORK/drain.out"))"
[ "$drained" = 0 ] || docker logs --tail 20 "$NAME" 2>&1 | sed 's/^/      log: /'
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
check "clean stop: exit code 0 after SIGTERM" test "$code" = 0
docker rm "$NAME" >/dev/null

# ---- 6. with an admin key: uploads land on the volume and survive a restart -------------------------
say "docker run with REFT_ADMIN_KEY (same volume)"
docker run -d --name "$NAME" --network none "${HARDENED[@]}" -e REFT_ADMIN_KEY="$ADMIN_KEY" \
    -v "$VOLUME:/srv/adapters" "$IMAGE" >/dev/null
wait_health "$(now)" >/dev/null || { echo "FAIL  /health never answered"; docker logs --tail 30 "$NAME"; exit 1; }
check "upload without the key refused (401)" probe upload uploaded 401
check "upload with the admin key accepted (201)" probe upload uploaded 201 "$ADMIN_KEY"
check "generation with the uploaded adapter" probe generate uploaded
# tests/data/pyreft-emoji zipped with 2 MiB of padding: starlette spools the body to /tmp, and the server
# unpacks the archive there
python3 -c '
import os, sys, zipfile
from pathlib import Path
with zipfile.ZipFile(sys.argv[1], "w") as zf:
    for p in sorted(Path("tests/data/pyreft-emoji").iterdir()):
        zf.write(p, f"emoji/{p.name}")
    zf.writestr("emoji/padding.dat", os.urandom(2 << 20))' "$WORK/pyreft-emoji.zip"
check "pyreft archive of $(stat -c %s "$WORK/pyreft-emoji.zip") bytes imported (201), spooled and unpacked in /tmp" \
    probe_stdin upload-archive archived f2+l2 201 "$ADMIN_KEY" <"$WORK/pyreft-emoji.zip"
check "generation with the imported pyreft adapter" probe generate archived
docker restart -t 30 "$NAME" >/dev/null
wait_health "$(now)" >/dev/null || { echo "FAIL  /health never answered after restart"; exit 1; }
check "uploaded adapter still served after a restart (registry on the volume)" probe models uploaded emoji
t0=$(now)
docker stop -t 30 "$NAME" >/dev/null
figure "docker stop, idle (s)" "$(since "$t0")"
check "clean stop: exit code 0" test "$(docker inspect -f '{{.State.ExitCode}}' "$NAME")" = 0
docker rm "$NAME" >/dev/null
docker volume rm "$VOLUME" >/dev/null

say "summary ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, docker $(docker version -f '{{.Server.Version}}'))"
printf '  %s\n' "${FIGURES[@]}"
if [ "$FAILED" = 0 ]; then echo "docker-test: all checks passed"; else echo "docker-test: some checks FAILED"; fi
exit "$FAILED"
