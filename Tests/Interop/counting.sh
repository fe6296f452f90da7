#!/usr/bin/env bash
# Tools/test's counting (Tools/testlib/count.sh) against steps with known outcomes: a step that
# only skips is a skip and never a pass, a step that exits non-zero without a FAIL line is a
# failure, and the closing line has the shape CI reads.
set -u
cd "$(dirname "$0")/../.."
LIB=${COUNT_LIB:-Tools/testlib/count.sh}
out=$(bash -c '
source "$1"
step "skips only" bash -c "echo \"SKIP no loop device here\"; exit 0"
step "passes and skips" bash -c "echo PASS a; echo PASS b; echo SKIP c"
step "fails" bash -c "echo PASS a; echo FAIL b; exit 1"
step "dies without a FAIL line" bash -c "echo PASS a; exit 3"
step "silent success" true
step "silent failure" false
summary
' counting "$LIB" 2>&1)
last=$(echo "$out" | tail -1)
expected="5 passed, 3 failed, 2 skipped"
if [ "$last" = "$expected" ]; then
    echo "PASS skips are counted as skips, never as passes ($last)"
else
    echo "FAIL the counting says '$last', expected '$expected'"; echo "$out" | sed 's/^/    /'
fi
if echo "$last" | grep -qE '^[0-9]+ passed, [0-9]+ failed(, [0-9]+ skipped)?$'; then
    echo "PASS the closing line has the shape CI reads"
else
    echo "FAIL the closing line '$last' is not 'N passed, N failed, N skipped'"
fi
