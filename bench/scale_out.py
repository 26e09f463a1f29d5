"""Scale-out measurements (issue 13); prints JSON.

    python bench/scale_out.py store      # the registry's shared store: flock + journal vs SQLite WAL
    python bench/scale_out.py metrics    # GET /metrics at 20 Hz on a server with 10,000 adapters

`store` times what each design costs per operation, in one directory on this machine's disk:
a recorded write (lock, catch up, append one fsynced record, unlock), the check a replica makes
when nothing changed, following one change made by another process, and a cold read of 10,000
records. The flock side is the registry's own code; the SQLite side is the obvious schema
(one row per adapter, a change counter) in WAL mode with synchronous=FULL (each commit durable,
as each journal line is).

`metrics` starts the real server on a registry of N adapters, scrapes /metrics at the router's
rate for a while, and reports latency percentiles and the server's CPU time (from /proc) against
the same time idle.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ServerProcess, base_shape, random_loreft  # noqa: E402
from server import adapter_file  # noqa: E402
from server.model import ModelShape  # noqa: E402
from server.registry import AdapterRecord, Registry  # noqa: E402

SHAPE = ModelShape("llama", 576, 30)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def ms(xs: list[float]) -> dict:
    return {"p50_ms": round(statistics.median(xs) * 1e3, 3), "p99_ms": round(pct(xs, 0.99) * 1e3, 3), "n": len(xs)}


def record(i: int) -> dict:
    return asdict(AdapterRecord(
        name=f"r{i:05d}", version=1, sha256=f"{i:064x}", bytes=37816, created=time.time(), types=["loreft"],
        layers=[10], rank=4, positions="f2+l2", share_weights=True, file_size=37816, file_mtime_ns=time.time_ns(),
    ))


def store(n_writes: int, n_records: int) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        # flock + journal: the registry's code path for a write, minus the adapter file itself
        a = Registry(Path(tmp) / "flock", SHAPE, max_rank=64, max_adapter_bytes=1 << 20)
        b = Registry(Path(tmp) / "flock", SHAPE, max_rank=64, max_adapter_bytes=1 << 20)
        a.open()
        b.open()
        writes, follows, checks = [], [], []
        for i in range(n_writes):
            t = time.perf_counter()
            with a._write_lock, a._shared.lock(exclusive=True):
                a._sync()
                a._apply({f"w{i}": AdapterRecord(**{**record(i), "name": f"w{i}"})})
                a._journal([{"put": {**record(i), "name": f"w{i}"}}])
            writes.append(time.perf_counter() - t)
            t = time.perf_counter()
            b.refresh()
            follows.append(time.perf_counter() - t)
            t = time.perf_counter()
            b.refresh()
            checks.append(time.perf_counter() - t)
        out["flock_journal"] = {"write": ms(writes), "follow_one_change": ms(follows), "check_unchanged": ms(checks)}

        # SQLite in WAL mode beside the files
        path = Path(tmp) / "registry.sqlite3"
        w = sqlite3.connect(path, isolation_level=None)
        w.execute("PRAGMA journal_mode=WAL")
        w.execute("PRAGMA synchronous=FULL")
        w.execute("CREATE TABLE adapters (name TEXT PRIMARY KEY, seq INTEGER, record TEXT)")
        w.execute("CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT)")
        r = sqlite3.connect(path, isolation_level=None)
        last = 0
        writes, follows, checks = [], [], []
        version = r.execute("PRAGMA data_version").fetchone()[0]
        for i in range(n_writes):
            t = time.perf_counter()
            w.execute("BEGIN IMMEDIATE")
            seq = w.execute("INSERT INTO changes (name) VALUES (?)", (f"w{i}",)).lastrowid
            w.execute("INSERT OR REPLACE INTO adapters VALUES (?, ?, ?)", (f"w{i}", seq, json.dumps(record(i))))
            w.execute("COMMIT")
            writes.append(time.perf_counter() - t)
            t = time.perf_counter()
            version = r.execute("PRAGMA data_version").fetchone()[0]
            rows = r.execute("SELECT a.record FROM changes c JOIN adapters a ON a.name = c.name WHERE c.seq > ?",
                             (last,)).fetchall()
            last += len(rows)
            follows.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert r.execute("PRAGMA data_version").fetchone()[0] == version
            checks.append(time.perf_counter() - t)
        out["sqlite_wal"] = {"write": ms(writes), "follow_one_change": ms(follows), "check_unchanged": ms(checks)}

        # cold read of n_records
        big = Registry(Path(tmp) / "big", SHAPE, max_rank=64, max_adapter_bytes=1 << 20)
        big.open()
        with big._write_lock, big._shared.lock(exclusive=True):
            big._apply({f"r{i:05d}": AdapterRecord(**record(i)) for i in range(n_records)})
            big._compact()
        t = time.perf_counter()
        fresh = Registry(Path(tmp) / "big", SHAPE, max_rank=64, max_adapter_bytes=1 << 20)
        with fresh._write_lock, fresh._shared.lock(exclusive=False):
            fresh._adopt(fresh._shared.reload(), whole=True)
        json_s = time.perf_counter() - t
        w.execute("BEGIN")
        w.executemany("INSERT OR REPLACE INTO adapters VALUES (?, 0, ?)",
                      ((f"r{i:05d}", json.dumps(record(i))) for i in range(n_records)))
        w.execute("COMMIT")
        t = time.perf_counter()
        rows = [AdapterRecord(**json.loads(x)) for (x,) in r.execute("SELECT record FROM adapters")]
        sql_s = time.perf_counter() - t
        out["cold_read_records"] = {"records": n_records, "flock_index_json_s": round(json_s, 4),
                                    "sqlite_select_s": round(sql_s, 4), "sqlite_rows": len(rows)}
        w.close()
        r.close()
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics(adapters: int, seconds: float, hz: float) -> dict:
    shape = base_shape(None)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "adapters"
        directory.mkdir()
        data = adapter_file.to_bytes(random_loreft(shape, 9000, layers=(10,)))
        for i in range(adapters):
            (directory / f"r{i:05d}.safetensors").write_bytes(data)
        server = ServerProcess(directory, Path(tmp) / "server.log", env={"REFT_SCAN_INTERVAL": "2"})
        server.start()
        try:
            pid = server.proc.pid
            time.sleep(3)
            c0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(seconds)
            idle = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
            lat: list[float] = []
            size = 0
            with httpx.Client(base_url=server.url, timeout=10) as client:
                c0, t0 = cpu_seconds(pid), time.monotonic()
                nxt = t0
                while time.monotonic() - t0 < seconds:
                    t = time.perf_counter()
                    r = client.get("/metrics")
                    lat.append(time.perf_counter() - t)
                    size = len(r.content)
                    nxt += 1 / hz
                    time.sleep(max(0.0, nxt - time.monotonic()))
                busy = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
            return {"adapters": adapters, "rate_hz": hz, "seconds": seconds, "latency": ms(lat),
                    "bytes": size, "server_cpu_share_scraped": round(busy, 4), "server_cpu_share_idle": round(idle, 4),
                    "cpu_ms_per_scrape": round((busy - idle) * 1e3 / hz, 3)}
        finally:
            server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["store", "metrics"])
    p.add_argument("--writes", type=int, default=200)
    p.add_argument("--records", type=int, default=10_000)
    p.add_argument("--adapters", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--hz", type=float, default=20.0)
    args = p.parse_args()
    result = store(args.writes, args.records) if args.what == "store" else metrics(args.adapters, args.seconds, args.hz)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
