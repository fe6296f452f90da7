#!/usr/bin/env python3
"""Watch one resource's replication state on one marsd (through `marsadm view --json`), for join.sh.

    joinwatch.py state  --marsadm M --control C --resource R
        one line: role disk replication syncOffset syncSize syncBytesSent primary state fetchSource
        ("-" for a field view does not show)
    joinwatch.py members --marsadm M --control C --resource R
        one line: HOST=role/replication/fetchedLSN for every member in view (what gossip brought)
    joinwatch.py mid    --marsadm M --control C --resource R [--lo 0.2] [--hi 0.8] [--timeout T]
                        [--persisted ROOT/resource-R/resource.json]
        polls until syncOffset/syncSize is within [lo, hi] (and, with --persisted, the replica has
        stored a sync offset > 0: marsd checkpoints every 5 s or 256 MiB); prints
        "offset size persisted"; exit 0.
        Exit 1 (with the last state) if the sync ends or the time passes first.
    joinwatch.py follow --marsadm M --control C --resource R [--timeout T] [--samples FILE]
        polls until the replica is UpToDate and Replicating with no sync running (or 5 s after its
        fetch stopped with NeedsSync or Failed and no sync runs); prints
        "first=F min=M last=L maxsent=B samples=N disk=D replication=R" where F, M, L are the first,
        smallest and last syncOffset seen ("-" if none was seen) and B the largest syncBytesSent
        seen (also after the sync), and when (seconds after the start) no sync was seen any more;
        exit 0 once UpToDate and Replicating, 1 otherwise.
"""

import argparse
import json
import subprocess
import sys
import time


def view(a):
    try:
        out = subprocess.run([a.marsadm, "view", "--json", "--control", a.control, "--timeout", "5"],
                             capture_output=True, timeout=10).stdout
        d = json.loads(out)
    except Exception:
        return None
    for r in d.get("resources", []):
        if r.get("name") == a.resource:
            return r
    return None


def fields(r):
    if r is None:
        return {}
    p = r.get("replication") or {}
    return {"role": r.get("role"), "state": r.get("state"), "disk": p.get("disk"),
            "replication": p.get("replication"), "syncOffset": p.get("syncOffset"),
            "syncSize": p.get("syncSize"), "syncBytesSent": p.get("syncBytesSent"),
            "primary": p.get("primary"), "fetchSource": p.get("fetchSource")}


def line(f):
    keys = ["role", "disk", "replication", "syncOffset", "syncSize", "syncBytesSent", "primary", "state", "fetchSource"]
    return " ".join("-" if f.get(k) is None else str(f[k]) for k in keys)


def cmd_state(a):
    print(line(fields(view(a))))


def cmd_members(a):
    r = view(a)
    ms = ((r or {}).get("replication") or {}).get("members") or []
    print(" ".join("%s=%s/%s/%s" % (m.get("host"), m.get("role"), m.get("replication"), m.get("fetchedLSN"))
                   for m in sorted(ms, key=lambda m: m.get("host", ""))) or "-")


def persisted(path):
    """The sync offset stored in a replica's resource.json (0 without one)."""
    try:
        with open(path) as f:
            return int((json.load(f).get("sync") or {}).get("offset") or 0)
    except Exception:
        return 0


def cmd_mid(a):
    deadline = time.monotonic() + a.timeout
    f = {}
    seen_sync = False
    while time.monotonic() < deadline:
        f = fields(view(a))
        off, size = f.get("syncOffset"), f.get("syncSize")
        if off is not None and size:
            seen_sync = True
            if a.lo * size <= off <= a.hi * size and (not a.persisted or persisted(a.persisted) > 0):
                print(off, size, persisted(a.persisted) if a.persisted else "-")
                return 0
            if off > a.hi * size:
                break
        elif seen_sync and f.get("disk") == "UpToDate":
            break
        time.sleep(a.interval)
    print("no syncOffset within [%g, %g] of the size seen%s; last: %s" % (
        a.lo, a.hi, " with a persisted offset > 0" if a.persisted else "", line(f)))
    return 1


def cmd_follow(a):
    deadline = time.monotonic() + a.timeout
    first = low = last = None
    maxsent = None
    n = 0
    f = {}
    stuck = None
    t0 = time.monotonic()
    synced_at = None
    samples = open(a.samples, "a") if a.samples else None
    while time.monotonic() < deadline:
        f = fields(view(a))
        n += 1
        if samples and f:
            samples.write("%.2f %s\n" % (time.monotonic(), line(f)))
            samples.flush()
        sent = f.get("syncBytesSent")
        if sent is not None:
            maxsent = sent if maxsent is None else max(maxsent, sent)
        off = f.get("syncOffset")
        if off is not None:
            synced_at = None
            first = off if first is None else first
            low = off if low is None else min(low, off)
            last = off
        if off is None and f and synced_at is None:
            synced_at = time.monotonic() - t0
        if off is None and f.get("disk") == "UpToDate" and f.get("replication") == "Replicating":
            break
        # A stopped fetch (NeedsSync, Failed) after the sync needs the operator: give up after 5 s.
        if off is None and f.get("replication") in ("NeedsSync", "Failed"):
            stuck = stuck or time.monotonic()
            if time.monotonic() - stuck > 5:
                break
        else:
            stuck = None
        time.sleep(a.interval)
    ok = f.get("disk") == "UpToDate" and f.get("replication") == "Replicating"
    print("first=%s min=%s last=%s maxsent=%s samples=%d disk=%s replication=%s sync_ended_after=%s" % (
        "-" if first is None else first, "-" if low is None else low, "-" if last is None else last,
        "-" if maxsent is None else maxsent, n, f.get("disk"), f.get("replication"),
        "-" if synced_at is None else "%.1fs" % synced_at))
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["state", "members", "mid", "follow"])
    ap.add_argument("--marsadm", required=True)
    ap.add_argument("--control", required=True)
    ap.add_argument("--resource", required=True)
    ap.add_argument("--lo", type=float, default=0.2)
    ap.add_argument("--hi", type=float, default=0.8)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--samples")
    ap.add_argument("--persisted", help="mid: also wait until this resource.json holds a sync offset > 0")
    a = ap.parse_args()
    sys.exit({"state": cmd_state, "members": cmd_members, "mid": cmd_mid, "follow": cmd_follow}[a.cmd](a) or 0)


if __name__ == "__main__":
    main()
