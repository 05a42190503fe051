"""Generate the Python stubs of proto/sie/v1 into sdk/sie_sdk/v1.

protoc writes absolute imports (`from sie.v1 import common_pb2`); the stubs live inside the
`sie_sdk` package, so those imports are rewritten to `from sie_sdk.v1 import ...`. Descriptor file
names stay `sie/v1/*.proto`, so reflection and any-language clients see the contract unchanged.

Usage: python scripts/gen_proto.py [--check]   (--check: fail if the committed stubs drifted)
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
TARGET = ROOT / "sdk" / "sie_sdk" / "v1"
IMPORT_RE = re.compile(r"^from sie\.v1 import ", re.MULTILINE)
HEADER = '"""Generated from proto/sie/v1 by scripts/gen_proto.py; do not edit."""\n'


def generate(out: Path) -> None:
    import grpc_tools

    # protoc finds the mypy-protobuf plugins on PATH; they sit beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "sie" / "v1").glob("*.proto")
    )
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out=quiet:{out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    gen_dir = out / "sie" / "v1"
    for path in gen_dir.iterdir():
        text = IMPORT_RE.sub("from sie_sdk.v1 import ", path.read_text())
        (out / path.name).write_text(text)
    shutil.rmtree(out / "sie")
    (out / "__init__.py").write_text(HEADER)
    (out / "py.typed").write_text("")


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        if check:
            want = {p.name: p.read_bytes() for p in out.iterdir()}
            have = (
                {p.name: p.read_bytes() for p in TARGET.iterdir() if p.is_file()}
                if TARGET.exists()
                else {}
            )
            drift = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
            if drift:
                print("generated stubs drifted from proto/ (run `make proto`):", *drift, sep="\n  ")
                return 1
            print("generated stubs match proto/")
            return 0
        if TARGET.exists():
            shutil.rmtree(TARGET)
        shutil.copytree(out, TARGET)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
