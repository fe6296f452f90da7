#!/usr/bin/python3
"""Replication against its targets (issue 16), medians over interleaved rounds.

Five marsd "hosts" on loopback in two clusters: alpha (primary) and beta (secondary) talk directly;
wan-a (primary) and wan-b (secondary) talk through Tools/faultproxy.py set to 100 ms RTT (50 ms
each way) and 100 Mbit/s (12,500,000 bytes/s each way). alpha serves three resources: `repl`
(beta replicates it), `solo` (no secondary: the same host's write path alone) and `big` (4 GiB of
random data; beta joins and leaves it for the sync jobs).

  replay-1m       beta's replay of a backlog of --seq-gib of 1 MiB sequential writes (pause-replay,   >= 0.9
                  write, wait until fetched, resume-replay, time until replayedLSN reaches alpha's
                  durableLSN) vs alpha's logged 1M sequential write rate on `solo` (same size, fio
                  nbd qd8 --end_fsync=1), in the same round
  fetch-cpu-4k    alpha's CPU per 4 KiB random write (fio nbd qd32, --runtime s) on `repl` with beta  <= 1.15
                  fetching and replaying vs on `solo`; each run counts until beta has fetched all;
                  then `solo` again at the rate `repl` reached (fio --rate_iops): the same workload
                  with and without the fetch service, since CPU per request depends on the rate
                  (group commits batch more at higher rates)
  lag-4k          beta's view every 100 ms (replication.lagBytes, lagSeconds) under 4 KiB random     (report)
                  writes at --lag-iops (fio --rate_iops) for --lag-seconds; p50/p99; and the same lag
                  measured from outside: alpha's durableLSN sampled every 20 ms against beta's
                  replayedLSN (bytes behind, and age of the oldest durable write beta has not replayed)
  wan-fetch       through the proxy: pause-fetch on wan-b, --wan-mib of 1M writes, resume-fetch;     >= 0.9
                  fetch throughput (fetchedLSN over time, and the proxy's bytes_down) / 12.5 MB/s;
                  then lag under 4 KiB writes at --wan-lag-iops through the same link
  sync-4g         beta joins `big` (--sync-gib of random data) with an empty sparse device: time to  >= 0.8
                  UpToDate vs nbdcopy of the same export over TCP loopback into a new local file
                  (plain, and with --flush as a second view); interleaved
  rejoin          beta leaves `big` and joins it again with the device it just synced (identical):   < 1%
                  max syncBytesSent / device size
  rss             VmHWM of every marsd after every phase                                               < 256 MiB

CPU is utime+stime of all threads of each marsd from /proc/PID/stat. Usage:

  replbench.py [--rounds N] [--quick] [--seq-gib G] [--runtime S] [--lag-iops N] [--lag-seconds S]
               [--wan-mib M] [--sync-gib G] [--jobs replay,fetch-cpu,lag,wan,sync] [--dir DIR] [--json FILE]
"""
import argparse
import json
import os
import hashlib
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MiB, GiB = 1 << 20, 1 << 30
HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.dirname(HERE)
TICK = os.sysconf("SC_CLK_TCK")
LINK_RATE = 12_500_000  # bytes/s each way: 100 Mbit/s
LINK_DELAY_MS = 50  # each way: 100 ms RTT


def log(msg):
    print(f"[replbench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values, p):
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


def med(values):
    return statistics.median(values) if values else float("nan")


def machine_ticks():
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal, idle + iowait


class Host:
    """One marsd with a peer port, a Unix NBD socket and a control socket."""

    def __init__(self, bin_dir, work, name, peer, advertise=None, tcp=None):
        self.name = name
        self.bin_dir = bin_dir
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        self.peer = peer
        self.ctl = os.path.join(self.dir, "ctl.sock")
        self.sock = os.path.join(self.dir, "nbd.sock")
        argv = [os.path.join(bin_dir, "marsd"), "serve", "--root", os.path.join(self.dir, "root"), "--unix", self.sock,
                "--control", self.ctl, "--peer", peer, "--log-level", "notice"]
        if advertise:
            argv += ["--peer-advertise", advertise]
        if tcp:
            argv += ["--tcp", tcp]
        self.tcp = tcp
        self.logpath = os.path.join(work, f"{name}.log")
        self.logf = open(self.logpath, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT)
        for _ in range(300):
            if os.path.exists(self.ctl):
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        else:
            pass
        if not os.path.exists(self.ctl):
            raise SystemExit(f"marsd {name} did not start; see {self.logpath}")

    def uri(self, resource):
        return f"nbd+unix:///{resource}?socket={self.sock}"

    def adm(self, *args, check=True, timeout=600):
        argv = [os.path.join(self.bin_dir, "marsadm"), *args, "--control", self.ctl, "--json"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        try:
            reply = json.loads(out.stdout) if out.stdout.strip() else {}
        except json.JSONDecodeError:
            reply = {"error": out.stdout}
        if check and out.returncode != 0:
            raise RuntimeError(f"{self.name}: marsadm {' '.join(args)}: {reply.get('error') or out.stderr or out.stdout}")
        return reply

    def view(self):
        """marsd's status straight from the control socket (what `marsadm view --json` prints)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        try:
            s.connect(self.ctl)
            s.sendall(b'{"command":"view"}\n')
            buf = bytearray()
            while b"\n" not in buf:
                d = s.recv(1 << 16)
                if not d:
                    break
                buf += d
        finally:
            s.close()
        return json.loads(bytes(buf).split(b"\n", 1)[0])["status"]

    def res(self, name):
        for r in self.view().get("resources", []):
            if r["name"] == name:
                return r
        return None

    def cpu(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def hwm_mib(self, key="VmHWM:"):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        return 0.0

    def rss_mib(self):
        return self.hwm_mib("VmRSS:")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                log(f"marsd {self.name} did not stop in 120 s after SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait()


class Proxy:
    def __init__(self, work, listen, target):
        self.ctl = os.path.join(work, "proxy.sock")
        self.logf = open(os.path.join(work, "proxy.log"), "wb")
        self.proc = subprocess.Popen(["/usr/bin/python3", os.path.join(TOOLS, "faultproxy.py"), "--listen", listen,
                                      "--target", target, "--control", self.ctl], stdout=self.logf, stderr=subprocess.STDOUT)
        for _ in range(100):
            if os.path.exists(self.ctl):
                return
            time.sleep(0.05)
        raise SystemExit("faultproxy did not start")

    def send(self, command):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(self.ctl)
            s.sendall(command.encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                d = s.recv(4096)
                if not d:
                    break
                buf += d
        finally:
            s.close()
        reply = buf.decode().strip()
        if not reply.startswith("ok"):
            raise RuntimeError(f"faultproxy {command}: {reply}")
        return reply

    def stats(self):
        return {k: v for k, v in (w.split("=", 1) for w in self.send("stats").split()[1:])}

    def cpu(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def fio(uri, rw, bs, qd, size=None, runtime=None, rate_iops=None, end_fsync=False, region="2g"):
    argv = ["fio", "--name=j", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--output-format=json",
            "--ioengine=nbd", f"--uri={uri}", "--randrepeat=0", "--norandommap"]
    if runtime:
        argv += [f"--size={region}", "--time_based", f"--runtime={runtime}"]
    else:
        argv += [f"--size={size}"]
    if rate_iops:
        argv += [f"--rate_iops={rate_iops}"]
    if end_fsync:
        argv += ["--end_fsync=1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {' '.join(argv)}\n{out.stderr}")
    text = out.stdout
    job = json.loads(text[text.index("{"):])["jobs"][0]
    w = job["write"]
    return dict(iops=w["iops"], mibs=w["bw_bytes"] / MiB, ios=w["total_ios"], bytes=w["io_bytes"],
                seconds=job["job_runtime"] / 1000, lat_p99_us=w["clat_ns"]["percentile"].get("99.000000", 0) / 1000)


def wait_until(what, predicate, timeout, interval=0.02):
    t_end = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > t_end:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def lsn(host, resource, key):
    r = host.res(resource)
    if key == "durableLSN":
        return r["log"]["durableLSN"]
    return r["replication"].get(key) or 0


class Sampler(threading.Thread):
    """Calls `probe` every `interval` seconds until stopped; keeps (monotonic time, value)."""

    def __init__(self, probe, interval):
        super().__init__(daemon=True)
        self.probe, self.interval = probe, interval
        self.samples = []
        self.stopping = threading.Event()
        self.error = None

    def run(self):
        nxt = time.monotonic()
        while not self.stopping.is_set():
            try:
                t0 = time.monotonic()
                value = self.probe()
                self.samples.append(((t0 + time.monotonic()) / 2, value))
            except Exception as e:  # keep sampling; report the first error
                self.error = self.error or e
            nxt += self.interval
            time.sleep(max(0.0, nxt - time.monotonic()))

    def stop(self):
        self.stopping.set()
        self.join()
        return self.samples


def join_resource(host, name, device, timeout=30):
    """join-resource, retried while the gossip has not brought the resource yet."""
    t_end = time.monotonic() + timeout
    while True:
        reply = host.adm("join-resource", name, device, check=False)
        if not reply.get("error"):
            return
        if "has no resource" not in reply["error"] or time.monotonic() > t_end:
            raise RuntimeError(f"{host.name}: join-resource {name}: {reply['error']}")
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# Jobs


def job_replay(a, alpha, beta, rnd):
    """Returns (solo write MiB/s, replay MiB/s, details)."""
    size = f"{int(a.seq_gib * 1024)}m"
    nbytes = int(a.seq_gib * GiB)
    out = {}

    # Each timed phase starts with alpha's writeback done and no dirty pages: otherwise the phase
    # after the other one's 2 GiB competed with writing them back (round 1's replay ran at a third
    # of round 2's, in both orders of the code before and after session 13).
    def settle():
        for name in ("solo", "repl"):
            wait_until(f"alpha to write {name} back", lambda: alpha.res(name)["log"]["writebackLSN"] >= lsn(alpha, name, "durableLSN"), 600)
        os.sync()

    def solo():
        settle()
        c0 = alpha.cpu()
        r = fio(alpha.uri("solo"), "write", "1m", 8, size=size, end_fsync=True)
        out["solo_mibs"] = r["mibs"]
        out["solo_alpha_ms_per_gib"] = (alpha.cpu() - c0) * 1000 / a.seq_gib

    def backlog():
        beta.adm("pause-replay", "repl")
        replayed0 = lsn(beta, "repl", "replayedLSN")
        settle()
        ca0, cb0 = alpha.cpu(), beta.cpu()
        t0 = time.monotonic()
        r = fio(alpha.uri("repl"), "write", "1m", 8, size=size, end_fsync=True)
        t_written = time.monotonic()
        durable = lsn(alpha, "repl", "durableLSN")
        wait_until("beta to fetch the backlog", lambda: lsn(beta, "repl", "fetchedLSN") >= durable, 600)
        t_fetched = time.monotonic()
        ca1, cb1 = alpha.cpu(), beta.cpu()
        out["repl_write_mibs"] = r["mibs"]
        out["fetch_done_after_write_s"] = t_fetched - t_written
        out["fetch_mibs"] = nbytes / MiB / (t_fetched - t0)
        out["backlog_alpha_ms_per_gib"] = (ca1 - ca0) * 1000 / a.seq_gib
        out["fetch_beta_ms_per_gib"] = (cb1 - cb0) * 1000 / a.seq_gib
        # The backlog is local now; replay it.
        settle()
        start_lsn = lsn(beta, "repl", "replayedLSN")
        cb2 = beta.cpu()
        t1 = time.monotonic()
        beta.adm("resume-replay", "repl")
        wait_until("beta to replay the backlog", lambda: lsn(beta, "repl", "replayedLSN") >= durable, 900, 0.01)
        t2 = time.monotonic()
        out["replay_seconds"] = t2 - t1
        out["replay_log_bytes"] = durable - start_lsn
        out["replay_mibs"] = nbytes / MiB / (t2 - t1)
        out["replay_beta_ms_per_gib"] = (beta.cpu() - cb2) * 1000 / a.seq_gib
        out["replayed_before_pause"] = replayed0

    order = [solo, backlog] if rnd % 2 else [backlog, solo]
    for f in order:
        f()
    return out


def settle_fetch(alpha, beta, name, timeout=300):
    durable = lsn(alpha, name, "durableLSN")
    wait_until(f"beta to fetch {name}", lambda: lsn(beta, name, "fetchedLSN") >= durable, timeout, 0.01)
    return durable


def job_fetch_cpu(a, alpha, beta, rnd):
    out = {}

    def run(name, rated=False):
        ca0, cb0, (busy0, idle0) = alpha.cpu(), beta.cpu(), machine_ticks()
        r = fio(alpha.uri(name), "randwrite", "4k", 32, runtime=a.runtime, rate_iops=a.cpu_iops if rated else None)
        if rated:
            durable = settle_fetch(alpha, beta, "repl") if name == "repl" else None
            out[f"{name}_rated_iops"] = r["iops"]
            out[f"{name}_rated_alpha_us"] = (alpha.cpu() - ca0) * 1e6 / r["ios"]
            if durable:
                wait_until("beta to replay", lambda: lsn(beta, "repl", "replayedLSN") >= durable, 600, 0.02)
                out["repl_rated_beta_us"] = (beta.cpu() - cb0) * 1e6 / r["ios"]
            return
        if name == "repl":
            settle_t0 = time.monotonic()
            durable = settle_fetch(alpha, beta, "repl")
            out["repl_settle_s"] = time.monotonic() - settle_t0
        ca1, (busy1, idle1) = alpha.cpu(), machine_ticks()
        out[f"{name}_iops"] = r["iops"]
        out[f"{name}_alpha_us"] = (ca1 - ca0) * 1e6 / r["ios"]
        out[f"{name}_machine_us"] = (busy1 - busy0) / TICK * 1e6 / r["ios"]
        out[f"{name}_idle"] = (idle1 - idle0) / ((busy1 - busy0) + (idle1 - idle0))
        if name == "repl":
            t0 = time.monotonic()
            wait_until("beta to replay", lambda: lsn(beta, "repl", "replayedLSN") >= durable, 600, 0.02)
            out["repl_replay_tail_s"] = time.monotonic() - t0
            out["repl_beta_us"] = (beta.cpu() - cb0) * 1e6 / r["ios"]
        else:
            out["solo_beta_us"] = (beta.cpu() - cb0) * 1e6 / r["ios"]

    def matched():
        """`solo` at the rate `repl` reached at full speed: the CPU per request of the same
        workload with and without the fetch service (group commits batch alike at equal rates)."""
        iops = int(out["repl_iops"])
        ca0 = alpha.cpu()
        r = fio(alpha.uri("solo"), "randwrite", "4k", 32, runtime=a.runtime, rate_iops=iops)
        out["solo_matched_iops"] = r["iops"]
        out["solo_matched_alpha_us"] = (alpha.cpu() - ca0) * 1e6 / r["ios"]

    for name in (["solo", "repl"] if rnd % 2 else ["repl", "solo"]):
        run(name)
    matched()
    if a.cpu_iops:
        for name in (["repl", "solo"] if rnd % 2 else ["solo", "repl"]):
            run(name, rated=True)
    return out


def lag_run(primary, secondary, name, seconds, iops, prim_interval=0.02):
    """fio 4 KiB random writes at `iops` for `seconds`; the secondary's view every 100 ms and the
    primary's durable end every 20 ms. Returns the view's lag samples and the outside measurement."""
    prim = Sampler(lambda: primary.res(name)["log"]["durableLSN"], prim_interval)
    sec = Sampler(lambda: secondary.res(name)["replication"], 0.1)
    prim.start()
    sec.start()
    time.sleep(0.5)
    r = fio(primary.uri(name), "randwrite", "4k", 32, runtime=seconds, rate_iops=iops)
    time.sleep(0.3)
    ps, ss = prim.stop(), sec.stop()
    if prim.error or sec.error:
        raise RuntimeError(f"sampling failed: {prim.error or sec.error}")
    # Steady part only: from 1 s after the start to the end of fio's run.
    t_start = ss[0][0] + 1.5
    t_stop = ss[0][0] + 0.5 + seconds
    view_bytes, view_secs, true_bytes, true_secs = [], [], [], []
    pi = 0
    for t, rep in ss:
        if not (t_start <= t <= t_stop):
            continue
        view_bytes.append(rep.get("lagBytes") or 0)
        view_secs.append(rep.get("lagSeconds") or 0.0)
        replayed = rep.get("replayedLSN") or 0
        # The primary's durable end at t (last sample at or before t).
        while pi + 1 < len(ps) and ps[pi + 1][0] <= t:
            pi += 1
        true_bytes.append(max(0, ps[pi][1] - replayed))
        # Age of the oldest durable write not replayed: when the primary's durable end passed
        # `replayed`, interpolated between the two primary samples around that moment.
        i = next((k for k, (_, d) in enumerate(ps) if d > replayed), None)
        if i is None or ps[i][0] > t:
            true_secs.append(0.0)
        elif i == 0:
            true_secs.append(t - ps[0][0])
        else:
            (ta, da), (tb, db) = ps[i - 1], ps[i]
            passed = ta + (replayed - da) / (db - da) * (tb - ta)
            true_secs.append(max(0.0, t - passed))
    return dict(iops=r["iops"], view_bytes=view_bytes, view_secs=view_secs, true_bytes=true_bytes, true_secs=true_secs)


def job_lag(a, alpha, beta, rnd):
    return lag_run(alpha, beta, "repl", a.lag_seconds, a.lag_iops)


def job_wan(a, wa, wb, proxy, rnd):
    out = {}
    proxy.send("reset")
    proxy.send(f"delay {LINK_DELAY_MS}")
    proxy.send(f"throttle {LINK_RATE}")
    wb.adm("pause-fetch", "wan")
    r = fio(wa.uri("wan"), "write", "1m", 8, size=f"{a.wan_mib}m", end_fsync=True)
    durable = lsn(wa, "wan", "durableLSN")
    f0 = lsn(wb, "wan", "fetchedLSN")
    backlog = durable - f0
    st0 = proxy.stats()
    ca0, cb0, cp0 = wa.cpu(), wb.cpu(), proxy.cpu()

    def probe():
        rep = wb.res("wan")["replication"]
        st = proxy.stats()
        return dict(fetched=rep.get("fetchedLSN") or 0, replayed=rep.get("replayedLSN") or 0, lag_bytes=rep.get("lagBytes") or 0,
                    lag_secs=rep.get("lagSeconds") or 0.0, down=int(st["bytes_down"]), up=int(st["bytes_up"]),
                    buffered_down=int(st["buffered_down"]), state=rep.get("replication"))

    s = Sampler(probe, 0.1)
    t0 = time.monotonic()
    wb.adm("resume-fetch", "wan")
    s.start()
    expected = backlog / LINK_RATE
    try:
        wait_until("wan-b to fetch the backlog", lambda: lsn(wb, "wan", "fetchedLSN") >= durable, expected * 3 + 60, 0.05)
    finally:
        samples = s.stop()
    t1 = time.monotonic()
    st1 = proxy.stats()
    out["backlog_bytes"] = backlog
    out["write_mibs"] = r["mibs"]
    out["seconds"] = t1 - t0
    out["fetch_Bps"] = backlog / (t1 - t0)
    out["proxy_down_Bps"] = (int(st1["bytes_down"]) - int(st0["bytes_down"])) / (t1 - t0)
    out["proxy_up_bytes"] = int(st1["bytes_up"]) - int(st0["bytes_up"])
    out["wan_a_ms_per_mib"] = (wa.cpu() - ca0) * 1000 / (backlog / MiB)
    out["wan_b_ms_per_mib"] = (wb.cpu() - cb0) * 1000 / (backlog / MiB)
    out["proxy_cpu_s"] = proxy.cpu() - cp0
    # Steady rate: from 10% to 90% of the backlog fetched.
    def first_at(frac):
        goal = f0 + frac * backlog
        return next(((t, v) for t, v in samples if v["fetched"] >= goal), None)
    p10, p90 = first_at(0.1), first_at(0.9)
    if p10 and p90 and p90[0] > p10[0]:
        out["steady_fetch_Bps"] = (p90[1]["fetched"] - p10[1]["fetched"]) / (p90[0] - p10[0])
        out["steady_down_Bps"] = (p90[1]["down"] - p10[1]["down"]) / (p90[0] - p10[0])
    first_byte = next((t for t, v in samples if v["fetched"] > f0), None)
    out["first_byte_s"] = (first_byte - t0) if first_byte else None
    out["lag_bytes_max"] = max((v["lag_bytes"] for _, v in samples), default=0)
    out["lag_secs_max"] = max((v["lag_secs"] for _, v in samples), default=0)
    out["buffered_down_p50"] = med([v["buffered_down"] for _, v in samples])
    # A per-second fetch profile, for the report.
    prof = []
    for t, v in samples:
        if not prof or t - prof[-1][0] >= 1.0:
            prof.append((t, v["fetched"], v["down"]))
    out["per_second_MBps"] = [round((b[1] - a_[1]) / (b[0] - a_[0]) / 1e6, 2) for a_, b in zip(prof, prof[1:])]
    # Lag through the link under a steady 4 KiB write rate below its capacity.
    wait_until("wan-b to replay", lambda: lsn(wb, "wan", "replayedLSN") >= durable, 300, 0.05)
    lag = lag_run(wa, wb, "wan", a.lag_seconds, a.wan_lag_iops)
    out["lag"] = lag
    proxy.send("reset")
    return out


def nbdcopy(src, dst, flush):
    if os.path.exists(dst):
        os.unlink(dst)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    argv = ["nbdcopy", src, dst] + (["--flush"] if flush else [])
    subprocess.run(argv, check=True, timeout=1200)
    dt = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return dt, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def job_sync(a, alpha, beta, work, rnd):
    out = {}
    size = int(a.sync_gib * GiB)
    copy_dst = os.path.join(work, "nbdcopy.img")
    sec_img = os.path.join(beta.dir, "big.img")
    src = f"nbd://{alpha.tcp}/big"

    def copy(flush):
        c0 = alpha.cpu()
        dt, client_cpu = nbdcopy(src, copy_dst, flush)
        key = "nbdcopy_flush" if flush else "nbdcopy"
        out[f"{key}_s"] = dt
        out[f"{key}_mibs"] = size / MiB / dt
        out[f"{key}_alpha_ms_per_gib"] = (alpha.cpu() - c0) * 1000 / a.sync_gib
        out[f"{key}_client_ms_per_gib"] = client_cpu * 1000 / a.sync_gib
        os.unlink(copy_dst)

    def sync():
        if os.path.exists(sec_img):
            os.unlink(sec_img)
        with open(sec_img, "wb") as f:
            f.truncate(size)
        dt, sent, ca, cb = timed_join(alpha, beta, sec_img)
        out["sync_s"] = dt
        out["sync_mibs"] = size / MiB / dt
        out["sync_bytes_sent"] = sent
        out["sync_alpha_ms_per_gib"] = ca * 1000 / a.sync_gib
        out["sync_beta_ms_per_gib"] = cb * 1000 / a.sync_gib
        # Re-join with the identical device.
        beta.adm("leave-resource", "big")
        dt, sent, ca, cb = timed_join(alpha, beta, sec_img)
        out["rejoin_s"] = dt
        out["rejoin_bytes_sent"] = sent
        out["rejoin_fraction"] = sent / size
        out["rejoin_alpha_ms_per_gib"] = ca * 1000 / a.sync_gib
        out["rejoin_beta_ms_per_gib"] = cb * 1000 / a.sync_gib
        beta.adm("leave-resource", "big")

    order = [lambda: copy(False), sync, lambda: copy(True)]
    if rnd % 2 == 0:
        order.reverse()
    for f in order:
        f()
    if os.path.exists(sec_img):
        os.unlink(sec_img)
    return out


def timed_join(alpha, beta, device):
    """join-resource `big` and wait until UpToDate; returns (seconds, max syncBytesSent, CPU s alpha, beta)."""
    ca0, cb0 = alpha.cpu(), beta.cpu()
    t0 = time.monotonic()
    join_resource(beta, "big", device)
    sent = 0
    while True:
        rep = beta.res("big")["replication"]
        sent = max(sent, rep.get("syncBytesSent") or 0)
        if rep["disk"] == "UpToDate" and rep.get("syncOffset") is None:
            break
        if rep["replication"] in ("Failed", "NeedsSync", "SplitBrain"):
            raise RuntimeError(f"sync of big failed: {rep}")
        if time.monotonic() - t0 > 1200:
            raise RuntimeError(f"sync of big did not finish in 1200 s: {rep}")
        time.sleep(0.05)
    dt = time.monotonic() - t0
    return dt, sent, alpha.cpu() - ca0, beta.cpu() - cb0


def make_random_image(path, size):
    """`size` bytes of non-zero random data (AES-CTR keystream; no all-zero 64 KiB chunk)."""
    key = os.urandom(16).hex()
    iv = os.urandom(16).hex()
    with open(path, "wb") as f:
        p1 = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE)
        p2 = subprocess.Popen(["openssl", "enc", "-aes-128-ctr", "-K", key, "-iv", iv, "-nosalt"], stdin=p1.stdout, stdout=f)
        p1.stdout.close()
        if p2.wait() != 0 or p1.wait() != 0:
            raise RuntimeError("openssl could not generate the random image")
    if os.path.getsize(path) != size:
        raise RuntimeError(f"random image has {os.path.getsize(path)} bytes, wanted {size}")


# ----------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 round, small sizes: a smoke run of about 3 minutes")
    p.add_argument("--seq-gib", type=float, default=2.0, help="backlog and solo write size for replay-1m (GiB)")
    p.add_argument("--runtime", type=int, default=8, help="seconds of each 4 KiB qd32 run of fetch-cpu")
    p.add_argument("--cpu-iops", type=int, default=10000,
                   help="fetch-cpu also runs both at this fixed rate (fio --rate_iops), so batching is alike; 0: skip")
    p.add_argument("--lag-iops", type=int, default=5000)
    p.add_argument("--lag-seconds", type=int, default=10)
    p.add_argument("--wan-mib", type=int, default=300)
    p.add_argument("--wan-lag-iops", type=int, default=1000, help="4 KiB writes/s for the lag through the proxy (below its 12.5 MB/s)")
    p.add_argument("--sync-gib", type=float, default=4.0)
    p.add_argument("--jobs", default="replay,fetch-cpu,lag,wan,sync")
    p.add_argument("--marsd", default=os.path.join(HERE, "../../.build/release/marsd"))
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--json")
    a = p.parse_args()
    if a.quick:
        a.rounds, a.seq_gib, a.runtime, a.lag_seconds, a.wan_mib, a.sync_gib = 1, 0.5, 4, 5, 60, 1.0
    jobs = set(a.jobs.split(","))
    unknown = jobs - {"replay", "fetch-cpu", "lag", "wan", "sync"}
    if unknown:
        p.error(f"unknown jobs: {', '.join(sorted(unknown))}")
    work = tempfile.mkdtemp(prefix="replbench.", dir=a.dir)
    # Private copies of the binaries: a rebuild of .build/ during the run must not change them.
    src_dir = os.path.dirname(os.path.abspath(a.marsd))
    bin_dir = os.path.join(work, "bin")
    os.makedirs(bin_dir)
    for tool in ("marsd", "marsadm"):
        shutil.copy2(os.path.join(src_dir, tool), bin_dir)
    with open(os.path.join(bin_dir, "marsd"), "rb") as f:
        marsd_sha = hashlib.sha256(f.read()).hexdigest()[:16]
    marsd_mtime = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(os.path.getmtime(os.path.join(src_dir, "marsd"))))
    log(f"marsd {src_dir}/marsd built {marsd_mtime}, sha256 {marsd_sha}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below
    started = time.time()
    load0 = os.getloadavg()
    hosts, proxy = [], None
    results = {k: [] for k in ("replay", "fetch-cpu", "lag", "wan", "sync")}
    rss = {}

    def note_rss(phase):
        rss[phase] = {h.name: round(h.hwm_mib(), 1) for h in hosts}
        now = {h.name: h.rss_mib() for h in hosts}
        log(f"VmHWM (VmRSS) after {phase}: " + ", ".join(f"{k} {v:.0f} ({now[k]:.0f}) MiB" for k, v in rss[phase].items()))

    try:
        # Loopback addresses and ports of our own, away from the test suite's 127.0.0.2x/3x:17777.
        alpha = Host(bin_dir, work, "alpha", "127.0.0.81:17881", tcp="127.0.0.81:10881")
        beta = Host(bin_dir, work, "beta", "127.0.0.82:17881")
        hosts += [alpha, beta]
        token = alpha.adm("create-cluster", "--host", "alpha")["token"]
        beta.adm("join-cluster", "--host", "beta", "--token", token, alpha.peer)
        devsize = max(int(a.seq_gib * GiB), 2 * GiB)
        for name in ("repl", "solo"):
            for h in (alpha, beta) if name == "repl" else (alpha,):
                # Allocated, as a logical volume is: a sparse file made each round's first writes
                # allocate blocks, which the replay's device syncs wait for and the log does not.
                with open(os.path.join(h.dir, f"{name}.img"), "wb") as f:
                    os.posix_fallocate(f.fileno(), 0, devsize)
            alpha.adm("create-resource", name, os.path.join(alpha.dir, f"{name}.img"))
        join_resource(beta, "repl", os.path.join(beta.dir, "repl.img"))
        beta.adm("wait-resource", "repl", "--timeout", "120")
        if "sync" in jobs:
            log(f"sync: {a.sync_gib:g} GiB of random data for alpha's resource big")
            big = os.path.join(alpha.dir, "big.img")
            make_random_image(big, int(a.sync_gib * GiB))
            alpha.adm("create-resource", "big", big)
        if "wan" in jobs:
            wa = Host(bin_dir, work, "wan-a", "127.0.0.83:17881", advertise="127.0.0.85:17882")
            wb = Host(bin_dir, work, "wan-b", "127.0.0.84:17881")
            hosts += [wa, wb]
            proxy = Proxy(work, "127.0.0.85:17882", "127.0.0.83:17881")
            token = wa.adm("create-cluster", "--host", "wan-a")["token"]
            wb.adm("join-cluster", "--host", "wan-b", "--token", token, "127.0.0.85:17882")
            for h in (wa, wb):
                with open(os.path.join(h.dir, "wan.img"), "wb") as f:
                    f.truncate(max(512 * MiB, a.wan_mib * MiB))
            wa.adm("create-resource", "wan", os.path.join(wa.dir, "wan.img"))
            join_resource(wb, "wan", os.path.join(wb.dir, "wan.img"))
            wb.adm("wait-resource", "wan", "--timeout", "120")
        note_rss("setup")
        for rnd in range(1, a.rounds + 1):
            if "replay" in jobs:
                r = job_replay(a, alpha, beta, rnd)
                results["replay"].append(r)
                log(f"round {rnd}: replay-1m: solo write {r['solo_mibs']:.0f} MiB/s, replay {r['replay_mibs']:.0f} MiB/s "
                    f"({r['replay_seconds']:.2f} s), ratio {r['replay_mibs'] / r['solo_mibs']:.2f}; write with beta fetching "
                    f"{r['repl_write_mibs']:.0f} MiB/s, fetch {r['fetch_mibs']:.0f} MiB/s (done {r['fetch_done_after_write_s']:.2f} s after the write)")
                note_rss(f"replay round {rnd}")
            if "fetch-cpu" in jobs:
                r = job_fetch_cpu(a, alpha, beta, rnd)
                results["fetch-cpu"].append(r)
                log(f"round {rnd}: fetch-cpu-4k: alpha µs/request solo {r['solo_alpha_us']:.2f} ({r['solo_iops'] / 1000:.1f}k IOPS), "
                    f"with beta {r['repl_alpha_us']:.2f} ({r['repl_iops'] / 1000:.1f}k IOPS), ratio {r['repl_alpha_us'] / r['solo_alpha_us']:.2f}; "
                    f"beta {r['repl_beta_us']:.2f} µs/request; machine {r['solo_machine_us']:.2f} / {r['repl_machine_us']:.2f}"
                    + f"; solo at {r['solo_matched_iops'] / 1000:.1f}k/s (the rate with beta) {r['solo_matched_alpha_us']:.2f} (ratio {r['repl_alpha_us'] / r['solo_matched_alpha_us']:.2f})"
                    + (f"; at {a.cpu_iops}/s: solo {r['solo_rated_alpha_us']:.2f}, with beta {r['repl_rated_alpha_us']:.2f} "
                       f"(ratio {r['repl_rated_alpha_us'] / r['solo_rated_alpha_us']:.2f}), beta {r['repl_rated_beta_us']:.2f}" if a.cpu_iops else ""))
                note_rss(f"fetch-cpu round {rnd}")
            if "lag" in jobs:
                r = job_lag(a, alpha, beta, rnd)
                results["lag"].append(r)
                log(f"round {rnd}: lag-4k at {r['iops']:.0f} IOPS: view p50/p99 {pct(r['view_bytes'], 50) / 1024:.0f}/{pct(r['view_bytes'], 99) / 1024:.0f} KiB, "
                    f"{pct(r['view_secs'], 50) * 1000:.0f}/{pct(r['view_secs'], 99) * 1000:.0f} ms; outside "
                    f"{pct(r['true_bytes'], 50) / 1024:.0f}/{pct(r['true_bytes'], 99) / 1024:.0f} KiB, "
                    f"{pct(r['true_secs'], 50) * 1000:.0f}/{pct(r['true_secs'], 99) * 1000:.0f} ms")
            if "wan" in jobs:
                r = job_wan(a, wa, wb, proxy, rnd)
                results["wan"].append(r)
                log(f"round {rnd}: wan-fetch: {r['backlog_bytes'] / MiB:.0f} MiB in {r['seconds']:.1f} s = {r['fetch_Bps'] / 1e6:.2f} MB/s "
                    f"({r['fetch_Bps'] / LINK_RATE:.2f} of the link), steady {r.get('steady_fetch_Bps', 0) / 1e6:.2f} MB/s, proxy down "
                    f"{r['proxy_down_Bps'] / 1e6:.2f} MB/s; first byte after {r['first_byte_s']:.2f} s; per second {r['per_second_MBps']}")
                lg = r["lag"]
                log(f"round {rnd}: wan lag at {lg['iops']:.0f} IOPS: view p50/p99 {pct(lg['view_bytes'], 50) / 1024:.0f}/{pct(lg['view_bytes'], 99) / 1024:.0f} KiB, "
                    f"{pct(lg['view_secs'], 50) * 1000:.0f}/{pct(lg['view_secs'], 99) * 1000:.0f} ms; outside "
                    f"{pct(lg['true_bytes'], 50) / 1024:.0f}/{pct(lg['true_bytes'], 99) / 1024:.0f} KiB, "
                    f"{pct(lg['true_secs'], 50) * 1000:.0f}/{pct(lg['true_secs'], 99) * 1000:.0f} ms")
                note_rss(f"wan round {rnd}")
            if "sync" in jobs:
                r = job_sync(a, alpha, beta, work, rnd)
                results["sync"].append(r)
                log(f"round {rnd}: sync: {r['sync_mibs']:.0f} MiB/s ({r['sync_s']:.1f} s) vs nbdcopy {r['nbdcopy_mibs']:.0f} MiB/s "
                    f"(--flush {r['nbdcopy_flush_mibs']:.0f}), ratio {r['sync_mibs'] / r['nbdcopy_mibs']:.2f}; rejoin {r['rejoin_s']:.1f} s, "
                    f"sent {r['rejoin_bytes_sent']} bytes ({100 * r['rejoin_fraction']:.3f}%)")
                note_rss(f"sync round {rnd}")
        for h in hosts:
            h.stop()
        if proxy:
            proxy.stop()
    finally:
        for h in hosts:
            if h.proc.poll() is None:
                h.proc.kill()
        if proxy and proxy.proc.poll() is None:
            proxy.proc.kill()
        if os.environ.get("REPLBENCH_KEEP"):
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    summary = summarize(a, results, rss)
    summary["meta"] = dict(date=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)), wall_s=round(time.time() - started),
                           load_start=load0, load_end=os.getloadavg(), argv=sys.argv[1:], rounds=a.rounds,
                           marsd_built=marsd_mtime, marsd_sha256=marsd_sha)
    print_summary(summary)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(summary=summary, raw=results, rss=rss), f, indent=1)


def summarize(a, results, rss):
    s = {}
    rp = results["replay"]
    if rp:
        solo, replay = [r["solo_mibs"] for r in rp], [r["replay_mibs"] for r in rp]
        s["replay-1m"] = dict(replay_mibs=med(replay), solo_mibs=med(solo), ratio=med([r["replay_mibs"] / r["solo_mibs"] for r in rp]),
                              per_round=[(round(x), round(y)) for x, y in zip(replay, solo)],
                              repl_write_mibs=med([r["repl_write_mibs"] for r in rp]), fetch_mibs=med([r["fetch_mibs"] for r in rp]),
                              solo_alpha_ms_per_gib=med([r["solo_alpha_ms_per_gib"] for r in rp]),
                              backlog_alpha_ms_per_gib=med([r["backlog_alpha_ms_per_gib"] for r in rp]),
                              fetch_beta_ms_per_gib=med([r["fetch_beta_ms_per_gib"] for r in rp]),
                              replay_beta_ms_per_gib=med([r["replay_beta_ms_per_gib"] for r in rp]), target=">= 0.9")
    fc = results["fetch-cpu"]
    if fc:
        s["fetch-cpu-4k"] = dict(repl_alpha_us=med([r["repl_alpha_us"] for r in fc]), solo_alpha_us=med([r["solo_alpha_us"] for r in fc]),
                                 ratio=med([r["repl_alpha_us"] / r["solo_alpha_us"] for r in fc]),
                                 per_round=[(round(r["repl_alpha_us"], 2), round(r["solo_alpha_us"], 2)) for r in fc],
                                 repl_iops=med([r["repl_iops"] for r in fc]), solo_iops=med([r["solo_iops"] for r in fc]),
                                 repl_beta_us=med([r["repl_beta_us"] for r in fc]),
                                 repl_machine_us=med([r["repl_machine_us"] for r in fc]), solo_machine_us=med([r["solo_machine_us"] for r in fc]),
                                 repl_idle=med([r["repl_idle"] for r in fc]), solo_idle=med([r["solo_idle"] for r in fc]),
                                 settle_s=med([r["repl_settle_s"] for r in fc]), replay_tail_s=med([r["repl_replay_tail_s"] for r in fc]),
                                 target="<= 1.15")
        s["fetch-cpu-4k-matched"] = dict(iops=med([r["solo_matched_iops"] for r in fc]), repl_alpha_us=s["fetch-cpu-4k"]["repl_alpha_us"],
                                         solo_alpha_us=med([r["solo_matched_alpha_us"] for r in fc]),
                                         ratio=med([r["repl_alpha_us"] / r["solo_matched_alpha_us"] for r in fc]),
                                         per_round=[(round(r["repl_alpha_us"], 2), round(r["solo_matched_alpha_us"], 2)) for r in fc],
                                         target="<= 1.15")
        if "repl_rated_alpha_us" in fc[0]:
            s["fetch-cpu-4k-rated"] = dict(iops=a.cpu_iops, repl_alpha_us=med([r["repl_rated_alpha_us"] for r in fc]),
                                           solo_alpha_us=med([r["solo_rated_alpha_us"] for r in fc]),
                                           ratio=med([r["repl_rated_alpha_us"] / r["solo_rated_alpha_us"] for r in fc]),
                                           per_round=[(round(r["repl_rated_alpha_us"], 2), round(r["solo_rated_alpha_us"], 2)) for r in fc],
                                           repl_beta_us=med([r["repl_rated_beta_us"] for r in fc]), target="<= 1.15")
    lg = results["lag"]
    if lg:
        def agg(key, rs):
            vals = [v for r in rs for v in r[key]]
            return dict(p50=pct(vals, 50), p99=pct(vals, 99), max=max(vals) if vals else None, n=len(vals))
        s["lag-4k"] = {k: agg(k, lg) for k in ("view_bytes", "view_secs", "true_bytes", "true_secs")}
        s["lag-4k"]["iops"] = med([r["iops"] for r in lg])
    wn = results["wan"]
    if wn:
        s["wan-fetch"] = dict(fetch_Bps=med([r["fetch_Bps"] for r in wn]), steady_fetch_Bps=med([r.get("steady_fetch_Bps", 0) for r in wn]),
                              proxy_down_Bps=med([r["proxy_down_Bps"] for r in wn]),
                              fraction=med([r["fetch_Bps"] / LINK_RATE for r in wn]),
                              steady_fraction=med([r.get("steady_fetch_Bps", 0) / LINK_RATE for r in wn]),
                              first_byte_s=med([r["first_byte_s"] or 0 for r in wn]),
                              per_round=[round(r["fetch_Bps"] / 1e6, 2) for r in wn], target=">= 0.9",
                              wan_a_ms_per_mib=med([r["wan_a_ms_per_mib"] for r in wn]), wan_b_ms_per_mib=med([r["wan_b_ms_per_mib"] for r in wn]))
        lags = [r["lag"] for r in wn]
        s["wan-lag"] = {k: dict(p50=pct([v for r in lags for v in r[k]], 50), p99=pct([v for r in lags for v in r[k]], 99))
                        for k in ("view_bytes", "view_secs", "true_bytes", "true_secs")}
        s["wan-lag"]["iops"] = med([r["iops"] for r in lags])
    sy = results["sync"]
    if sy:
        s["sync"] = dict(sync_mibs=med([r["sync_mibs"] for r in sy]), nbdcopy_mibs=med([r["nbdcopy_mibs"] for r in sy]),
                         nbdcopy_flush_mibs=med([r["nbdcopy_flush_mibs"] for r in sy]),
                         ratio=med([r["sync_mibs"] / r["nbdcopy_mibs"] for r in sy]),
                         ratio_flush=med([r["sync_mibs"] / r["nbdcopy_flush_mibs"] for r in sy]),
                         per_round=[(round(r["sync_mibs"]), round(r["nbdcopy_mibs"]), round(r["nbdcopy_flush_mibs"])) for r in sy],
                         sync_alpha_ms_per_gib=med([r["sync_alpha_ms_per_gib"] for r in sy]),
                         sync_beta_ms_per_gib=med([r["sync_beta_ms_per_gib"] for r in sy]),
                         nbdcopy_alpha_ms_per_gib=med([r["nbdcopy_alpha_ms_per_gib"] for r in sy]),
                         nbdcopy_client_ms_per_gib=med([r["nbdcopy_client_ms_per_gib"] for r in sy]),
                         target=">= 0.8")
        s["rejoin"] = dict(max_fraction=max(r["rejoin_fraction"] for r in sy), bytes_sent=[r["rejoin_bytes_sent"] for r in sy],
                           seconds=med([r["rejoin_s"] for r in sy]), rejoin_alpha_ms_per_gib=med([r["rejoin_alpha_ms_per_gib"] for r in sy]),
                           rejoin_beta_ms_per_gib=med([r["rejoin_beta_ms_per_gib"] for r in sy]), target="< 1%")
    peak = {}
    for phase, per in rss.items():
        for h, v in per.items():
            peak[h] = max(peak.get(h, 0), v)
    s["rss"] = dict(peak_mib=peak, target="< 256 MiB")
    return s


def print_summary(s):
    m = s["meta"]
    print(f"date {m['date']}, wall {m['wall_s']} s, load {m['load_start'][0]:.2f} at start, {m['load_end'][0]:.2f} at end; "
          f"marsd built {m['marsd_built']} (sha256 {m['marsd_sha256']}); {m['rounds']} rounds")
    print(f"{'job':<14} {'measured':>14} {'peer':>14} {'ratio':>7}  target")
    if "replay-1m" in s:
        r = s["replay-1m"]
        print(f"{'replay-1m':<14} {r['replay_mibs']:>9.0f} MiB/s {r['solo_mibs']:>9.0f} MiB/s {r['ratio']:>7.2f}  {r['target']}   per round (replay, solo) {r['per_round']}")
        print(f"    write with beta fetching {r['repl_write_mibs']:.0f} MiB/s, fetch {r['fetch_mibs']:.0f} MiB/s; CPU ms/GiB: alpha solo write "
              f"{r['solo_alpha_ms_per_gib']:.0f}, alpha write+serve fetch {r['backlog_alpha_ms_per_gib']:.0f}, beta fetch {r['fetch_beta_ms_per_gib']:.0f}, "
              f"beta replay {r['replay_beta_ms_per_gib']:.0f}")
    if "fetch-cpu-4k" in s:
        r = s["fetch-cpu-4k"]
        print(f"{'fetch-cpu-4k':<14} {r['repl_alpha_us']:>9.2f} µs/rq {r['solo_alpha_us']:>9.2f} µs/rq {r['ratio']:>7.2f}  {r['target']}   per round (with beta, solo) {r['per_round']}")
        print(f"    IOPS with beta {r['repl_iops'] / 1000:.1f}k, solo {r['solo_iops'] / 1000:.1f}k; beta {r['repl_beta_us']:.2f} µs/rq; machine "
              f"{r['repl_machine_us']:.2f} / {r['solo_machine_us']:.2f} µs/rq, idle {100 * r['repl_idle']:.0f}% / {100 * r['solo_idle']:.0f}%; "
              f"fetch settled {r['settle_s']:.2f} s, replay {r['replay_tail_s']:.2f} s after fio")
    if "fetch-cpu-4k-matched" in s:
        r = s["fetch-cpu-4k-matched"]
        print(f"{'  solo matched':<14} {r['repl_alpha_us']:>9.2f} µs/rq {r['solo_alpha_us']:>9.2f} µs/rq {r['ratio']:>7.2f}  {r['target']}   "
              f"solo at the rate reached with beta ({r['iops'] / 1000:.1f}k/s); per round (with beta, solo) {r['per_round']}")
    if "fetch-cpu-4k-rated" in s:
        r = s["fetch-cpu-4k-rated"]
        print(f"{'  at ' + str(r['iops']) + '/s':<14} {r['repl_alpha_us']:>9.2f} µs/rq {r['solo_alpha_us']:>9.2f} µs/rq {r['ratio']:>7.2f}  {r['target']}   "
              f"per round (with beta, solo) {r['per_round']}; beta {r['repl_beta_us']:.2f} µs/rq")
    for key, title in (("lag-4k", "lag-4k"), ("wan-lag", "wan-lag")):
        if key in s:
            r = s[key]
            print(f"{title:<14} at {r['iops']:.0f} IOPS: view lagBytes p50 {r['view_bytes']['p50'] / 1024:.0f} KiB p99 {r['view_bytes']['p99'] / 1024:.0f} KiB, "
                  f"lagSeconds p50 {r['view_secs']['p50'] * 1000:.0f} ms p99 {r['view_secs']['p99'] * 1000:.0f} ms; outside: "
                  f"{r['true_bytes']['p50'] / 1024:.0f} / {r['true_bytes']['p99'] / 1024:.0f} KiB, "
                  f"{r['true_secs']['p50'] * 1000:.0f} / {r['true_secs']['p99'] * 1000:.0f} ms")
    if "wan-fetch" in s:
        r = s["wan-fetch"]
        print(f"{'wan-fetch':<14} {r['fetch_Bps'] / 1e6:>10.2f} MB/s {LINK_RATE / 1e6:>10.2f} MB/s {r['fraction']:>7.2f}  {r['target']}   "
              f"steady {r['steady_fraction']:.2f}, proxy down {r['proxy_down_Bps'] / 1e6:.2f} MB/s, first byte {r['first_byte_s']:.2f} s, per round {r['per_round']}")
    if "sync" in s:
        r = s["sync"]
        print(f"{'sync':<14} {r['sync_mibs']:>9.0f} MiB/s {r['nbdcopy_mibs']:>9.0f} MiB/s {r['ratio']:>7.2f}  {r['target']}   "
              f"vs nbdcopy --flush {r['nbdcopy_flush_mibs']:.0f} MiB/s: {r['ratio_flush']:.2f}; per round (sync, nbdcopy, --flush) {r['per_round']}")
        print(f"    CPU ms/GiB: sync alpha {r['sync_alpha_ms_per_gib']:.0f} beta {r['sync_beta_ms_per_gib']:.0f}; nbdcopy alpha "
              f"{r['nbdcopy_alpha_ms_per_gib']:.0f} client {r['nbdcopy_client_ms_per_gib']:.0f}")
        r = s["rejoin"]
        print(f"{'rejoin':<14} max {100 * r['max_fraction']:.4f}% of the device sent ({r['bytes_sent']} bytes), {r['seconds']:.1f} s  {r['target']}")
    print(f"{'rss':<14} peak VmHWM: " + ", ".join(f"{h} {v:.0f} MiB" for h, v in s["rss"]["peak_mib"].items()) + f"  {s['rss']['target']}")


if __name__ == "__main__":
    main()
