#!/usr/bin/env bash
# Fails unless the vendored sqlx-core is the one in the build and is the published 0.9.0 with
# exactly the patch in vendor/sqlx-core-tcp-nodelay.patch. Needs the crates.io download
# (CI's machines reach the registry).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo tree --locked -i sqlx-core --depth 0 | grep -q 'vendor/sqlx-core'; then
  echo "the [patch.crates-io] sqlx-core entry is not used: sea-orm moved to another sqlx; see vendor/README.md" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl -sSfL -o "$work/sqlx-core.crate" https://static.crates.io/crates/sqlx-core/sqlx-core-0.9.0.crate
tar -xzf "$work/sqlx-core.crate" -C "$work"
mkdir -p "$work/a" "$work/b"
cp -r "$work/sqlx-core-0.9.0/src" "$work/a/src"
(cd "$work/a" && patch -s -p1 < "$OLDPWD/vendor/sqlx-core-tcp-nodelay.patch")
cp -r vendor/sqlx-core/src "$work/b/src"
if ! diff -r "$work/a/src" "$work/b/src" >/dev/null; then
  echo "vendor/sqlx-core/src is not sqlx-core 0.9.0 plus vendor/sqlx-core-tcp-nodelay.patch" >&2
  exit 1
fi
echo "vendored sqlx-core: in use, and the published 0.9.0 plus its one patch"
