# Deterministic test-data generator shared by the guest (busybox awk) and the
# host (mawk/gawk): both must produce byte-identical output.
# Usage: awk -v seed=SEED -v start=FIRST_LINE -v count=LINES -f pattern.awk
# Every line is exactly 64 bytes (63 characters + "\n"), so line N starts at
# byte offset 64*N of the stream, and a misplaced block is detectable.
BEGIN {
    for (i = start; i < start + count; i++)
        printf "swift-mars %-12.12s line %012d :: abcdefghijklmnopqr\n", seed, i
}
