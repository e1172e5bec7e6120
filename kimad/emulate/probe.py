"""A TCP throughput probe, run as a script inside a node's namespace: ``python probe.py recv|send ...``.

``recv ADDR PORT`` listens, prints ``ready``, takes one connection, reads it to the end and prints
``{"bytes": ..., "seconds": ...}`` (seconds from the first byte to end of stream). ``send ADDR
PORT SECONDS`` streams zeros for SECONDS seconds and closes. The receiver's figure is the one
that counts: it includes draining what the shaper had queued.
"""

from __future__ import annotations

import json
import socket
import sys
import time

CHUNK_BYTES = 64 * 1024


def receive(addr: str, port: int) -> dict:
    """Accept one stream on ``addr:port`` and return its byte count and duration (seconds)."""
    with socket.create_server((addr, port)) as server:
        print("ready", flush=True)
        server.settimeout(30.0)
        conn, _ = server.accept()
        with conn:
            total = len(conn.recv(CHUNK_BYTES))
            start = time.monotonic()
            while chunk := conn.recv(CHUNK_BYTES):
                total += len(chunk)
            return {"bytes": total, "seconds": time.monotonic() - start}


def send(addr: str, port: int, seconds: float) -> None:
    """Stream zeros to ``addr:port`` for ``seconds`` seconds."""
    payload = bytes(CHUNK_BYTES)
    with socket.create_connection((addr, port), timeout=30.0) as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.sendall(payload)


def main(argv: list[str]) -> int:
    if argv[:1] == ["recv"] and len(argv) == 3:
        print(json.dumps(receive(argv[1], int(argv[2]))), flush=True)
        return 0
    if argv[:1] == ["send"] and len(argv) == 4:
        send(argv[1], int(argv[2]), float(argv[3]))
        return 0
    print("usage: python probe.py recv ADDR PORT | send ADDR PORT SECONDS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
