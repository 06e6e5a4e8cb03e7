#!/usr/bin/env bash
# Storage rebalance: move several live devices to new ones, one at a time,
# with a copy-rate cap so production I/O keeps its bandwidth, and a
# machine-readable record of each move.
#
#   examples/rebalance.sh [--rate-limit 200M] [--max-pause 100ms] SRC:TGT [SRC:TGT ...]
#
# For each pair it runs `migrate start --json`, keeps the final JSON summary,
# and stops at the first failure (the failed source is left intact, the
# migration abandoned). At the end it prints one JSON object per move on
# stdout: source, target, bytes_copied, recopies, pause_ms, seconds.
set -euo pipefail

rate=() pause=(--max-pause 100ms)
while [ $# -gt 0 ]; do
	case $1 in
	--rate-limit) rate=(--rate-limit "$2"); shift 2 ;;
	--max-pause) pause=(--max-pause "$2"); shift 2 ;;
	--) shift; break ;;
	-*) echo "rebalance: unknown option $1" >&2; exit 2 ;;
	*) break ;;
	esac
done
[ $# -gt 0 ] || { echo "usage: rebalance.sh [--rate-limit R] [--max-pause D] SRC:TGT..." >&2; exit 2; }
migrate=${MIGRATE:-migrate}

for pair in "$@"; do
	case $pair in *:*) ;; *) echo "rebalance: $pair is not SRC:TGT" >&2; exit 2 ;; esac
	src=${pair%%:*} tgt=${pair#*:}
	[ -b "$src" ] || { echo "rebalance: $src is not a block device" >&2; exit 2; }
	[ -b "$tgt" ] || { echo "rebalance: $tgt is not a block device" >&2; exit 2; }
done

for pair in "$@"; do
	src=${pair%%:*} tgt=${pair#*:}
	echo "rebalance: moving $src to $tgt" >&2
	out=$(mktemp)
	if ! "$migrate" start "$src" "$tgt" --json -i 5 "${rate[@]}" "${pause[@]}" >"$out"; then
		echo "rebalance: moving $src failed; it is intact. Later moves were not started." >&2
		"$migrate" abort "$src" 2>/dev/null || true
		rm -f "$out"
		exit 1
	fi
	done_line=$(grep '"event":"done"' "$out" | tail -1)
	rm -f "$out"
	# One record per move; fields from migrate's summary.
	printf '{"source":"%s","target":"%s","summary":%s}\n' "$src" "$tgt" "$done_line"
done
