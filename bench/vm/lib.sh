# shellcheck shell=sh
# In the guest, for the bench/vm/*.sh scripts (installed as
# /tests/bench-lib.sh; bench/lib.sh writes /tests/bench.conf).

# clock_us: sets CLOCK_US to the guest's wall clock in microseconds.
# busybox date has no %N and /proc/uptime steps by 10 ms; adjtimex(2) reads
# the clock to the microsecond (nothing in the guest steps it). One process
# per reading, so that two readings around a command add little to it.
clock_us() {
	# shellcheck disable=SC2046 # the words of adjtimex's report
	set -- $(adjtimex)
	while [ $# -gt 1 ]; do
		case $1 in
		time.tv_sec:) _s=$2 ;;
		time.tv_usec:) _u=$2 ;;
		esac
		shift
	done
	CLOCK_US=$((_s * 1000000 + _u))
}
now_ms() {
	clock_us
	echo $((CLOCK_US / 1000))
}

# peak_rss_kb OUT CMD...: runs CMD (its output to OUT), prints its peak
# resident set in KiB (getrusage's ru_maxrss, from busybox time -v); fails
# when CMD fails.
peak_rss_kb() {
	_out=$1
	shift
	busybox time -v "$@" >"$_out" 2>&1 || return 1
	sed -n 's/.*Maximum resident set size (kbytes): *//p' "$_out"
}
