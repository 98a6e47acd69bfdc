#!/usr/bin/env bash
# Exports uv.lock as the hashed requirement files the images install (requirements/<image>.txt);
# `--check` fails when one differs from what the lock gives (run by `make lint`).
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
check=false; [ "${1:-}" = "--check" ] && check=true
status=0
for image in operator:operator runtime:runtime runtime-gpu:gpu; do
  name=${image%%:*}; extras=${image#*:}
  args=(export --frozen --no-dev --no-emit-project --group build --format requirements-txt --quiet)
  for extra in ${extras//,/ }; do args+=(--extra "$extra"); done
  out=requirements/$name.txt
  if $check; then
    if ! diff -q <("$uv" "${args[@]}" --no-header) <(grep -v '^#' "$out") >/dev/null 2>&1; then
      echo "error: $out is not what uv.lock gives: run 'make lock'" >&2; status=1
    fi
  else
    { echo "# The $name image's Python packages, exported from uv.lock by 'make lock'; do not edit."
      "$uv" "${args[@]}" --no-header; } > "$out"
  fi
done
exit $status
