//! `containerd-shim-mvm-v2`: containerd runtime `io.containerd.mvm.v2`.

#[tokio::main]
async fn main() {
    // The sandbox manager waits for its own children (jailer, mkfs.ext4, ip, debugfs): a
    // shim-wide waitpid(-1) reaper would steal their exit statuses (ECHILD). The crate sets up
    // its SIGCHLD reaper and subreaper before `Shim::new` runs, so this is the place to say no.
    let config = containerd_shim::Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<shim::MvmShim>("io.containerd.mvm.v2", Some(config)).await;
}
