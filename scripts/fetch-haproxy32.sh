#!/usr/bin/env bash
# Fetch HAProxy 3.2 LTS from Debian's newer suite (sid) and unpack it, with its
# own shared-library closure and its own dynamic loader, into .haproxy/3.2/.
# Nothing is installed system-wide: the system keeps bookworm's 2.6 in
# /usr/sbin/haproxy, and the tests run both versions side by side.
#
# Idempotent: does nothing when .haproxy/3.2/haproxy already reports 3.2.x.
# The Debian mirror is read from this machine's apt configuration at run time.
set -euo pipefail

WANT_MAJOR="3.2"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${HAPROXY32_DIR:-$REPO_ROOT/.haproxy/3.2}"
WRAPPER="$DEST/haproxy"

log() { printf 'fetch-haproxy32: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Pipelines below never stop reading early (no `head`, `grep -q` or awk `exit`): under
# `set -o pipefail` the writer's SIGPIPE would abort the script without a message.
first_line() { local out; out="$("$@" 2>/dev/null || true)"; printf '%s\n' "${out%%$'\n'*}"; }
if [[ -x "$WRAPPER" ]] && [[ "$(first_line "$WRAPPER" -v)" == *"version ${WANT_MAJOR}."* ]]; then
    log "present: $(first_line "$WRAPPER" -v)"
    exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found (a Debian-like system is required)"
command -v dpkg >/dev/null || die "dpkg not found"
if [[ $(id -u) -ne 0 ]]; then
    die "must run as root (apt-get update/download with private lists); run: sudo $0"
fi

# --- the Debian mirror, from the machine's own apt configuration -----------
mirror=""
if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
    # deb822: take the URIs of the stanza whose Suites are not *-security.
    mirror="$(awk '
        /^[[:space:]]*$/ { if (uris != "" && !sec) { print uris; exit } uris=""; sec=0; next }
        /^URIs:/        { uris=$2 }
        /^Suites:/      { if ($0 ~ /-security/) sec=1 }
        END             { if (uris != "" && !sec) print uris }' /etc/apt/sources.list.d/debian.sources | head -n1)"
fi
if [[ -z "$mirror" ]]; then
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r "$f" ]] || continue
        mirror="$(awk '$1=="deb" && $0 !~ /security/ {
                for (i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f" | head -n1)"
        [[ -n "$mirror" ]] && break
    done
fi
[[ -n "$mirror" ]] || die "no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
log "mirror from apt configuration: $mirror"

arch="$(dpkg --print-architecture)"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -r "$keyring" ]] || die "$keyring missing (install debian-archive-keyring)"

# --- private apt state: never touches the system's lists or cache ----------
work="$(mktemp -d "${TMPDIR:-/tmp}/haproxy32.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# apt's download sandbox user (_apt) must be able to write here.
chmod 755 "$work"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs"
cat >"$work/sid.sources" <<SRC
Types: deb
URIs: $mirror
Suites: sid
Components: main
Signed-By: $keyring
SRC
APT=(apt-get -q
     -o "Dir::Etc::SourceList=$work/sid.sources"
     -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$work/lists"
     -o "Dir::Cache=$work/cache"
     -o Dir::State::status=/dev/null
     -o "APT::Architecture=$arch"
     -o Acquire::Languages=none)
APT_CACHE=(apt-cache
     -o "Dir::Etc::SourceList=$work/sid.sources"
     -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$work/lists"
     -o "Dir::Cache=$work/cache"
     -o Dir::State::status=/dev/null
     -o "APT::Architecture=$arch")

log "apt-get update (sid, private lists)"
"${APT[@]}" update >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; die "apt-get update for sid failed"; }

found="$("${APT_CACHE[@]}" show --no-all-versions haproxy 2>/dev/null | awk '/^Version:/ && !v {v=$2} END {print v}')"
[[ -n "$found" ]] || die "sid has no haproxy package"
upstream="${found#*:}"; upstream="${upstream%%-*}"
case "$upstream" in
    "${WANT_MAJOR}".*) log "sid haproxy: $found" ;;
    *) die "sid's haproxy is $found, not ${WANT_MAJOR}.x; pin another source or update this script" ;;
esac

# --- the shared-library closure: haproxy, then the lib*/zlib* packages it
# depends on, following only library packages (adduser, debconf, ... are not
# needed to run the binary and would drag in half the distribution).
deps_of() {
    "${APT_CACHE[@]}" depends --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances "$1" 2>/dev/null \
        | awk '$1 ~ /^(Pre)?Depends:$/ && $2 !~ /^</ { print $2 }' \
        | sed 's/:.*$//' | grep -E '^(lib|zlib)' || true
}
declare -A seen=([haproxy]=1)
queue=(haproxy)
while ((${#queue[@]})); do
    p="${queue[0]}"; queue=("${queue[@]:1}")
    for d in $(deps_of "$p"); do
        [[ -n "${seen[$d]:-}" ]] && continue
        seen[$d]=1; queue+=("$d")
    done
done
pkgs="$(printf '%s\n' "${!seen[@]}" | sort -u)"
# libc6's loader is needed in any case (we run sid's loader, not the host's).
pkgs="$(printf '%s\nlibc6\n' "$pkgs" | sort -u)"
log "packages: $(echo $pkgs)"

( cd "$work/debs" && chmod 777 . && "${APT[@]}" download $pkgs ) >"$work/download.log" 2>&1 \
    || { cat "$work/download.log" >&2; die "apt-get download failed"; }

stage="$work/stage"
mkdir -p "$stage/root"
for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$stage/root"
done

[[ -x "$stage/root/usr/sbin/haproxy" ]] || die "haproxy binary not found in the unpacked packages"
loader="$(cd "$stage/root" && find ./usr/lib64 ./lib64 ./usr/lib ./lib -maxdepth 2 -name 'ld-linux*.so*' 2>/dev/null | head -n1 || true)"
[[ -n "$loader" ]] || die "no dynamic loader in the unpacked libc6"
loader="${loader#./}"

# --- move into place and write the wrapper (absolute paths) ----------------
rm -rf "$DEST"
mkdir -p "$DEST"
mv "$stage/root" "$DEST/root"
R="$DEST/root"
libpath=""
for d in "$R"/usr/lib/*-linux-gnu "$R"/lib/*-linux-gnu "$R"/usr/lib "$R"/lib; do
    [[ -d "$d" ]] && libpath="${libpath:+$libpath:}$d"
done
cat >"$WRAPPER" <<WRAP
#!/bin/sh
# Generated by scripts/fetch-haproxy32.sh: HAProxy $found from Debian sid, run
# with its own loader and libraries (nothing of it is installed system-wide).
exec "$R/$loader" --library-path "$libpath" "$R/usr/sbin/haproxy" "\$@"
WRAP
chmod 755 "$WRAPPER"
echo "$found" >"$DEST/VERSION"

# --- verify: every library resolves inside the folder, and it runs ----------
listing="$("$R/$loader" --library-path "$libpath" --list "$R/usr/sbin/haproxy" 2>&1)" \
    || { echo "$listing" >&2; rm -f "$WRAPPER"; die "loader --list failed"; }
outside="$(echo "$listing" | awk '/=>/ { print $3 }' | grep -v "^$R/" | grep -v '^$' || true)"
missing="$(echo "$listing" | grep 'not found' || true)"
if [[ -n "$outside" || -n "$missing" ]]; then
    echo "$listing" >&2
    rm -f "$WRAPPER"
    die "libraries resolve outside $R or are missing: ${outside}${missing}"
fi
[[ "$(first_line "$WRAPPER" -v)" == *"version ${WANT_MAJOR}."* ]] || { rm -f "$WRAPPER"; die "wrapper does not report ${WANT_MAJOR}"; }
log "installed: $(first_line "$WRAPPER" -v) -> $WRAPPER"
