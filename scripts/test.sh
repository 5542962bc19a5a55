#!/usr/bin/env bash
# Run the whole test suite: formatting, lints, then unit and integration tests
# (which start real S3-compatible servers on 127.0.0.1).
#
#   ./scripts/test.sh                  # everything
#   ./scripts/test.sh --test pipeline  # extra args go to `cargo test --release`
#
# Installs what the tests need when it is missing, so it also works on a
# fresh machine (CI runs it via .ci/run).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$HOME/.local/bin:$PATH"

S3S_FS_VERSION=0.14.1

say() { echo "test.sh: $*" >&2; }

# --- system packages ----------------------------------------------------------
# nginx: tests/http.rs runs a real nginx in front of offloadd.
# systemd: systemd-analyze for tests/packaging.rs (the unit's exposure score).
# tests/systemd_e2e.rs installs systemd-container and debootstrap itself
# (tests/systemd-testbed/up.sh) and caches the container root in $SDLAB.
# prometheus: promtool for tests/dashboards.rs (checks and unit-tests the alert
# rules); installing it starts no service where systemd is not running.
# xfsprogs: mkfs.xfs for tests/torture/privileged.rs (an XFS root moved to
# another loop device).
APT_PACKAGES=(nginx systemd prometheus xfsprogs)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
# pip installs moto (below); a fresh Debian/Ubuntu has python3 without it.
if ! command -v moto_server >/dev/null 2>&1 && ! python3 -m pip --version >/dev/null 2>&1; then
    missing+=(python3-pip)
fi
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    sudo=()
    ((EUID == 0)) || sudo=(sudo)
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# --- Rust components ------------------------------------------------------------
if command -v rustup >/dev/null 2>&1; then
    cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
    cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi

# cargo-deb builds the .deb (scripts/package.sh) for the packaging tests.
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
    say "installing cargo-deb $CARGO_DEB_VERSION"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi

# cargo-deny checks the dependency tree (deny.toml). A debug build: it
# installs in a fraction of the release build's time (about 1.5 min on 2 cores,
# which CI's 30 minutes notice) and checks this tree in seconds all the same.
CARGO_DENY_VERSION=0.20.2
if ! cargo deny --version 2>/dev/null | grep -qF "$CARGO_DENY_VERSION"; then
    say "installing cargo-deny $CARGO_DENY_VERSION (debug build)"
    cargo install cargo-deny --version "$CARGO_DENY_VERSION" --locked --debug
fi

# --- S3-compatible servers the tests start ----------------------------------------
# s3s-fs: keeps its data on disk and checks signatures.
if ! s3s-fs --version 2>/dev/null | grep -qF "$S3S_FS_VERSION"; then
    say "installing s3s-fs $S3S_FS_VERSION"
    cargo install s3s-fs --version "$S3S_FS_VERSION" --features binary --locked
fi

# moto: an in-memory S3 for tests that need its API surface.
if ! command -v moto_server >/dev/null 2>&1; then
    say "installing moto[server]"
    # Debian's system Python refuses plain pip installs (PEP 668); fall back
    # to --break-system-packages there, as CI machines are throwaway.
    python3 -m pip install --quiet 'moto[server]' 2>/dev/null ||
        python3 -m pip install --quiet --break-system-packages 'moto[server]'
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
    hash -r
    command -v moto_server >/dev/null 2>&1 ||
        { say "moto_server is still not on PATH after pip install"; exit 1; }
fi

# --- checks --------------------------------------------------------------------
say "cargo fmt --check"
cargo fmt --check
say "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
say "cargo deny check"
if ! cargo deny -L error check --hide-inclusion-graph bans licenses sources; then
    say "cargo deny: the dependency tree breaks deny.toml"
    exit 1
fi
# Advisories need the RustSec database from GitHub; a machine that cannot
# reach it says so on every run instead of passing in silence.
if ! advisories=$(cargo deny -L error check --hide-inclusion-graph advisories 2>&1); then
    if grep -qiE "failed to fetch|unable to|could not resolve|network|clone" <<<"$advisories"; then
        say "WARNING: the RustSec advisory database is unreachable from this machine; advisories NOT checked"
    else
        printf '%s\n' "$advisories" >&2
        say "cargo deny: an advisory affects the dependency tree"
        exit 1
    fi
fi
say "cargo test --release $*"
cargo test --release "$@"
