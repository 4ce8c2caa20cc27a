//! An OCI image in the vm tier: `mvm load -` of an OCI archive built here (busybox, a user
//! `app`, Env, WorkingDir, Entrypoint and Cmd) through mvmd, then `mvm run --isolation vm
//! IMAGE`: the guest's root is the image's (the agent pivots onto an ext4 copy of its tree),
//! the command runs as the image's user in its working directory with its environment, the
//! guest kernel is the project's, and a guest's writes do not reach the next sandbox.

use mvm_testkit::registry::{busybox_layer, config_blob, layer, oci_archive, Entry};

use super::{Ctx, MvmdSession, Outcome, Verdict};

/// The image's name in the archive.
const IMAGE: &str = "example.com/nested/app:v1";

/// `mvm load` and `mvm run IMAGE` in micro-VMs.
pub fn image_in_the_vm_tier(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let session = MvmdSession::start(ctx, "images")?;
    let ctx = &*ctx;
    let checked = (|| {
        let top = layer(&[
            Entry::Dir("work/", 0o755),
            Entry::File("work/marker", 0o644, b"from-the-image\n"),
        ]);
        let config = config_blob(
            serde_json::json!({
                "Env": ["PATH=/bin", "GREETING=hello-from-the-image"],
                "WorkingDir": "/work",
                "User": "app",
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["id -u; id -g; pwd; echo $GREETING; cat marker"],
            }),
            "amd64",
        );
        let archive = oci_archive(IMAGE, &[busybox_layer(), top], &config);
        let loaded = session.mvm(ctx, &["load", "-"], Some(&archive))?;
        if !loaded.contains(IMAGE) {
            return Err(format!("mvm load - printed {loaded:?}"));
        }
        let out = session.mvm(ctx, &["run", "--rm", "--isolation", "vm", IMAGE], None)?;
        let want = "1000\n1000\n/work\nhello-from-the-image\nfrom-the-image\n";
        if out != want {
            return Err(format!("the image's command printed {out:?}, not {want:?}"));
        }
        // The guest's own kernel, and its writes stay in its sandbox.
        let script = "uname -r; echo scribble > /tmp/scribble; cat /tmp/scribble";
        let out = session.mvm(
            ctx,
            &["run", "--rm", "--isolation", "vm", IMAGE, "--", script],
            None,
        )?;
        let l1 = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        match out.lines().collect::<Vec<_>>()[..] {
            [release, "scribble"] if release != l1.trim() => {}
            _ => return Err(format!("uname/scribble printed {out:?} (L1 is {l1:?})")),
        }
        let out = session.mvm(
            ctx,
            &[
                "run",
                "--rm",
                "--isolation",
                "vm",
                IMAGE,
                "--",
                "test -e /tmp/scribble && echo leaked || echo clean",
            ],
            None,
        )?;
        if out != "clean\n" {
            return Err(format!("a guest's write reached the next sandbox: {out:?}"));
        }
        Ok(())
    })();
    session.finish(ctx, checked)
}
