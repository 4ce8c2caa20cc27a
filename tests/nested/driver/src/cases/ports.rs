//! A published port in the vm tier: `mvm run -d -p HOST_PORT:8080` through mvmd starts busybox
//! httpd in a micro-VM without egress; L1 reaches it on 127.0.0.1:HOST_PORT (host DNAT to the
//! sandbox's veth, the namespace's DNAT on to the guest behind the tap), mvmd's port proxy
//! (`/v1/sandboxes/{id}/ports/8080/`) reaches it from inside the sandbox's namespace, and
//! `mvm rm` closes the port and removes its table.

use std::time::{Duration, Instant};

use mvm_testkit::ports::{free_local_port, http_get, httpd_command, ports_table_exists};

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
        let publish = format!("{port}:8080");
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
        let proxied = session.get(&format!("/v1/sandboxes/{id}/ports/8080/"))?;
        if !proxied.starts_with("HTTP/1.1 200") || !proxied.contains(PAGE) {
            return Err(format!("mvmd's port proxy answered {proxied:?}"));
        }
        session.mvm(ctx, &["rm", &id], None)?;
        if ports_table_exists(&id) || http_get(port).is_ok() {
            return Err(format!(
                "127.0.0.1:{port} or its table is still there after mvm rm"
            ));
        }
        Ok(())
    })();
    session.finish(ctx, checked)
}
