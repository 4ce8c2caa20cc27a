//! `containerd-shim-mvm-v2`: containerd runtime `io.containerd.mvm.v2`.

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<shim::MvmShim>("io.containerd.mvm.v2", None).await;
}
