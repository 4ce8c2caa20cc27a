//! The jail tier's wall, end to end as root through a real mvmd: its programs run on the host
//! kernel, so they get no new namespaces or other kernel attack surface (the jailer's `sandbox`
//! seccomp policy), cannot reach the agent's host console log through /proc, and write into a
//! layer of a fixed size.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{block_on, cgroup_mode, Daemon};
use mvm_sandbox::model::{CreateSandbox, ExecRequest, Isolation};
use mvm_testkit::{bin_dir, root_or_skip};

/// The sandboxes' writable layer in this test (`MVM_JAIL_DISK_MIB`).
const LAYER_MIB: u64 = 64;
/// The jail tier's console log cap in this test (`MVM_CONSOLE_LIMIT`).
const CONSOLE_LIMIT: u64 = 64 << 10;

/// Bytes used on the file system holding `path`.
fn fs_used(path: &Path) -> u64 {
    let st = mvm_testkit::statvfs(path).expect("statvfs");
    (st.f_blocks - st.f_bfree) * st.f_frsize
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        ..ExecRequest::default()
    }
}

/// The agent's pid inside sandbox `id`'s pid namespace, found from the host.
fn agent_pid_inside(d: &Daemon, id: &str) -> u32 {
    for pid in cgroup_mode().pids(&d.cgroup_parent, id) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).starts_with("/mvm-agent") {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let nspid = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .expect("NSpid in /proc/PID/status");
        return nspid.split_whitespace().last().unwrap().parse().unwrap();
    }
    panic!("no mvm-agent process in sandbox {id}");
}

#[test]
fn jail_tier_programs_are_walled_off_from_the_host() {
    if !root_or_skip("jail_tier_programs_are_walled_off_from_the_host") {
        return;
    }
    let layer = LAYER_MIB.to_string();
    let console_limit = CONSOLE_LIMIT.to_string();
    let d = Daemon::start_with_env(
        &[],
        &[
            ("MVM_JAIL_DISK_MIB", Path::new(&layer)),
            ("MVM_CONSOLE_LIMIT", Path::new(&console_limit)),
        ],
    );
    let before = d.host_state();
    block_on(async {
        let c = d.client();
        let req = CreateSandbox {
            isolation: Some(Isolation::Jail),
            memory_mib: Some(512),
            ..CreateSandbox::default()
        };
        let s = c.create(&req).await.expect("create");

        // No new namespaces: busybox's unshare is refused.
        let out = c
            .exec(
                &s.id,
                &sh("unshare -U true; echo user=$?; unshare -n true; echo net=$?"),
            )
            .await
            .expect("exec unshare");
        for refused in ["user=1", "net=1"] {
            assert!(out.stdout.contains(refused), "{refused}: {out:?}");
        }

        // A static probe brought in through the files API: the kernel surface is shut, and
        // fork, threads, exec (clone3 falling back to clone) keep working.
        let probe = std::fs::read(bin_dir().join("jail-probe")).expect("the jail-probe binary");
        c.put_file(&s.id, "/tmp/jail-probe", 0o755, probe)
            .await
            .expect("put the probe");
        let out = c
            .exec(&s.id, &sh("/tmp/jail-probe syscalls"))
            .await
            .expect("exec the probe");
        let r: HashMap<&str, &str> = out
            .stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .collect();
        assert_eq!(r.get("seccomp_mode"), Some(&"2"), "{out:?}");
        for denied in [
            "unshare_user",
            "unshare_net",
            "clone_newuser",
            "keyctl",
            "io_uring_setup",
            "bpf",
            "userfaultfd",
            "ptrace",
        ] {
            assert_eq!(r.get(denied), Some(&"EPERM"), "{denied}: {out:?}");
        }
        assert_eq!(r.get("clone3"), Some(&"ENOSYS"), "{out:?}");
        for works in ["fork", "thread", "exec"] {
            assert_eq!(r.get(works), Some(&"ok"), "{works}: {out:?}");
        }

        // The agent's (and the jail init's) stdout and stderr are the host's console.log: not
        // reachable through /proc, nor is the agent's memory (code injected there could write
        // them). A command's own stdio is a pipe.
        let console = d
            .run_dir()
            .join("sandboxes")
            .join(&s.id)
            .join("console")
            .join("console.log");
        let logged = std::fs::metadata(&console).expect("console.log").len();
        let agent = agent_pid_inside(&d, &s.id);
        let out = c
            .exec(
                &s.id,
                &sh(&format!(
                    "for p in 1 {agent}; do for fd in 1 2; do \
                       echo junk >> /proc/$p/fd/$fd && echo wrote-$p-$fd; done; \
                       ls /proc/$p/fd >/dev/null && echo listed-$p; \
                       (exec 3<>/proc/$p/mem) && echo opened-mem-$p; done; \
                     readlink /proc/self/fd/1; readlink /proc/self/fd/2"
                )),
            )
            .await
            .expect("exec the console writes");
        for reached in ["wrote-", "listed-", "opened-mem-"] {
            assert!(!out.stdout.contains(reached), "{reached}: {out:?}");
        }
        assert_eq!(
            out.stdout
                .lines()
                .filter(|l| l.starts_with("pipe:"))
                .count(),
            2,
            "{out:?}"
        );
        assert_eq!(
            std::fs::metadata(&console).unwrap().len(),
            logged,
            "console.log grew"
        );

        // The writable layer holds LAYER_MIB: past it, ENOSPC in the sandbox.
        let out = c
            .exec(
                &s.id,
                &sh(&format!(
                    "dd if=/dev/zero of=/root/fill bs=1M count={} 2>&1; echo rc=$?; \
                     du -m /root/fill",
                    LAYER_MIB * 2
                )),
            )
            .await
            .expect("exec the fill");
        assert!(out.stdout.contains("No space left on device"), "{out:?}");
        assert!(out.stdout.contains("rc=1"), "{out:?}");
        let filled: u64 = out
            .stdout
            .lines()
            .last()
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("du output: {out:?}"));
        assert!(filled < LAYER_MIB, "{filled} MiB written: {out:?}");
        // The sandbox still works, and deleting frees the space.
        let out = c
            .exec(
                &s.id,
                &sh("rm /root/fill && echo x > /tmp/after && cat /tmp/after"),
            )
            .await
            .expect("exec after the fill");
        assert_eq!(out.stdout, "x\n", "{out:?}");

        // The jail's /run is on the same layer: past it, ENOSPC, and the host's disk under the
        // run directory does not take what was written. The agent (whose socket is there)
        // still answers.
        let used = fs_used(&d.run_dir());
        let out = c
            .exec(
                &s.id,
                &sh(&format!(
                    "dd if=/dev/zero of=/run/big bs=1M count={} 2>&1; echo rc=$?; \
                     du -m /run/big",
                    LAYER_MIB * 2
                )),
            )
            .await
            .expect("exec the /run fill");
        assert!(out.stdout.contains("No space left on device"), "{out:?}");
        assert!(out.stdout.contains("rc=1"), "{out:?}");
        let grown = fs_used(&d.run_dir()).saturating_sub(used) >> 20;
        assert!(
            grown < LAYER_MIB,
            "the host's disk took {grown} MiB: {out:?}"
        );
        let out = c
            .exec(&s.id, &sh("ls /run; rm /run/big && echo freed"))
            .await
            .expect("exec after the /run fill");
        assert!(out.stdout.contains("agent.sock"), "{out:?}");
        assert!(out.stdout.contains("freed"), "{out:?}");

        // Bad peers make the agent log a line each: its console log stops at the cap, and
        // the agent keeps serving.
        let out = c
            .exec(&s.id, &sh("/tmp/jail-probe connflood /run/agent.sock 4000"))
            .await
            .expect("exec the log flood");
        assert!(out.stdout.contains("connections=4000"), "{out:?}");
        let logged = std::fs::metadata(&console).unwrap().len();
        assert!(
            logged <= CONSOLE_LIMIT && logged > CONSOLE_LIMIT / 2,
            "console.log holds {logged} bytes, cap {CONSOLE_LIMIT}"
        );
        let out = c
            .exec(&s.id, &sh("echo alive"))
            .await
            .expect("exec after the log flood");
        assert_eq!(out.stdout, "alive\n", "{out:?}");
        let logs = c.logs(&s.id).await.expect("logs");
        assert!(logs.len() as u64 == logged, "{} bytes of logs", logs.len());

        c.delete(&s.id).await.expect("delete");
    });
    d.assert_no_leaks(&before);
}
