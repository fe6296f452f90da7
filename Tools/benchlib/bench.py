#!/usr/bin/env python3
"""NBD benchmark: marsd against nbdkit (file plugin), qemu-nbd and raw fio (io_uring).

Run it through Tools/bench, which installs missing tools first. Standard library only.

What happens:
  0. Transports: by default every NBD server runs twice, one instance on a Unix socket
     (NAME@unix) and one on TCP at 127.0.0.1 (NAME@tcp), and both are measured in every round;
     the report has one set of tables per transport, ratios within a transport.
  1. One backing file per server, all in one temp dir (same filesystem), each of --size bytes,
     preallocated (default) or sparse. Every server is started once and kept running until the
     end; all are stopped in a `finally` (and get SIGTERM via PR_SET_PDEATHSIG if we die).
  2. Each export is prefilled once, completely, through its own server (fio, 1 MiB sequential
     writes), so no read is ever served from a hole and nbdcopy reads real data everywhere.
  3. Rounds: in each round every job runs on every server in turn; the server order is rotated
     each round. Before every measured job (untimed): `sync`, so that one server's dirty pages
     are not written back during the next server's measurement, and then the data the job
     touches is read into the page cache (evicted for O_DIRECT variants), so every server starts
     from the same cache state even if something else on the machine dropped caches.
     One benchmark at a time per machine (flock on /tmp/marsd-bench.lock).
  4. Medians over rounds are reported, with server CPU time (utime+stime of all threads, from
     /proc/PID/stat) per request for fio jobs and per GiB for nbdcopy.
"""

import argparse
import ctypes
import datetime
import fcntl
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_MARSD = "/work/main/.build/release/marsd"
EXPORT = "disk"

# ----------------------------------------------------------------------------------------------
# Jobs. metric: "iops" or "mibs" (MiB/s). The order is the order of execution inside a round.

FIO_JOBS = [
    dict(name="randwrite-4k-qd32", rw="randwrite", bs="4k", qd=32, numjobs=1, metric="iops"),
    dict(name="randread-4k-qd32", rw="randread", bs="4k", qd=32, numjobs=1, metric="iops"),
    dict(name="randwrite-64k-qd16", rw="randwrite", bs="64k", qd=16, numjobs=1, metric="mibs"),
    dict(name="seqwrite-1m-qd8", rw="write", bs="1m", qd=8, numjobs=1, metric="mibs"),
    dict(name="seqread-1m-qd8", rw="read", bs="1m", qd=8, numjobs=1, metric="mibs"),
    # Medium READs: where sending cached pages (sendfile) and copying them trade places (issue 18).
    dict(name="randread-64k-qd16", rw="randread", bs="64k", qd=16, numjobs=1, metric="mibs"),
    dict(name="randread-256k-qd8", rw="randread", bs="256k", qd=8, numjobs=1, metric="mibs"),
    dict(name="randwrite-4k-qd32-2conn", rw="randwrite", bs="4k", qd=32, numjobs=2, metric="iops"),
    dict(name="randread-4k-qd32-2conn", rw="randread", bs="4k", qd=32, numjobs=2, metric="iops"),
]
COPY_JOBS = [
    dict(name="nbdcopy-in", metric="mibs"),   # random-data file -> export (copy size)
    dict(name="nbdcopy-out", metric="mibs"),  # whole export -> null:
]
ALL_JOBS = FIO_JOBS + COPY_JOBS
JOB_BY_NAME = {j["name"]: j for j in ALL_JOBS}

# ----------------------------------------------------------------------------------------------
# Server variants: name -> (kind, server options, plugin options (nbdkit only), description)

VARIANTS = {
    "marsd": ("marsd", [], [], "marsd with its default engine and cache mode"),
    "marsd-buffered": ("marsd", ["--cache", "buffered"], [], "marsd --cache buffered"),
    "marsd-direct": ("marsd", ["--cache", "direct"], [], "marsd --cache direct (O_DIRECT)"),
    "marsd-uring": ("marsd", ["--io-engine", "uring"], [], "marsd --io-engine uring"),
    "marsd-posix": ("marsd", ["--io-engine", "posix"], [], "marsd --io-engine posix"),
    "marsd-uring-direct": ("marsd", ["--io-engine", "uring", "--cache", "direct"], [],
                           "marsd --io-engine uring --cache direct"),
    "marsd-posix-direct": ("marsd", ["--io-engine", "posix", "--cache", "direct"], [],
                           "marsd --io-engine posix --cache direct"),
    "nbdkit": ("nbdkit", [], [], "nbdkit file plugin, defaults (16 threads per connection)"),
    "nbdkit-aa": ("nbdkit", [], [], "a second, identical nbdkit: an A/A control that shows how "
                                    "much of a ratio is noise"),
    "qemu-nbd": ("qemu-nbd", ["--cache=writeback", "--aio=threads"], [],
                 "qemu-nbd --cache=writeback --aio=threads (its defaults)"),
    "qemu-nbd-uring": ("qemu-nbd", ["--cache=writeback", "--aio=io_uring"], [],
                       "qemu-nbd --cache=writeback --aio=io_uring"),
    "qemu-nbd-direct": ("qemu-nbd", ["--cache=none", "--aio=native"], [],
                        "qemu-nbd --cache=none --aio=native (O_DIRECT)"),
    "raw": ("raw", [], [], "fio --ioengine=io_uring on the file, buffered (the physical limit)"),
    "raw-direct": ("raw", [], [], "fio --ioengine=io_uring on the file, --direct=1 "
                                  "(fio jobs only)"),
}
DEFAULT_SERVERS = "marsd,nbdkit,qemu-nbd,raw"
LOCKFILE = "/tmp/marsd-bench.lock"


class BenchError(Exception):
    pass


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text):
    t = text.strip().lower().replace("ib", "").rstrip("b")
    mult = 1
    for suffix, m in (("k", KiB), ("m", MiB), ("g", GiB), ("t", 1 << 40)):
        if t.endswith(suffix):
            mult, t = m, t[:-1]
            break
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 4G, 512M, 1073741824)")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def fmt_size(n):
    for unit, m in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n} B"


def ms(seconds):
    return f"{int(round(seconds * 1000))}ms"


# ----------------------------------------------------------------------------------------------
# Child processes

_libc = ctypes.CDLL(None, use_errno=True)
_children = set()        # Popen objects we started and have not reaped yet
_children_lock = threading.Lock()


def _pdeathsig():
    # PR_SET_PDEATHSIG = 1: the child gets SIGTERM when we die, even by SIGKILL.
    _libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def spawn(argv, new_session=False, **kw):
    p = subprocess.Popen(argv, preexec_fn=_pdeathsig, start_new_session=new_session, **kw)
    with _children_lock:
        _children.add(p)
    return p


def reap(p):
    with _children_lock:
        _children.discard(p)


def run(argv, timeout, what, capture=True):
    """Run a client command (fio, nbdcopy, nbdinfo); kill it on timeout. Returns CompletedProcess."""
    p = spawn(argv, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
              stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise BenchError(f"{what}: timed out after {timeout:.0f} s: {shlex.join(argv)}")
    finally:
        reap(p)
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def kill_all_children():
    with _children_lock:
        procs = list(_children)
    for p in procs:
        if p.poll() is None:
            try:
                p.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        reap(p)


def cpu_ticks(pid):
    """utime+stime of the whole process (all threads, live and exited) in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


class CpuSampler(threading.Thread):
    """Samples a process's CPU ticks every `interval` seconds until finish()."""

    def __init__(self, pid, interval=0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples = [(time.monotonic(), cpu_ticks(pid))]
        self._halt = threading.Event()

    def run(self):
        while not self._halt.wait(self.interval):
            try:
                self.samples.append((time.monotonic(), cpu_ticks(self.pid)))
            except OSError:
                return

    def finish(self):
        self._halt.set()
        self.join()
        self.samples.append((time.monotonic(), cpu_ticks(self.pid)))

    def ticks_at(self, t):
        s = self.samples
        if t <= s[0][0]:
            return s[0][1]
        for (t0, c0), (t1, c1) in zip(s, s[1:]):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
        return s[-1][1]

    def last_seconds_us(self, seconds):
        """Server CPU (microseconds) in the last `seconds` before finish()."""
        t_end, c_end = self.samples[-1]
        return (c_end - self.ticks_at(t_end - seconds)) * 1e6 / CLK_TCK


# ----------------------------------------------------------------------------------------------
# Servers

def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, variant, cfg, workdir, sockdir, transport):
        kind, sargs, pargs, desc = cfg.variants[variant]
        self.variant, self.kind, self.desc = variant, kind, desc
        # raw has no transport; with both transports every NBD server runs twice, named NAME@TRANSPORT
        self.transport = None if kind == "raw" else transport
        self.name = variant if kind == "raw" or len(cfg.transports) == 1 else f"{variant}@{transport}"
        self.server_args, self.plugin_args = list(sargs), list(pargs)
        self.path = os.path.join(workdir, f"{self.name}.img")
        self.sock = os.path.join(sockdir, f"{self.name}.sock")
        self.logpath = os.path.join(workdir, f"{self.name}.log")
        self.port = free_tcp_port() if self.transport == "tcp" else None
        self.proc = None
        self.argv = None
        self.multi_conn = None
        self.cfg = cfg
        if kind == "marsd":
            self.server_args += cfg.marsd_args

    @property
    def is_raw(self):
        return self.kind == "raw"

    @property
    def direct(self):
        """True if the server bypasses the page cache (O_DIRECT); its file is then kept uncached."""
        if self.kind == "raw":
            return self.variant == "raw-direct"
        a = self.server_args + self.plugin_args
        return (any(x in a for x in ("--cache=direct", "--cache=none", "--cache=directsync"))
                or any(a[i] == "--cache" and a[i + 1] == "direct" for i in range(len(a) - 1)))

    @property
    def uri(self):
        if self.port:
            return f"nbd://127.0.0.1:{self.port}/{EXPORT}"
        return f"nbd+unix:///{EXPORT}?socket={self.sock}"

    def command(self):
        if self.kind == "marsd":
            listen = ["--tcp", f"127.0.0.1:{self.port}"] if self.port else ["--unix", self.sock]
            # its own root: two marsd may not share one (and the default, /mars, may be in use)
            root = os.path.join(os.path.dirname(self.path), f"{self.name}.root")
            return ([self.cfg.marsd, "serve", "--root", root, "--export", f"{EXPORT}={self.path}"]
                    + listen + self.server_args)
        if self.kind == "nbdkit":
            listen = ["-i", "127.0.0.1", "-p", str(self.port)] if self.port else ["-U", self.sock]
            return (["nbdkit", "-f", "--exit-with-parent"] + listen + self.server_args
                    + ["file", f"file={self.path}"] + self.plugin_args)
        if self.kind == "qemu-nbd":
            listen = ["-b", "127.0.0.1", "-p", str(self.port)] if self.port else ["-k", self.sock]
            return (["qemu-nbd"] + listen + ["-x", EXPORT, "-f", "raw", "-e", "8", "-t"]
                    + self.server_args + [self.path])
        raise AssertionError(self.kind)

    def create_file(self):
        with open(self.path, "wb") as f:
            if self.cfg.alloc == "prealloc":
                os.posix_fallocate(f.fileno(), 0, self.cfg.size)
            else:
                f.truncate(self.cfg.size)

    def start(self):
        if self.is_raw:
            return
        self.argv = self.command()
        self.logf = open(self.logpath, "wb")
        self.proc = spawn(self.argv, new_session=True, stdin=subprocess.DEVNULL,
                          stdout=self.logf, stderr=subprocess.STDOUT)

    def log_tail(self, n=20):
        try:
            with open(self.logpath, errors="replace") as f:
                lines = f.read().splitlines()
            return "\n".join("    " + line for line in lines[-n:]) or "    (empty)"
        except OSError:
            return "    (no log)"

    def check_alive(self):
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"server {self.name} exited with status {self.proc.returncode}\n"
                             f"  command: {shlex.join(self.argv)}\n  last lines of its output"
                             f" ({self.logpath}; --keep keeps it):\n{self.log_tail()}")

    def wait_ready(self, timeout=30.0):
        if self.is_raw:
            return
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            if self.port or os.path.exists(self.sock):
                r = run(["nbdinfo", "--size", self.uri], 10, f"nbdinfo {self.name}")
                if r.returncode == 0:
                    size = int(r.stdout.strip())
                    if size != self.cfg.size:
                        raise BenchError(f"server {self.name} exports {size} bytes, "
                                         f"expected {self.cfg.size}")
                    mc = run(["nbdinfo", "--can", "multi-conn", self.uri], 10, "nbdinfo")
                    self.multi_conn = {0: True, 2: False}.get(mc.returncode)
                    return
                last = (r.stderr or "").strip()
            time.sleep(0.1)
        raise BenchError(f"server {self.name} not ready after {timeout:.0f} s ({last})\n"
                         f"  command: {shlex.join(self.argv)}\n  log:\n{self.log_tail()}")

    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for 10 s; sending SIGKILL")
                self.proc.kill()
                self.proc.wait()
        reap(self.proc)
        self.logf.close()


# ----------------------------------------------------------------------------------------------
# Measurements

def fio_argv(server, job, cfg, out, prefill=False):
    argv = ["fio", f"--name={job['name']}", f"--rw={job['rw']}", f"--bs={job['bs']}",
            f"--iodepth={job['qd']}", f"--numjobs={job['numjobs']}", "--group_reporting",
            "--offset=0", "--output-format=json", f"--output={out}",
            # fio invalidates (POSIX_FADV_DONTNEED) the file range before a job by default; the
            # page cache state is managed by prepare_cache() instead
            "--invalidate=0"]
    if prefill:
        argv += [f"--size={cfg.size}"]
    else:
        argv += [f"--size={cfg.region}", "--time_based", f"--runtime={ms(cfg.runtime)}",
                 f"--ramp_time={ms(cfg.ramp)}", "--norandommap", "--randrepeat=0"]
    if server.is_raw:
        argv += ["--ioengine=io_uring", f"--filename={server.path}",
                 f"--direct={1 if server.direct else 0}"]
    else:
        argv += ["--ioengine=nbd", f"--uri={server.uri}"]
    return argv


def parse_fio(path, argv, stderr):
    try:
        with open(path) as f:
            text = f.read()
        # fio's nbd engine may print lines before the JSON document; skip to the first '{'.
        data = json.loads(text[text.index("{"):])
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot parse fio output {path}: {e}\n  {shlex.join(argv)}\n{stderr}")
    jobs = data.get("jobs") or []
    if not jobs:
        raise BenchError(f"fio output has no jobs: {shlex.join(argv)}\n{stderr}")
    for j in jobs:
        if j.get("error"):
            raise BenchError(f"fio job error {j['error']}: {shlex.join(argv)}\n{stderr}")
    return data


def summarize_fio(data):
    jobs = data["jobs"]
    total_ios = sum(j[d]["total_ios"] for j in jobs for d in ("read", "write"))
    iops = sum(j[d]["iops"] for j in jobs for d in ("read", "write"))
    bw = sum(j[d]["bw_bytes"] for j in jobs for d in ("read", "write"))
    runtime_ms = max(max(j["read"]["runtime"], j["write"]["runtime"]) for j in jobs)
    j0 = jobs[0]
    d = "read" if j0["read"]["total_ios"] >= j0["write"]["total_ios"] else "write"
    pct = j0[d].get("clat_ns", {}).get("percentile", {})
    return dict(
        iops=iops, mibs=bw / MiB, total_ios=total_ios, runtime_ms=runtime_ms,
        lat_mean_us=j0[d].get("lat_ns", {}).get("mean", 0) / 1000,
        clat_p50_us=pct.get("50.000000", 0) / 1000, clat_p99_us=pct.get("99.000000", 0) / 1000,
        client_usr_pct=sum(j["usr_cpu"] for j in jobs),
        client_sys_pct=sum(j["sys_cpu"] for j in jobs),
    )


def prefill(server, cfg):
    job = dict(name="prefill", rw="write", bs="1m", qd=8, numjobs=1)
    out = os.path.join(cfg.workdir, f"prefill-{server.name}.json")
    argv = fio_argv(server, job, cfg, out, prefill=True)
    t0 = time.monotonic()
    r = run(argv, 120 + cfg.size / (20 * MiB), f"prefill {server.name}")
    if r.returncode != 0:
        raise BenchError(f"prefill of {server.name} failed ({r.returncode}): {shlex.join(argv)}\n"
                         f"{r.stderr}")
    parse_fio(out, argv, r.stderr)
    server.check_alive()
    return time.monotonic() - t0


def run_fio_job(server, job, cfg, rnd):
    out = os.path.join(cfg.workdir, f"r{rnd}-{job['name']}-{server.name}.json")
    argv = fio_argv(server, job, cfg, out)
    sampler = None
    if server.pid():
        sampler = CpuSampler(server.pid())
    p = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if sampler:
        sampler.start()
    timeout = cfg.runtime + cfg.ramp + 120
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise BenchError(f"fio timed out after {timeout:.0f} s: {shlex.join(argv)}")
    finally:
        reap(p)
        if sampler:
            sampler.finish()
    server.check_alive()
    if p.returncode != 0:
        raise BenchError(f"fio failed ({p.returncode}) on {server.name}: {shlex.join(argv)}\n{err}")
    res = summarize_fio(parse_fio(out, argv, err))
    res["value"] = res[job["metric"]]
    if sampler:
        # CPU over the measured window only (the last runtime seconds, after fio's ramp).
        cpu_us = sampler.last_seconds_us(res["runtime_ms"] / 1000)
        res["server_cpu_us"] = cpu_us
        res["cpu_per_unit"] = cpu_us / res["total_ios"] if res["total_ios"] else None
    else:
        res["server_cpu_us"] = res["cpu_per_unit"] = None
    res["argv"] = argv
    return res


def raw_copy_in(src, dst, length):
    """The physical limit of 'copy N bytes into the file': copy_file_range through the page cache."""
    with open(src, "rb") as fi, open(dst, "r+b") as fo:
        off = 0
        while off < length:
            n = os.copy_file_range(fi.fileno(), fo.fileno(), min(length - off, 256 * MiB), off, off)
            if n <= 0:
                raise BenchError(f"copy_file_range returned {n} at offset {off}")
            off += n


def run_copy_job(server, job, cfg, rnd):
    conns = ["-C", str(cfg.nbdcopy_conns), "-T", str(cfg.nbdcopy_conns)]
    if job["name"] == "nbdcopy-in":
        nbytes = cfg.copy_size
        if server.is_raw:
            argv = ["python3: os.copy_file_range", cfg.randfile, server.path, str(nbytes)]
        else:
            argv = ["nbdcopy"] + conns + (["--flush"] if cfg.nbdcopy_flush else []) + \
                   [cfg.randfile, server.uri]
    else:
        nbytes = cfg.size
        argv = ["nbdcopy"] + conns + [server.path if server.is_raw else server.uri, "null:"]
    c0 = cpu_ticks(server.pid()) if server.pid() else None
    t0 = time.monotonic()
    if argv[0].startswith("python3:"):
        raw_copy_in(cfg.randfile, server.path, nbytes)
        if cfg.nbdcopy_flush:
            with open(server.path, "r+b") as fo:
                os.fsync(fo.fileno())
    else:
        r = run(argv, 120 + nbytes / (10 * MiB), f"{job['name']} {server.name}")
        if r.returncode != 0:
            server.check_alive()
            raise BenchError(f"{job['name']} failed ({r.returncode}) on {server.name}: "
                             f"{shlex.join(argv)}\n{r.stderr}")
    secs = time.monotonic() - t0
    c1 = cpu_ticks(server.pid()) if server.pid() else None
    server.check_alive()
    res = dict(seconds=secs, bytes=nbytes, mibs=nbytes / MiB / secs, argv=argv)
    res["value"] = res["mibs"]
    if c0 is not None:
        cpu_us = (c1 - c0) * 1e6 / CLK_TCK
        res["server_cpu_us"] = cpu_us
        res["cpu_per_unit"] = cpu_us / (nbytes / GiB)
    else:
        res["server_cpu_us"] = res["cpu_per_unit"] = None
    return res


class _CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


_SYS_CACHESTAT = 451  # Linux >= 6.5, same number on all architectures
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_fraction(path, length):
    """Fraction of [0, length) of path that is in the page cache (None if cachestat is missing)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        rng, cs = _CacheStatRange(0, length), _CacheStat()
        if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(cs), 0) != 0:
            return None
        return min(1.0, cs.nr_cache * PAGE / length)
    finally:
        os.close(fd)


def warm(path, length):
    """Read [0, length) of path so that it is in the page cache (untimed preparation)."""
    buf = bytearray(4 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
        off = 0
        while off < length:
            n = os.preadv(fd, [memoryview(buf)[:min(len(buf), length - off)]], off)
            if n <= 0:
                break
            off += n
    finally:
        os.close(fd)


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def prepare_cache(server, job, cfg):
    """Before each measured job: flush dirty pages (sync), then put the page cache into the same
    state for every server, whatever other processes on the machine did to it meanwhile.
    Returns the resident fraction of the job's data found before warming (diagnostics)."""
    if cfg.page_cache == "cold":
        drop_caches()
        return None
    os.sync()
    if cfg.page_cache == "asis":
        return None
    if server.direct:
        evict(server.path)
        return None
    if job["name"] == "nbdcopy-out":
        ranges = [(server.path, cfg.size)]
    elif job["name"] == "nbdcopy-in":
        ranges = [(cfg.randfile, cfg.copy_size), (server.path, cfg.copy_size)]
    else:
        ranges = [(server.path, cfg.region)]
    fracs = [resident_fraction(p, n) for p, n in ranges]
    for p, n in ranges:
        warm(p, n)
    known = [f for f in fracs if f is not None]
    return min(known) if known else None


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def make_random_file(path, size):
    chunk = 16 * MiB
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


# ----------------------------------------------------------------------------------------------
# Report

def version_of(argv):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        text = (r.stdout or r.stderr).strip().splitlines()
        return text[0] if text and r.returncode == 0 else f"unknown (exit {r.returncode})"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * KiB
    return out


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fs_type(path):
    best, fstype = "", "unknown"
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, parts[2]
    return f"{fstype} on {best}"


def fmt_value(metric, v):
    if v is None:
        return "—"
    if metric == "iops":
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def fmt_cpu(job, v):
    if v is None:
        return "—"
    if job["name"].startswith("nbdcopy"):
        return f"{v / 1000:.0f}"          # ms per GiB
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def spread_pct(values):
    if len(values) < 2:
        return None
    med = statistics.median(values)
    return (max(values) - min(values)) / 2 / med * 100 if med else None


def summarize(results, servers, jobs):
    summary = {}
    for job in jobs:
        row = {}
        for s in servers:
            rounds = results.get(job["name"], {}).get(s.name, [])
            vals = [r["value"] for r in rounds]
            cpus = [r["cpu_per_unit"] for r in rounds if r.get("cpu_per_unit") is not None]
            row[s.name] = dict(
                median=statistics.median(vals) if vals else None,
                min=min(vals) if vals else None, max=max(vals) if vals else None,
                spread_pct=spread_pct(vals),
                cpu_median=statistics.median(cpus) if cpus else None,
                rounds=len(vals),
            )
        summary[job["name"]] = row
    return summary


def ratio(a, b):
    return a / b if a is not None and b else None


def compute_ratios(summary, servers, jobs):
    """Ratios of each marsd to each other server of the same transport group (raw included)."""
    marsds = [s.name for s in servers if s.kind == "marsd"]
    subjects = marsds or [s.name for s in servers if not s.is_raw]
    ratios = {}
    for subj in subjects:
        refs = [s.name for s in servers if s.kind != "marsd" and s.name != subj]
        per_job = {}
        for job in jobs:
            row = summary[job["name"]]
            per_job[job["name"]] = {
                ref: dict(throughput=ratio(row[subj]["median"], row[ref]["median"]),
                          cpu=ratio(row[subj]["cpu_median"], row[ref]["cpu_median"]))
                for ref in refs}
        ratios[subj] = per_job
    return ratios


def unit(job):
    return "IOPS" if job["metric"] == "iops" else "MiB/s"


def cpu_unit(job):
    return "ms/GiB" if job["name"].startswith("nbdcopy") else "µs/req"


def render_markdown(meta, cfg, servers, jobs, summary, ratios):
    L = []
    L.append("# marsd NBD benchmark")
    L.append("")
    L.append(f"- command: `{meta['command']}`")
    L.append(f"- date: {meta['date']}; wall time: {meta['wall_seconds']:.0f} s")
    L.append(f"- host: {meta['hostname']}, kernel {meta['kernel']}, {meta['cpus']} CPUs "
             f"({meta['cpu_model']}), {meta['mem_total_gib']:.1f} GiB RAM; "
             f"load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}")
    L.append(f"- versions: {meta['versions']['fio']}; {meta['versions']['nbdkit']}; "
             f"{meta['versions']['qemu-nbd']}; {meta['versions']['nbdcopy']}"
             + (f"; marsd: {meta['versions']['marsd']}" if "marsd" in meta["versions"] else ""))
    L.append(f"- config: {cfg.rounds} round(s); fio runtime {cfg.runtime:g} s + ramp {cfg.ramp:g} s "
             f"over the first {fmt_size(cfg.region)}; export size {fmt_size(cfg.size)} "
             f"({cfg.alloc}, {meta['fs']}, workdir {cfg.workdir}); nbdcopy in "
             f"{fmt_size(cfg.copy_size)} from a random-data file, nbdcopy out = whole export to "
             f"null:, {cfg.nbdcopy_conns} connections/threads"
             f"{', --flush' if cfg.nbdcopy_flush else ''}; transports: "
             + ", ".join(TRANSPORT_TITLES[t] for t in cfg.transports))
    L.append(f"- page cache: {meta['cache_policy']}")
    ev = meta["cache_evicted_before"]
    if ev:
        L.append(f"- note: before {len(ev)} job(s) the data was found partly evicted from the page "
                 "cache (by another process or memory pressure) and was read back in before the "
                 "job: " + "; ".join(ev[:8]) + (" …" if len(ev) > 8 else ""))
    L.append("- servers:")
    for s in servers:
        if s.is_raw:
            L.append(f"  - `{s.name}`: {s.desc}")
        else:
            mc = {True: "yes", False: "NO", None: "unknown"}[s.multi_conn]
            L.append(f"  - `{s.name}` (multi-conn: {mc}): `{shlex.join(s.argv)}`")
    for w in meta["warnings"]:
        L.append(f"- WARNING: {w}")
    for transport, group in transport_groups(cfg, servers):
        render_group(L, cfg, TRANSPORT_TITLES[transport], group, jobs, summary, ratios[transport])
    return "\n".join(L)


TRANSPORT_TITLES = {"unix": "Unix socket", "tcp": "TCP on 127.0.0.1"}


def transport_groups(cfg, servers):
    """(transport, servers measured over it, plus raw) for each transport of the run."""
    return [(t, [s for s in servers if s.transport in (t, None)]) for t in cfg.transports]


def render_group(L, cfg, title, servers, jobs, summary, ratios):
    L.append("")
    names = [s.name for s in servers]
    n = cfg.rounds
    L.append(f"## {title}: throughput (median of {n} round{'s' if n != 1 else ''}"
             + ("; ±: half the min–max spread, in % of the median)" if n > 1 else ")"))
    L.append("")
    L.append("| job | unit | " + " | ".join(names) + " |")
    L.append("|---|---|" + "---:|" * len(names))
    for job in jobs:
        cells = []
        for nm in names:
            c = summary[job["name"]][nm]
            txt = fmt_value(job["metric"], c["median"])
            if c["spread_pct"] is not None:
                txt += f" ±{c['spread_pct']:.0f}%"
            cells.append(txt)
        L.append(f"| {job['name']} | {unit(job)} | " + " | ".join(cells) + " |")
    L.append("")
    L.append(f"## {title}: server CPU (median; utime+stime of all server threads per request, "
             "or per GiB copied for nbdcopy; raw has no server)")
    L.append("")
    L.append("| job | unit | " + " | ".join(names) + " |")
    L.append("|---|---|" + "---:|" * len(names))
    for job in jobs:
        cells = [fmt_cpu(job, summary[job["name"]][nm]["cpu_median"]) for nm in names]
        L.append(f"| {job['name']} | {cpu_unit(job)} | " + " | ".join(cells) + " |")
    L.append("")
    for subj, per_job in ratios.items():
        refs = list(next(iter(per_job.values())).keys()) if per_job else []
        if not refs:
            continue
        L.append(f"## {title}: ratios {subj} / reference (throughput: >1 is better; CPU: <1 is better)")
        L.append("")
        refs_cpu = [r for r in refs if not is_raw_name(r, servers)]
        hdr = [f"tput / {r}" for r in refs] + [f"cpu / {r}" for r in refs_cpu]
        L.append("| job | " + " | ".join(hdr) + " |")
        L.append("|---|" + "---:|" * len(hdr))
        for job in jobs:
            row = per_job[job["name"]]
            cells = [f"{row[r]['throughput']:.2f}" if row[r]["throughput"] is not None else "—"
                     for r in refs]
            cells += [f"{row[r]['cpu']:.2f}" if row[r]["cpu"] is not None else "—"
                      for r in refs_cpu]
            L.append(f"| {job['name']} | " + " | ".join(cells) + " |")
        L.append("")


def is_raw_name(name, servers):
    return any(s.name == name and s.is_raw for s in servers)


# ----------------------------------------------------------------------------------------------
# Main

def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog=os.environ.get("BENCH_ARGV0", "bench"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark marsd's NBD server against nbdkit (file plugin), qemu-nbd and raw "
                    "fio on the same kind of backing file. Prints a markdown report on stdout "
                    "(progress goes to stderr).",
        epilog="Server variants (use with --servers; add your own with --marsd-variant):\n"
               + "\n".join(f"  {k:20s} {v[3]}" for k, v in VARIANTS.items())
               + "\n\nJobs: " + ", ".join(j["name"] for j in ALL_JOBS))
    ap.add_argument("--servers", default=DEFAULT_SERVERS,
                    help=f"comma-separated server variants, in this order (default {DEFAULT_SERVERS})")
    ap.add_argument("--rounds", type=int, help="rounds (default 3; --quick: 1)")
    ap.add_argument("--runtime", type=float, help="seconds per fio job (default 10; --quick: 2)")
    ap.add_argument("--ramp", type=float, help="fio ramp seconds (default 1; --quick: 0.5)")
    ap.add_argument("--size", type=parse_size, help="export/backing file size (default 4G; --quick: 512M)")
    ap.add_argument("--region", type=parse_size,
                    help="fio jobs use the first REGION bytes (default 1G; --quick: 256M)")
    ap.add_argument("--copy-size", type=parse_size,
                    help="nbdcopy in size (default 2G; --quick: 256M)")
    ap.add_argument("--alloc", choices=("prealloc", "sparse"), default="prealloc",
                    help="backing files: posix_fallocate'd (default) or sparse")
    ap.add_argument("--transport", choices=("both", "unix", "tcp"), default="both",
                    help="both (default): every NBD server is measured over the Unix socket and "
                         "over TCP on 127.0.0.1 (two instances, interleaved in every round, one "
                         "table set per transport); or only one of them")
    ap.add_argument("--jobs", help="comma-separated subset of jobs (default: all)")
    ap.add_argument("--page-cache", choices=("warm", "cold", "asis"), default="warm",
                    help="warm (default): before every measured job, sync and make sure the data "
                         "the job touches is in the page cache (read it, untimed), or not cached at "
                         "all for O_DIRECT variants; cold: sync and drop the whole page cache "
                         "before every job (reads then measure the disk); asis: only sync")
    ap.add_argument("--lock-wait", type=float, default=1800,
                    help="another Tools/bench running? wait up to this many seconds for it "
                         f"(lock {LOCKFILE}; default 1800, 0 = fail at once)")
    ap.add_argument("--nbdcopy-conns", type=int, default=4,
                    help="nbdcopy -C and -T (default 4)")
    ap.add_argument("--nbdcopy-flush", action="store_true",
                    help="nbdcopy in with --flush (default: no flush, like the fio jobs)")
    ap.add_argument("--marsd", default=os.environ.get("MARSD", DEFAULT_MARSD),
                    help=f"marsd binary (default $MARSD or {DEFAULT_MARSD})")
    ap.add_argument("--marsd-args", default="",
                    help="extra arguments appended to every marsd command (shell-quoted string)")
    ap.add_argument("--marsd-variant", action="append", default=[], metavar="NAME=ARGS",
                    help="define a marsd variant NAME with extra ARGS, e.g. "
                         "--marsd-variant 'marsd-x=--cache direct --io-engine posix'")
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run: 1 round, 2 s jobs, 512M export, 256M copy")
    ap.add_argument("--workdir", help="parent directory for the temp dir (default /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (files, logs, fio JSON)")
    ap.add_argument("--json", help="write results as JSON to this file")
    ap.add_argument("--markdown", help="also write the markdown report to this file")
    ap.add_argument("--list-servers", action="store_true", help="list server variants and exit")
    a = ap.parse_args(argv)

    q = a.quick
    defaults = dict(rounds=1 if q else 3, runtime=2.0 if q else 10.0, ramp=0.5 if q else 1.0,
                    size=512 * MiB if q else 4 * GiB, region=256 * MiB if q else 1 * GiB,
                    copy_size=256 * MiB if q else 2 * GiB)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.region = min(a.region, a.size)
    if a.copy_size > a.size:
        ap.error(f"--copy-size ({a.copy_size}) must not exceed --size ({a.size})")
    if a.rounds < 1 or a.runtime <= 0 or a.ramp < 0 or a.nbdcopy_conns < 1:
        ap.error("--rounds, --runtime and --nbdcopy-conns must be positive, --ramp >= 0")
    a.transports = ["unix", "tcp"] if a.transport == "both" else [a.transport]
    a.marsd_args = shlex.split(a.marsd_args)
    a.variants = dict(VARIANTS)
    for spec in a.marsd_variant:
        name, sep, args = spec.partition("=")
        if not sep or not name or "," in name:
            ap.error(f"bad --marsd-variant {spec!r}; expected NAME=ARGS")
        a.variants[name] = ("marsd", shlex.split(args), [], f"marsd {args}")
    if a.list_servers:
        for k, v in a.variants.items():
            print(f"{k:20s} {v[3]}")
        sys.exit(0)
    a.server_names = [s.strip() for s in a.servers.split(",") if s.strip()]
    unknown = [s for s in a.server_names if s not in a.variants]
    if unknown:
        ap.error(f"unknown server(s) {', '.join(unknown)}; known: {', '.join(a.variants)}")
    if len(set(a.server_names)) != len(a.server_names):
        ap.error("--servers lists a server twice")
    if a.jobs:
        names = [j.strip() for j in a.jobs.split(",") if j.strip()]
        bad = [j for j in names if j not in JOB_BY_NAME]
        if bad:
            ap.error(f"unknown job(s) {', '.join(bad)}; known: {', '.join(JOB_BY_NAME)}")
        a.job_list = [j for j in ALL_JOBS if j["name"] in names]
    else:
        a.job_list = list(ALL_JOBS)
    return a


def take_lock(wait_s):
    """One benchmark at a time on this machine: two concurrent runs would measure each other."""
    f = open(LOCKFILE, "a+")
    deadline = time.monotonic() + wait_s
    next_note = 0.0
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            now = time.monotonic()
            if now >= deadline:
                raise BenchError(f"another benchmark holds {LOCKFILE} ({holder}); gave up after "
                                 f"{wait_s:.0f} s (see --lock-wait)")
            if now >= next_note:
                log(f"another benchmark is running ({holder}); waiting for it "
                    f"(up to {max(0, deadline - now):.0f} s more)")
                next_note = now + 60
            time.sleep(1)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n")
    f.flush()
    return f  # keep it open: the lock lives as long as the process


def check_tools(cfg):
    kinds = {cfg.variants[n][0] for n in cfg.server_names}
    need = ["fio", "nbdinfo"]
    if any(j["name"].startswith("nbdcopy") for j in cfg.job_list):
        need.append("nbdcopy")
    if "nbdkit" in kinds:
        need.append("nbdkit")
    if "qemu-nbd" in kinds:
        need.append("qemu-nbd")
    missing = [t for t in need if not shutil.which(t)]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (Tools/bench installs them with "
                         "apt-get: fio nbdkit qemu-utils libnbd-bin)")
    if "marsd" in kinds:
        m = cfg.marsd
        if not (os.path.isfile(m) and os.access(m, os.X_OK)):
            found = shutil.which(m) if os.sep not in m else None
            if not found:
                raise BenchError(
                    f"marsd was requested (--servers {cfg.servers}) but the binary {m!r} does not "
                    "exist or is not executable.\n  Build it (swift build -c release), point "
                    "--marsd or $MARSD at it, or leave marsd out of --servers "
                    "(e.g. --servers nbdkit,qemu-nbd,raw).")
            cfg.marsd = found
        cfg.marsd = os.path.abspath(cfg.marsd)


def main(argv):
    cfg = parse_args(argv)
    command = shlex.join([os.environ.get("BENCH_ARGV0", sys.argv[0])] + argv)
    check_tools(cfg)

    # signals -> normal exception path, so that `finally` stops the servers
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    t_lock = time.monotonic()
    lock = take_lock(cfg.lock_wait)  # noqa: F841 (held until exit)
    t_start = time.monotonic()
    lock_wait_s = t_start - t_lock
    parent = os.path.abspath(cfg.workdir or "/var/tmp")
    os.makedirs(parent, exist_ok=True)
    cfg.workdir = tempfile.mkdtemp(prefix="marsd-bench.", dir=parent)
    sockdir = os.path.join(cfg.workdir, "s")
    if len(sockdir) > 80:  # sun_path is 108 bytes
        sockdir = tempfile.mkdtemp(prefix="mb.", dir="/tmp")
    else:
        os.mkdir(sockdir)

    servers = []
    warnings = []
    results = {}
    versions = {}
    cache_policy = ""
    evicted = []
    exit_code = 0
    try:
        servers = [Server(n, cfg, cfg.workdir, sockdir, t) for n in cfg.server_names
                   for t in (cfg.transports if cfg.variants[n][0] != "raw" else [None])]
        versions = {
            "fio": version_of(["fio", "--version"]),
            "nbdkit": version_of(["nbdkit", "--version"]),
            "qemu-nbd": version_of(["qemu-nbd", "--version"]),
            "nbdcopy": version_of(["nbdcopy", "--version"]),
        }
        if any(s.kind == "marsd" for s in servers):
            versions["marsd"] = version_of([cfg.marsd, "--version"])

        # space and memory
        need_disk = len(servers) * cfg.size + cfg.copy_size
        st = os.statvfs(cfg.workdir)
        free = st.f_bavail * st.f_frsize
        if need_disk > free * 0.95:
            raise BenchError(f"need {need_disk / GiB:.1f} GiB in {cfg.workdir}, "
                             f"only {free / GiB:.1f} GiB free (use a smaller --size)")
        if cfg.page_cache == "cold" and not drop_caches():
            raise BenchError("--page-cache cold needs root (writes /proc/sys/vm/drop_caches)")
        mem = meminfo()
        # with --page-cache warm each job re-reads what it needs, so one export (plus the copy
        # source) must fit; otherwise all of them must stay cached at once
        if cfg.page_cache == "warm":
            cached_need = cfg.size + cfg.copy_size
        else:
            cached_need = sum(cfg.size for s in servers if not s.direct) + cfg.copy_size
        avail = mem.get("MemAvailable", mem["MemTotal"])
        if cfg.page_cache != "cold" and cached_need > 0.8 * avail:
            warnings.append(
                f"the data to keep cached ({cached_need / GiB:.1f} GiB) does not comfortably fit "
                f"in the page cache ({avail / GiB:.1f} GiB available): jobs may partly read from "
                "disk, unevenly between servers; use a smaller --size")
        for w in warnings:
            log("WARNING: " + w)

        # estimate
        n_fio = sum(1 for j in cfg.job_list if j in FIO_JOBS)
        est = cfg.rounds * len(servers) * n_fio * (cfg.runtime + cfg.ramp + 1.5)
        log(f"workdir {cfg.workdir}; servers {', '.join(cfg.server_names)}; "
            f"{cfg.rounds} round(s) x {len(cfg.job_list)} jobs; fio alone takes about "
            f"{est / 60:.1f} min plus setup and nbdcopy")

        # setup: files, servers, prefill
        if any(j["name"] == "nbdcopy-in" for j in cfg.job_list):
            cfg.randfile = os.path.join(cfg.workdir, "random.src")
            log(f"writing {fmt_size(cfg.copy_size)} of random data to {cfg.randfile}")
            make_random_file(cfg.randfile, cfg.copy_size)
        for s in servers:
            s.create_file()
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
            if s.multi_conn is False:
                warnings.append(f"{s.name} does not advertise multi-conn: the 2conn jobs still "
                                "use 2 connections, nbdcopy uses only 1")
            log(f"{s.name} ready" + ("" if s.is_raw else f" (pid {s.pid()}, {s.uri}, "
                                     f"multi-conn {s.multi_conn})"))
        for s in servers:
            secs = prefill(s, cfg)
            log(f"prefilled {s.name}: {fmt_size(cfg.size)} in {secs:.1f} s")
        os.sync()

        cache_policy = {
            "warm": "before every measured job (untimed): sync, then the data the job touches "
                    "(fio: the region; nbdcopy-in: the source file and the target range; "
                    "nbdcopy-out: the whole file) is read into the page cache, or evicted for "
                    "O_DIRECT variants. The page cache is never dropped: every buffered server "
                    "runs fully cached, so the figures measure the server, not the disk, and "
                    "other processes dropping caches do not skew them",
            "cold": "sync + drop of the whole page cache before every measured job "
                    "(cold cache: reads measure the disk)",
            "asis": "sync before every measured job; the page cache is left as it is",
        }[cfg.page_cache]

        # rounds
        for rnd in range(cfg.rounds):
            k = rnd % len(servers)
            order = servers[k:] + servers[:k]
            log(f"round {rnd + 1}/{cfg.rounds}: order {', '.join(s.name for s in order)}")
            for job in cfg.job_list:
                for s in order:
                    if s.is_raw and s.direct and job in COPY_JOBS:
                        continue  # nbdcopy has no O_DIRECT mode for local files
                    resident = prepare_cache(s, job, cfg)
                    if job in FIO_JOBS:
                        res = run_fio_job(s, job, cfg, rnd + 1)
                    else:
                        res = run_copy_job(s, job, cfg, rnd + 1)
                    res["round"] = rnd + 1
                    res["resident_before_warm"] = resident
                    if resident is not None and resident < 0.95:
                        evicted.append(f"r{rnd + 1} {job['name']} {s.name}: "
                                       f"{resident * 100:.0f}%")
                    results.setdefault(job["name"], {}).setdefault(s.name, []).append(res)
                    cpu = res["cpu_per_unit"]
                    log(f"  r{rnd + 1} {job['name']:24s} {s.name:16s} "
                        f"{fmt_value(job['metric'], res['value']):>8s} {unit(job):5s}"
                        + (f"  server cpu {fmt_cpu(job, cpu)} {cpu_unit(job)}" if cpu is not None
                           else ""))
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); stopping servers")
        exit_code = 130
    except BenchError as e:
        log(f"ERROR: {e}")
        exit_code = 1
    finally:
        for s in servers:
            try:
                s.stop()
            except Exception as e:  # keep stopping the others
                log(f"stopping {s.name}: {e}")
        kill_all_children()
        if sockdir != os.path.join(cfg.workdir, "s"):
            shutil.rmtree(sockdir, ignore_errors=True)
        if not cfg.keep:
            shutil.rmtree(cfg.workdir, ignore_errors=True)
        else:
            log(f"kept {cfg.workdir}")

    if not results:
        return exit_code or 1

    jobs = [j for j in cfg.job_list if j["name"] in results]
    summary = summarize(results, servers, jobs)
    ratios = {t: compute_ratios(summary, group, jobs) for t, group in transport_groups(cfg, servers)}
    mem = meminfo()
    u = platform.uname()
    meta = dict(
        command=command,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=time.monotonic() - t_start, lock_wait_seconds=lock_wait_s,
        hostname=u.node, kernel=f"{u.system} {u.release} {u.version} {u.machine}",
        cpus=os.cpu_count(), cpu_model=cpu_model(), mem_total_gib=mem["MemTotal"] / GiB,
        loadavg_start=None, loadavg_end=" ".join(f"{x:.2f}" for x in os.getloadavg()),
        versions=versions, fs=fs_type(parent), cache_policy=cache_policy,
        warnings=warnings, complete=(exit_code == 0), cache_evicted_before=evicted,
    )
    meta["loadavg_start"] = LOADAVG_START
    md = render_markdown(meta, cfg, servers, jobs, summary, ratios)
    if exit_code:
        md += "\n**INCOMPLETE RUN** (see the error above); the figures cover what finished.\n"
    print(md)
    if cfg.markdown:
        with open(cfg.markdown, "w") as f:
            f.write(md + "\n")
    if cfg.json:
        doc = dict(
            meta=meta,
            config=dict(rounds=cfg.rounds, runtime_s=cfg.runtime, ramp_s=cfg.ramp, size=cfg.size,
                        region=cfg.region, copy_size=cfg.copy_size, alloc=cfg.alloc,
                        transports=cfg.transports, page_cache=cfg.page_cache,
                        nbdcopy_conns=cfg.nbdcopy_conns, nbdcopy_flush=cfg.nbdcopy_flush,
                        servers=cfg.server_names, jobs=[j["name"] for j in jobs]),
            servers={s.name: dict(kind=s.kind, variant=s.variant, transport=s.transport,
                                  description=s.desc,
                                  command=s.argv, multi_conn=s.multi_conn) for s in servers},
            # summary.*.cpu_median and results.*.cpu_per_unit are in cpu_unit (microseconds)
            jobs={j["name"]: dict(j, unit=unit(j),
                                  cpu_unit="us/GiB" if j["name"].startswith("nbdcopy") else "us/req")
                  for j in jobs},
            summary=summary, ratios=ratios, results=results,
        )
        with open(cfg.json, "w") as f:
            json.dump(doc, f, indent=1)
        log(f"wrote {cfg.json}")
    return exit_code


LOADAVG_START = " ".join(f"{x:.2f}" for x in os.getloadavg())

if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        sys.exit(130)
