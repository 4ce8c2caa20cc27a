//! virtio-balloon free page reports (and inflate chains) on guest-controlled rings.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::balloon::serve_queue;

fuzz_target!(|data: &[u8]| {
    let Some((mem, mut queue)) = common::setup(data) else {
        return;
    };
    let reporting = data.len() % 2 == 0;
    // Twice: the second pass sees what the first left in the rings.
    serve_queue(&mem, &mut queue, reporting);
    serve_queue(&mem, &mut queue, reporting);
});
