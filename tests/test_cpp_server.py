"""``safe-denoiser-cpp serve`` as deployed: the OpenAI and AUTOMATIC1111 image APIs through their own Python
clients (same PNG bytes as ``safe-denoiser-cpp generate``), Prometheus metrics, JSON access logs and request ids,
API keys, HTTP hardening (405/415/Host/no paths) and slow clients that must not starve ``/health``.

Everything runs on 127.0.0.1 (a non-loopback bind is tested by binding 0.0.0.0 and connecting to loopback), every
server is bounded by --max-seconds, every socket by a timeout. The binary is ``make cpp``'s (or
$SAFE_DENOISER_CPP); test bundles come from make_test_bundles.py (or $SAFE_DENOISER_CPP_BUNDLES).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

ROOT = Path(__file__).resolve().parents[1]
BINARY = ROOT / "cpp_runtime" / "build" / "release" / "safe-denoiser-cpp"
KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def cpp() -> Path:
    binary = Path(os.environ.get("SAFE_DENOISER_CPP", BINARY))
    if not binary.is_file():
        subprocess.run(["make", "-C", str(ROOT), "cpp"], check=True, stdout=subprocess.DEVNULL)
    return binary


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "SAFE_DENOISER_CPP_BUNDLES" in os.environ:
        return Path(os.environ["SAFE_DENOISER_CPP_BUNDLES"])
    out = tmp_path_factory.mktemp("cpp_bundles")
    script = ROOT / "cpp_runtime" / "scripts" / "make_test_bundles.py"
    subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
    return out


class Server:
    """A server on a free port; its stderr (the JSON log) goes to a file, read with ``log()``."""

    def __init__(self, cpp: Path, bundle: Path, tmp: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.bundle = bundle
        self.err_path = tmp / f"server-{time.monotonic_ns()}.log"
        cmd = [str(cpp), "serve", "--bundle", str(bundle), "--port", "0", "--threads", "1", "--max-seconds", "120"]
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [*cmd, *args], stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **(env or {})}
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening on http://"), line + self.err_path.read_text()
        self.port = int(line.rsplit(":", 1)[1])

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def post(self, path: str, payload: dict[str, Any], **headers: str) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", path, json.dumps(payload).encode(), headers)

    def log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.err_path.read_text().splitlines() if line.startswith("{")]

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        return out


@pytest.fixture
def start(cpp: Path, tmp_path: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def _start(bundle: Path, *args: str, env: dict[str, str] | None = None) -> Server:
        servers.append(Server(cpp, bundle, tmp_path, *args, env=env))
        return servers[-1]

    yield _start
    for s in servers:
        s.stop()


def generate_png(cpp: Path, bundle: Path, tmp: Path, *args: str) -> bytes:
    out = tmp / f"ref-{time.monotonic_ns()}.png"
    cmd = [str(cpp), "generate", "--bundle", str(bundle), "--threads", "1", "--out", str(out), *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out.read_bytes()


# ---- the two image APIs through their clients --------------------------------------------------------------------
def test_openai_client_gets_the_bytes_of_generate(start: Any, cpp: Path, bundles: Path, tmp_path: Path) -> None:
    bundle = bundles / "tiny_theorem"
    s = start(bundle, "--api-key", KEY)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key=KEY, max_retries=0, timeout=60)
    size = json.loads(s.request("GET", "/health")[2])["image"]
    got = client.images.generate(
        model="tiny-sd",
        prompt="a red cat",
        n=2,
        size=f"{size['width']}x{size['height']}",
        response_format="b64_json",
        extra_body={"seed": 11, "negative_prompt": "blurry", "steps": 3},
    )
    assert got.created > 0 and len(got.data) == 2
    for item, image in enumerate(got.data):  # image i of n is (seed, item i)
        assert image.b64_json is not None
        want = generate_png(cpp, bundle, tmp_path, "--prompt", "a red cat", "--negative-prompt", "blurry",
                            "--seed", "11", "--item", str(item), "--steps", "3")  # fmt: skip
        assert base64.b64decode(image.b64_json) == want, item
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.images.generate(prompt="a cat", response_format="url")
    with pytest.raises(openai.BadRequestError, match="quality"):
        client.images.generate(prompt="a cat", quality="hd")
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="a cat", size="1024x1024")
    bad_key = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="wrong-key-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.images.generate(prompt="a cat")


def test_webuiapi_txt2img_gets_the_bytes_of_generate(start: Any, cpp: Path, bundles: Path, tmp_path: Path) -> None:
    bundle = bundles / "tiny_theorem"
    s = start(bundle)
    size = json.loads(s.request("GET", "/health")[2])["image"]
    api = webuiapi.WebUIApi(host="127.0.0.1", port=s.port, sampler="DDIM", steps=3)
    common = {"prompt": "a red cat", "negative_prompt": "blurry", "seed": 21, "cfg_scale": 6.5}
    result = api.txt2img(**common, batch_size=2, width=size["width"], height=size["height"], eta=0)
    info = result.info
    assert info["all_seeds"] == [21, 22] and info["steps"] == 3 and info["sampler_name"] == "DDIM"
    assert len(info["corrected_steps"]) == 2 and result.parameters["seed"] == 21
    for k, b64 in enumerate(result.json["images"]):  # image k has seed S + k (A1111's all_seeds), item 0
        want = generate_png(cpp, bundle, tmp_path, "--prompt", "a red cat", "--negative-prompt", "blurry",
                            "--seed", str(21 + k), "--steps", "3", "--guidance", "6.5")  # fmt: skip
        assert base64.b64decode(b64) == want, k
    # webuiapi's own defaults that would change the image are refused, naming the field.
    for extra, needle in [
        ({}, "eta"),
        ({"eta": 0, "enable_hr": True}, "enable_hr"),
        ({"eta": 0, "width": 512}, "width"),
    ]:
        args = {"width": size["width"], "height": size["height"], **extra}
        with pytest.raises(RuntimeError, match=needle):
            api.txt2img(**common, **args)
    with pytest.raises(RuntimeError, match="Euler a"):
        webuiapi.WebUIApi(host="127.0.0.1", port=s.port).txt2img(prompt="x", eta=0, **size)
    status, _, body = s.post("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "DDIM", "hires_fix": 1})
    assert status == 400 and b"unsupported field 'hires_fix'" in body


def test_class_label_bundle_takes_labels_as_prompts(start: Any, cpp: Path, bundles: Path, tmp_path: Path) -> None:
    bundle = bundles / "demo_theorem"
    s = start(bundle)
    status, _, body = s.post("/v1/images/generations", {"prompt": " 3 ", "negative_prompt": "5", "seed": 7})
    assert status == 200, body
    png = base64.b64decode(json.loads(body)["data"][0]["b64_json"])
    assert png == generate_png(cpp, bundle, tmp_path, "--class", "3", "--negative-class", "5", "--seed", "7")
    status, _, body = s.post("/v1/images/generations", {"prompt": "a cat"})
    assert status == 400 and b"class-conditional" in body and json.loads(body)["error"]["param"] == "prompt"
    status, _, body = s.post("/sdapi/v1/txt2img", {"prompt": "99", "sampler_name": "DDIM"})
    assert status == 400 and b"0..12" in body
    # Zero images (a fuzz finding: answered from an empty list) is a 400 naming the field, as is a float count.
    for path, payload in [
        ("/sdapi/v1/txt2img", {"prompt": "3", "sampler_name": "DDIM", "batch_size": 0}),
        ("/sdapi/v1/txt2img", {"prompt": "3", "sampler_name": "DDIM", "n_iter": 0}),
        ("/sdapi/v1/txt2img", {"prompt": "3", "sampler_name": "DDIM", "batch_size": 1e30}),
        ("/v1/images/generations", {"prompt": "3", "n": 0}),
    ]:
        field = next(k for k in ("batch_size", "n_iter", "n") if k in payload)
        status, _, body = s.post(path, payload)
        assert status == 400 and f"{field}: expected an integer in 1..".encode() in body, (payload, body)


# ---- metrics, logs, request ids -----------------------------------------------------------------------------------
def metric_samples(s: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = s.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(body.decode()):
        for sm in family.samples:
            samples[(sm.name, tuple(sorted(sm.labels.items())))] = sm.value
    return samples


def test_metrics_parse_and_move(start: Any, bundles: Path) -> None:
    s = start(bundles / "demo_theorem")
    before = metric_samples(s)
    ok = ("safe_denoiser_http_requests_total", (("route", "/generate"), ("status", "200")))
    assert before.get(ok, 0) == 0 and before[("safe_denoiser_ready", ())] == 1
    for seed in range(3):
        assert s.post("/generate", {"class": 1, "seed": seed, "steps": 4})[0] == 200
    assert s.post("/v1/images/generations", {"prompt": "2", "n": 2})[0] == 200
    assert s.request("GET", "/generate")[0] == 405
    not_allowed = ("safe_denoiser_http_requests_total", (("route", "/generate"), ("status", "405")))
    deadline = time.monotonic() + 2  # a request is counted right after its answer is sent: allow that moment
    while not_allowed not in (after := metric_samples(s)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after[ok] == 3
    assert after[not_allowed] == 1
    assert after[("safe_denoiser_images_generated_total", ())] == 5
    latency = ("safe_denoiser_http_request_duration_seconds_count", (("route", "/generate"),))
    assert after[latency] == 4
    assert after[("safe_denoiser_batch_size_count", ())] >= 2  # at least one call per request burst
    assert after[("safe_denoiser_batch_size_sum", ())] == 5
    steps = after[("safe_denoiser_denoise_steps_total", ())]
    assert steps == 3 * 4 + 2 * 10  # the demo bundle's default is 10 steps
    fired = after[("safe_denoiser_correction_steps_total", ())]
    assert 0 < fired <= steps
    assert after[("safe_denoiser_queue_depth", ())] == 0 and after[("safe_denoiser_queue_capacity", ())] == 16


def test_one_json_log_line_per_request_with_its_id(start: Any, bundles: Path, tmp_path: Path) -> None:
    s = start(bundles / "demo_theorem")
    status, headers, _ = s.post("/generate", {"class": 2, "seed": 1, "steps": 3}, **{"X-Request-Id": "client-42"})
    assert status == 200 and headers["X-Request-Id"] == "client-42"
    _, headers, _ = s.request("GET", "/health", headers={"X-Request-Id": "bad id\twith spaces"})
    generated = headers["X-Request-Id"]
    assert len(generated) == 16 and generated != "bad id\twith spaces"
    s.stop()
    # The line is written once the answer is sent: the two lines may come in either order.
    requests = {line["id"]: line for line in s.log() if line.get("event") == "request"}
    assert sorted(requests) == sorted(["client-42", generated]) and requests[generated]["route"] == "/health"
    first = requests["client-42"]
    assert first["route"] == "/generate" and first["status"] == 200 and first["images"] == 1
    assert first["steps"] == 3 and 0 <= first["correction_steps"] <= 3 and first["latency_ms"] > 0
    assert first["level"] == "info" and "time" in first
    quiet = start(bundles / "demo_theorem", "--log-level", "error")
    assert quiet.request("GET", "/health")[0] == 200 and quiet.request("GET", "/nope")[0] == 404
    quiet.stop()
    assert quiet.log() == []  # info and warn lines are below --log-level error


# ---- worker pool --------------------------------------------------------------------------------------------------
def test_two_workers_serve_concurrent_requests_with_the_bytes_of_generate(
    start: Any, cpp: Path, bundles: Path, tmp_path: Path
) -> None:
    bundle = bundles / "demo_theorem"
    s = start(bundle, "--workers", "2", "--max-batch", "1")  # one image per call: both workers get work
    health = json.loads(s.request("GET", "/health")[2])
    assert health["workers"] == 2 and health["ready"] is True
    assert metric_samples(s)[("safe_denoiser_workers", ())] == 2
    jobs = [(seed % 3, seed) for seed in range(6)]  # (class, seed), six requests at once
    got: dict[int, tuple[int, bytes]] = {}

    def ask(label: int, seed: int) -> None:
        status, _, body = s.post("/generate?format=png", {"class": label, "seed": seed, "steps": 4})
        got[seed] = (status, body)

    threads = [threading.Thread(target=ask, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(got) == [seed for _, seed in jobs]
    for label, seed in jobs:
        status, body = got[seed]
        assert status == 200, body
        want = generate_png(cpp, bundle, tmp_path, "--class", str(label), "--seed", str(seed), "--steps", "4")
        assert body == want, seed
    assert metric_samples(s)[("safe_denoiser_images_generated_total", ())] == len(jobs)
    out = s.stop()
    assert s.proc.returncode == 0 and "stopped: 6 answered" in out


@pytest.mark.parametrize("count", ["0", "17", "two"])
def test_workers_out_of_range_is_refused_naming_the_flag(cpp: Path, bundles: Path, count: str) -> None:
    proc = subprocess.run([str(cpp), "serve", "--bundle", str(bundles / "demo_theorem"), "--port", "0",
                           "--workers", count], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "--workers" in proc.stderr, proc.stderr
    assert "listening" not in proc.stdout


# ---- access -------------------------------------------------------------------------------------------------------
def test_non_loopback_bind_needs_a_key(cpp: Path, bundles: Path, start: Any) -> None:
    bundle = str(bundles / "demo_theorem")
    env = {k: v for k, v in os.environ.items() if k != "SAFE_DENOISER_API_KEY"}
    proc = subprocess.run([str(cpp), "serve", "--bundle", bundle, "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert proc.returncode == 2 and "not a loopback address" in proc.stderr and "API key" in proc.stderr
    assert "listening" not in proc.stdout
    short = subprocess.run([str(cpp), "serve", "--bundle", bundle, "--host", "0.0.0.0", "--api-key", "short"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert short.returncode == 2 and "--api-key" in short.stderr
    # With the key from the environment, bound to every address (connected to over loopback only).
    s = start(bundles / "demo_theorem", "--host", "0.0.0.0", env={"SAFE_DENOISER_API_KEY": KEY})
    payload = {"class": 1, "seed": 3, "steps": 2}
    status, headers, body = s.post("/generate", payload)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and b"Authorization" in body
    assert s.post("/generate", payload, Authorization="Bearer wrong-key-0123456789")[0] == 401
    assert s.request("GET", "/metrics")[0] == 401
    assert s.post("/generate", payload, Authorization=f"Bearer {KEY}")[0] == 200
    assert s.request("GET", "/health")[0] == 200  # readiness probes need no key
    assert json.loads(s.request("GET", "/health")[2])["auth"] == "bearer"


# ---- hardening ----------------------------------------------------------------------------------------------------
def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_methods_types_hosts_and_no_paths(start: Any, bundles: Path) -> None:
    bundle = bundles / "demo_theorem"
    s = start(bundle, "--max-body", "4096")
    status, headers, body = s.request("GET", "/v1/images/generations")
    assert status == 405 and headers["Allow"] == "POST" and "not allowed" in json.loads(body)["error"]["message"]
    status, headers, body = s.request("DELETE", "/health")
    assert status == 405 and headers["Allow"] == "GET, HEAD" and json.loads(body)["status"] == 405
    status, _, body = s.request("POST", "/generate", b'{"class": 1}', {"Content-Type": "text/plain"})
    assert status == 415 and b"application/json" in body
    json_utf8 = {"Content-Type": "application/json; charset=utf-8"}
    assert s.request("POST", "/generate", b'{"class": 1}', json_utf8)[0] == 200
    status, _, body = s.request("GET", "/nope")
    assert status == 404 and json.loads(body)["error"].startswith("no route")
    for host in [f"evil.example:{s.port}", "localhost:1", "127.0.0.1"]:
        reply = raw_request(s.port, f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 403") and b"DNS rebinding" in reply, host
    for host in [f"localhost:{s.port}", f"[::1]:{s.port}"]:
        reply = raw_request(s.port, f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 200"), host
    deep = b"[" * 100 + b"]" * 100
    status, _, body = s.request("POST", "/generate", deep)
    assert status == 400 and b"nested deeper than 64" in body
    status, _, body = s.request("POST", "/generate", b"x" * 5000)
    assert status == 413 and json.loads(body)["status"] == 413
    answers = [s.request("GET", "/health")[2], s.request("GET", "/metrics")[2], s.request("GET", "/nope")[2],
               s.post("/generate", {"class": 1, "seed": 1, "steps": 2})[2],
               s.post("/generate", {"class": 1, "seed": 1, "steps": 2, "bundle": str(bundle)})[2]]  # fmt: skip
    assert b'"record"' in answers[3]
    for answer in answers:
        assert str(bundle).encode() not in answer and str(bundle.parent).encode() not in answer


def test_slow_clients_do_not_starve_health(start: Any, bundles: Path) -> None:
    """32 clients sending headers one byte every 0.2 s, more than the 24 default connection threads (the old server
    stopped answering /health at 30): /health keeps answering within 2.5 s, and every slow client is cut off by the
    read deadline (3 s here; 1 s for those served while only the reserve threads were free), counted from accept."""
    s = start(bundles / "demo_theorem", "--read-timeout-ms", "3000")
    stop = threading.Event()
    cut_off: list[float] = []
    lock = threading.Lock()

    def slow_client() -> None:
        begin = time.monotonic()
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 100:
                if stop.is_set():
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:  # the server closed the connection
                    break
                time.sleep(0.2)
            with contextlib.suppress(OSError):
                sock.recv(1024)
            with lock:
                cut_off.append(time.monotonic() - begin)

    clients = [threading.Thread(target=slow_client) for _ in range(32)]
    for t in clients:
        t.start()
    time.sleep(1.0)  # every slow client is connected and holding a thread (or was cut off)
    latencies = []
    for _ in range(5):
        begin = time.monotonic()
        status, _, _ = s.request("GET", "/health")
        latencies.append(time.monotonic() - begin)
        assert status == 200
        time.sleep(0.3)
    time.sleep(3.0)
    stop.set()
    for t in clients:
        t.join(timeout=30)
    assert max(latencies) < 2.5, latencies
    assert len(cut_off) == 32 and max(cut_off) < 8.0, cut_off  # all cut off by their deadlines (plus slack)


def test_connection_cap_answers_503(start: Any, bundles: Path) -> None:
    s = start(bundles / "demo_theorem", "--http-threads", "2", "--max-connections", "3", "--read-timeout-ms", "1500")
    socks = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(6)]
    try:
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\n")  # unfinished: holds a thread until the read deadline
        replies = []
        for sock in socks:
            try:
                replies.append(sock.recv(4096))
            except OSError:
                replies.append(b"")
    finally:
        for sock in socks:
            sock.close()
    assert sum(r.startswith(b"HTTP/1.1 503") and b"too many connections" in r for r in replies) >= 2, replies
    samples = metric_samples(s)
    assert samples[("safe_denoiser_http_connections_rejected_total", ())] >= 2


def test_sigterm_stops_at_once_with_an_idle_keep_alive_client(start: Any, bundles: Path) -> None:
    s = start(bundles / "demo_theorem")
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().read()  # the connection stays open, idle
    begin = time.monotonic()
    out = s.stop()
    conn.close()
    assert s.proc.returncode == 0 and "stopped:" in out
    assert time.monotonic() - begin < 1.5  # no polling interval, no keep-alive wait
