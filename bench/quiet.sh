# Shared by the bench drivers (source it): waiting for a quiet machine before each timed process.
# busy_frac prints the share of all CPUs used over 1 s (by anyone; the caller runs nothing then);
# wait_quiet waits up to QUIET_WAIT seconds while that share exceeds QUIET_MAX and leaves the last
# reading in BUSY.
busy_frac() {
  local a b
  a=($(head -1 /proc/stat)); sleep 1; b=($(head -1 /proc/stat))
  awk -v u="$(( b[1]+b[2]+b[3]+b[6]+b[7]+b[8] - a[1]-a[2]-a[3]-a[6]-a[7]-a[8] ))" \
      -v t="$(( b[1]+b[2]+b[3]+b[4]+b[5]+b[6]+b[7]+b[8] - a[1]-a[2]-a[3]-a[4]-a[5]-a[6]-a[7]-a[8] ))" \
      'BEGIN{printf "%.2f", (t > 0) ? (u / t) : 0}'
}
BUSY=0
wait_quiet() {
  local waited=0
  BUSY=$(busy_frac)
  while awk -v b="$BUSY" -v m="${QUIET_MAX:-0.10}" 'BEGIN{exit !(b > m)}' && (( waited < ${QUIET_WAIT:-120} )); do
    (( waited == 0 )) && echo "  (machine busy: ${BUSY} of the CPUs used by others; waiting up to ${QUIET_WAIT:-120}s)" >&2
    sleep 4; waited=$((waited + 5)); BUSY=$(busy_frac)
  done
}
