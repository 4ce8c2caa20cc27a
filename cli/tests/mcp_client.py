"""A real MCP client (the official `mcp` package) driving `mvm mcp` over stdio.

Usage: mcp_client.py MVM [ARGS...]  (the server's environment is this process's). Prints one
JSON object per step on stdout; the Rust test (cli/tests/mcp.rs) checks them. Exits non-zero
on the first unexpected answer.
"""

import asyncio
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters, stdio_client


def step(name, **fields):
    print(json.dumps({"step": name, **fields}), flush=True)


def check(cond, what):
    if not cond:
        raise SystemExit(f"mcp_client.py: {what}")


async def call(session, tool, args):
    r = await session.call_tool(tool, args)
    text = "".join(c.text for c in r.content if getattr(c, "type", "") == "text")
    return r.is_error, r.structured_content, text


async def record(session, name, tool, args):
    """Calls `tool` and reports the answer as step `name`; returns its structured content."""
    err, result, text = await call(session, tool, args)
    step(name, is_error=err, result=result, text=text)
    return result


async def main():
    server = StdioServerParameters(command=sys.argv[1], args=sys.argv[2:], env=dict(os.environ))
    async with stdio_client(server) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            step("tools", names=sorted(t.name for t in tools.tools),
                 described=all(t.description and t.input_schema.get("properties") for t in tools.tools))

            err, created, _ = await call(session, "sandbox_create", {"isolation": "jail"})
            check(not err, f"sandbox_create failed: {created}")
            sid = created["sandbox_id"]
            step("created", **created)

            for name, tool, args in [
                ("exec", "sandbox_exec", {"command": "echo out; echo err >&2; exit 3"}),
                ("exec_loop", "sandbox_exec", {"command": "for w in a b; do printf '%s|' \"$w\"; done"}),
                ("exec_too_large", "sandbox_exec", {"command": "echo " + "x" * 2_000_000}),
                ("write_no_dir", "sandbox_write_file", {"path": "/tmp/mcp/hello.txt", "content": "no directory yet"}),
                ("mkdir", "sandbox_exec", {"command": "mkdir -p /tmp/mcp/sub"}),
                ("write", "sandbox_write_file", {"path": "/tmp/mcp/hello.txt", "content": "héllo\nworld\n"}),
                ("read", "sandbox_read_file", {"path": "/tmp/mcp/hello.txt"}),
                ("list", "sandbox_list_files", {"path": "/tmp/mcp"}),
                ("read_missing", "sandbox_read_file", {"path": "/no/such/file"}),
                ("list_missing", "sandbox_list_files", {"path": "/no/such/dir"}),
            ]:
                await record(session, name, tool, {"sandbox_id": sid, **args})
            await record(session, "bad_id", "sandbox_exec", {"sandbox_id": "not-a-sandbox", "command": "true"})

            err, second, _ = await call(session, "sandbox_create", {"isolation": "jail"})
            check(not err, f"the second sandbox_create failed: {second}")
            gone = {"sandbox_id": second["sandbox_id"]}
            await record(session, "destroyed", "sandbox_destroy", gone)
            await record(session, "destroyed_gone", "sandbox_exec", {**gone, "command": "true"})
    # The session is over: the server has seen stdin's end and exited.
    step("ended")


asyncio.run(main())
