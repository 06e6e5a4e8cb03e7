#!/usr/bin/env bash
# Benchmark `migrate copy` against dd (O_DIRECT, 4 MiB blocks) and cp on the
# same image files, several interleaved runs, page cache dropped before each.
# Prints a Markdown table of median times, throughputs, and ratios to dd.
#
#   bench/copy.sh [SIZE_MIB=2048] [RUNS=5] [DIR=/var/tmp/blkmig-bench]
# Needs root (to drop the page cache).
set -euo pipefail

size_mib=${1:-2048}
runs=${2:-5}
dir=${3:-/var/tmp/blkmig-bench}
repo=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
cargo build --release --locked -q -p migrate --manifest-path "$repo/Cargo.toml"
migrate="$repo/target/release/migrate"

mkdir -p "$dir"
src="$dir/src.img" tgt="$dir/tgt.img"
if [ ! -f "$src" ] || [ "$(stat -c %s "$src")" -ne $((size_mib << 20)) ]; then
	echo "bench: writing $size_mib MiB of random data to $src" >&2
	head -c $((size_mib << 20)) /dev/urandom >"$src.tmp" && mv "$src.tmp" "$src"
fi
truncate -s $((size_mib << 20)) "$tgt"
sync

drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# Seconds (wall clock) a command takes.
secs() {
	local t0 t1
	t0=$(date +%s.%N)
	"$@" >/dev/null 2>&1
	t1=$(date +%s.%N)
	echo "$t1 - $t0" | bc -l
}

declare -A times
tools=(dd cp migrate)
for ((i = 1; i <= runs; i++)); do
	# Rotate the order so drift in the host does not favour one tool.
	for ((k = 0; k < ${#tools[@]}; k++)); do
		tool=${tools[$(((k + i) % ${#tools[@]}))]}
		drop
		case $tool in
		dd) t=$(secs dd if="$src" of="$tgt" bs=4M iflag=direct oflag=direct conv=notrunc,fsync) ;;
		cp) t=$(secs sh -c "cp --sparse=never '$src' '$tgt' && sync -f '$tgt'") ;;
		migrate) t=$(secs "$migrate" copy "$src" "$tgt" -q) ;;
		esac
		times[$tool]="${times[$tool]:-} $t"
		printf 'bench: run %d %-8s %.3f s\n' "$i" "$tool" "$t" >&2
	done
done
cmp "$src" "$tgt" || { echo "bench: target differs from source after the runs" >&2; exit 1; }

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
dd_med=$(echo "${times[dd]}" | median)
echo "| tool | median time (s) | MiB/s | throughput vs dd |"
echo "|---|---|---|---|"
for tool in dd migrate cp; do
	m=$(echo "${times[$tool]}" | median)
	printf '| %s | %.3f | %.0f | %.2fx |\n' "$tool" "$m" "$(echo "$size_mib / $m" | bc -l)" "$(echo "$dd_med / $m" | bc -l)"
done
echo
echo "$runs runs of $size_mib MiB each, $(nproc) cores, $(uname -r), $(date -u +%Y-%m-%d)."
