//! virtio-net TX and RX on guest-controlled rings, with frames from the input on the "tap".
#![no_main]

mod common;

use std::os::unix::net::UnixDatagram;

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::net::{NetEngine, Tap};
use vmm::rate_limiter::RateLimiter;

fuzz_target!(|data: &[u8]| {
    let Some((mem, mut queue)) = common::setup(data) else {
        return;
    };
    let (ours, theirs) = UnixDatagram::pair().expect("socketpair");
    ours.set_nonblocking(true).expect("nonblocking");
    theirs.set_nonblocking(true).expect("nonblocking");
    let limiter = || RateLimiter::new(None).expect("timerfd");
    let mut engine = NetEngine::new(Tap::from_fd(ours.into()), limiter(), limiter());
    engine.process_tx(&mem, &mut queue);
    // Frames for RX: slices of the input's tail, so sizes vary.
    for frame in data.rsplit(|&b| b == 0xa5).take(4) {
        // A full socket just means fewer frames.
        let _ = theirs.send(frame);
    }
    let Some((mem, mut queue)) = common::setup(data) else {
        return;
    };
    engine.process_rx(&mem, &mut queue);
    engine.process_rx(&mem, &mut queue);
});
