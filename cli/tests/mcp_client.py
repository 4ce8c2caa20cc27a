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

            err, out, text = await call(session, "sandbox_exec", {
                "sandbox_id": sid, "command": "echo out; echo err >&2; exit 3"})
            step("exec", is_error=err, result=out, text=text)

            err, out, _ = await call(session, "sandbox_exec", {
                "sandbox_id": sid, "command": "for w in a b; do printf '%s|' \"$w\"; done"})
            step("exec_loop", is_error=err, result=out)

            err, _, text = await call(session, "sandbox_write_file", {
                "sandbox_id": sid, "path": "/tmp/mcp/hello.txt", "content": "no directory yet"})
            step("write_no_dir", is_error=err, text=text)
            await call(session, "sandbox_exec", {"sandbox_id": sid, "command": "mkdir -p /tmp/mcp/sub"})
            err, out, _ = await call(session, "sandbox_write_file", {
                "sandbox_id": sid, "path": "/tmp/mcp/hello.txt", "content": "héllo\nworld\n"})
            step("write", is_error=err, result=out)
            err, out, _ = await call(session, "sandbox_read_file", {
                "sandbox_id": sid, "path": "/tmp/mcp/hello.txt"})
            step("read", is_error=err, result=out)
            err, out, _ = await call(session, "sandbox_list_files", {
                "sandbox_id": sid, "path": "/tmp/mcp"})
            step("list", is_error=err, result=out)

            err, _, text = await call(session, "sandbox_read_file", {
                "sandbox_id": sid, "path": "/no/such/file"})
            step("read_missing", is_error=err, text=text)
            err, _, text = await call(session, "sandbox_list_files", {
                "sandbox_id": sid, "path": "/no/such/dir"})
            step("list_missing", is_error=err, text=text)
            err, _, text = await call(session, "sandbox_exec", {
                "sandbox_id": "not-a-sandbox", "command": "true"})
            step("bad_id", is_error=err, text=text)

            err, second, _ = await call(session, "sandbox_create", {"isolation": "jail"})
            check(not err, f"the second sandbox_create failed: {second}")
            err, out, _ = await call(session, "sandbox_destroy", {"sandbox_id": second["sandbox_id"]})
            step("destroyed", is_error=err, result=out)
            err, _, text = await call(session, "sandbox_exec", {
                "sandbox_id": second["sandbox_id"], "command": "true"})
            step("destroyed_gone", is_error=err, text=text)
    # The session is over: the server has seen stdin's end and exited.
    step("ended")


asyncio.run(main())
