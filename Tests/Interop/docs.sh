#!/usr/bin/env bash
# The docs say what is true and stand alone: no reference to files a user of the project does not
# have, the invariants in docs/architecture.md, README's counts match the tests, man pages link
# only to pages that exist (and Tools/man --check would catch one that does not), the seqwrite
# ratio says what it compares. PASS/FAIL per check.
set -u
cd "$(dirname "$0")/../.."
T=$(mktemp -d /tmp/marsd-docs.XXXXXX)
trap 'rm -rf "$T"' EXIT
result() { if [ "$2" -eq 0 ]; then echo "PASS $1"; else echo "FAIL $1${3:+: $3}"; fi; }

outside=$(grep -nE '\.\./(shared|[A-Za-z]+/)' README.md BENCHMARKS.md docs/*.md Man/*.8 | head -5)
result "the docs refer to no file outside the project" "$([ -z "$outside" ]; echo $?)" "$outside"

invariants=$(awk '/^## Invariants/ { on = 1; next } /^## / { on = 0 } on && /^[1-7]\. / { n++ } END { print n + 0 }' docs/architecture.md)
result "docs/architecture.md states the seven invariants" "$([ "$invariants" -eq 7 ]; echo $?)" "found $invariants"
grep -qE 'Not yet exercised: 5 ' docs/architecture.md
result "... and says which are not exercised yet (5, fencing)" $?

cases=$(grep -c '^@case(' Tests/Interop/clients/malformed.py)
grep -q "$cases raw-socket" README.md
result "README's count of malformed-input cases is the test's ($cases)" $? "$(grep -oE '[0-9]+ raw-socket' README.md)"

# Where the docs say the epoch is checked, a test must check it.
grep -q 'aRecordOfAnotherEpochIsRefused' docs/architecture.md && grep -q 'func aRecordOfAnotherEpochIsRefused' Tests/LogEngineTests/ReplicaLogTests.swift
result "docs/architecture.md names the test that checks epochs on secondaries" $?

Tools/man --check-links Man >/dev/null
result "man pages link only to pages in Man/" $?
cp Man/*.8 "$T/" && printf '.Sh "SEE ALSO"\n.Xr marsadm.nothing 8\n' >> "$T/marsadm.8"
! Tools/man --check-links "$T" >/dev/null
result "the man page check catches a link to a missing page" $?

row=$(grep -m1 '^| seqwrite-1m-qd8 | 2 GiB of new data' BENCHMARKS.md)  # the logged write path's newest table
echo "$row" | grep -q 'durable in its \*\*log\*\*' && echo "$row" | grep -q 'durable in the \*\*file\*\*'
result "BENCHMARKS.md's seqwrite figure says it compares a durable log with a durable file" $?
