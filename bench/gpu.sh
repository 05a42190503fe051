#!/usr/bin/env bash
# The GPU bench in one call (bench/README.md, "On a GPU"): our server against the same model in
# process, bf16, at 64 and 256 clients, with GPU utilisation; about 4 minutes on an H100, and
# never more than SIE_GPU_TIMEOUT_S + 60 s.
#
#   bash bench/gpu.sh [--tiny] [bench/bench_gpu.py flags...]
#
# 1. Installs the carried wheels (bench/gpu_wheels/*.whl, from `make gpu-wheels`) that this
#    Python lacks, or has older or of another major version, into SIE_GPU_SITE, and puts our
#    packages (sdk/, server/, http_bridge/) on PYTHONPATH: the same modules `pip install -e .`
#    would expose, with no build step and nothing fetched.
# 2. Checks that everything the server and the bench import is there.
# 3. Runs bench/bench_gpu.py under `timeout`; it writes gpu.json, gpu.md and server.log to $OUT,
#    and this script adds gpu.log (everything printed).
#
# Environment: OUT (results folder; default: a new folder under /tmp), PYTHON (default:
# .venv/bin/python when present, else python3), SIE_GPU_TIMEOUT_S (hard limit of the bench,
# default 420), SIE_GPU_WHEELS (default bench/gpu_wheels), SIE_GPU_SITE (where wheels are
# installed, default /tmp/sie-gpu-site).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-$(mktemp -d /tmp/sie-gpu-XXXXXX)}
mkdir -p "$OUT"
export OUT

main() {
    local started py wheels site limit need rc
    started=$(date +%s)
    py=${PYTHON:-}
    if [ -z "$py" ]; then
        if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
    fi
    wheels=${SIE_GPU_WHEELS:-bench/gpu_wheels}
    site=${SIE_GPU_SITE:-/tmp/sie-gpu-site}
    limit=${SIE_GPU_TIMEOUT_S:-420}
    echo "== gpu.sh: $(date -u '+%F %T') UTC, $("$py" --version 2>&1) ($py), results in $OUT"
    command -v nvidia-smi >/dev/null && nvidia-smi -L

    # 1. Carried wheels: install each one whose distribution is absent, older or of another major
    #    version here.
    if compgen -G "$wheels/*.whl" >/dev/null; then
        need=$("$py" - "$wheels" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    from packaging.version import Version
except ImportError:  # no packaging: install every wheel
    Version = None
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, want = wheel.name.split("-")[:2]
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    # Older, or another major version (protobuf refuses stubs of another major), or unknown.
    install = (have is None or Version is None or Version(have) < Version(want)
               or Version(have).major != Version(want).major)
    print(f"   {name}: here {have or 'absent'}, carried {want}: "
          f"{'install' if install else 'keep'}", file=sys.stderr)
    if install:
        print(wheel)
PYEOF
        ) || { echo "gpu.sh: could not read the carried wheels"; return 2; }
        if [ -n "$need" ]; then
            # shellcheck disable=SC2086  # one path per word
            "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$site" $need || { echo "gpu.sh: wheel install failed"; return 2; }
        fi
    else
        echo "   no wheels in $wheels (make gpu-wheels): using what this Python has"
    fi
    export PYTHONPATH="$site:$ROOT/sdk:$ROOT/server:$ROOT/http_bridge:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}"
    export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

    # 2. Everything the server and the bench import.
    "$py" - <<'PYEOF' || { echo "gpu.sh: a module is missing (see above)"; return 2; }
import grpc, google.protobuf, google.rpc.status_pb2, grpc_health.v1.health  # noqa: E401
import grpc_reflection.v1alpha.reflection, torch, transformers, sentence_transformers  # noqa: E401
import aiohttp, msgpack, yaml, psutil, safetensors, tokenizers  # noqa: E401
import sie_server.grpc_api.server, sie_server.adapters.dense, sie_server.adapters.bge_m3  # noqa: E401
import sie_sdk.v1.encode_pb2_grpc  # noqa: F401
print(f"   imports ok: grpcio {grpc.__version__}, protobuf {google.protobuf.__version__}, "
      f"torch {torch.__version__} (cuda {torch.cuda.is_available()}), transformers "
      f"{transformers.__version__}, sentence-transformers {sentence_transformers.__version__}")
PYEOF

    # 3. The bench, with its own deadline inside the hard limit.
    echo "== bench_gpu.py (hard limit ${limit}s) after $(( $(date +%s) - started ))s"
    timeout -k 20 "$limit" "$py" -u bench/bench_gpu.py --out-dir "$OUT" \
        --deadline-s $(( limit - 40 )) "$@"
    rc=$?
    [ "$rc" -eq 124 ] && echo "gpu.sh: bench_gpu.py stopped at the ${limit}s limit"
    echo "== gpu.sh done in $(( $(date +%s) - started ))s, exit $rc; files in $OUT:"
    ls -la "$OUT"
    return "$rc"
}

main "$@" 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
