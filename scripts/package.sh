#!/usr/bin/env bash
# Build the Debian package: target/debian/offloadd_<version>-1_<arch>.deb
# (built in target/package, without the test-only failpoints).
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
# A target dir of its own: the package is built without the test-only
# `failpoints` feature, and must not replace the binary the tests run.
export CARGO_TARGET_DIR=${PACKAGE_TARGET_DIR:-target/package}
cargo build --release --bin offloadd ${CARGO_BUILD_JOBS:+-j "$CARGO_BUILD_JOBS"}
# --no-build: the binary above is the one packaged (no strip/rebuild surprises).
cargo deb --no-build --no-strip --output target/debian "$@" | tail -1
