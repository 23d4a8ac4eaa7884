#!/usr/bin/env bash
# Fails unless the vendored sqlx-core is the one in the build and is the published 0.9.0 with
# exactly the patch in vendor/sqlx-core-tcp-nodelay.patch. Needs the crates.io download
# (CI's machines reach the registry).
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(cargo tree --locked -i sqlx-core --depth 0)
if ! grep -q 'vendor/sqlx-core' <<<"$tree"; then
  echo "the [patch.crates-io] sqlx-core entry is not used: sea-orm moved to another sqlx; see vendor/README.md" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl -sSfL -o "$work/sqlx-core.crate" https://static.crates.io/crates/sqlx-core/sqlx-core-0.9.0.crate
tar -xzf "$work/sqlx-core.crate" -C "$work"
mkdir -p "$work/a" "$work/b"
# The sources and the manifest (its features and dependencies) as published, plus the patch.
cp -r "$work/sqlx-core-0.9.0/src" "$work/sqlx-core-0.9.0/Cargo.toml" "$work/a/"
(cd "$work/a" && patch -s -p1 < "$OLDPWD/vendor/sqlx-core-tcp-nodelay.patch")
cp -r vendor/sqlx-core/src vendor/sqlx-core/Cargo.toml "$work/b/"
if ! diff -ru "$work/a" "$work/b" >"$work/differences"; then
  echo "vendor/sqlx-core is not sqlx-core 0.9.0 plus vendor/sqlx-core-tcp-nodelay.patch:" >&2
  head -n 40 "$work/differences" >&2
  exit 1
fi
echo "vendored sqlx-core: in use, and the published 0.9.0 plus its one patch"
