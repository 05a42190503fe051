"""Run the gRPC server and the HTTP bridge together (``make run``), and stop them together.

    python scripts/run_services.py [--grpc-port 50051] [--http-port 8080] [-- <sie-server flags>]

Both run as child processes in their own session, so a terminal's Ctrl-C reaches only this
supervisor, which then sends SIGTERM to both: the server drains (NOT_SERVING, then finishes work
in flight) while the bridge stops accepting. SIGTERM to the supervisor does the same. If either
child exits on its own, the supervisor says which one and with what status, stops the other, and
exits non-zero. Standard library only: it imports neither service.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

STOP_TIMEOUT_S = 60.0


def _say(message: str) -> None:
    print(f"run_services: {message}", file=sys.stderr, flush=True)


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpc-port", type=int, default=50051)
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--host", default="0.0.0.0")
    args, rest = parser.parse_known_args(argv)
    return args, [arg for arg in rest if arg != "--"]


def _stop(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for name, proc in children.items():
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _say(f"{name} did not stop within {STOP_TIMEOUT_S:.0f}s; killing it")
            proc.kill()
            proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args, server_flags = _parse(sys.argv[1:] if argv is None else argv)
    python = sys.executable
    commands = {
        "sie-server": [
            python, "-m", "sie_server", "--host", args.host, "--port", str(args.grpc_port),
            *server_flags,
        ],
        "sie-bridge": [
            python, "-m", "sie_bridge", "--host", args.host, "--port", str(args.http_port),
            "--backend", f"127.0.0.1:{args.grpc_port}",
        ],
    }  # fmt: skip
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children: dict[str, subprocess.Popen[bytes]] = {}
    for name, command in commands.items():
        children[name] = subprocess.Popen(command, start_new_session=True)
        _say(f"started {name} (pid {children[name].pid})")
    _say(f"gRPC on :{args.grpc_port}, HTTP on :{args.http_port}; Ctrl-C stops both")
    while not stopping:
        for name, proc in children.items():
            code = proc.poll()
            if code is not None:
                other = next(n for n in children if n != name)
                _say(f"{name} exited with status {code}; stopping {other}")
                _stop(children)
                return code or 1
        time.sleep(0.2)
    _say("stopping sie-server and sie-bridge")
    _stop(children)
    codes = {name: proc.returncode for name, proc in children.items()}
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        _say(f"exit status: {failed}")
        return 1
    _say("stopped")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
