# Shared by the replication test scripts (sourced): PASS/FAIL lines, the processes a script
# started (stopped at exit with its work directory $W), and waiting for a condition.
pids=()
fails=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1"; fails=$((fails + 1)); return 1; }
# check NAME COMMAND...: a PASS or FAIL line; its status is COMMAND's, so 'check ... || explain' works.
check() { if "${@:2}"; then pass "$1"; else fail "$1"; fi; }
eventually() {  # eventually SECONDS COMMAND...: true once COMMAND succeeds within SECONDS
    local until=$((SECONDS + $1)); shift
    while [ $SECONDS -lt $until ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.3; done
    return 1
}
stop_all() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$W"
}
