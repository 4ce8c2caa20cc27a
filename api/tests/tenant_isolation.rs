//! One tenant against another, as root with a real mvmd and jail-tier sandboxes: what a
//! tenant with a valid token can do inside its own sandbox never reaches a neighbour's.

mod common;

use common::{api_error, block_on, jail, sh, Daemon};
use mvm_testkit::root_or_skip;

/// The attacker replaces its jail's agent socket with a link to the victim's and gets mvmd
/// to connect again (a daemon restart reconnects to every sandbox). mvmd must never follow
/// the link: the attacker's execs fail (its own sandbox is broken, by its own hand), the
/// victim's secret never shows, and the victim's sandbox works on.
#[test]
fn a_planted_agent_socket_link_never_reaches_another_tenant() {
    if !root_or_skip("a_planted_agent_socket_link_never_reaches_another_tenant") {
        return;
    }
    let mut d = Daemon::start();
    let attacker_token = d.tenant("attacker", &[]);
    let (victim, attacker) = block_on(async {
        let victim = d.client().create(&jail()).await.expect("victim create");
        d.client()
            .exec(&victim.id, &sh("echo victim-secret-4711 > /tmp/secret"))
            .await
            .expect("victim writes its secret");
        let a = d.client_with(Some(&attacker_token));
        let attacker = a.create(&jail()).await.expect("attacker create");
        (victim, attacker)
    });
    // The jail's /run is bound from the sandbox's writable layer.
    let victim_socket = d
        .run_dir()
        .join("sandboxes")
        .join(&victim.id)
        .join("layer/run/agent.sock");
    assert!(victim_socket.exists(), "{}", victim_socket.display());
    block_on(async {
        let a = d.client_with(Some(&attacker_token));
        let plant = format!(
            "rm -f /run/agent.sock && ln -s {} /run/agent.sock",
            victim_socket.display()
        );
        let out = a
            .exec(&attacker.id, &sh(&plant))
            .await
            .expect("the attacker plants its link");
        assert_eq!(out.exit.exit_code, Some(0), "{out:?}");
    });
    d.kill9();
    d.spawn();
    block_on(async {
        let a = d.client_with(Some(&attacker_token));
        match a.exec(&attacker.id, &sh("cat /tmp/secret")).await {
            Ok(out) => panic!("the attacker's exec ran, in the victim's sandbox: {out:?}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("through a link"), "{msg}");
            }
        }
        let out = d
            .client()
            .exec(&victim.id, &sh("cat /tmp/secret"))
            .await
            .expect("the victim's sandbox still answers");
        assert_eq!(out.stdout, "victim-secret-4711\n");
    });
    block_on(async {
        d.client().delete(&victim.id).await.expect("delete victim");
        d.client_with(Some(&attacker_token))
            .delete(&attacker.id)
            .await
            .expect("delete attacker");
    });
}

/// Operators decide who may use the jail tier (tenant code on the host kernel): daemon-wide
/// with `--allowed-isolation`, per tenant with `mvmd tenant create --allowed-isolation`.
#[test]
fn operators_decide_which_tiers_tenants_may_use() {
    if !root_or_skip("operators_decide_which_tiers_tenants_may_use") {
        return;
    }
    let vm_only = Daemon::start_with(&["--allowed-isolation", "vm"]);
    block_on(async {
        let e = vm_only.client().create(&jail()).await.unwrap_err();
        let (status, code, message) = api_error(&e);
        assert_eq!((status, code.as_str()), (403, "forbidden"), "{message}");
        assert!(message.contains("--allowed-isolation"), "{message}");
    });
    drop(vm_only);

    let d = Daemon::start();
    let token = d.tenant("vm-only", &["--allowed-isolation", "vm"]);
    block_on(async {
        let e = d
            .client_with(Some(&token))
            .create(&jail())
            .await
            .unwrap_err();
        let (status, code, message) = api_error(&e);
        assert_eq!((status, code.as_str()), (403, "forbidden"), "{message}");
        assert!(message.contains("tenant vm-only"), "{message}");
        // Other tenants keep the daemon's tiers.
        let s = d.client().create(&jail()).await.expect("default tenant");
        d.client().delete(&s.id).await.expect("delete");
    });
    // `daemon` hands the choice back to the daemon.
    let token = d.tenant("vm-only", &["--allowed-isolation", "daemon"]);
    block_on(async {
        let c = d.client_with(Some(&token));
        let s = c.create(&jail()).await.expect("create after the reset");
        c.delete(&s.id).await.expect("delete");
    });
}

/// mvmd's state (every sandbox's env, the audit log) and run directories (layers, consoles,
/// jails) are root's alone.
#[test]
fn private_state_is_not_readable_by_other_users() {
    if !root_or_skip("private_state_is_not_readable_by_other_users") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start();
    block_on(async {
        let s = d.client().create(&jail()).await.expect("create");
        let mode = |p: std::path::PathBuf| {
            std::fs::metadata(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(d.state_dir()), 0o700);
        assert_eq!(mode(d.run_dir()), 0o700);
        assert_eq!(mode(d.state_dir().join("mvm.db")) & 0o077, 0);
        let console = d
            .run_dir()
            .join("sandboxes")
            .join(&s.id)
            .join("console/console.log");
        assert_eq!(mode(console) & 0o077, 0);
        d.client().delete(&s.id).await.expect("delete");
    });
}
