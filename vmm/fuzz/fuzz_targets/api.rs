//! The API's HTTP request parser and router on arbitrary client bytes, read as one connection's
//! stream the way the API thread reads it: each request is parsed, then routed to a `VmmAction`
//! or answered with an error response; no VM, no socket. Every refusal must be a 4xx, and no
//! accepted body may exceed the parser's cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api_server::http::{read_request, MAX_BODY_BYTES};
use vmm::api_server::router::route;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    let mut written = Vec::new();
    loop {
        let (response, close) = match read_request(&mut stream) {
            Ok(None) => return,
            Ok(Some(request)) => {
                assert!(request.body.len() <= MAX_BODY_BYTES);
                match route(&request) {
                    Ok(_action) => {
                        if request.close {
                            return;
                        }
                        continue;
                    }
                    Err(response) => (response, request.close),
                }
            }
            Err(response) => (response, true),
        };
        assert!(
            (400..500).contains(&response.status),
            "a client error answered {}",
            response.status
        );
        written.clear();
        response
            .write_to(&mut written, close)
            .expect("write to memory");
        if close {
            return;
        }
    }
});
