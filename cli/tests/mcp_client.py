"""A real MCP client (the official `mcp` package) driving `mvm mcp` over stdio, or mvmd's
`/mcp` over streamable HTTP.

Usage: mcp_client.py MVM [ARGS...]  (stdio; the server's environment is this process's)
       mcp_client.py http://HOST:PORT/mcp  (streamable HTTP, bearer token from MVM_TOKEN)
Prints one JSON object per step on stdout; the Rust tests (cli/tests/mcp.rs,
api/tests/mcp_http.rs) check them. Exits non-zero on the first unexpected answer.
"""

import asyncio
import contextlib
import json
import os
import sys

from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


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


@contextlib.asynccontextmanager
async def transport():
    """The client transport the command line names; leaving it ends the session."""
    if sys.argv[1].startswith("http"):
        headers = {"Authorization": f"Bearer {os.environ['MVM_TOKEN']}"}
        async with create_mcp_http_client(headers=headers) as http:
            async with streamable_http_client(sys.argv[1], http_client=http) as streams:
                yield streams
    else:
        server = StdioServerParameters(command=sys.argv[1], args=sys.argv[2:], env=dict(os.environ))
        async with stdio_client(server) as streams:
            yield streams


async def main():
    async with transport() as (read, write):
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
    # The session is over: the server has seen stdin's end and exited (stdio), or the session's
    # DELETE (streamable HTTP).
    step("ended")


asyncio.run(main())
