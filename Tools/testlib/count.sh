# Counting for Tools/test (sourced). A step's output lines starting with PASS, FAIL or SKIP (also
# GUEST-PASS, GUEST-FAIL, GUEST-SKIP) are counted; a step that prints none counts once, by its exit
# status. A skip is never a pass: a step that only skips counts as skipped, and one that exits
# non-zero without a FAIL line counts as failed. `summary` prints the closing line
# "N passed, N failed, N skipped" (CI reads "N passed, N failed").
passed=0
failed=0
skipped=0
failures=()
record() {  # record NAME STATUS
    if [ "$2" -eq 0 ]; then passed=$((passed + 1)); echo "PASS $1"; else failed=$((failed + 1)); failures+=("$1"); echo "FAIL $1"; fi
}
step() {  # step NAME COMMAND...
    local name=$1; shift
    local log; log=$(mktemp)
    echo "=== $name"
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    local p f s
    p=$(grep -cE '^(GUEST-)?PASS' "$log" || true)
    f=$(grep -cE '^(GUEST-)?FAIL' "$log" || true)
    s=$(grep -cE '^(GUEST-)?SKIP' "$log" || true)
    passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
    [ "$f" -gt 0 ] && failures+=("$name")
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        record "$name (exit $rc)" 1
    elif [ "$p" -eq 0 ] && [ "$f" -eq 0 ] && [ "$s" -eq 0 ]; then
        record "$name" 0
    fi
    rm -f "$log"
}
summary() {
    if [ "$failed" -gt 0 ]; then
        echo "failed: ${failures[*]}"
    fi
    echo "$passed passed, $failed failed, $skipped skipped"
}
