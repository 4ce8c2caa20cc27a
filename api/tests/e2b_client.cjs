// A smoke run of the official `e2b` JS/TS SDK (installed by scripts/deps.sh, pinned) against
// mvmd's /e2b, configured only by E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY. Prints one
// JSON report of steps like e2b_client.py (api/tests/e2b_sdk.rs asserts them).

const { Sandbox, CommandExitError, FileNotFoundError, SandboxNotFoundError } = require('e2b')

const steps = []

async function step(name, check) {
  try {
    await check()
    steps.push({ step: name, ok: true })
  } catch (e) {
    steps.push({ step: name, ok: false, detail: String(e && e.stack ? e.stack : e) })
  }
}

function expect(cond, what) {
  if (!cond) throw new Error(`expected: ${JSON.stringify(what)}`)
}

async function main() {
  const run = String(Date.now())
  const sbx = await Sandbox.create('base', { timeoutMs: 120_000, metadata: { run } })
  steps.push({ step: 'create', ok: true })

  await step('commands.run with onStdout/onStderr', async () => {
    const out = []
    const err = []
    const r = await sbx.commands.run('echo one; echo two >&2', {
      onStdout: (d) => out.push(d),
      onStderr: (d) => err.push(d),
    })
    expect(r.exitCode === 0 && r.stdout === 'one\n' && r.stderr === 'two\n', r)
    expect(out.join('') === 'one\n' && err.join('') === 'two\n', { out, err })
  })

  await step('a non-zero exit is CommandExitError', async () => {
    try {
      await sbx.commands.run('exit 4')
    } catch (e) {
      expect(e instanceof CommandExitError && e.exitCode === 4, String(e))
      return
    }
    throw new Error('no CommandExitError')
  })

  await step('files write, read, list, missing file', async () => {
    await sbx.files.write('/tmp/js/a.txt', 'from js')
    expect((await sbx.files.read('/tmp/js/a.txt')) === 'from js', 'read back')
    const names = (await sbx.files.list('/tmp/js')).map((e) => e.name)
    expect(names.length === 1 && names[0] === 'a.txt', names)
    try {
      await sbx.files.read('/tmp/js/none')
    } catch (e) {
      expect(e instanceof FileNotFoundError, String(e))
      return
    }
    throw new Error('no FileNotFoundError')
  })

  await step('getMetrics: samples of CPU, memory and disk', async () => {
    const deadline = Date.now() + 30_000
    let metrics = await sbx.getMetrics()
    while (metrics.length === 0) {
      expect(Date.now() < deadline, 'no sample in 30 s')
      await new Promise((r) => setTimeout(r, 1000))
      metrics = await sbx.getMetrics()
    }
    const last = metrics[metrics.length - 1]
    expect(last.memTotal === 256 * 1024 * 1024 && last.cpuCount >= 1, last)
    expect(last.memUsed > 0 && last.diskTotal > 0 && last.timestamp instanceof Date, last)
  })

  await step('createSnapshot: refused in the jail tier naming the vm tier; none listed or deleted', async () => {
    try {
      await sbx.createSnapshot()
      throw new Error('a jail-tier sandbox was snapshotted')
    } catch (e) {
      expect(String(e.message).includes('vm-tier'), String(e))
    }
    const listed = await Sandbox.listSnapshots().nextItems()
    expect(listed.length === 0, listed)
    expect((await Sandbox.deleteSnapshot('kept')) === false, 'deleted a snapshot it does not have')
  })

  await step('list with a metadata filter, then kill', async () => {
    const page = await Sandbox.list({ query: { metadata: { run } } }).nextItems()
    expect(page.length === 1 && page[0].sandboxId === sbx.sandboxId, page)
    await sbx.kill()
    const left = await Sandbox.list({ query: { metadata: { run } } }).nextItems()
    expect(left.length === 0, left)
  })

  await step('lifecycle onTimeout pause: paused at its timeout, a command resumes it (autoResume)', async () => {
    const auto = await Sandbox.create('base', {
      timeoutMs: 3_000,
      metadata: { run: `${run}-auto` },
      lifecycle: { onTimeout: 'pause', autoResume: true },
    })
    try {
      await auto.files.write('/tmp/js/kept', 'kept')
      const info = await Sandbox.getInfo(auto.sandboxId)
      expect(info.lifecycle && info.lifecycle.onTimeout === 'pause' && info.lifecycle.autoResume === true, info.lifecycle)
      const deadline = Date.now() + 20_000
      while ((await Sandbox.getInfo(auto.sandboxId)).state !== 'paused') {
        expect(Date.now() < deadline, 'not paused at its timeout')
        await new Promise((r) => setTimeout(r, 200))
      }
      const r = await auto.commands.run('cat /tmp/js/kept')
      expect(r.stdout === 'kept', r.stdout)
    } finally {
      await auto.kill()
    }
  })

  await step('an unknown sandbox is SandboxNotFoundError', async () => {
    try {
      await Sandbox.connect('000000000000')
    } catch (e) {
      expect(e instanceof SandboxNotFoundError, String(e))
      return
    }
    throw new Error('connected to nothing')
  })

  process.stdout.write(JSON.stringify(steps))
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
