//! The sandbox helpers' supervision, through the real `mvm-dns` binary: a worker that cannot
//! serve (here: started without its sockets) is started again with growing pauses, and after
//! five failures in a row within a second of their start the supervisor gives up with status 1
//! and says so, instead of restarting it forever.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_helper_that_keeps_failing_is_given_up() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_mvm-dns"))
        .args([
            "--sandbox",
            "0123456789ab",
            "--netns",
            "/nonexistent",
            "--policy",
            "/nonexistent",
            "--client",
            "10.0.0.2",
        ])
        .output()
        .expect("running mvm-dns");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let restarts = stderr.matches("starting another").count();
    assert_eq!(restarts, 4, "{stderr}");
    assert!(stderr.contains("giving up"), "{stderr}");
    // The pauses between the five workers: 50, 100, 200 and 400 ms.
    assert!(took >= Duration::from_millis(750), "{took:?}: {stderr}");
}
