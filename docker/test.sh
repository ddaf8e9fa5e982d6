#!/usr/bin/env bash
# The container image, built and run on this machine (issue 14), after the tests in .ci/run:
#   1. installs docker.io, docker-compose and mmdebstrap if missing (Debian, root), starts
#      dockerd if none answers; where it cannot, says why and stops with status 0 (SKIPPED);
#   2. builds a local base image from the host's Debian sources with mmdebstrap (no Docker
#      Hub), with the host's extra CA certificates (a TLS-inspecting proxy's);
#   3. builds docker/Dockerfile on it;
#   4. runs the image with --init beside a peer container (the tests' DNS server and sink),
#      sends a message through the published loopback port, and checks the verdict headers
#      the sink received, the refusal of a foreign domain, `gateway health`, and a graceful
#      stop on SIGTERM;
#   5. `docker-compose --profile essai up`: the gateway and the trial mailbox server (Postfix +
#      Dovecot, built on the same base), a message through the gateway read back over IMAP,
#      then `down`;
#   6. the same with the engine profiles (antivirus: ClamAV, antispam: rspamd and Redis), built
#      on the same base, clamd given the tests' signature database (no download): a file its
#      signature names is refused, clean mail reaches the mailbox with rspamd's score.
# Usage: docker/test.sh            (KEEP=1: leave the images; the containers always go)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "docker/test.sh: $*"; }
skip() { say "SKIPPED: $*"; exit 0; }
fail() { say "FAILED: $*"; exit 1; }

SUITE=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
SUITE=${SUITE:-bookworm}
BASE_IMAGE=local/debian:$SUITE
IMAGE=gateway-cabinet:test
BOITE=gateway-cabinet-boite:test
CLAMAV=gateway-cabinet-clamav:test
RSPAMD=gateway-cabinet-rspamd:test
NET=gateway-test
SUBNET=172.31.254.0/24
PEER_IP=172.31.254.10
PREFIX=gateway-test
START=$(date +%s)

# ---- 1. the tools and the engine ----
missing=""
command -v dockerd >/dev/null 2>&1 || missing="$missing docker.io"
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
command -v mmdebstrap >/dev/null 2>&1 || missing="$missing mmdebstrap"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
      >/dev/null || skip "could not install$missing"
  else
    skip "missing$missing (needs root and apt-get to install)"
  fi
fi

DOCKERD_PID=""
WORK=$(mktemp -d)
cleanup() {
  docker rm -f -v "$PREFIX-gw" "$PREFIX-peer" >/dev/null 2>&1 || true
  if [ -f "$WORK/compose.test.yaml" ]; then
    docker-compose -p "$PREFIX" --env-file "$WORK/compose.env" -f docker/compose.yaml \
      -f "$WORK/compose.test.yaml" --profile essai --profile antivirus --profile antispam \
      down -v >/dev/null 2>&1 || true
  fi
  docker network rm "$NET" >/dev/null 2>&1 || true
  if [ -z "${KEEP:-}" ] && [ -n "$DOCKERD_PID" ]; then
    docker rmi "$IMAGE" "$BOITE" "$CLAMAV" "$RSPAMD" >/dev/null 2>&1 || true
  fi
  if [ -n "$DOCKERD_PID" ]; then
    kill "$DOCKERD_PID" 2>/dev/null || true
    wait "$DOCKERD_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || skip "no Docker engine answers, and starting dockerd needs root"
  say "starting dockerd"
  dockerd >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 0.5
  done
  if ! docker info >/dev/null 2>&1; then
    DOCKERD_PID=""
    skip "dockerd cannot start here: $(tail -n 3 "$WORK/dockerd.log" | tr '\n' ' ')"
  fi
fi
export DOCKER_BUILDKIT=0  # the classic builder: no buildx plugin needed

# ---- 2. the local base image ----
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  say "building $BASE_IMAGE with mmdebstrap"
  # Debian's own mirror names for the suite; the host's extra CAs copied in and trusted.
  mmdebstrap --quiet --variant=minbase --include=ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --customize-hook='if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
        mkdir -p "$1/usr/local/share/ca-certificates" &&
        cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/" &&
        chroot "$1" update-ca-certificates >/dev/null 2>&1; fi' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$SUITE" - \
    "deb http://deb.debian.org/debian $SUITE main" \
    "deb http://deb.debian.org/debian $SUITE-updates main" \
    "deb http://deb.debian.org/debian-security $SUITE-security main" \
    | docker import - "$BASE_IMAGE" >/dev/null
fi

# ---- 3. the image ----
say "building $IMAGE on $BASE_IMAGE"
docker build -f docker/Dockerfile --build-arg "BASE=$BASE_IMAGE" -t "$IMAGE" . \
  >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; fail "docker build"; }
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
[ "$user" = gateway ] || fail "the image runs as '$user', not the gateway user"
ids=$(docker run --rm --network none --entrypoint id "$IMAGE")
case "$ids" in "uid=10025(gateway) gid=10025(gateway)"*) ;; *) fail "user ids: $ids";; esac
setuid=$(docker run --rm --network none --user root --entrypoint find "$IMAGE" / -xdev -type f -perm /6000)
[ -z "$setuid" ] || fail "setuid programs in the image: $setuid"

# ---- 4. run it beside its peers ----
docker network create --subnet "$SUBNET" "$NET" >/dev/null
mkdir -p "$WORK/out" && chmod 0777 "$WORK/out"
cat >"$WORK/zone.json" <<EOF
{"expediteur.test": [["TXT", "v=spf1 ip4:$SUBNET -all"]],
 "_dmarc.expediteur.test": [["TXT", "v=DMARC1; p=reject"]],
 "compose.test": [["TXT", "v=spf1 ?all"]]}
EOF
docker run -d --name "$PREFIX-peer" --network "$NET" --ip "$PEER_IP" --user root \
  -v "$PWD/tests:/opt/gateway/app/tests:ro" -v "$WORK:/work" --entrypoint python "$IMAGE" \
  -m tests.support.container_peer /work/zone.json /work/out >/dev/null
docker run -d --init --name "$PREFIX-gw" --network "$NET" -p 127.0.0.1::25 --health-interval 2s \
  -e GATEWAY_DOMAINS=cabinet.test -e GATEWAY_HOSTNAME=mx.cabinet.test \
  -e "GATEWAY_NEXT_HOP=$PEER_IP:2525" "$IMAGE" serve --dns "$PEER_IP:53" >/dev/null
port=$(docker port "$PREFIX-gw" 25/tcp | sed -n '1s/.*://p')
say "gateway container on 127.0.0.1:$port"

python3 -m tests.support.container_client direct "$port" "$WORK/out" \
  || { docker logs "$PREFIX-gw" 2>&1 | tail -n 30; fail "mail through the container"; }

docker exec "$PREFIX-gw" gateway health >/dev/null || fail "gateway health in the container"
for _ in $(seq 1 60); do
  state=$(docker inspect -f '{{.State.Health.Status}}' "$PREFIX-gw")
  [ "$state" = starting ] || break
  sleep 1
done
say "HEALTHCHECK: $state"
t0=$(date +%s)
docker stop -t 40 "$PREFIX-gw" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$PREFIX-gw")
[ "$code" = 0 ] || { docker logs "$PREFIX-gw" 2>&1 | tail -n 20; fail "exit status $code after SIGTERM"; }
logs=$(docker logs "$PREFIX-gw" 2>&1)  # whole, not piped into grep -q (pipefail, SIGPIPE)
grep -q '"stopping' <<<"$logs" || fail "no 'stopping' log line after SIGTERM"
say "SIGTERM: stopped in $(( $(date +%s) - t0 )) s with status 0"

# ---- 5. compose ----
docker rm -f -v "$PREFIX-gw" >/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
say "building $BOITE on $BASE_IMAGE"
docker build -f docker/boite/Dockerfile --build-arg "BASE=$BASE_IMAGE" -t "$BOITE" . \
  >"$WORK/build-boite.log" 2>&1 || { tail -n 40 "$WORK/build-boite.log"; fail "docker build (boite)"; }
imap_port=$(free_port)
cat >"$WORK/compose.env" <<EOF
GATEWAY_DOMAINS=cabinet.test
GATEWAY_HOSTNAME=mx.cabinet.test
GATEWAY_NEXT_HOP=boite:25
GATEWAY_IMAGE=$IMAGE
BOITE_IMAGE=$BOITE
ESSAI_MOT_DE_PASSE=essai-compose
SMTP_PUBLISH=127.0.0.1:$(free_port)
IMAP_PUBLISH=127.0.0.1:$imap_port
EOF
# The test's own addition: the peer's network and DNS (a second file, as an admin's
# docker-compose.override.yml would be).
cat >"$WORK/compose.test.yaml" <<EOF
services:
  gateway:
    dns: [$PEER_IP]
    networks: [default, peer]
networks:
  peer:
    external: true
    name: $NET
EOF
compose() {
  docker-compose -p "$PREFIX" --env-file "$WORK/compose.env" -f docker/compose.yaml \
    -f "$WORK/compose.test.yaml" "$@"
}
# Up with these profiles; the gateway's container ($cid) and its published port ($port).
compose_up() {
  compose "$@" up -d --no-build >/dev/null 2>&1 \
    || { compose "$@" up -d --no-build; fail "docker-compose up $*"; }
  cid=$(compose ps -q gateway)
  port=$(docker port "$cid" 25/tcp | sed -n '1s/.*://p')
}
compose_up --profile essai
say "compose: gateway on 127.0.0.1:$port"
python3 -m tests.support.container_client compose "$port" "$imap_port" \
  || { docker logs "$cid" 2>&1 | tail -n 30; docker logs "$(compose ps -q boite)" 2>&1 | tail -n 30;
       fail "mail through compose"; }
compose --profile essai down -v >/dev/null 2>&1 || fail "docker-compose down"
say "compose: relayed into the trial mailbox, then down"

# ---- 6. compose with the engines ----
for engine in clamav rspamd; do
  tag=$CLAMAV; [ $engine = rspamd ] && tag=$RSPAMD
  say "building $tag on $BASE_IMAGE"
  docker build -f "docker/$engine/Dockerfile" --build-arg "BASE=$BASE_IMAGE" -t "$tag" . \
    >"$WORK/build-$engine.log" 2>&1 \
    || { tail -n 40 "$WORK/build-$engine.log"; fail "docker build ($engine)"; }
done
# No signature download here: the test's own database (tests/support/clamd.py) in the volume.
python3 -c 'import sys; from pathlib import Path; from tests.support.clamd import ClamdServer
ClamdServer(Path(sys.argv[1]))' "$WORK/clamd"
cat >>"$WORK/compose.env" <<EOF
CLAMAV_IMAGE=$CLAMAV
RSPAMD_IMAGE=$RSPAMD
GATEWAY_CLAMAV=clamav:3310
GATEWAY_RSPAMD=http://rspamd:11333
GATEWAY_RSPAMD_CONTROLLER=http://rspamd:11334
GATEWAY_RSPAMD_PASSWORD_FILE=/run/gateway-rspamd/password
EOF
cat >"$WORK/compose.test.yaml" <<EOF
services:
  gateway:
    dns: [$PEER_IP]
    networks: [default, peer]
  clamav:
    volumes: ["$WORK/clamd/db:/var/lib/clamav"]
  rspamd:
    dns: [$PEER_IP]
    networks: [default, peer]
networks:
  peer:
    external: true
    name: $NET
EOF
profiles="--profile essai --profile antivirus --profile antispam"
compose_up $profiles
say "compose with ClamAV and rspamd: gateway on 127.0.0.1:$port"
python3 -m tests.support.container_client engines "$port" "$imap_port" \
  || { for s in gateway clamav rspamd; do docker logs "$(compose ps -q $s)" 2>&1 | tail -n 20; done;
       fail "mail through compose with the engines"; }
compose $profiles down -v >/dev/null 2>&1 || fail "docker-compose down (engines)"
say "compose with the engines: malware refused, rspamd's score in the mailbox, then down"
say "passed in $(( $(date +%s) - START )) s"
