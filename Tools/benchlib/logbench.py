#!/usr/bin/python3
"""The logged write path against its targets (issue 3), medians over interleaved rounds.

  randwrite-4k-qd32   fio nbd: marsd logged resource vs marsd plain export      target >= 0.8x
  seqwrite-1m-qd8     fio nbd on the logged resource vs fio io_uring on a file   target >= 0.45x
                      (--seq-gib of new data each, both ending with a sync: fio --end_fsync=1;
                      the raw file is new every round, so both pay for fresh pages)
  fua-4k-qd1          python libnbd FUA 4k writes vs os.pwrite + os.fdatasync    target <= 1.5x latency
                      of 4k on a file in the same filesystem (median latency)
  rss-10g-burst       peak RSS (VmHWM) of marsd while fio writes 10 GiB to the   target < 256 MiB
                      logged resource (1M, qd8)
  qemu-4k-qd32        4 KiB writes at qd32 through QEMU's NBD client (qemu-img   no target: a second
                      bench, the block layer a KVM guest's disk goes through),   view of the first job
                      logged resource vs plain export, scattered offsets

For the 4 KiB rounds it also reports CPU per request (marsd's threads, and the whole machine with
fio) and the machine's idle share (idle + iowait): on a small machine the client shares the CPUs,
and the two paths differ as much in how much CPU stays idle as in what a request costs.

Usage: logbench.py [--rounds N] [--runtime S] [--marsd PATH] [--dir DIR] [--burst-gib N] [--seq-gib N]
                   [--fua-writes N] [--json FILE]
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, "/usr/lib/python3/dist-packages")
import nbd  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30


def log(msg):
    print(f"[logbench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Marsd:
    """One marsd serving either a plain export or a logged resource of `size` bytes."""

    def __init__(self, marsd, workdir, name, logged, size):
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir)
        self.image = os.path.join(self.dir, "disk.img")
        with open(self.image, "wb") as f:
            f.truncate(size)
        self.sock = os.path.join(self.dir, "nbd.sock")
        ctl = os.path.join(self.dir, "ctl.sock")
        argv = [marsd, "serve", "--root", os.path.join(self.dir, "root"), "--unix", self.sock, "--control", ctl,
                "--log-level", "warning"]
        if not logged:
            argv += ["--export", f"disk={self.image}"]
        self.logf = open(os.path.join(self.dir, "marsd.log"), "wb")
        self.proc = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT)
        for _ in range(200):
            if os.path.exists(ctl):
                break
            time.sleep(0.05)
        if logged:
            marsadm = os.path.join(os.path.dirname(marsd), "marsadm")
            for args in (["create-cluster", "--host", "bench"], ["create-resource", "disk", self.image]):
                subprocess.run([marsadm] + args + ["--control", ctl], check=True, stdout=subprocess.DEVNULL)
        self.uri = f"nbd+unix:///disk?socket={self.sock}"
        for _ in range(200):
            if subprocess.run(["nbdinfo", "--size", self.uri], capture_output=True).returncode == 0:
                return
            time.sleep(0.05)
        raise SystemExit(f"marsd ({name}) did not come up; see {self.dir}/marsd.log")

    def rss_peak_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def cpu_seconds(self):
        """utime + stime of every thread of marsd so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=600)


def fio(target, rw, bs, qd, runtime=None, size=None, end_fsync=False):
    argv = ["fio", "--name=j", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--output-format=json",
            "--invalidate=0", "--randrepeat=0", "--norandommap"]
    if runtime:
        argv += ["--size=1g", "--time_based", f"--runtime={runtime}", "--ramp_time=1"]
    else:
        argv += [f"--size={size}"]
    if end_fsync:
        argv += ["--end_fsync=1"]
    if target.startswith("nbd"):
        argv += ["--ioengine=nbd", f"--uri={target}"]
    else:
        argv += ["--ioengine=io_uring", f"--filename={target}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"fio failed: {' '.join(argv)}\n{out.stderr}")
    text = out.stdout
    job = json.loads(text[text.index("{"):])["jobs"][0]["write"]
    return dict(iops=job["iops"], mibs=job["bw_bytes"] / MiB)


def machine_ticks():
    """(busy, idle) clock ticks of all CPUs so far; iowait counts as idle."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal, idle + iowait


def fio_4k(server, runtime):
    """4 KiB random writes at qd32 against `server`: IOPS, µs of CPU per request (marsd; the whole
    machine, fio included) and the machine's idle share, over fio's whole run (ramp included)."""
    cpu0, (busy0, idle0) = server.cpu_seconds(), machine_ticks()
    result = fio(server.uri, "randwrite", "4k", 32, runtime)
    cpu1, (busy1, idle1) = server.cpu_seconds(), machine_ticks()
    requests = result["iops"] * (runtime + 1)  # fio's second of ramp runs at about the same rate
    tick = os.sysconf("SC_CLK_TCK")
    return dict(iops=result["iops"], server_us=(cpu1 - cpu0) * 1e6 / requests,
                machine_us=(busy1 - busy0) / tick * 1e6 / requests, idle=(idle1 - idle0) / ((busy1 - busy0) + (idle1 - idle0)))


def qemu_4k(server, runtime):
    """4 KiB writes at qd32 through QEMU's NBD client: requests per second. Each offset is 100003
    blocks past the previous one, modulo the device, so the writes scatter like random ones."""
    count = 60_000 * runtime
    out = subprocess.run(["qemu-img", "bench", "-w", "-c", str(count), "-d", "32", "-s", "4k", "-S", str(4096 * 100003),
                          "--image-opts", f"driver=nbd,server.type=unix,server.path={server.sock},export=disk"],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0 or "Run completed in" not in out.stdout:
        raise SystemExit(f"qemu-img bench failed:\n{out.stdout}{out.stderr}")
    seconds = float(out.stdout.split("Run completed in")[1].split()[0])
    return count / seconds


def fresh(workdir, name):
    """A new, empty file (no cached pages)."""
    path = os.path.join(workdir, name)
    if os.path.exists(path):
        os.unlink(path)
    open(path, "wb").close()
    return path


def fua_latency_us(uri, count, region):
    h = nbd.NBD()
    h.connect_uri(uri)
    data = os.urandom(4096)
    samples = []
    for _ in range(count):
        offset = random.randrange(region // 4096) * 4096
        t0 = time.perf_counter_ns()
        h.pwrite(data, offset, nbd.CMD_FLAG_FUA)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    h.shutdown()
    return statistics.median(samples)


def bare_latency_us(path, count, region):
    fd = os.open(path, os.O_RDWR)
    data = os.urandom(4096)
    samples = []
    for _ in range(count):
        offset = random.randrange(region // 4096) * 4096
        t0 = time.perf_counter_ns()
        os.pwrite(fd, data, offset)
        os.fdatasync(fd)
        samples.append((time.perf_counter_ns() - t0) / 1000)
    os.close(fd)
    return statistics.median(samples)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=int, default=8)
    p.add_argument("--marsd", default=os.path.join(os.path.dirname(__file__), "../../.build/release/marsd"))
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--burst-gib", type=int, default=10)
    p.add_argument("--seq-gib", type=int, default=2)
    p.add_argument("--fua-writes", type=int, default=2000)
    p.add_argument("--json")
    a = p.parse_args()
    marsd = os.path.abspath(a.marsd)
    work = tempfile.mkdtemp(prefix="logbench.", dir=a.dir)
    size = 2 * GiB
    results = {k: [] for k in ("plain-4k", "logged-4k", "raw-1m", "logged-1m", "bare-fua", "logged-fua", "plain-qemu", "logged-qemu")}
    cpu = {"plain-4k": [], "logged-4k": []}
    try:
        plain = Marsd(marsd, work, "plain", False, size)
        logged = Marsd(marsd, work, "logged", True, size)
        raw = os.path.join(work, "raw.img")
        with open(raw, "wb") as f:
            f.truncate(size)
        for rnd in range(1, a.rounds + 1):
            order = [
                ("plain-4k", lambda: fio_4k(plain, a.runtime)),
                ("logged-4k", lambda: fio_4k(logged, a.runtime)),
                ("raw-1m", lambda: fio(fresh(work, "seq.img"), "write", "1m", 8, size=f"{a.seq_gib}g", end_fsync=True)["mibs"]),
                ("logged-1m", lambda: fio(logged.uri, "write", "1m", 8, size=f"{a.seq_gib}g", end_fsync=True)["mibs"]),
                ("bare-fua", lambda: bare_latency_us(raw, a.fua_writes, size)),
                ("logged-fua", lambda: fua_latency_us(logged.uri, a.fua_writes, size)),
                ("plain-qemu", lambda: qemu_4k(plain, a.runtime)),
                ("logged-qemu", lambda: qemu_4k(logged, a.runtime)),
            ]
            if rnd % 2 == 0:
                order = [order[i ^ 1] for i in range(len(order))]  # alternate who goes first
            for name, measure in order:
                value = measure()
                if name in cpu:
                    cpu[name].append(value)
                    log(f"round {rnd}: {name} = {value['iops']:.1f} IOPS, marsd {value['server_us']:.2f} µs/request, "
                        f"machine {value['machine_us']:.2f} µs/request, {100 * value['idle']:.0f}% idle")
                    value = value["iops"]
                else:
                    log(f"round {rnd}: {name} = {value:.1f}")
                results[name].append(value)
        plain.stop()
        log(f"burst: {a.burst_gib} GiB of 1M writes into a fresh logged resource")
        burst = Marsd(marsd, work, "burst", True, a.burst_gib * GiB)
        t0 = time.monotonic()
        fio(burst.uri, "write", "1m", 8, size=f"{a.burst_gib}g", end_fsync=True)
        seconds = time.monotonic() - t0
        rss_mib = burst.rss_peak_kib() / 1024
        burst.stop()
        logged.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    usage = {k: {m: statistics.median(r[m] for r in v) for m in ("server_us", "machine_us", "idle")} for k, v in cpu.items()}
    summary = {
        "randwrite-4k-qd32": dict(logged_iops=med["logged-4k"], plain_iops=med["plain-4k"],
                                  ratio=med["logged-4k"] / med["plain-4k"], target=">= 0.8",
                                  logged_cpu=usage["logged-4k"], plain_cpu=usage["plain-4k"]),
        "seqwrite-1m-qd8": dict(logged_mibs=med["logged-1m"], raw_mibs=med["raw-1m"],
                                ratio=med["logged-1m"] / med["raw-1m"], target=">= 0.45"),
        "fua-4k-qd1": dict(logged_us=med["logged-fua"], bare_us=med["bare-fua"],
                           ratio=med["logged-fua"] / med["bare-fua"], target="<= 1.5"),
        "qemu-4k-qd32": dict(logged_iops=med["logged-qemu"], plain_iops=med["plain-qemu"],
                             ratio=med["logged-qemu"] / med["plain-qemu"], target="(none)"),
        "rss-10g-burst": dict(peak_rss_mib=rss_mib, burst_gib=a.burst_gib, seconds=seconds,
                              mibs=a.burst_gib * 1024 / seconds, target="< 256 MiB"),
        "rounds": a.rounds, "runtime": a.runtime, "raw": results, "cpu_4k": cpu,
    }
    print(f"{'job':<20} {'logged':>12} {'peer':>12} {'ratio':>7}  target")
    for job, peer, unit in (("randwrite-4k-qd32", "plain_iops", "logged_iops"), ("seqwrite-1m-qd8", "raw_mibs", "logged_mibs"),
                            ("fua-4k-qd1", "bare_us", "logged_us"), ("qemu-4k-qd32", "plain_iops", "logged_iops")):
        s = summary[job]
        print(f"{job:<20} {s[unit]:>12.1f} {s[peer]:>12.1f} {s['ratio']:>7.2f}  {s['target']}")
    for path in ("logged", "plain"):
        u = summary["randwrite-4k-qd32"][f"{path}_cpu"]
        print(f"  4k {path:<7} CPU per request: marsd {u['server_us']:.2f} µs, machine {u['machine_us']:.2f} µs; "
              f"machine idle {100 * u['idle']:.0f}%")
    b = summary["rss-10g-burst"]
    print(f"{'rss-10g-burst':<20} {b['peak_rss_mib']:>9.1f} MiB peak RSS, {b['mibs']:.0f} MiB/s  target {b['target']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
