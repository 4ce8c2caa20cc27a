//! The API's HTTP request parser and router on arbitrary client bytes, fed to one connection's
//! incremental parser the way the API thread receives them: in pieces (the first byte sets the
//! piece size), each whole request routed to a `VmmAction` or answered with an error response;
//! no VM, no socket. Every refusal must be a 4xx, no accepted body may exceed the parser's cap,
//! and a parser waiting for bytes always has room for them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api_server::http::{RequestParser, MAX_BODY_BYTES};
use vmm::api_server::router::route;

fuzz_target!(|data: &[u8]| {
    let Some((piece, mut stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(*piece).max(1);
    let mut parser = RequestParser::new();
    let mut written = Vec::new();
    loop {
        let (response, close) = match parser.next_request() {
            Ok(None) => {
                if stream.is_empty() {
                    match parser.finish() {
                        Ok(()) => return,
                        Err(response) => (response, true),
                    }
                } else {
                    let n = piece.min(stream.len()).min(parser.room());
                    assert!(n > 0, "the parser wants bytes but has no room");
                    parser.push(&stream[..n]);
                    stream = &stream[n..];
                    continue;
                }
            }
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
