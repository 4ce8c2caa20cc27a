"""Drives mvmd's /e2b with the official `e2b` Python SDK, configured only by E2B_API_URL,
E2B_SANDBOX_URL and E2B_API_KEY. Prints one JSON report: a step per SDK call checked, with
`ok` and what went wrong (api/tests/e2b_sdk.rs asserts them)."""

import asyncio
import datetime
import io
import os
import json
import sys
import time
import traceback

import httpx

from e2b import (
    AsyncSandbox,
    CommandExitException,
    FileNotFoundException,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxQuery,
)

steps = []


def step(name):
    """Runs the decorated check at once and records its outcome."""

    def run(check):
        try:
            detail = check()
            steps.append({"step": name, "ok": True, "detail": detail})
        except Exception as e:  # every failure is reported, the run goes on
            steps.append(
                {
                    "step": name,
                    "ok": False,
                    "detail": f"{type(e).__name__}: {e}",
                    "trace": traceback.format_exc(),
                }
            )

    return run


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


run_id = str(time.time_ns())
sbx = Sandbox.create(
    template="base",
    timeout=120,
    metadata={"suite": "e2b", "run": run_id},
    envs={"GREETING": "hello"},
)
steps.append({"step": "create", "ok": True, "detail": sbx.sandbox_id})


@step("commands.run streams stdout and stderr to callbacks")
def _():
    out, err = [], []
    r = sbx.commands.run(
        "echo one; echo two >&2; echo three", on_stdout=out.append, on_stderr=err.append
    )
    expect(r.exit_code == 0, r)
    expect(r.stdout == "one\nthree\n", repr(r.stdout))
    expect(r.stderr == "two\n", repr(r.stderr))
    expect("".join(out) == "one\nthree\n" and "".join(err) == "two\n", (out, err))


@step("a large output arrives whole")
def _():
    r = sbx.commands.run("head -c 3000000 /dev/urandom | base64 | tr -d '\\n'", timeout=120)
    expect(len(r.stdout) == 4000000, len(r.stdout))


@step("a non-zero exit raises CommandExitException with the code")
def _():
    try:
        sbx.commands.run("echo bad >&2; exit 3")
    except CommandExitException as e:
        expect(e.exit_code == 3 and "bad" in e.stderr, (e.exit_code, e.stderr))
        return
    raise AssertionError("no CommandExitException")


@step("envs of the sandbox and of the command")
def _():
    r = sbx.commands.run("echo $GREETING $EXTRA", envs={"EXTRA": "there"})
    expect(r.stdout == "hello there\n", repr(r.stdout))


@step("cwd")
def _():
    r = sbx.commands.run("pwd", cwd="/tmp")
    expect(r.stdout == "/tmp\n", repr(r.stdout))


@step("background command, commands.list and commands.kill")
def _():
    h = sbx.commands.run("sleep 100", background=True)
    pids = [p.pid for p in sbx.commands.list()]
    expect(h.pid in pids, (h.pid, pids))
    expect(sbx.commands.kill(h.pid), "kill returned False")
    try:
        h.wait()
        raise AssertionError("a killed command ended well")
    except CommandExitException as e:
        expect(e.exit_code != 0, e)
    expect(h.pid not in [p.pid for p in sbx.commands.list()], "still listed")
    expect(not sbx.commands.kill(h.pid), "killed twice")


@step("stdin: send_stdin and close_stdin")
def _():
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "ping\n")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    expect(r.stdout == "ping\n", repr(r.stdout))


@step("files: write (parents made), read, bytes, streamed upload")
def _():
    info = sbx.files.write("/tmp/e2b/dir/a.txt", "content")
    expect(info.path == "/tmp/e2b/dir/a.txt", info)
    expect(sbx.files.read("/tmp/e2b/dir/a.txt") == "content", "read back")
    blob = bytes(range(256)) * 1024
    sbx.files.write("/tmp/e2b/blob", io.BytesIO(blob))
    expect(bytes(sbx.files.read("/tmp/e2b/blob", format="bytes")) == blob, "bytes")
    big = os.urandom(3 << 20)  # past axum's default body limit, as multipart
    sbx.files.write("/tmp/e2b/big", big)
    expect(bytes(sbx.files.read("/tmp/e2b/big", format="bytes")) == big, "3 MiB")
    sbx.files.remove("/tmp/e2b/big")


@step("files: list, exists, get_info")
def _():
    names = sorted(e.name for e in sbx.files.list("/tmp/e2b"))
    expect(names == ["blob", "dir"], names)
    deep = sorted(e.path for e in sbx.files.list("/tmp/e2b", depth=2))
    expect("/tmp/e2b/dir/a.txt" in deep, deep)
    expect(sbx.files.exists("/tmp/e2b/blob"), "exists")
    expect(not sbx.files.exists("/tmp/e2b/nothing"), "not exists")
    expect(sbx.files.get_info("/tmp/e2b/blob").size == 256 * 1024, "size")


@step("files: rename, make_dir, remove")
def _():
    moved = sbx.files.rename("/tmp/e2b/dir/a.txt", "/tmp/e2b/b.txt")
    expect(moved.path == "/tmp/e2b/b.txt", moved)
    expect(sbx.files.read("/tmp/e2b/b.txt") == "content", "moved content")
    expect(sbx.files.make_dir("/tmp/e2b/new/deeper"), "make_dir")
    expect(not sbx.files.make_dir("/tmp/e2b/new/deeper"), "make_dir twice")
    sbx.files.remove("/tmp/e2b/new")
    expect(not sbx.files.exists("/tmp/e2b/new"), "removed")


@step("files: a missing file is FileNotFoundException")
def _():
    try:
        sbx.files.read("/tmp/e2b/missing")
    except FileNotFoundException:
        return
    raise AssertionError("no FileNotFoundException")


@step("files: watch_dir reports create, write and remove")
def _():
    sbx.files.make_dir("/tmp/w")
    h = sbx.files.watch_dir("/tmp/w")
    sbx.files.write("/tmp/w/x", "1")
    created = [(e.name, e.type.value) for e in h.get_new_events()]
    expect(created == [("x", "create")], created)
    sbx.files.write("/tmp/w/x", "longer")
    written = [(e.name, e.type.value) for e in h.get_new_events()]
    expect(written == [("x", "write")], written)
    sbx.files.remove("/tmp/w/x")
    removed = [(e.name, e.type.value) for e in h.get_new_events()]
    expect(removed == [("x", "remove")], removed)
    h.stop()


@step("async SDK: commands.run and the WatchDir stream (recursive)")
def _():
    async def check():
        asbx = await AsyncSandbox.connect(sbx.sandbox_id)
        r = await asbx.commands.run("echo async")
        expect(r.stdout == "async\n", repr(r.stdout))
        await asbx.files.make_dir("/tmp/aw/sub")
        seen = []
        h = await asbx.files.watch_dir("/tmp/aw", on_event=seen.append, recursive=True)
        await asbx.files.write("/tmp/aw/sub/y", "1")
        for _ in range(40):
            if seen:
                break
            await asyncio.sleep(0.1)
        await h.stop()
        got = [(e.name, e.type.value) for e in seen]
        expect(got == [("sub/y", "create")], got)

    asyncio.run(check())


@step("set_timeout and get_info")
def _():
    before = sbx.get_info().end_at
    sbx.set_timeout(600)
    info = sbx.get_info()
    expect(info.end_at > before, (before, info.end_at))
    expect(info.metadata.get("run") == run_id, info.metadata)
    expect(info.sandbox_id == sbx.sandbox_id, info)


@step("list with a metadata filter")
def _():
    mine = Sandbox.list(query=SandboxQuery(metadata={"run": run_id})).next_items()
    expect([s.sandbox_id for s in mine] == [sbx.sandbox_id], mine)
    other = Sandbox.list(query=SandboxQuery(metadata={"run": "other"})).next_items()
    expect(other == [], other)


@step("pause, then Sandbox.connect resumes it; is_running")
def _():
    expect(sbx.is_running(), "running before")
    expect(sbx.pause() is not False, "paused")
    state = Sandbox.get_info(sbx.sandbox_id).state.value
    expect(state == "paused", state)
    resumed = Sandbox.connect(sbx.sandbox_id)
    expect(resumed.commands.run("echo back").stdout == "back\n", "resumed run")
    expect(Sandbox.get_info(sbx.sandbox_id).state.value == "running", "running after")


@step("fork of a jail-tier sandbox is refused naming the vm tier")
def _():
    try:
        sbx.fork()
        raise AssertionError("a jail-tier sandbox forked")
    except SandboxException as e:
        expect("vm" in str(e), str(e))


@step("Sandbox.connect to a running sandbox")
def _():
    again = Sandbox.connect(sbx.sandbox_id)
    expect(again.commands.run("echo again").stdout == "again\n", "connected run")


@step("pty: create, resize, input")
def _():
    out = bytearray()
    h = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(h.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(h.pid, b"stty size; exit\n")
    try:
        h.wait(on_pty=out.extend)
    except CommandExitException:
        pass
    expect(b"30 100" in out, bytes(out))


@step("an unknown sandbox is NotFound")
def _():
    try:
        Sandbox.connect("000000000000")
        raise AssertionError("connected to nothing")
    except NotFoundException:
        pass
    expect(Sandbox.kill("000000000000") is False, "kill of nothing")
    try:
        Sandbox.get_info("000000000000")
        raise AssertionError("info of nothing")
    except NotFoundException:
        pass


@step("bad input gets E2B-shaped 4xx answers, never 5xx")
def _():
    url, key = os.environ["E2B_API_URL"], os.environ["E2B_API_KEY"]
    api = {"X-API-Key": key}
    envd = {"X-Access-Token": key, "Content-Type": "application/json"}
    cases = [
        ("POST", "/sandboxes", {}, "{}", 401),
        ("POST", "/v2/sandboxes", api, "{", 400),
        ("POST", "/v2/sandboxes", api, '{"templateID": "no-such-template"}', 404),
        ("POST", "/v2/sandboxes", api, '{"templateID": "base", "volumeMounts": [{}]}', 400),
        ("GET", "/sandboxes/nope", api, "", 404),
        ("POST", "/sandboxes/nope/timeout", api, '{"timeout": 5}', 404),
        ("POST", "/v3/templates", api, "{}", 400),
        ("GET", "/volumes", api, "", 400),
        ("PUT", "/sandboxes", api, "{}", 405),
        ("GET", "/v2/sandboxes?nextToken=x", api, "", 400),
        ("GET", "/v2/sandboxes?limit=many", api, "", 400),
        ("POST", "/process.Process/NoSuchMethod", {**envd, "E2b-Sandbox-Id": sbx.sandbox_id}, "{}", 404),
        ("POST", "/filesystem.Filesystem/Stat", {**envd, "E2b-Sandbox-Id": "nope"}, '{"path": "/"}', 404),
        ("POST", "/process.Process/List", {"E2b-Sandbox-Id": sbx.sandbox_id}, "{}", 401),
        ("POST", "/process.Process/SendInput", {**envd, "E2b-Sandbox-Id": sbx.sandbox_id}, '{"process": {"pid": 1}}', 404),
        ("POST", "/filesystem.Filesystem/Stat", {**envd, "E2b-Sandbox-Id": sbx.sandbox_id}, "{", 400),
        ("GET", "/files?path=/tmp", {**envd, "E2b-Sandbox-Id": sbx.sandbox_id}, "", 400),
    ]
    for method, path, headers, body, status in cases:
        r = httpx.request(method, url + path, headers=headers, content=body)
        expect(r.status_code == status, f"{method} {path}: {r.status_code} {r.text}")
        expect(isinstance(r.json().get("message"), str), f"{method} {path}: {r.text}")


def await_state(sandbox_id, state, seconds=20):
    """Waits until the sandbox's state is `state`."""
    deadline = time.time() + seconds
    while Sandbox.get_info(sandbox_id).state.value != state:
        expect(time.time() < deadline, f"sandbox {sandbox_id} not {state} after {seconds} s")
        time.sleep(0.2)


def paused_at_timeout(run, lifecycle):
    """A sandbox with `lifecycle` and a 3 s timeout, holding /tmp/kept, once that timeout has
    paused it."""
    s = Sandbox.create(
        template="base",
        timeout=3,
        metadata={"suite": "e2b", "run": f"{run_id}-{run}"},
        lifecycle=lifecycle,
    )
    try:
        s.files.write("/tmp/kept", "kept")
        want = {"on_timeout": "pause", "auto_resume": bool(lifecycle.get("auto_resume"))}
        got = Sandbox.get_info(s.sandbox_id).lifecycle
        expect(got == want, got)
        await_state(s.sandbox_id, "paused")
        return s
    except Exception:
        s.kill()
        raise


@step("lifecycle on_timeout pause: paused (not killed) at its timeout, resumed by a command (auto_resume), paused again")
def _():
    s = paused_at_timeout("auto", {"on_timeout": "pause", "auto_resume": True})
    try:
        time.sleep(2)
        expect(Sandbox.get_info(s.sandbox_id).state.value == "paused", "kept paused")
        expect(s.commands.run("cat /tmp/kept").stdout == "kept", "a command resumes it")
        # Its timeout runs again from the resume.
        await_state(s.sandbox_id, "paused")
    finally:
        s.kill()


@step("lifecycle on_timeout pause without auto_resume: a command is refused, Sandbox.connect resumes it")
def _():
    s = paused_at_timeout("manual", {"on_timeout": "pause"})
    try:
        try:
            s.commands.run("true")
            raise AssertionError("a command ran in a paused sandbox")
        except AssertionError:
            raise
        except Exception as e:
            expect("resume" in str(e), str(e))
        resumed = Sandbox.connect(s.sandbox_id, timeout=60)
        expect(resumed.files.read("/tmp/kept") == "kept", "its file after connect")
        expect(Sandbox.get_info(s.sandbox_id).state.value == "running", "running after connect")
    finally:
        s.kill()


@step("get_metrics: CPU, memory and disk sampled every 5 s, a window, the latest of several, not another tenant's")
def _():
    # Two busy seconds and 4 MB written: CPU and disk used, in the samples after them.
    busy = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    sbx.commands.run(
        "head -c 4000000 /dev/urandom > /tmp/metrics-file; "
        "t=$(( $(date +%s) + 2 )); while [ $(date +%s) -lt $t ]; do :; done"
    )
    done = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
    deadline = time.time() + 30
    while (metrics := sbx.get_metrics())[-1:] == [] or metrics[-1].timestamp < done:
        expect(time.time() < deadline, f"no sample after the busy command in 30 s: {metrics}")
        time.sleep(1)
    info = sbx.get_info()
    last = metrics[-1]
    expect(last.cpu_count == info.cpu_count, (last.cpu_count, info.cpu_count))
    expect(last.mem_total == info.memory_mb << 20, (last.mem_total, info.memory_mb))
    expect(0 < last.mem_used <= last.mem_total, last)
    expect(4000000 <= last.disk_used <= last.disk_total, last)
    expect(all(0 <= m.cpu_used_pct <= 100 for m in metrics), metrics)
    expect(any(m.cpu_used_pct > 10 for m in metrics if m.timestamp > busy), metrics)
    times = [m.timestamp for m in metrics]
    expect(times == sorted(times) and len(set(times)) == len(times), times)
    later = sbx.get_metrics(start=last.timestamp + datetime.timedelta(seconds=1))
    expect(all(m.timestamp > last.timestamp for m in later), later)
    first = sbx.get_metrics(end=metrics[0].timestamp)
    expect(first and all(m.timestamp <= metrics[0].timestamp for m in first), first)
    other = os.environ["E2B_OTHER_API_KEY"]
    try:
        Sandbox.get_metrics(sbx.sandbox_id, api_key=other)
        raise AssertionError("another tenant read the metrics")
    except NotFoundException:
        pass
    url, key = os.environ["E2B_API_URL"], os.environ["E2B_API_KEY"]
    ids = {"sandbox_ids": f"{sbx.sandbox_id},nope"}
    mine = httpx.get(f"{url}/sandboxes/metrics", params=ids, headers={"X-API-Key": key}).json()
    expect(list(mine["sandboxes"]) == [sbx.sandbox_id], mine)
    expect(mine["sandboxes"][sbx.sandbox_id]["memTotal"] == last.mem_total, mine)
    theirs = httpx.get(f"{url}/sandboxes/metrics", params=ids, headers={"X-API-Key": other})
    expect(theirs.json() == {"sandboxes": {}}, theirs.text)
    return f"{len(metrics)} samples, the last {last}"


@step("update_network replaces an allow list; what mvm does not do is refused; not another tenant's")
def _():
    s = Sandbox.create(
        template="base",
        timeout=60,
        metadata={"suite": "e2b", "run": f"{run_id}-net"},
        network={"allow_out": ["10.9.9.9"], "deny_out": ["0.0.0.0/0"]},
    )
    try:
        url, key = os.environ["E2B_API_URL"], os.environ["E2B_API_KEY"]
        native = f"{url.removesuffix('/e2b')}/v1/sandboxes/{s.sandbox_id}"

        def allowed():
            r = httpx.get(native, headers={"Authorization": f"Bearer {key}"})
            return r.json()["network"]["allow"]

        expect(allowed() == ["10.9.9.9/32"], allowed())
        s.update_network({"allow_out": ["10.9.9.8", "10.9.9.7"], "deny_out": ["0.0.0.0/0"]})
        expect(allowed() == ["10.9.9.8/32", "10.9.9.7/32"], allowed())
        network = f"{url}/sandboxes/{s.sandbox_id}/network"
        for body, status in [
            ({"allowOut": ["10.9.9.9"], "rules": {"10.9.9.9": []}}, 400),
            ({"allowOut": [], "denyOut": ["10.9.9.8"]}, 400),
            ({"allow_internet_access": True}, 400),
        ]:
            r = httpx.put(network, json=body, headers={"X-API-Key": key})
            expect(r.status_code == status and r.json()["message"], (body, r.status_code, r.text))
        expect(allowed() == ["10.9.9.8/32", "10.9.9.7/32"], "a refused update changes nothing")
        other = os.environ["E2B_OTHER_API_KEY"]
        try:
            Sandbox.update_network(s.sandbox_id, {"allow_out": []}, api_key=other)
            raise AssertionError("another tenant changed the allow list")
        except NotFoundException:
            pass
        # A sandbox made without an allow list has none to change.
        r = httpx.put(f"{url}/sandboxes/{sbx.sandbox_id}/network", json={"allowOut": ["10.9.9.9"]}, headers={"X-API-Key": key})
        expect(r.status_code == 409, (r.status_code, r.text))
        expect(allowed() == ["10.9.9.8/32", "10.9.9.7/32"], "another tenant's update changed nothing")
    finally:
        s.kill()


@step("snapshots: a jail-tier sandbox's is refused naming the vm tier; none listed; not another tenant's")
def _():
    try:
        sbx.create_snapshot(name="kept")
        raise AssertionError("a jail-tier sandbox was snapshotted")
    except SandboxException as e:
        expect("vm-tier" in str(e), str(e))
    try:
        sbx.create_snapshot(mode="filesystem")
        raise AssertionError("a file-system-only snapshot was taken")
    except SandboxException as e:
        expect("filesystem" in str(e), str(e))
    try:
        Sandbox.create_snapshot(sbx.sandbox_id, api_key=os.environ["E2B_OTHER_API_KEY"])
        raise AssertionError("another tenant's sandbox was snapshotted")
    except NotFoundException:
        pass
    expect(sbx.list_snapshots().next_items() == [], "a snapshot is listed")
    expect(Sandbox.list_snapshots().next_items() == [], "a snapshot is listed")
    expect(Sandbox.delete_snapshot("kept") is False, "a snapshot it does not have was deleted")
    try:
        Sandbox.create("kept")
        raise AssertionError("a sandbox was made from a snapshot it does not have")
    except SandboxException as e:
        expect("no template" in str(e), str(e))


@step("kill")
def _():
    sbx.kill()
    left = Sandbox.list(query=SandboxQuery(metadata={"run": run_id})).next_items()
    expect(left == [], left)


json.dump(steps, sys.stdout)
