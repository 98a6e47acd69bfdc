#!/usr/bin/env bash
# No registry is reachable: builds the pause, operator and runtime images here (mmdebstrap + buildah), caches them as tars keyed by their inputs, and loads them into a containerd.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}
images=$cache/images    # <name>-<hash>.tar (docker-archive) and <name>-<hash>.id (its image ID, the config digest)
rootfs=$cache/rootfs    # base-<hash>.tar, mmdebstrap's output
wheels=$cache/wheels    # <image>-<hash>/, the locked wheels, downloaded with their hashes checked
suite=bookworm          # the base's Debian release: its python3 is 3.11, the ABI of the wheels below
pyver=3.11
tag=dev                 # operator and runtime are localhost/modelfleet-<image>:dev; base and pause carry their hash
glibc=2.36              # bookworm's, for the wheels' manylinux tags
arch=$(uname -m)
label=io.modelfleet.images  # on the base (so on every image built from it) and the pause: what prune_store may drop

log() { printf '[images] %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
hash16() { sha256sum | cut -c1-16; }
human() { numfmt --to=iec --suffix=B "$1"; }

need_debs() {  # install the Debian packages whose commands are missing (a fresh machine has none of them)
  local missing=() cmd
  for cmd in "$@"; do command -v "${cmd%%:*}" >/dev/null || missing+=("${cmd#*:}"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# shellcheck disable=SC2016 # apt's and mmdebstrap's own \$(...) and "$1"
# The host's Debian sources for $suite: the build must use the mirror the host uses (it may be the only one reachable).
debian_sources() {
  apt-get indextargets --format '$(ORIGIN)|$(REPO_URI)|$(RELEASE)|$(COMPONENT)|$(IDENTIFIER)' 2>/dev/null |
    awk -F'|' -v s="$suite" '$1 == "Debian" && $5 == "Packages" && ($3 == s || index($3, s "-") == 1) {
      print "deb " $2 " " $3 " " $4 }' | sort -u
}
# The host's apt settings that decide how a mirror is reached (proxy, snapshot dates), passed on to mmdebstrap.
apt_access_opts() {
  apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date|https?::(Proxy|Verify-Peer|CaInfo)[^ ]*) ' || true
}

# shellcheck disable=SC2016
# ---- base: Debian's python3 with a venv at /opt/venv -------------------------------------------------------------
base_rootfs() {  # out.tar
  local out=$1 src=() line opts=()
  while IFS= read -r line; do src+=("$line"); done < <(debian_sources)
  while IFS= read -r line; do opts+=("--aptopt=$line"); done < <(apt_access_opts)
  # setuptools is not kept: the images install the lock's. pip stays (Debian's), to install the lock with.
  mmdebstrap --quiet --format=tar --variant=apt --include=python3,python3-venv,ca-certificates "${opts[@]}" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
    --customize-hook='chroot "$1" /opt/venv/bin/python -m pip uninstall --quiet --yes setuptools' \
    --customize-hook='chmod -R u+rwX,go+rX,go-w "$1/opt/venv"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/cache/debconf/*-old "$1"/var/log/*.log "$1"/var/log/apt/*' \
    "$suite" "$out" "${src[@]}"
}
base_image() {  # rootfs.tar ref
  local ctr; ctr=$(buildah from --quiet scratch)
  buildah add --quiet "$ctr" "$1" / >/dev/null
  buildah config --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd '["python3"]' --label "$label=base" "$ctr"
  buildah commit --quiet --rm "$ctr" "$2" >/dev/null
}
base_hash() {
  { echo "$suite"; debian_sources; apt_access_opts; declare -f base_rootfs base_image; } | hash16
}
ensure_base() {  # hash: the base image is in buildah's storage (its rootfs tar cached, keyed by its inputs)
  local h=$1 ref=localhost/modelfleet-base:$1 tar=$rootfs/base-$1.tar
  buildah inspect --type image "$ref" >/dev/null 2>&1 && return 0
  mkdir -p "$rootfs"
  if [ ! -s "$tar" ]; then
    log "mmdebstrap $suite (python3, python3-venv): about 90 s"
    rm -rf "$tar.tmp"; base_rootfs "$tar.tmp"; mv "$tar.tmp" "$tar"
    find "$rootfs" -mindepth 1 -maxdepth 1 -name 'base-*' ! -name "base-$h.tar" -exec rm -rf {} +
  fi
  base_image "$tar" "$ref"
}

# ---- pause: the pod sandbox's process -----------------------------------------------------------------------------
pause_build() {  # ref
  local dir ctr; dir=$(mktemp -d)
  (cd hack/pause && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS='' go build -trimpath -ldflags '-s -w -buildid=' -o "$dir/pause" .)
  ctr=$(buildah from --quiet scratch)
  buildah copy --quiet --chmod 0755 "$ctr" "$dir/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --user 65535:65535 --label "$label=pause" "$ctr"
  buildah commit --quiet --rm "$ctr" "$1" >/dev/null
  rm -rf "$dir"
}
pause_hash() {
  { go version; git ls-files -z --cached --others --exclude-standard -- hack/pause | sort -z | xargs -0 sha256sum
    declare -f pause_build; } | hash16
}

# ---- operator and runtime: the Dockerfile's targets, from the locked wheels ----------------------------------------
wheel_opts() {  # pip matches a --platform tag exactly: every manylinux tag that bookworm's glibc runs is listed
  local m; echo --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" --abi abi3 --abi none
  for m in 1 2010 2014; do echo --platform "manylinux${m}_$arch"; done
  for m in $(seq 5 "${glibc#2.}"); do echo --platform "manylinux_2_${m}_$arch"; done
}
wheels_hash() { { cat "requirements/$1.txt"; wheel_opts; } | hash16; }
# Every lock entry of the image must have a wheel: the Dockerfile installs with --require-hashes, so a wheel built
# here from an sdist would not match the lock's hashes (and the base has no compiler to build one inside).
sdist_only() {  # image: prints the image's locked packages that have no wheel at all
  python3 - "requirements/$1.txt" <<'EOF'
import re, sys, tomllib
pins = set(re.findall(r"^([A-Za-z0-9._-]+)==([^ ;\\]+)", open(sys.argv[1]).read(), re.M))
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
lock = tomllib.load(open("uv.lock", "rb"))
for p in lock.get("package", []):
    if (norm(p["name"]), p.get("version")) in {(norm(n), v) for n, v in pins} and not p.get("wheels"):
        print(f"{p['name']}=={p['version']}")
EOF
}
ensure_wheels() {  # image -> prints the folder of its wheels
  local img=$1 dir; dir=$wheels/$img-$(wheels_hash "$1")
  if [ ! -f "$dir/.complete" ]; then
    local bad; bad=$(sdist_only "$img")
    [ -z "$bad" ] || die "requirements/$img.txt locks packages that publish no wheel: $bad (pin a version with wheels)"
    python3 -c "import sys; v = '%d.%d' % sys.version_info[:2]; sys.exit(v != '$pyver')" ||
      die "python3 is not $pyver: the requirement markers would be read for another Python than the image's"
    log "downloading the wheels of requirements/$img.txt"
    rm -rf "$dir.tmp"; mkdir -p "$dir.tmp"
    # shellcheck disable=SC2046
    python3 -m pip download --quiet --disable-pip-version-check --require-hashes --no-deps --only-binary=:all: \
      $(wheel_opts) -r "requirements/$img.txt" -d "$dir.tmp" >&2
    touch "$dir.tmp/.complete"; rm -rf "$dir"; mv "$dir.tmp" "$dir"
    find "$wheels" -mindepth 1 -maxdepth 1 -name "$img-*" ! -name "${dir##*/}" -exec rm -rf {} +
  fi
  echo "$dir"
}
# What goes into an image: the files the Dockerfile copies (tracked or new, not ignored), the Dockerfile, the base.
project_hash() {  # image base-hash
  { echo "$1 $2 $tag"; wheel_opts
    git ls-files -z --cached --others --exclude-standard -- Dockerfile .dockerignore pyproject.toml README.md \
      requirements operator runtime | sort -zu | while IFS= read -r -d '' f; do [ -f "$f" ] && sha256sum "$f"; done
    declare -f project_build; } | hash16
}
project_build() {  # image base-ref wheel-dir ref
  buildah bud --quiet --runtime=runc --pull=never --layers --force-rm --network=none --target "$1" \
    --build-arg BASE_IMAGE="$2" --build-arg WHEELS=/wheels -v "$3:/wheels:ro" -t "$4" -f Dockerfile . >/dev/null
}

# ---- the cache ----------------------------------------------------------------------------------------------------
ref_of() {  # name hash
  case $1 in pause) echo "localhost/modelfleet-pause:$2" ;; *) echo "localhost/modelfleet-$1:$tag" ;; esac
}
export_tar() {  # name hash ref: docker-archive tar plus its image ID; only the newest tar per image is kept
  local tar=$images/$1-$2.tar
  mkdir -p "$images"; rm -f "$tar.tmp"
  buildah push --quiet "$3" "docker-archive:$tar.tmp:$3" >/dev/null
  tar -xOf "$tar.tmp" manifest.json | python3 -c 'import json, sys; print("sha256:" + json.load(sys.stdin)[0]["Config"].split("/")[-1].removesuffix(".json"))' > "$images/$1-$2.id"
  mv "$tar.tmp" "$tar"
  find "$images" -maxdepth 1 -regextype egrep -regex ".*/$1-[0-9a-f]{16}\.(tar|id)" ! -name "$1-$2.*" -delete
}
# Buildah's storage keeps what the last build made (the --layers cache) and the current base and pause; older
# images of this script (labelled $label) go: replaced bases and pauses, untagged images and stale layer caches.
prune_store() {  # start-epoch keep-ref...
  buildah images --all --json --filter "label=$label" | python3 -c '
import datetime, json, sys
start, keep = float(sys.argv[1]), set(sys.argv[2:])
for i in json.load(sys.stdin):
    names = set(i.get("names") or [])
    created = datetime.datetime.fromisoformat(i["createdatraw"][:26].rstrip("Z")).replace(tzinfo=datetime.timezone.utc)
    if (not names and created.timestamp() < start) or (names and not names & keep and all(
            n.startswith(("localhost/modelfleet-base:", "localhost/modelfleet-pause:")) for n in names)):
        print(i["id"])' "$@" | xargs -r buildah rmi >/dev/null 2>&1 || true
}
current() {  # prints "name hash" for pause, operator, runtime
  local bh; bh=$(base_hash)
  echo "pause $(pause_hash)"
  echo "operator $(project_hash operator "$bh")"
  echo "runtime $(project_hash runtime "$bh")"
}

cmd_build() {
  need_debs mmdebstrap buildah runc  # runc: crun refuses this machine's hybrid cgroups
  command -v go >/dev/null || die "the pause image needs the Go toolchain"
  mkdir -p "$cache"
  exec 9>"$cache/.images.lock"; flock 9   # one build at a time per cache
  local bh name h t0 state tar wd lines=() item items
  bh=$(base_hash); mapfile -t items < <(current)
  local start built=false; start=$(date +%s)
  for item in "${items[@]}"; do
    read -r name h <<<"$item"
    [ $# -eq 0 ] || [[ " $* " == *" $name "* ]] || continue  # `build pause`: only the images named
    t0=$SECONDS; tar=$images/$name-$h.tar; state=cached
    if [ ! -s "$tar" ] || [ ! -s "$images/$name-$h.id" ]; then
      state=built built=true; log "building $name ($h)"
      if [ "$name" = pause ]; then
        pause_build "$(ref_of pause "$h")"
      else
        ensure_base "$bh"
        wd=$(ensure_wheels "$name")
        project_build "$name" "localhost/modelfleet-base:$bh" "$wd" "$(ref_of "$name" "$h")"
      fi
      export_tar "$name" "$h" "$(ref_of "$name" "$h")"
    fi
    lines+=("$(printf '%-9s %s %7s %4ss %s' "$name" "$h" "$(human "$(stat -c %s "$tar")")" $((SECONDS - t0)) "$state")")
  done
  $built && prune_store "$start" "localhost/modelfleet-base:$bh" "$(ref_of pause "${items[0]#* }")" \
    "$(ref_of operator x)" "$(ref_of runtime x)"
  printf '%s\n' "${lines[@]}"
}

cmd_load() {  # socket
  local sock=${1:?usage: images.sh load SOCKET} name h ref want have digest
  command -v ctr >/dev/null || die "ctr is missing (Debian's containerd package)"
  [ -S "$sock" ] || die "$sock is not a socket"
  local c=(ctr --address "$sock" -n k8s.io) item items
  mapfile -t items < <(current)
  for item in "${items[@]}"; do
    read -r name h <<<"$item"
    ref=$(ref_of "$name" "$h")
    if [ ! -s "$images/$name-$h.tar" ]; then  # not fatal: the node runs without it until `make images`
      echo "$name $ref not built for the current sources: run 'make images'" >&2; continue
    fi
    want=$(cat "$images/$name-$h.id")
    digest=$("${c[@]}" images ls "name==$ref" 2>/dev/null | awk 'NR > 1 {print $3}')
    have=
    [ -n "$digest" ] && have=$("${c[@]}" content get "$digest" 2>/dev/null |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["config"]["digest"])' 2>/dev/null || true)
    if [ "$have" = "$want" ]; then
      echo "$name $ref present"
    else
      local t0=$SECONDS
      "${c[@]}" images import "$images/$name-$h.tar" >/dev/null
      echo "$name $ref imported in $((SECONDS - t0))s"
    fi
  done
}

cmd_refs() {
  local name h
  while read -r name h; do echo "$name=$(ref_of "$name" "$h")"; done < <(current)
}

case ${1:-build} in
  build) shift || true; cmd_build "$@" ;;
  load) shift; cmd_load "$@" ;;
  refs) cmd_refs ;;
  hashes) current | tr ' ' '=' ;;  # name=hash of its inputs: a pod annotation that rolls pods when an image changes
  *) die "usage: images.sh [build [pause|operator|runtime ...]|load SOCKET|refs|hashes]" ;;
esac
