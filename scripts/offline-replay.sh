#!/usr/bin/env bash
# Rebuild a ledger from a chain of bundles on a machine with no network, and check that the
# site's history reproduces: every bundle is verified (orch-verify), imported in order into a
# fresh ledger (orchd import), then exported again from the rebuilt ledger; each re-export must
# have the same content digests (every data file's SHA-256, the Merkle root) as the original.
#
#   scripts/offline-replay.sh --root root.json [--root-chain DIR] [--db rebuilt.db] BUNDLE...
#
# Binaries are taken from $ORCH_BIN_DIR, else from PATH, else from target/release or target/debug
# of this checkout. Exit 0: the history reproduces; 1: a bundle failed or differs; 2: usage.
set -euo pipefail

usage() { echo "usage: $0 --root root.json [--root-chain DIR] [--db rebuilt.db] BUNDLE..." >&2; exit 2; }
root="" chain="" db="" bundles=()
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root="${2:-}"; shift 2 ;;
        --root-chain) chain="${2:-}"; shift 2 ;;
        --db) db="${2:-}"; shift 2 ;;
        -h|--help) usage ;;
        -*) echo "$0: unknown option $1" >&2; usage ;;
        *) bundles+=("$1"); shift ;;
    esac
done
[ -n "$root" ] && [ ${#bundles[@]} -gt 0 ] || usage

here="$(cd "$(dirname "$0")/.." && pwd)"
find_bin() {
    local name="$1"
    for dir in "${ORCH_BIN_DIR:-}" "" "$here/target/release" "$here/target/debug"; do
        if [ -z "$dir" ]; then
            command -v "$name" 2>/dev/null && return 0
        elif [ -x "$dir/$name" ]; then
            echo "$dir/$name"; return 0
        fi
    done
    echo "$0: cannot find $name (build with cargo build --release, or set ORCH_BIN_DIR)" >&2
    exit 2
}
orchd="$(find_bin orchd)"; bundle="$(find_bin orch-bundle)"; verify="$(find_bin orch-verify)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
[ -n "$db" ] || db="$work/rebuilt.db"
[ ! -e "$db" ] || { echo "$0: $db exists; give a new --db" >&2; exit 2; }
trust=(--root "$root")
[ -z "$chain" ] || trust+=(--root-chain "$chain")

# A field of a one-line JSON document: a string, number or null.
field() { grep -oE "\"$1\":(\"[^\"]*\"|[0-9]+|null)" <<<"$2" | head -n1 | cut -d: -f2- | tr -d '"'; }
# The content digests of a bundle's manifest: its "files" and "merkle" objects.
digests() { zstd -dcq "$1" | tar -xOf - manifest.json | grep -oE '"(files|merkle)":\{("[^"]+":(\{[^}]*\}|"[^"]*"|[0-9]+),?)*\}'; }

"$bundle" keygen --out "$work/keys" --name replay >/dev/null
prev_replayed="" n=0 failed=0
for b in "${bundles[@]}"; do
    n=$((n + 1))
    report="$("$verify" "$b" "${trust[@]}" --json)" || { echo "FAIL $b: does not verify"; echo "$report"; exit 1; }
    from="$(field from_seq "$report")"; to="$(field to_seq "$report")"
    site="$(field site_id "$report")"; tenant="$(field tenant "$report")"
    "$orchd" import "$b" --db "$db" "${trust[@]}" >/dev/null || { echo "FAIL $b: import refused"; exit 1; }
    out="$work/replayed-$n.tar.zst"
    args=(export --db "$db" --origin "$site" --key "$work/keys/replay.key" --out "$out" --from-seq "$from" --to-seq "$to")
    [ "$tenant" = "null" ] || args+=(--tenant "$tenant")
    [ -z "$prev_replayed" ] || args+=(--previous "$prev_replayed")
    "$bundle" "${args[@]}" >/dev/null
    want="$(digests "$b")"
    [ -n "$want" ] || { echo "FAIL $b: no manifest digests"; exit 1; }
    if [ "$want" = "$(digests "$out")" ]; then
        echo "ok   $b: site $site events $from..=$to reproduce"
    else
        echo "FAIL $b: site $site events $from..=$to do not reproduce"
        diff <(digests "$b" | tr ',' '\n') <(digests "$out" | tr ',' '\n') || true
        failed=1
    fi
    prev_replayed="$out"
done
[ "$failed" = 0 ] || exit 1
echo "rebuilt ledger: $db (${#bundles[@]} bundles)"
