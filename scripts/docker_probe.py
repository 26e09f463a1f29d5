"""Run inside the container by scripts/docker-test.sh (`docker exec -i NAME python - CMD ...`): stdlib only.

Commands print one line and exit 0 when the server answered as expected:
  health                      GET /health is 200
  generate ADAPTER [N]        POST /generate with ADAPTER gives 200 and some text (N tokens exactly, if given)
  upload NAME STATUS [KEY]    POST /v1/adapters (a copy of emoji.safetensors) answers STATUS
  upload-archive NAME POSITIONS STATUS [KEY]
                              POST /v1/adapters with the pyreft .zip read from stdin answers STATUS
  models NAME...              GET /v1/models lists every NAME
  writable DIR...             a file can be created in every DIR
  read-only DIR...            creating a file in any DIR fails with EROFS (a read-only file system)
"""

from __future__ import annotations

import errno
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

BASE = f"http://127.0.0.1:{os.environ.get('REFT_PORT', '8000')}"
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def call(method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(BASE + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def multipart(fields: dict[str, str], file_name: str, file_bytes: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + file_bytes + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "health":
        status, body = call("GET", "/health")
        print(status, body.decode()[:200])
        return 0 if status == 200 else 1
    if cmd == "generate":
        n = int(args[1]) if len(args) > 1 else None
        payload = {"adapter": args[0], "prompt": PROMPT, "max_new_tokens": n or 16, "ignore_eos": n is not None}
        t0 = time.monotonic()
        status, body = call("POST", "/generate", json.dumps(payload).encode(), {"content-type": "application/json"})
        reply = json.loads(body) if status == 200 else {}
        tokens = len(reply.get("token_ids", []))
        text = reply.get("text", body.decode()[:300])
        print(status, f"{tokens} tokens in {time.monotonic() - t0:.1f} s:", json.dumps(text))
        return 0 if status == 200 and reply["text"] and (n is None or tokens == n) else 1
    if cmd == "upload":
        name, expected = args[0], int(args[1])
        adapters = os.environ.get("REFT_ADAPTERS", "/srv/adapters")
        with open(os.path.join(adapters, "emoji.safetensors"), "rb") as f:
            body, content_type = multipart({"name": name}, f"{name}.safetensors", f.read())
        headers = {"content-type": content_type}
        if len(args) > 2:
            headers["authorization"] = f"Bearer {args[2]}"
        status, reply = call("POST", "/v1/adapters", body, headers)
        print(status, reply.decode()[:300])
        return 0 if status == expected else 1
    if cmd == "upload-archive":
        name, positions, expected = args[0], args[1], int(args[2])
        body, content_type = multipart({"name": name, "positions": positions, "share_weights": "true"},
                                       f"{name}.zip", sys.stdin.buffer.read())
        headers = {"content-type": content_type}
        if len(args) > 3:
            headers["authorization"] = f"Bearer {args[3]}"
        status, reply = call("POST", "/v1/adapters", body, headers)
        print(status, reply.decode()[:300])
        return 0 if status == expected else 1
    if cmd in ("writable", "read-only"):
        results = {}
        for directory in args:
            try:
                with tempfile.NamedTemporaryFile(dir=directory):
                    results[directory] = "writable"
            except OSError as e:
                results[directory] = errno.errorcode.get(e.errno, str(e.errno))
        print(" ".join(f"{d}: {r}" for d, r in results.items()))
        wanted = "writable" if cmd == "writable" else "EROFS"
        return 0 if all(r == wanted for r in results.values()) else 1
    if cmd == "models":
        status, body = call("GET", "/v1/models")
        names = {m["id"] for m in json.loads(body)["data"]} if status == 200 else set()
        missing = sorted(set(args) - names)
        print(status, "missing:" if missing else "all listed:", " ".join(missing or args))
        return 0 if status == 200 and not missing else 1
    print(f"unknown command {cmd}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
