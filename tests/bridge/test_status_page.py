"""The live status page (``GET /``) in a real headless Chromium, and the ``/ws/status`` stream.

A real server (tiny dense models) and a real bridge run in the test's event loop on 127.0.0.1:0;
Chromium runs as an asyncio subprocess, so both keep serving while it loads the page. The page's
own logic (exact rates, restarts, the banner, reconnecting) is driven by a scripted ``/ws/status``
beside the bridge's page handler. Without Debian's ``/usr/bin/chromium`` the browser tests skip
(``.ci/run`` installs it); the WebSocket tests need no browser.

Real time vs. virtual time. ``--dump-dom`` and ``--screenshot`` act right after the load event (a
``--timeout`` only cuts short a load that has not finished, so alone it dumps the empty page), and
``--virtual-time-budget`` runs the page's timers on a virtual clock that jumps ahead whenever the
page is idle: a 20 s budget ends within a second of real time, and a budget longer than the page's
5 s watchdog fires it (the dump then says "disconnected"). The WebSocket data is real time. So the
one-shot runs use a budget under the watchdog (``VIRTUAL_BUDGET_MS``) and are repeated until the
dumped DOM shows a rendered snapshot; what needs several messages in one page (rates, numbers that
change while it is open) is polled on the open page in real time over the DevTools protocol
(``--remote-debugging-port``). Every wait is bounded by ``BROWSER_DEADLINE_S``; no test asserts
how long anything took, except the stream's cadence by the server's own timestamps.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import pytest
import pytest_asyncio
import sie_server
from aiohttp import web
from sie_bridge.routes import status
from sie_sdk.v1 import common_pb2, encode_pb2, encode_pb2_grpc

from tests.bridge_utils import BridgeHandle, bridged
from tests.server_utils import ServerHandle, free_port, serving, write_catalog_entry
from tests.tiny_models import dense

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian chromium not installed: .ci/run installs it with apt"
)
WINDOW = (1280, 900)
VIRTUAL_BUDGET_MS = 2000  # under the page's 5 s watchdog
BROWSER_DEADLINE_S = 60.0
HANG_S = 10.0
PAGE_MODEL, LIVE_MODEL, LAZY_MODEL = "tiny/page", "tiny/live", "tiny/lazy"
TEXTS = ["Hello, world!", "Status pages count requests.", "x"]

TOP_KEYS = {
    "timestamp",
    "gpu",
    "loaded_models",
    "server",
    "gpus",
    "models",
    "counters",
    "histograms",
}
SERVER_KEYS = {"version": str, "uptime_seconds": int, "user": str, "working_dir": str, "pid": int}
GPU_KEYS: dict[str, type | tuple[type, ...]] = {
    "index": int,
    "name": str,
    "gpu_type": str,
    "utilization_percent": (int, float),
    "memory_used_bytes": int,
    "memory_total_bytes": int,
    "memory_threshold_pct": (int, float),
    "temperature_c": int,
}
MODEL_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "state": str,
    "device": (str, type(None)),
    "memory_bytes": int,
    "queue_depth": int,
    "queue_pending_items": int,
    "config": dict,
}
CONFIG_KEYS = {
    "adapter": str,
    "max_sequence_length": int,
    "outputs": list,
    "default_profile": str,
    "tasks": list,
}


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("status-page")
    weights = dense.build_tiny_dense(root / "dense")
    for name in (PAGE_MODEL, LIVE_MODEL, LAZY_MODEL):
        entry = {
            "name": name,
            "adapter": "dense",
            "weights_path": str(weights),
            "max_sequence_length": 128,
            "outputs": {"dense": {"dims": dense.HIDDEN}},
        }
        write_catalog_entry(root / "catalog", entry)
    return root / "catalog"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(catalog_dir: Path) -> AsyncIterator[ServerHandle]:
    async with serving([catalog_dir], preload=[PAGE_MODEL, LIVE_MODEL]) as handle:
        yield handle


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def bridge(server: ServerHandle) -> AsyncIterator[BridgeHandle]:
    async with bridged(server.address) as handle:
        yield handle


async def encode(server: ServerHandle, model: str, texts: list[str]) -> int:
    """One Encode call; returns its token count (what ``sie_tokens_processed_total`` adds)."""
    stub = encode_pb2_grpc.EncodeServiceStub(server.channel)
    request = encode_pb2.EncodeRequest(model=model, items=[common_pb2.Item(text=t) for t in texts])
    response = await stub.Encode(request)
    return sum(item.num_tokens for item in response.items)


def dead_address() -> str:
    """A local address nobody listens on."""
    return f"127.0.0.1:{free_port()}"


# ---- the dumped DOM ----------------------------------------------------------------------------

VOID = frozenset(
    (
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "source",
        "track",
        "wbr",
    )
)


@dataclass
class Field:
    name: str
    text: str
    attrs: dict[str, str]
    row: dict[str, str]  # attributes of the enclosing <tr> (data-model, data-metric, ...)

    @property
    def value(self) -> str:
        """The raw number where the page formats the text, else the text."""
        return self.attrs.get("data-value", self.text)


@dataclass
class Page:
    """Every ``data-field`` element of a serialized DOM, with the ``<body>`` attributes."""

    fields: list[Field] = field(default_factory=list)
    body: dict[str, str] = field(default_factory=dict)

    def one(self, name: str, **row: str) -> Field:
        """The single field ``name`` whose row has ``data-<key>=value`` for each of ``row``."""
        hits = [
            f
            for f in self.fields
            if f.name == name and all(f.row.get(f"data-{k}") == v for k, v in row.items())
        ]
        assert len(hits) == 1, f"{len(hits)} elements data-field={name} {row}"
        return hits[0]


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._open: list[tuple[str, dict[str, str], list[str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.page.body = values
        if tag not in VOID:
            self._open.append((tag, values, []))

    def handle_data(self, data: str) -> None:
        for _, _, text in self._open:
            text.append(data)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            name, attrs, text = self._open.pop()
            if "data-field" in attrs:
                row = next((a for t, a, _ in reversed(self._open) if t == "tr"), {})
                content = " ".join("".join(text).split())
                self.page.fields.append(Field(attrs["data-field"], content, attrs, row))
            if name == tag:
                return


def parse(html: str) -> Page:
    parser = _Parser()
    parser.feed(html)
    parser.close()
    return parser.page


# ---- Chromium ----------------------------------------------------------------------------------


def _stderr_log(profile: Path) -> BinaryIO:
    profile.mkdir(parents=True)
    return (profile / "stderr.log").open("wb")


@asynccontextmanager
async def chromium(profile: Path, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """Headless Chromium with its own profile (stderr in ``profile/stderr.log``), stopped with its
    process group on exit."""
    with _stderr_log(profile) as log:
        proc = await asyncio.create_subprocess_exec(
            str(CHROMIUM),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        await proc.communicate()


async def run_chromium(profile: Path, *args: str) -> bytes:
    """One run to completion; its stdout."""
    async with chromium(profile, *args) as proc:
        out, _ = await asyncio.wait_for(proc.communicate(), BROWSER_DEADLINE_S)
    assert proc.returncode == 0, (profile / "stderr.log").read_text()[-2000:]
    return out


async def dump_until(url: str, tmp: Path, ready: Callable[[Page], bool]) -> Page:
    """``--dump-dom`` of ``url``, repeated until ``ready`` holds for the dumped DOM."""
    deadline = time.monotonic() + BROWSER_DEADLINE_S
    attempt = 0
    while True:
        attempt += 1
        budget = f"--virtual-time-budget={VIRTUAL_BUDGET_MS}"
        html = await run_chromium(tmp / f"dump-{attempt}", budget, "--dump-dom", url)
        page = parse(html.decode())
        if ready(page):
            return page
        assert time.monotonic() < deadline, (
            f"never ready: {[(f.name, f.text) for f in page.fields]}"
        )
        await asyncio.sleep(0.5)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's signature and IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, kind, width, height = struct.unpack(">I4sII", head[8:24])
    assert (length, kind) == (13, b"IHDR")
    return width, height


class DevTools:
    """Just enough of the DevTools protocol: calls on one page target."""

    ws: aiohttp.ClientWebSocketResponse
    #: Uncaught exceptions the page reported (``Runtime.exceptionThrown``), seen while calling.
    exceptions: list[str]
    _next_id: int

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.exceptions = []
        self._next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        await self.ws.send_json({"id": self._next_id, "method": method, "params": params})
        async with asyncio.timeout(HANG_S):
            async for message in self.ws:
                reply = json.loads(message.data)
                if reply.get("method") == "Runtime.exceptionThrown":
                    details = reply["params"]["exceptionDetails"]
                    self.exceptions.append(details.get("exception", {}).get("description", ""))
                if reply.get("id") == self._next_id:  # anything else is an event
                    assert "error" not in reply, reply
                    result: dict[str, Any] = reply["result"]
                    return result
        raise AssertionError("the DevTools socket closed")

    async def evaluate(self, expression: str) -> Any:
        reply = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in reply, reply
        return reply["result"].get("value")

    async def poll(self, expression: str, ready: Callable[[Any], bool]) -> Any:
        """Evaluate ``expression`` until ``ready`` holds for its value (real time)."""
        deadline = time.monotonic() + BROWSER_DEADLINE_S
        while not ready(value := await self.evaluate(expression)):
            assert time.monotonic() < deadline, f"the page never got there: {value}"
            await asyncio.sleep(0.1)
        return value


def _devtools_port(profile: Path) -> int | None:
    """Chromium writes its port to ``DevToolsActivePort`` once it listens."""
    try:
        return int((profile / "DevToolsActivePort").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


@asynccontextmanager
async def devtools_page(url: str, profile: Path) -> AsyncIterator[DevTools]:
    async with chromium(profile, "--remote-debugging-port=0", url):
        deadline = time.monotonic() + BROWSER_DEADLINE_S
        while (port := _devtools_port(profile)) is None:
            assert time.monotonic() < deadline, "Chromium never opened its DevTools port"
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            target = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = DevTools(ws)
                await page.call("Runtime.enable")
                # A DevTools-driven headless window keeps room for browser chrome: size the
                # viewport itself, as --screenshot does.
                await page.call(
                    "Emulation.setDeviceMetricsOverride",
                    width=WINDOW[0],
                    height=WINDOW[1],
                    deviceScaleFactor=1,
                    mobile=False,
                )
                yield page


# ---- the page in a browser -----------------------------------------------------------------


@needs_chromium
async def test_page_shows_live_numbers(
    server: ServerHandle, bridge: BridgeHandle, tmp_path: Path
) -> None:
    tokens = 0
    for text in TEXTS:
        tokens += await encode(server, PAGE_MODEL, [text])
    page = await dump_until(f"{bridge.url}/", tmp_path, lambda p: int(p.one("messages").value) > 0)

    assert page.body["data-connection"] == "live"
    assert "hidden" in page.one("backend-banner").attrs
    assert int(page.one("pid").text) == os.getpid()  # the server runs in this process
    assert page.one("version").text == sie_server.__version__
    uptime = page.one("uptime")
    assert int(uptime.value) >= 0
    assert re.fullmatch(r"(\d+[dhm] )*\d+s", uptime.text), uptime.text
    assert page.one("gpu").text == "cpu"
    assert page.one("device-type", device="0").text == "cpu"
    assert (
        0 < int(page.one("device-memory-used").value) <= int(page.one("device-memory-total").value)
    )

    assert page.one("model-name", model=PAGE_MODEL).text == PAGE_MODEL
    assert page.one("model-state", model=PAGE_MODEL).text == "loaded"
    assert page.one("model-device", model=PAGE_MODEL).text == "cpu"
    assert page.one("model-adapter", model=PAGE_MODEL).text == "dense"
    assert page.one("model-tasks", model=PAGE_MODEL).text == "encode, score"
    assert page.one("model-state", model=LAZY_MODEL).text == "available"
    assert page.one("model-requests", model=PAGE_MODEL).value == str(len(TEXTS))
    assert page.one("model-tokens", model=PAGE_MODEL).value == str(tokens)
    counter = page.one("counter-value", metric="sie_requests_total", model=PAGE_MODEL)
    assert counter.text == str(len(TEXTS))


@needs_chromium
async def test_screenshot_is_a_png_of_the_window(bridge: BridgeHandle, tmp_path: Path) -> None:
    shot = tmp_path / "status-page.png"
    await run_chromium(
        tmp_path / "profile",
        f"--virtual-time-budget={VIRTUAL_BUDGET_MS}",
        f"--screenshot={shot}",
        f"{bridge.url}/",
    )
    assert png_size(shot) == WINDOW


# The live model's row and the page's own numbers, read in the open page.
STATE_JS = """(() => {
  const row = ROW;
  const value = (sel) => { const el = document.querySelector(sel);
                           return el ? (el.dataset.value ?? el.textContent) : null; };
  return {
    connection: document.body && document.body.dataset.connection,  // null while loading
    messages: Number(value('[data-field="messages"]')),
    uptime: value('[data-field="uptime"]'),
    requests: value(row + ' [data-field="model-requests"]'),
    requestRate: value(row + ' [data-field="model-request-rate"]'),
    tokens: value(row + ' [data-field="model-tokens"]'),
    tokenRate: value(row + ' [data-field="model-token-rate"]'),
  };
})()""".replace("ROW", json.dumps(f'#models tr[data-model="{LIVE_MODEL}"]'))


@needs_chromium
async def test_page_updates_while_open(
    server: ServerHandle, bridge: BridgeHandle, tmp_path: Path
) -> None:
    async with devtools_page(f"{bridge.url}/", tmp_path / "profile") as page:
        first = await page.poll(STATE_JS, lambda s: s["messages"] >= 3)
        assert first["connection"] == "live"
        assert (first["requests"], first["requestRate"]) == ("0", "0")  # rates from 2+ snapshots

        tokens = await encode(server, LIVE_MODEL, TEXTS)
        tokens += await encode(server, LIVE_MODEL, TEXTS[:1])
        after = await page.poll(STATE_JS, lambda s: s["requests"] == "2")
        assert after["tokens"] == str(tokens)
        assert float(after["requestRate"]) > 0
        assert float(after["tokenRate"]) > 0
        assert after["messages"] > first["messages"]
        later = await page.poll(STATE_JS, lambda s: int(s["uptime"]) > int(first["uptime"]))
        assert later["connection"] == "live"

        shot = tmp_path / "status-page-live.png"
        capture = await page.call("Page.captureScreenshot", format="png")
        shot.write_bytes(base64.b64decode(capture["data"]))
        assert png_size(shot) == WINDOW
        assert page.exceptions == []


# ---- the page's own logic, fed by a scripted /ws/status --------------------------------------

FAKE_MODEL = "fake/model"
GIB = 1 << 30

# Every data-field's text and raw value (the last element wins where a field repeats), the
# connection state and whether the banner shows.
FIELDS_JS = """(() => {
  const fields = {};
  for (const el of document.querySelectorAll('[data-field]'))
    fields[el.dataset.field] = [el.textContent.trim(), el.dataset.value ?? null];
  const banner = document.querySelector('[data-field="backend-banner"]');
  return {connection: document.body && document.body.dataset.connection,
          banner: !!banner && !banner.hidden, fields};
})()"""


def snapshot(t: float, requests: int, tokens: int) -> dict[str, Any]:
    """A ``/ws/status`` message of one loaded model, stamped ``t``, uptime ``t - 1000`` s."""
    return {
        "timestamp": t,
        "gpu": "cpu",
        "loaded_models": [FAKE_MODEL],
        "server": {
            "version": "9.9.9",
            "uptime_seconds": int(t - 1000),
            "user": "someone",
            "working_dir": "/srv",
            "pid": 4242,
        },
        "gpus": [
            {
                "index": 0,
                "name": "Fake CPU",
                "gpu_type": "cpu",
                "utilization_percent": 12.5,
                "memory_used_bytes": 3 * GIB,
                "memory_total_bytes": 8 * GIB,
                "memory_threshold_pct": 37.5,
                "temperature_c": 0,
            }
        ],
        "models": [
            {
                "name": FAKE_MODEL,
                "state": "loaded",
                "device": "cpu",
                "memory_bytes": 1 << 20,
                "queue_depth": 1,
                "queue_pending_items": 7,
                "config": {
                    "adapter": "dense",
                    "max_sequence_length": 128,
                    "outputs": ["dense"],
                    "default_profile": "default",
                    "tasks": ["encode", "score"],
                },
            }
        ],
        "counters": {
            "sie_requests_total": {FAKE_MODEL: requests},
            "sie_tokens_processed_total": {FAKE_MODEL: tokens},
        },
        "histograms": {
            "sie_batch_size": {
                FAKE_MODEL: {"buckets": [1.0, 2.0], "counts": [1, 1, 0], "sum": 3.0, "count": 2}
            }
        },
    }


@asynccontextmanager
async def scripted_status() -> AsyncIterator[tuple[str, asyncio.Queue[web.WebSocketResponse]]]:
    """The bridge's page handler beside a ``/ws/status`` that hands each connected socket to the
    test, which sends what it wants and closes it when it wants."""
    sockets: asyncio.Queue[web.WebSocketResponse] = asyncio.Queue()

    async def ws_status(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await sockets.put(ws)
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/", status.page)
    app.router.add_get("/ws/status", ws_status)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/", sockets
    finally:
        await runner.cleanup()


@needs_chromium
async def test_page_rates_banner_and_reconnect(tmp_path: Path) -> None:
    first, second = snapshot(4725.0, 100, 1000), snapshot(4726.0, 110, 1250)
    check_schema(first)
    async with scripted_status() as (url, sockets), devtools_page(url, tmp_path / "p") as page:
        ws = await asyncio.wait_for(sockets.get(), BROWSER_DEADLINE_S)
        await ws.send_json(first)
        await ws.send_json(second)
        shown = await page.poll(FIELDS_JS, lambda s: s["fields"]["messages"][1] == "2")
        fields = shown["fields"]
        assert shown["connection"] == "live"
        assert not shown["banner"]
        # rates over the two snapshots, one second apart: 10 requests/s, 250 tokens/s
        assert fields["model-request-rate"] == ["10.0", "10"]
        assert fields["model-token-rate"] == ["250", "250"]
        assert fields["model-requests"] == ["110", "110"]
        assert fields["uptime"] == ["1h 2m 6s", "3726"]
        assert fields["pid"] == ["4242", "4242"]
        assert fields["device-utilization"] == ["12.5%", "12.5"]
        assert fields["device-memory-used"] == ["3.0 GiB", str(3 * GIB)]
        assert fields["device-memory-total"] == ["8.0 GiB", str(8 * GIB)]
        assert fields["model-memory"] == ["1.0 MiB", str(1 << 20)]
        assert fields["model-queue-depth"][0] == "1"
        assert fields["model-pending"][0] == "7"
        assert fields["model-avg-batch"][0] == "1.5"

        # a counter went down (the server restarted between two messages): the window restarts
        await ws.send_json(snapshot(4728.0, 2, 20))
        shown = await page.poll(FIELDS_JS, lambda s: s["fields"]["messages"][1] == "3")
        assert shown["fields"]["model-request-rate"] == ["-", ""]
        assert shown["fields"]["model-requests"] == ["2", "2"]

        await ws.send_json({"backend": "unavailable", "timestamp": 4729.0})
        shown = await page.poll(FIELDS_JS, lambda s: s["connection"] == "unavailable")
        assert shown["banner"]
        assert shown["fields"]["model-requests"][0] == "2"  # the last numbers stay

        await ws.close()  # the socket drops: the page says so and opens a new one
        await page.poll(FIELDS_JS, lambda s: s["connection"] == "disconnected")
        ws = await asyncio.wait_for(sockets.get(), BROWSER_DEADLINE_S)
        # back, after "unavailable": no rate until two snapshots of the new connection
        await ws.send_json(snapshot(5000.0, 3, 30))
        shown = await page.poll(FIELDS_JS, lambda s: s["fields"]["messages"][1] == "5")
        assert shown["connection"] == "live"
        assert not shown["banner"]
        assert shown["fields"]["model-request-rate"] == ["-", ""]
        await ws.send_json(snapshot(5002.0, 7, 30))
        shown = await page.poll(FIELDS_JS, lambda s: s["fields"]["messages"][1] == "6")
        assert shown["fields"]["model-request-rate"] == ["2.0", "2"]
        assert shown["fields"]["model-token-rate"] == ["0.0", "0"]
        assert page.exceptions == []


@needs_chromium
async def test_page_shows_backend_unavailable(tmp_path: Path) -> None:
    async with bridged(dead_address()) as dead:
        page = await dump_until(
            f"{dead.url}/", tmp_path, lambda p: p.body.get("data-connection") == "unavailable"
        )
    banner = page.one("backend-banner")
    assert "hidden" not in banner.attrs
    assert banner.text.startswith("Backend unavailable")
    assert page.one("connection").text == "backend unavailable"


# ---- the WebSocket itself ------------------------------------------------------------------


def check_schema(message: dict[str, Any]) -> None:
    """Every key of the spec's ``/ws/status`` message schema, with its type."""

    def check(obj: dict[str, Any], keys: dict[str, Any], where: str) -> None:
        missing = set(keys) - set(obj)
        assert not missing, f"{where} lacks {sorted(missing)}"
        for key, kind in keys.items():
            value = obj[key]
            assert isinstance(value, kind), f"{where}.{key}: {value!r}"
            assert not isinstance(value, bool), f"{where}.{key}: {value!r}"

    assert set(message) >= TOP_KEYS, sorted(TOP_KEYS - set(message))
    assert isinstance(message["timestamp"], float)
    assert isinstance(message["gpu"], str)
    assert all(isinstance(name, str) for name in message["loaded_models"])
    check(message["server"], SERVER_KEYS, "server")
    assert message["gpus"], "no device entry"
    for gpu in message["gpus"]:
        check(gpu, GPU_KEYS, "gpus[]")
    for model in message["models"]:
        check(model, MODEL_KEYS, "models[]")
        check(model["config"], CONFIG_KEYS, "models[].config")
    for metric, by_model in message["counters"].items():
        assert all(isinstance(v, int) for v in by_model.values()), metric
    for metric, by_model in message["histograms"].items():
        for histogram in by_model.values():
            assert {"buckets", "counts", "sum", "count"} <= set(histogram), metric
            assert len(histogram["counts"]) == len(histogram["buckets"]) + 1, metric


async def test_ws_status_sends_spec_messages_several_a_second(
    server: ServerHandle, bridge: BridgeHandle
) -> None:
    async with bridge.session.ws_connect("/ws/status") as ws:
        messages = [await ws.receive_json(timeout=HANG_S) for _ in range(3)]
    for message in messages:
        check_schema(message)
    stamps = [m["timestamp"] for m in messages]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == 3
    # Three snapshots within one second of each other, by the server's own clock (the stream's
    # interval is 200 ms); connecting and the first snapshot are not part of the cadence.
    assert stamps[-1] - stamps[0] < 1.0
    last = messages[-1]
    assert last["server"]["pid"] == os.getpid()
    assert set(last["loaded_models"]) == {PAGE_MODEL, LIVE_MODEL}
    states = {m["name"]: m["state"] for m in last["models"]}
    assert states == {PAGE_MODEL: "loaded", LIVE_MODEL: "loaded", LAZY_MODEL: "available"}
    assert last["gpus"][0]["gpu_type"] == "cpu"


async def test_ws_status_reports_unreachable_backend() -> None:
    async with bridged(dead_address()) as dead, dead.session.ws_connect("/ws/status") as ws:
        message = await ws.receive_json(timeout=HANG_S)
    assert message["backend"] == "unavailable"
    assert isinstance(message["timestamp"], float)
