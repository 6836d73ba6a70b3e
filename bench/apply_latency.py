#!/usr/bin/env python3
"""Writers on a device that is receiving a big file (issue 16, decision 0017).

    bench/apply_latency.py --bin BEFORE --bin AFTER [--mib 256] [--rate 32] [--rounds 1]
    bench/apply_latency.py --bin AFTER --rss-mib 1024      # peak RSS of the receiving daemon

For each binary, in the same run: a server, device A (direct) and device B whose traffic
from the server goes through a pacing proxy of this script (--rate MiB/s per connection).
A writes a file of --mib MiB of random bytes; while B receives and applies it, a writer on
B creates, writes (4 KiB) and closes a new file every 10 ms in B's mount. Printed: the
latency of those create+write+close (p50, p99, max, count) and how long B took to have the
file. With --rss-mib, no proxy: B's daemon peak RSS (VmHWM) after applying a file that big.
Needs root (FUSE). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB = 1 << 20


class PacingProxy:
    """TCP proxy; what the server sends is paced at `rate` bytes/s per connection."""

    def __init__(self, upstream: str, rate: float):
        host, port = upstream.replace("http://", "").rstrip("/").split(":")
        self.up = (host, int(port))
        self.rate = rate
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            s = socket.create_connection(self.up)
            threading.Thread(target=self._pump, args=(c, s, 0), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, self.rate), daemon=True).start()

    def _pump(self, src, dst, rate):
        start, sent = time.monotonic(), 0
        try:
            while True:
                b = src.recv(64 << 10)
                if not b:
                    break
                if rate:
                    sent += len(b)
                    ahead = sent / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
                dst.sendall(b)
        except OSError:
            pass
        for x in (src, dst):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.stop = True
        self.sock.close()


def run(bin_, *args, check=True, **kw):
    r = subprocess.run([bin_, *args], capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])}: {r.stderr.strip()}")
    return r


def status(bin_, home):
    r = run(bin_, "status", "--home", str(home), "--json", check=False)
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {}


def measure(bin_: str, mib: int, rate_mib: float, work: Path, rss: bool) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    srv = subprocess.Popen(
        [bin_, "server", "--listen", "127.0.0.1:0", "--data", str(data)],
        stdout=subprocess.PIPE, stderr=open(work / "server.log", "w"), text=True,
    )
    url = None
    for line in srv.stdout:
        if "listening on " in line:
            url = line.split("listening on ")[1].strip()
            break
    threading.Thread(target=lambda: [None for _ in srv.stdout], daemon=True).start()
    proxy = None
    mounts = []
    try:
        tok = work / "admin.token.copy"
        tok.write_text((data / "admin.token").read_text())
        pw = work / "pw"
        pw.write_text("correct horse battery staple")
        run(bin_, "admin", "--server", url, "--admin-token-file", str(tok), "user", "add",
            "ann", "--password-file", str(pw))
        homes = {}
        for dev in ("a", "b"):
            home, mp = work / f"home-{dev}", work / f"mnt-{dev}"
            mp.mkdir()
            run(bin_, "login", "--server", url, "--user", "ann", "--password-file", str(pw),
                "--device", dev, "--home", str(home))
            homes[dev] = (home, mp)
        if not rss:
            proxy = PacingProxy(url, rate_mib * MiB)
            dj = homes["b"][0] / "device.json"
            dj.write_text(dj.read_text().replace(url, proxy.url))
        for dev in ("a", "b"):
            home, mp = homes[dev]
            run(bin_, "mount", str(mp), "--home", str(home), "--quiet-ms", "100")
            mounts.append(mp)
        (a_home, a_mp), (b_home, b_mp) = homes["a"], homes["b"]
        with open(a_mp / "big.bin", "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())
        t_written = time.monotonic()
        # A has sent it when its outbox is empty; B has it when its cursor reaches A's seq.
        while True:
            s = status(bin_, a_home)
            if s.get("pending_uploads", {}).get("count") == 0 and s.get("unsealed_changes") == 0:
                break
            time.sleep(0.2)
        last = json.loads((a_home / "sync.json").read_text()).get("server_seq") or 0
        lat, done = [], threading.Event()

        def writer():
            i = 0
            while not done.is_set():
                p = b_mp / f"small-{i}.txt"
                t0 = time.monotonic()
                with open(p, "wb") as f:
                    f.write(b"x" * 4096)
                lat.append((time.monotonic() - t0) * 1e3)
                i += 1
                time.sleep(0.01)

        w = None if rss else threading.Thread(target=writer, daemon=True)
        if w:
            w.start()
        while (status(bin_, b_home).get("cursor") or 0) < last:
            time.sleep(0.2)
        received = time.monotonic() - t_written
        done.set()
        if w:
            w.join()
        out = {"received_s": round(received, 1)}
        if lat:
            q = statistics.quantiles(lat, n=100, method="inclusive")
            out.update(
                writes=len(lat), p50_ms=round(statistics.median(lat), 1),
                p99_ms=round(q[98], 1), max_ms=round(max(lat), 1),
                over_50ms=sum(1 for x in lat if x > 50),
            )
        pid = int((b_home / "mount.pid").read_text().split()[0])
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                out["b_peak_rss_mib"] = round(int(line.split()[1]) / 1024)
        return out
    finally:
        for mp in mounts:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
        time.sleep(1)
        if proxy:
            proxy.close()
        srv.kill()
        srv.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", action="append", required=True)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rate", type=float, default=32.0, help="MiB/s from the server to B")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rss-mib", type=int, default=0)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    base = Path(args.work or tempfile.mkdtemp(prefix="dd-apply-bench-"))
    for r in range(args.rounds):
        for n, b in enumerate(args.bin):
            w = base / f"r{r}-bin{n}"
            if args.rss_mib:
                res = measure(b, args.rss_mib, 0, w, rss=True)
            else:
                res = measure(b, args.mib, args.rate, w, rss=False)
            print(json.dumps({"bin": b, "round": r, **res}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
