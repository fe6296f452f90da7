#!/usr/bin/python3
"""Client side of the kill -9 crash test (crash.sh).

  crash_client.py work URI STATE SEED    write until the connection breaks (marsd is killed)
  crash_client.py verify URI STATE       after the restart: check the device

Every write carries its sequence number in every 512-byte sector, so the verifier can tell which
write each sector holds. Writes are issued one at a time (queue depth 1), so the order of issue
is the order of the log. STATE (JSON) keeps the history: every issued write, the sequence number
up to which writes are known durable (FUA acknowledged, or acknowledged before a FLUSH that
completed), and the sector map the verifier accepted last.

verify checks invariants 1 and 2 from the outside: the device must equal the replay of a prefix
of the issued writes (no torn write, no older data over newer, nothing out of order), and that
prefix must include every write acknowledged as durable.
"""
import json
import os
import random
import struct
import sys

import nbd

SECTOR = 512
REGION_SECTORS = 4096          # 2 MiB of the export is exercised
MAX_WRITE_SECTORS = 64         # up to 32 KiB per write


def load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"writes": [], "durable": 0, "sectors": [0] * REGION_SECTORS, "cycles": 0}


def save(path, state):
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(path + ".tmp", path)


def payload(seq, sectors):
    return b"".join(struct.pack("<QQ", seq, seq ^ 0x5A5A5A5A5A5A5A5A) * (SECTOR // 16) for _ in range(sectors))


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def work(uri, path, seed):
    state = load(path)
    rng = random.Random(seed)
    h = connect(uri)
    seq = state["writes"][-1][0] if state["writes"] else 0
    acknowledged = seq  # every write before this one was acknowledged
    try:
        while True:
            seq += 1
            first = rng.randrange(REGION_SECTORS)
            count = min(rng.randint(1, MAX_WRITE_SECTORS), REGION_SECTORS - first)
            fua = rng.random() < 0.3
            state["writes"].append([seq, first, count])
            h.pwrite(payload(seq, count), first * SECTOR, nbd.CMD_FLAG_FUA if fua else 0)
            acknowledged = seq
            if fua:
                state["durable"] = seq
            if rng.random() < 0.1:
                h.flush()
                state["durable"] = acknowledged
    except nbd.Error:
        pass  # marsd was killed: the write in flight may or may not have happened
    finally:
        save(path, state)
    return 0


def verify(uri, path):
    state = load(path)
    h = connect(uri)
    data = h.pread(REGION_SECTORS * SECTOR, 0)
    found = []
    for index in range(REGION_SECTORS):
        seq, check = struct.unpack_from("<QQ", data, index * SECTOR)
        sector = data[index * SECTOR:(index + 1) * SECTOR]
        if seq == 0 and check == 0 and sector == bytes(SECTOR):
            found.append(0)
        elif check == seq ^ 0x5A5A5A5A5A5A5A5A and sector == struct.pack("<QQ", seq, check) * (SECTOR // 16):
            found.append(seq)
        else:
            print(f"FAIL sector {index} holds bytes no write wrote (torn or foreign data)")
            return 1
    # Replay the writes issued since the last verified state, in order; some prefix must match.
    expected = list(state["sectors"])
    base = state.get("verified", 0)
    pending = [w for w in state["writes"] if w[0] > base]
    cut = None
    if expected == found and state["durable"] <= base:
        cut = base
    for seq, first, count in pending:
        for s in range(first, first + count):
            expected[s] = seq
        if seq >= state["durable"] and expected == found:
            cut = seq
    if cut is None:
        print(f"FAIL the device is no replay of a prefix of the log that holds every durable write "
              f"(durable through {state['durable']}, last issued {pending[-1][0] if pending else base})")
        return 1
    lost = len([w for w in pending if w[0] > cut])
    # Writes after the cut never happened in this history: forget them.
    state["writes"] = [w for w in state["writes"] if w[0] <= cut]
    state["sectors"] = found
    state["verified"] = cut
    state["durable"] = cut
    state["cycles"] += 1
    save(path, state)
    print(f"PASS cycle {state['cycles']}: device = replay of writes 1..{cut} "
          f"({len(pending) - lost} new writes kept, {lost} unacknowledged-as-durable lost)")
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "work":
        sys.exit(work(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    sys.exit(verify(sys.argv[2], sys.argv[3]))
