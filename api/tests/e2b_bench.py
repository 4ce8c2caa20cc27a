"""Create → first command output through the official `e2b` SDK against mvmd's native REST API
in the same run, alternating, from the same Python process over the same TCP listener. Prints
one JSON object of milliseconds (p50/p99 of each) and the SDK's ratio; api/tests/e2b_sdk.rs
runs it (`cargo test -p api --test e2b_sdk benchmark -- --nocapture` shows the figures)."""

import json
import os
import sys
import time

import httpx

from e2b import Sandbox

iterations = int(sys.argv[1])
base = os.environ["E2B_API_URL"].removesuffix("/e2b")
native_api = httpx.Client(
    base_url=base,
    headers={"Authorization": f"Bearer {os.environ['E2B_API_KEY']}"},
    timeout=60,
)


def native():
    """POST /v1/sandboxes, then a streamed exec of `echo ready` until its first output."""
    start = time.perf_counter()
    sandbox = native_api.post("/v1/sandboxes", json={}).raise_for_status().json()
    exec_req = {"cmd": ["echo", "ready"], "stream": True}
    with native_api.stream("POST", f"/v1/sandboxes/{sandbox['id']}/exec", json=exec_req) as r:
        for line in r.iter_lines():
            if json.loads(line)["type"] == "stdout":
                break
    took = time.perf_counter() - start
    native_api.delete(f"/v1/sandboxes/{sandbox['id']}").raise_for_status()
    return took


def sdk():
    """Sandbox.create(), then commands.run("echo ready") until its first stdout callback."""
    start = time.perf_counter()
    sbx = Sandbox.create()
    first = []
    sbx.commands.run("echo ready", on_stdout=lambda _: first.append(time.perf_counter()))
    took = first[0] - start
    sbx.kill()
    return took


def percentiles(samples):
    s = sorted(samples)
    pick = lambda p: s[min(len(s) - 1, round((len(s) - 1) * p))] * 1e3
    return pick(0.5), pick(0.99)


for warm_up in (native, sdk):
    warm_up()
runs = {"native": [], "sdk": []}
for _ in range(iterations):
    runs["native"].append(native())
    runs["sdk"].append(sdk())
(n50, n99), (s50, s99) = percentiles(runs["native"]), percentiles(runs["sdk"])
report = {
    "iterations": iterations,
    "native_p50_ms": round(n50, 1),
    "native_p99_ms": round(n99, 1),
    "sdk_p50_ms": round(s50, 1),
    "sdk_p99_ms": round(s99, 1),
    "sdk_over_native_p50": round(s50 / n50, 2),
}
json.dump(report, sys.stdout)
