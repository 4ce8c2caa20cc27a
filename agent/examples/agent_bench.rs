//! Agent benchmark over a unix socket: exec round trip (spawn `true`, get its exit
//! status) percentiles, stdout throughput and file transfer throughput.
//!
//! `cargo run -p agent --example agent_bench [-- EXECS STDOUT_MIB]` (defaults: 2000 and 1024).
//! The agent runs in this process on its own thread and single-threaded runtime, as in
//! the guest; the client uses another runtime.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::server::{Agent, ListenAddr, Listener};
use agent::{AgentClient, ExecRequest};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

fn start_agent(addr: ListenAddr) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("agent runtime");
        runtime.block_on(async move {
            let agent: Arc<Agent> = Agent::new(false).expect("agent");
            let listener = Listener::bind(&addr).expect("bind");
            ready_tx.send(()).expect("signal readiness");
            agent.serve(listener).await;
        });
    });
    ready_rx.recv().expect("agent thread started");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let execs: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2000);
    let stdout_mib: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    if execs == 0 || stdout_mib == 0 {
        return Err("EXECS and STDOUT_MIB must be positive".into());
    }
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("agent.sock");
    start_agent(ListenAddr::Unix(socket.clone()));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = AgentClient::connect_unix(&socket).await?;

        // Warm up (page cache, allocator).
        for _ in 0..50 {
            client.exec(ExecRequest::new(["true"])).await?.wait().await?;
        }
        let mut samples = Vec::with_capacity(execs);
        for _ in 0..execs {
            let start = Instant::now();
            let status = client.exec(ExecRequest::new(["true"])).await?.wait().await?;
            samples.push(start.elapsed());
            assert!(status.success());
        }
        samples.sort();
        let mean = samples.iter().sum::<Duration>() / execs as u32;
        println!(
            "exec round trip (`true`, {execs} runs): p50 {:.3} ms, p99 {:.3} ms, mean {:.3} ms, max {:.3} ms",
            percentile(&samples, 0.50).as_secs_f64() * 1e3,
            percentile(&samples, 0.99).as_secs_f64() * 1e3,
            mean.as_secs_f64() * 1e3,
            samples[samples.len() - 1].as_secs_f64() * 1e3,
        );

        let bytes = stdout_mib << 20;
        let start = Instant::now();
        let mut session = client
            .exec(ExecRequest::new(["head", "-c", &bytes.to_string(), "/dev/zero"]))
            .await?;
        let mut stdout = session.stdout.take().ok_or("no stdout")?;
        let mut received = 0u64;
        while let Some(chunk) = stdout.recv().await? {
            received += chunk.len() as u64;
        }
        session.wait().await?;
        let elapsed = start.elapsed();
        assert_eq!(received, bytes);
        println!(
            "stdout throughput ({stdout_mib} MiB from head -c): {:.0} MB/s",
            mb_per_s(received, elapsed)
        );

        let data = vec![0x5au8; 256 << 20];
        let path = dir.path().join("blob");
        let path = path.to_str().ok_or("temp path is not UTF-8")?;
        let start = Instant::now();
        client.put_file(path, 0o644, &data[..]).await?;
        let put = start.elapsed();
        let mut back = Vec::with_capacity(data.len());
        let start = Instant::now();
        client.get_file(path, &mut back).await?;
        let get = start.elapsed();
        assert!(back == data);
        println!(
            "file transfer (256 MiB, tmpfs or disk of {}): put {:.0} MB/s, get {:.0} MB/s",
            dir.path().display(),
            mb_per_s(data.len() as u64, put),
            mb_per_s(data.len() as u64, get)
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
