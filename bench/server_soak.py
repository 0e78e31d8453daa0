"""A bounded soak of ``safe-denoiser-cpp serve`` on 127.0.0.1: N requests from C concurrent keep-alive clients,
spread over the three image routes (/generate, /v1/images/generations, /sdapi/v1/txt2img), on a small bundle.

Reports throughput, p50/p99 latency, errors (any answer other than 200), and the server's resident set (VmRSS of
its process) at start, after the warm-up (the first 10% of the requests) and at the end; the goal is zero errors
and no RSS growth beyond 5% after the warm-up. The counters of /metrics at the end are checked against the count.

Usage: python bench/server_soak.py [--requests 10000] [--clients 4] [--steps 2]
       [--bundle cpp_runtime/build/test_bundles/demo_theorem] [--binary cpp_runtime/build/release/safe-denoiser-cpp]
       [--out bench/results/server_soak.json]
Needs ``make cpp`` and the test bundles (``make cpp-test``, or cpp_runtime/scripts/make_test_bundles.py DIR).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_json

ROOT = Path(__file__).resolve().parents[1]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def payload(i: int, steps: int, label: str) -> tuple[str, dict[str, Any]]:
    """Request i: the three routes in turn, each with its own seed."""
    if i % 3 == 0:
        return "/generate", {"class": i % 10, "seed": i, "steps": steps}
    if i % 3 == 1:
        return "/v1/images/generations", {"prompt": str(i % 10), "seed": i, "steps": steps}
    return "/sdapi/v1/txt2img", {"prompt": label or str(i % 10), "seed": i, "steps": steps, "sampler_name": "DDIM"}


class Soak:
    def __init__(self, port: int, requests: int, clients: int, steps: int) -> None:
        self.port, self.requests, self.clients, self.steps = port, requests, clients, steps
        self.next = 0
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.warm = threading.Event()

    def take(self) -> int | None:
        with self.lock:
            if self.next >= self.requests:
                return None
            self.next += 1
            if self.next == max(1, self.requests // 10):
                self.warm.set()
            return self.next - 1

    def client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while (i := self.take()) is not None:
            path, body = payload(i, self.steps, "")
            begin = time.perf_counter()
            try:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException) as e:
                ok, data = False, repr(e).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            elapsed = time.perf_counter() - begin
            with self.lock:
                self.latencies.append(elapsed)
                if not ok:
                    self.errors.append(f"{path}: {data[:200]!r}")
        conn.close()


def metrics(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    return conn.getresponse().read().decode()


def run(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [str(args.binary), "serve", "--bundle", str(args.bundle), "--port", "0", "--threads", str(args.threads),
           "--log-level", "warn", "--max-batch", "4"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on"):
            raise SystemExit(f"server did not start: {line!r}")
        port = int(line.rsplit(":", 1)[1])
        rss_start = rss_kib(proc.pid)
        soak = Soak(port, args.requests, args.clients, args.steps)
        threads = [threading.Thread(target=soak.client) for _ in range(args.clients)]
        begin = time.perf_counter()
        for t in threads:
            t.start()
        soak.warm.wait()
        rss_warm = rss_kib(proc.pid)
        for t in threads:
            t.join()
        seconds = time.perf_counter() - begin
        rss_end = rss_kib(proc.pid)
        exposition = metrics(port)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    lat = sorted(soak.latencies)
    images = next(
        float(line.split()[1])
        for line in exposition.splitlines()
        if line.startswith("safe_denoiser_images_generated_total ")
    )
    return {
        "requests": args.requests,
        "clients": args.clients,
        "steps": args.steps,
        "bundle": Path(args.bundle).name,
        "seconds": seconds,
        "throughput_rps": args.requests / seconds,
        "p50_ms": 1e3 * statistics.median(lat),
        "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "errors": len(soak.errors),
        "first_errors": soak.errors[:5],
        "images_generated_metric": images,
        "rss_kib": {"start": rss_start, "after_warmup": rss_warm, "end": rss_end},
        "rss_growth_after_warmup": (rss_end - rss_warm) / rss_warm,
        "server_exit_code": proc.returncode,
        "machine": machine_info(args.threads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="sampler steps per image (a small bundle, short runs)")
    parser.add_argument("--threads", type=int, default=1, help="the server's intra-op threads")
    parser.add_argument("--bundle", type=Path, default=ROOT / "cpp_runtime/build/test_bundles/demo_theorem")
    parser.add_argument("--binary", type=Path, default=ROOT / "cpp_runtime/build/release/safe-denoiser-cpp")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/server_soak.json")
    args = parser.parse_args()
    if args.requests < 10 or args.clients < 1:
        parser.error("--requests: at least 10; --clients: at least 1")
    result = run(args)
    rss = result["rss_kib"]
    print_table(
        ["requests", "clients", "req/s", "p50 ms", "p99 ms", "errors", "RSS start / warm / end (MiB)", "growth"],
        [[result["requests"], result["clients"], f"{result['throughput_rps']:.0f}", f"{result['p50_ms']:.1f}",
          f"{result['p99_ms']:.1f}", result["errors"],
          f"{rss['start'] / 1024:.1f} / {rss['after_warmup'] / 1024:.1f} / {rss['end'] / 1024:.1f}",
          f"{100 * result['rss_growth_after_warmup']:+.1f}%"]],
    )  # fmt: skip
    write_json(args.out, result)
    print(f"wrote {args.out}")
    if result["errors"] or result["images_generated_metric"] != result["requests"]:
        raise SystemExit(f"soak failed: {result['errors']} errors, first: {result['first_errors']}")


if __name__ == "__main__":
    main()
