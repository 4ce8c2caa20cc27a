//! A published port in the vm tier: `mvm run -d -p HOST_PORT:8080 -p HOST_PORT:5353/udp`
//! through mvmd starts busybox httpd in a micro-VM without egress; L1 reaches it on
//! 127.0.0.1:HOST_PORT (host DNAT to the sandbox's veth, the namespace's DNAT on to the guest
//! behind the tap), a UDP echo server copied into the guest (`mvm-udp-echo`) answers on the
//! UDP port of the same number, mvmd's port proxy (`/v1/sandboxes/{id}/ports/8080/`) reaches
//! httpd from inside the sandbox's namespace, and `mvm rm` closes both ports and removes
//! their table.

use std::time::{Duration, Instant};

use mvm_testkit::ports::{
    free_local_port, http_get, httpd_command, ports_table_exists, udp_answer,
};

use super::{Ctx, MvmdSession, Outcome, Verdict};

/// The guest's page.
const PAGE: &str = "hello-from-a-micro-vm";

/// How long the guest's server may take to answer (nested guests are slow).
const SERVE_TIMEOUT: Duration = Duration::from_secs(30);

/// `mvm run -d -p` of a vm-tier httpd, reached from L1 and gone after `mvm rm`.
pub fn published_port_vm_tier(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let session = MvmdSession::start(ctx, "ports")?;
    let ctx = &*ctx;
    let checked = (|| {
        let port = free_local_port();
        let (publish, publish_udp) = (format!("{port}:8080"), format!("{port}:5353/udp"));
        let serve = httpd_command(PAGE, 8080);
        let out = session.mvm(
            ctx,
            &[
                "run",
                "-d",
                "--isolation",
                "vm",
                "-p",
                &publish,
                "-p",
                &publish_udp,
                "--",
                "sh",
                "-c",
                &serve,
            ],
            None,
        )?;
        let id = out.trim().to_string();
        if !ports_table_exists(&id) {
            return Err(format!(
                "no nft table ip mvm-ports-{id} after mvm run -d -p"
            ));
        }
        let deadline = Instant::now() + SERVE_TIMEOUT;
        loop {
            match http_get(port) {
                Ok(answer) if answer.contains(PAGE) => break,
                other if Instant::now() > deadline => {
                    return Err(format!(
                        "127.0.0.1:{port} did not serve the guest's page in {SERVE_TIMEOUT:?}: \
                         {other:?}"
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        let echo = ctx.vmm.with_file_name("mvm-udp-echo");
        let echo = echo
            .to_str()
            .ok_or("the binaries' directory is not UTF-8")?;
        session.mvm(ctx, &["cp", echo, &format!("{id}:/tmp/udp-echo")], None)?;
        let start = "chmod 755 /tmp/udp-echo && \
                     setsid /tmp/udp-echo 5353 </dev/null >/dev/null 2>&1 & echo started";
        session.mvm(ctx, &["exec", &id, "--", "sh", "-c", start], None)?;
        match udp_answer(port, "ping", SERVE_TIMEOUT) {
            Some(answer) if answer == "echo:ping" => {}
            other => {
                return Err(format!(
                    "127.0.0.1:{port}/udp did not echo the guest's way in {SERVE_TIMEOUT:?}: \
                     {other:?}"
                ))
            }
        }
        let proxied = session.get(&format!("/v1/sandboxes/{id}/ports/8080/"))?;
        if !proxied.starts_with("HTTP/1.1 200") || !proxied.contains(PAGE) {
            return Err(format!("mvmd's port proxy answered {proxied:?}"));
        }
        session.mvm(ctx, &["rm", &id], None)?;
        let udp_open = udp_answer(port, "ping", Duration::from_secs(2)).is_some();
        if ports_table_exists(&id) || http_get(port).is_ok() || udp_open {
            return Err(format!(
                "127.0.0.1:{port} or its table is still there after mvm rm"
            ));
        }
        Ok(())
    })();
    session.finish(ctx, checked)
}
