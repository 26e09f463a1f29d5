"""`make load`: start a server on the example adapters, run the locust users headless, stop.

Bounded: REFT_LOAD_USERS (default 16) users for REFT_LOAD_SECONDS (default 60) against 127.0.0.1 only.
Exits non-zero if any request failed (429 back-pressure is not a failure).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    port = free_port()
    host = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(ROOT / ".venv/bin/reft-serve"), "serve", "--adapters", str(ROOT / "adapters"), "--port", str(port)],
        cwd=ROOT, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{host}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            print("server did not become ready", file=sys.stderr)
            return 1
        users = os.environ.get("REFT_LOAD_USERS", "16")
        seconds = os.environ.get("REFT_LOAD_SECONDS", "60")
        return subprocess.call([
            str(ROOT / ".venv/bin/locust"), "-f", str(ROOT / "load_tests/locustfile.py"), "--host", host,
            "--headless", "-u", users, "-r", "4", "-t", f"{seconds}s", "--stop-timeout", "30", "--only-summary",
        ])
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
