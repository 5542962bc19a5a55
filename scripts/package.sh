#!/usr/bin/env bash
# Build the Debian package: target/debian/offloadd_<version>-1_<arch>.deb
#
#   ./scripts/package.sh            # release build + cargo deb
#
# Installs cargo-deb when missing. Contents come from [package.metadata.deb]
# in Cargo.toml, units from systemd/, scripts from packaging/debian/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version >/dev/null 2>&1; then
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi
cargo build --release --bin offloadd ${CARGO_BUILD_JOBS:+-j "$CARGO_BUILD_JOBS"}
# --no-build: the binary above is the one packaged (no strip/rebuild surprises).
cargo deb --no-build --no-strip "$@" | tail -1
