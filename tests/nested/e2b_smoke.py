"""The official `e2b` Python SDK against an mvmd of the vm tier: run by tests/nested/run.sh on
L0 when the nested case `e2b-sdk-vm-tier` prints `nested: E2B-READY <api port> <verdict port>
<token>`, configured only by E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY. Creates a sandbox,
runs commands (stdout callback, exit code, CommandExitException), writes, reads and lists files,
pauses it (mvmd saves the VM to disk) and connects to it again (resumed, its files and processes
there), takes a snapshot of it (create_snapshot) and creates a sandbox from the snapshot by its
name (going on from the snapshot's instant: its file, its running process, its own host name; its
templateID the snapshot's id, as E2B's snapshots are templates),
lists and deletes the snapshot, makes a second one whose lifecycle pauses it at its timeout (saved) and resumes it on a
command, kills them, and sends its verdict back to the case over TCP (`127.0.0.1:<verdict port>`, given as
the only argument), one `key value` line each:

    verdict pass|fail
    first-output-ms <create -> first stdout callback, ms>   (on pass)
    guest-kernel <uname -r in the sandbox>                  (on pass)
    auto-saved <id of the sandbox paused at its timeout>    (on pass)
    auto-resume-ms <its resuming command -> output, ms>     (on pass)
    snapshot-create-ms <create_snapshot of a running sandbox, ms>          (on pass)
    from-snapshot-ms <Sandbox.create(snapshot) -> first command output, ms> (on pass)
    step ok|FAIL <name>[: <the SDK's error>]                (one per step run)

The steps stop at the first failure; the sandbox is killed whatever happened."""

import socket
import sys
import time
import traceback

# Under QEMU TCG a vm-tier create takes seconds and every call is slow: generous limits.
REQUEST_TIMEOUT_S = 180
COMMAND_TIMEOUT_S = 120
# The timeout of the sandbox whose lifecycle pauses it at its timeout.
AUTO_PAUSE_TIMEOUT_S = 30

lines = []
facts = {}


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def smoke():
    """Every step in order; returns True when all passed (each one is in `lines`)."""
    try:
        from e2b import CommandExitException, Sandbox, SandboxQuery, SandboxState
    except Exception as e:
        lines.append(f"step FAIL import e2b: {type(e).__name__}: {e} (run scripts/deps.sh)")
        return False
    run_id = str(time.time_ns())
    sbx = None
    killed = False

    def create():
        nonlocal sbx
        started = time.perf_counter()
        sbx = Sandbox.create(
            template="base",
            timeout=600,
            metadata={"suite": "nested", "run": run_id},
            request_timeout=REQUEST_TIMEOUT_S,
        )
        first = []
        out = []
        r = sbx.commands.run(
            "uname -r",
            on_stdout=lambda s: (first.append(time.perf_counter()), out.append(s)),
            timeout=COMMAND_TIMEOUT_S,
        )
        expect(r.exit_code == 0 and first, (r.exit_code, r.stderr))
        expect("".join(out) == r.stdout, (out, r.stdout))
        facts["first-output-ms"] = f"{(first[0] - started) * 1e3:.0f}"
        facts["guest-kernel"] = r.stdout.strip()

    def exit_code():
        try:
            sbx.commands.run("echo bad >&2; exit 3", timeout=COMMAND_TIMEOUT_S)
        except CommandExitException as e:
            expect(e.exit_code == 3 and "bad" in e.stderr, (e.exit_code, e.stderr))
            return
        raise AssertionError("no CommandExitException")

    def files():
        sbx.files.write("/tmp/e2b/a.txt", "content")
        expect(sbx.files.read("/tmp/e2b/a.txt") == "content", "read back")
        blob = bytes(range(256)) * 256
        sbx.files.write("/tmp/e2b/blob", blob)
        expect(bytes(sbx.files.read("/tmp/e2b/blob", format="bytes")) == blob, "bytes")
        names = sorted(e.name for e in sbx.files.list("/tmp/e2b"))
        expect(names == ["a.txt", "blob"], names)
        r = sbx.commands.run("cat /tmp/e2b/a.txt", timeout=COMMAND_TIMEOUT_S)
        expect(r.stdout == "content", repr(r.stdout))

    def pause_and_connect():
        nonlocal sbx
        sbx.commands.run(
            "setsid sh -c 'echo $$ > /tmp/e2b/pid; exec sleep 100000' </dev/null >/dev/null 2>&1 & "
            "while [ ! -s /tmp/e2b/pid ]; do sleep 0.1; done",
            timeout=COMMAND_TIMEOUT_S,
        )
        expect(sbx.pause() is True, "pause returned False")
        info = Sandbox.get_info(sbx.sandbox_id)
        expect(info.state == SandboxState.PAUSED, f"state {info.state} after the pause")
        sbx = Sandbox.connect(sbx.sandbox_id, timeout=600)
        info = Sandbox.get_info(sbx.sandbox_id)
        expect(info.state == SandboxState.RUNNING, f"state {info.state} after connect")
        r = sbx.commands.run(
            "cat /tmp/e2b/a.txt; kill -0 $(cat /tmp/e2b/pid) && echo alive",
            timeout=COMMAND_TIMEOUT_S,
        )
        expect(r.stdout == "contentalive\n", repr(r.stdout))

    def snapshot():
        sbx.commands.run("echo before > /tmp/e2b/snap.txt", timeout=COMMAND_TIMEOUT_S)
        name = f"smoke-{run_id}"
        started = time.perf_counter()
        info = sbx.create_snapshot(name=name)
        facts["snapshot-create-ms"] = f"{(time.perf_counter() - started) * 1e3:.0f}"
        expect(info.snapshot_id.startswith("snap-") and info.names == [name], info)
        # The source goes on, running, and what it does now is not in the snapshot.
        info_now = Sandbox.get_info(sbx.sandbox_id)
        expect(info_now.state == SandboxState.RUNNING, f"source {info_now.state} after it")
        sbx.commands.run("echo after > /tmp/e2b/snap.txt", timeout=COMMAND_TIMEOUT_S)
        listed = Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id).next_items()
        expect([s.snapshot_id for s in listed] == [info.snapshot_id], listed)
        try:
            sbx.create_snapshot(mode="filesystem")
            raise AssertionError("a file-system-only snapshot was taken")
        except AssertionError:
            raise
        except Exception as e:
            expect("filesystem" in str(e), f"its refusal: {e}")
        started = time.perf_counter()
        child = Sandbox.create(
            name,
            timeout=600,
            metadata={"suite": "nested", "run": run_id},
            request_timeout=REQUEST_TIMEOUT_S,
        )
        try:
            r = child.commands.run(
                "cat /tmp/e2b/snap.txt; kill -0 $(cat /tmp/e2b/pid) && echo alive; hostname",
                timeout=COMMAND_TIMEOUT_S,
            )
            facts["from-snapshot-ms"] = f"{(time.perf_counter() - started) * 1e3:.0f}"
            own = sbx.commands.run("hostname", timeout=COMMAND_TIMEOUT_S).stdout
            lines_out = r.stdout.split("\n")
            expect(lines_out[:2] == ["before", "alive"], repr(r.stdout))
            expect(lines_out[2] != own.strip(), f"the same host name {own!r}")
            # E2B's snapshots are templates: the sandbox's template is the snapshot.
            made_from = Sandbox.get_info(child.sandbox_id).template_id
            expect(made_from == info.snapshot_id, f"its templateID {made_from!r}")
        finally:
            child.kill()
        expect(Sandbox.delete_snapshot(info.snapshot_id) is True, "delete returned False")
        expect(Sandbox.delete_snapshot(info.snapshot_id) is False, "deleted twice")
        left = Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id).next_items()
        expect(left == [], left)
        try:
            gone = Sandbox.create(name, request_timeout=REQUEST_TIMEOUT_S)
            gone.kill()
            raise AssertionError("a sandbox was made from a deleted snapshot")
        except AssertionError:
            raise
        except Exception as e:
            expect("no template" in str(e), f"its refusal: {e}")

    def pause_at_timeout():
        # Its own sandbox: a lifecycle is chosen at the create. The timeout leaves time for
        # a cold create under TCG and the calls before it passes.
        auto = Sandbox.create(
            template="base",
            timeout=AUTO_PAUSE_TIMEOUT_S,
            metadata={"suite": "nested", "run": run_id},
            lifecycle={"on_timeout": "pause", "auto_resume": True},
            request_timeout=REQUEST_TIMEOUT_S,
        )
        try:
            auto.files.write("/tmp/e2b/kept", "kept")
            auto.commands.run(
                "setsid sh -c 'echo $$ > /tmp/e2b/pid; exec sleep 100000' </dev/null >/dev/null 2>&1 & "
                "while [ ! -s /tmp/e2b/pid ]; do sleep 0.1; done",
                timeout=COMMAND_TIMEOUT_S,
            )
            info = Sandbox.get_info(auto.sandbox_id)
            expect(info.lifecycle == {"on_timeout": "pause", "auto_resume": True}, info.lifecycle)
            deadline = time.time() + AUTO_PAUSE_TIMEOUT_S + 60
            while Sandbox.get_info(auto.sandbox_id).state != SandboxState.PAUSED:
                expect(time.time() < deadline, "not paused at its timeout")
                time.sleep(0.5)
            facts["auto-saved"] = auto.sandbox_id
            started = time.perf_counter()
            r = auto.commands.run(
                "cat /tmp/e2b/kept; kill -0 $(cat /tmp/e2b/pid) && echo alive",
                timeout=COMMAND_TIMEOUT_S,
            )
            facts["auto-resume-ms"] = f"{(time.perf_counter() - started) * 1e3:.0f}"
            expect(r.stdout == "keptalive\n", repr(r.stdout))
            info = Sandbox.get_info(auto.sandbox_id)
            expect(info.state == SandboxState.RUNNING, f"state {info.state} after the command")
        finally:
            auto.kill()

    def kill():
        nonlocal killed
        killed = sbx.kill() is not False
        expect(killed, "kill returned False")
        left = Sandbox.list(query=SandboxQuery(metadata={"run": run_id})).next_items()
        expect(left == [], left)

    steps = [
        ("Sandbox.create, commands.run with an on_stdout callback", create),
        ("a non-zero exit is CommandExitException with the code", exit_code),
        ("files.write, read, list; the file seen by a command", files),
        ("pause, then connect resumes it with its files and processes", pause_and_connect),
        (
            "create_snapshot, Sandbox.create from it goes on from its instant, list, delete",
            snapshot,
        ),
        (
            "lifecycle on_timeout pause: saved at its timeout, a command resumes it (auto_resume)",
            pause_at_timeout,
        ),
        ("kill, then the sandbox is not listed", kill),
    ]
    try:
        for name, check in steps:
            try:
                check()
            except Exception as e:
                lines.append(f"step FAIL {name}: {type(e).__name__}: {e}")
                print(traceback.format_exc(), file=sys.stderr)
                return False
            lines.append(f"step ok {name}")
        return True
    finally:
        if sbx is not None and not killed:
            try:
                sbx.kill()
            except Exception as e:
                print(f"killing the sandbox after a failure: {e}", file=sys.stderr)


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    passed = smoke()
    report = [f"verdict {'pass' if passed else 'fail'}"]
    if passed:
        report += [f"{k} {v}" for k, v in facts.items()]
    report += lines
    text = "\n".join(report) + "\n"
    print(text, end="")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(text.encode())


if __name__ == "__main__":
    main()
