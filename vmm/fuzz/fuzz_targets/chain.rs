//! Descriptor chain validation alone (loops, bad indexes, indirect tables, memory bounds).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vmm::devices::virtio::chain::{total_len, Chain};

fuzz_target!(|data: &[u8]| {
    let Some((mem, mut queue)) = common::setup(data) else {
        return;
    };
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        match Chain::parse(chain, &mem, 1 << 20) {
            Ok(chain) => {
                assert!(total_len(&chain.readable) + total_len(&chain.writable) <= 1 << 20)
            }
            Err(bad) => assert!(bad.valid.readable.len() + bad.valid.writable.len() <= 65536),
        }
    }
});
