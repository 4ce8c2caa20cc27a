//! mvmd's port proxy end to end, as root with a real mvmd and jail-tier sandboxes: an HTTP
//! server in a sandbox without any network answers through
//! `/v1/sandboxes/{id}/ports/{port}/...` (status, body, query, an 8 MiB request body, on the
//! unix socket and the TCP listener), and the route reaches nothing else: not another
//! tenant's sandbox, not a port of the host (mvmd's own), not a port where nothing listens.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;

use common::{api_error, block_on, detach, jail, Daemon};
use mvm_client::Client;
use mvm_sandbox::http::Endpoint;
use mvm_sandbox::model::{CreateSandbox, OnTimeout, Sandbox};
use mvm_sandbox::ErrorBody;
use mvm_testkit::ports::{free_local_port, httpd_command};
use mvm_testkit::root_or_skip;

/// What the sandbox's server answers on `/`.
const GREETING: &str = "hello-through-the-proxy";

/// A CGI script for busybox httpd that answers the method, the query and how many body bytes
/// it read.
const ECHO_CGI: &str = "#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
echo method=$REQUEST_METHOD query=$QUERY_STRING bytes=$(wc -c)
";

/// A connection's server for busybox `nc -ll -e`: reads a request's head, switches to the
/// protocol `echo` and then echoes what it gets.
const UPGRADE_SERVER: &str = "#!/bin/sh
while IFS= read -r line; do [ ${#line} -le 1 ] && break; done
printf 'HTTP/1.1 101 Switching Protocols\\r\\nConnection: Upgrade\\r\\nUpgrade: echo\\r\\n\\r\\n'
exec cat
";

/// A connection to mvmd upgraded to the protocol `echo` (see [`UPGRADE_SERVER`]).
struct Upgraded {
    conn: std::os::unix::net::UnixStream,
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
}

impl Upgraded {
    /// Asks mvmd (at `socket`, with `token`) to upgrade a request to port `port` of sandbox
    /// `id` to the protocol `echo`.
    fn open(socket: &std::path::Path, token: &str, id: &str, port: u16) -> Upgraded {
        use std::io::{BufRead as _, Write as _};
        let mut conn = std::os::unix::net::UnixStream::connect(socket).expect("mvmd's socket");
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        write!(
            conn,
            "GET /v1/sandboxes/{id}/ports/{port}/ HTTP/1.1\r\nHost: mvmd\r\n\
             Authorization: Bearer {token}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
        )
        .expect("request");
        let mut reader = std::io::BufReader::new(conn.try_clone().expect("clone"));
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            let read = reader.read_line(&mut head).expect("the answer's head");
            assert!(read > 0, "the answer ended in its head: {head}");
        }
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        Upgraded { conn, reader }
    }

    /// What comes back for a line sent.
    fn echo(&mut self) -> String {
        use std::io::{BufRead as _, Write as _};
        self.conn
            .write_all(b"ping over the upgraded connection\n")
            .expect("write");
        let mut echoed = String::new();
        self.reader.read_line(&mut echoed).expect("the echo");
        echoed
    }
}

/// Starts [`UPGRADE_SERVER`] on port 9000 of sandbox `id` (`-ll`: a server per connection,
/// so probing it, as a jail has no /proc/net for netstat, leaves it listening).
fn serve_upgrades(c: &Client, id: &str) {
    block_on(c.put_file(id, "/tmp/upgrade", 0o755, UPGRADE_SERVER.into())).expect("script");
    detach(c, id, "exec nc -ll -p 9000 -e /tmp/upgrade");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while block_on(c.exec(id, &common::sh("nc 127.0.0.1 9000 </dev/null")))
        .expect("probe")
        .exit
        .exit_code
        != Some(0)
    {
        assert!(std::time::Instant::now() < deadline, "nc does not listen");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// mvmd's JSON error in an answer's body.
fn error_body(body: &[u8]) -> ErrorBody {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", text(body)))
}

/// `GET path` on port `port` of sandbox `id` until its answer has `want` (the server needs
/// a moment to listen); panics after 10 s.
fn wait_serving(c: &Client, id: &str, port: u16, path: &str, want: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = block_on(c.port_request(id, port, "GET", path, Vec::new())).expect("proxy");
        if got.0 == 200 && text(&got.1).contains(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{path} did not serve {want:?}: {} {}",
            got.0,
            text(&got.1)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// mvmd also listening on a TCP port (returned), and a jail-tier sandbox of its `default`
/// tenant whose busybox httpd serves [`GREETING`] on port 8080.
fn serving_sandbox() -> (Daemon, u16, Sandbox) {
    let tcp = free_local_port();
    let d = Daemon::start_with(&["--tcp", &format!("127.0.0.1:{tcp}")]);
    let s = serve(&d, &d.client());
    (d, tcp, s)
}

/// A jail-tier sandbox of `c`'s tenant whose busybox httpd serves [`GREETING`] on port 8080.
fn serve(d: &Daemon, c: &Client) -> Sandbox {
    serve_from(d, c, &jail())
}

/// The sandbox `req` makes for `c`'s tenant, its busybox httpd serving [`GREETING`] on port
/// 8080.
fn serve_from(d: &Daemon, c: &Client, req: &CreateSandbox) -> Sandbox {
    let s = block_on(c.create(req)).expect("create");
    d.track(&s.id);
    detach(c, &s.id, &httpd_command(GREETING, 8080));
    wait_serving(c, &s.id, 8080, "/", GREETING);
    s
}

#[test]
fn a_server_in_a_sandbox_answers_through_the_port_proxy() {
    if !root_or_skip("a_server_in_a_sandbox_answers_through_the_port_proxy") {
        return;
    }
    let (d, tcp, s) = serving_sandbox();
    let c = d.client();
    // Egress `none` and no published port: no veth, the proxy needs none.
    assert_eq!(s.network.address, None);
    block_on(async {
        c.exec(&s.id, &common::sh("mkdir -p /tmp/www/cgi-bin"))
            .await
            .expect("mkdir");
        c.put_file(&s.id, "/tmp/www/cgi-bin/echo", 0o755, ECHO_CGI.into())
            .await
            .expect("the CGI script");
    });
    // Over the TCP listener as well.
    let over_tcp = Client::new(Endpoint::Tcp(format!("127.0.0.1:{tcp}")), Some(d.token()));
    wait_serving(&over_tcp, &s.id, 8080, "/index.html", GREETING);
    // The server's own status and body, and the query string as sent.
    let (status, body) =
        block_on(c.port_request(&s.id, 8080, "GET", "/missing", Vec::new())).expect("proxy");
    assert_eq!(status, 404, "{}", text(&body));
    assert!(
        serde_json::from_slice::<ErrorBody>(&body).is_err(),
        "mvmd answered, not the server: {}",
        text(&body)
    );
    let (status, body) = block_on(c.port_request(
        &s.id,
        8080,
        "GET",
        "/cgi-bin/echo?a=1&b=two%20words",
        Vec::new(),
    ))
    .expect("proxy");
    assert_eq!(
        (status, text(&body).trim()),
        (200, "method=GET query=a=1&b=two%20words bytes=0")
    );
    // An 8 MiB body reaches the server whole.
    let big = vec![b'x'; 8 << 20];
    let (status, body) =
        block_on(c.port_request(&s.id, 8080, "POST", "/cgi-bin/echo?up", big)).expect("proxy");
    assert_eq!(
        (status, text(&body).trim()),
        (200, "method=POST query=up bytes=8388608")
    );
    // Nothing listens: 502 naming the port.
    let (status, body) =
        block_on(c.port_request(&s.id, 8081, "GET", "/", Vec::new())).expect("proxy");
    let e = error_body(&body);
    assert_eq!(
        (status, e.code.as_str()),
        (502, "port_unreachable"),
        "{e:?}"
    );
    assert!(e.message.contains("port 8081"), "{e:?}");
    // Ports outside 1-65535.
    for bad in ["0", "65536", "http"] {
        let e = block_on(c.raw(
            "GET",
            &format!("/v1/sandboxes/{}/ports/{bad}/", s.id),
            "text/plain",
            Vec::new(),
        ))
        .expect_err("a bad port");
        let (status, _, msg) = api_error(&e);
        assert_eq!(status, 422, "{bad}: {msg}");
    }
    // An upgrade (as a WebSocket's) joins the two connections once the server says 101.
    serve_upgrades(&c, &s.id);
    assert_eq!(
        Upgraded::open(&d.socket, &d.token(), &s.id, 9000).echo(),
        "ping over the upgraded connection\n"
    );
    // A paused sandbox: 409.
    block_on(c.set_paused(&s.id, true)).expect("pause");
    let (status, body) =
        block_on(c.port_request(&s.id, 8080, "GET", "/", Vec::new())).expect("proxy");
    assert_eq!(status, 409, "{}", text(&body));
    block_on(c.set_paused(&s.id, false)).expect("resume");
    wait_serving(&c, &s.id, 8080, "/", GREETING);
    block_on(c.delete(&s.id)).expect("delete");
    let (status, _) = block_on(c.port_request(&s.id, 8080, "GET", "/", Vec::new())).expect("proxy");
    assert_eq!(status, 404);
}

/// The route reaches the caller's own sandbox and nothing else: another tenant gets 404 for
/// it, and a port that only the host has (mvmd's own TCP listener, a host server on
/// 127.0.0.1) is not reached through a sandbox: the connection is made in the sandbox's
/// namespace, whose loopback is its own.
#[test]
fn the_port_proxy_reaches_only_the_callers_own_sandbox() {
    if !root_or_skip("the_port_proxy_reaches_only_the_callers_own_sandbox") {
        return;
    }
    let (d, tcp, s) = serving_sandbox();
    let c = d.client();
    let neighbour = d.client_with(Some(&d.tenant("neighbour", &[])));
    let (status, body) =
        block_on(neighbour.port_request(&s.id, 8080, "GET", "/", Vec::new())).expect("proxy");
    let e = error_body(&body);
    assert_eq!((status, e.code.as_str()), (404, "not_found"), "{e:?}");
    // A host server on 127.0.0.1 and mvmd's own listener: not reached from the sandbox.
    let host = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let host_port = host.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in host.incoming().flatten() {
            use std::io::Write as _;
            let _ = (&conn).write_all(b"HTTP/1.0 200 OK\r\n\r\nthe-host-answered");
        }
    });
    for port in [host_port, tcp] {
        let (status, body) =
            block_on(c.port_request(&s.id, port, "GET", "/healthz", Vec::new())).expect("proxy");
        let e = error_body(&body);
        assert_eq!(
            (status, e.code.as_str()),
            (502, "port_unreachable"),
            "{port}: {e:?}"
        );
    }
    block_on(c.delete(&s.id)).expect("delete");
}

/// A tenant has at most `MVM_PORT_PROXY_CONNECTIONS` proxied connections open at once (429
/// past them; another tenant's are its own), and a connection on which nothing moves for
/// `MVM_PORT_PROXY_IDLE` seconds ends and gives its share back: a client that opens
/// connections and leaves them, or a sandbox that never answers, holds a bounded part of
/// mvmd.
#[test]
fn proxied_connections_are_bounded_per_tenant_and_idle_ones_end() {
    if !root_or_skip("proxied_connections_are_bounded_per_tenant_and_idle_ones_end") {
        return;
    }
    let d = Daemon::start_with_env(
        &[],
        &[
            ("MVM_PORT_PROXY_CONNECTIONS", Path::new("2")),
            ("MVM_PORT_PROXY_IDLE", Path::new("3")),
        ],
    );
    let c = d.client();
    let s = serve(&d, &c);
    serve_upgrades(&c, &s.id);
    let mut first = Upgraded::open(&d.socket, &d.token(), &s.id, 9000);
    let mut second = Upgraded::open(&d.socket, &d.token(), &s.id, 9000);
    for conn in [&mut first, &mut second] {
        assert_eq!(conn.echo(), "ping over the upgraded connection\n");
    }
    let (status, body) =
        block_on(c.port_request(&s.id, 8080, "GET", "/", Vec::new())).expect("proxy");
    let e = error_body(&body);
    assert_eq!((status, e.code.as_str()), (429, "quota_exceeded"), "{e:?}");
    assert!(e.message.contains("MVM_PORT_PROXY_CONNECTIONS"), "{e:?}");
    // Another tenant's share is its own.
    let neighbour = d.client_with(Some(&d.tenant("neighbour", &[])));
    let theirs = serve(&d, &neighbour);
    // A closed connection gives its share back.
    drop(first);
    wait_serving(&c, &s.id, 8080, "/", GREETING);
    // The second, idle since its echo, is ended by mvmd.
    second
        .conn
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let ended = std::io::Read::read_to_end(&mut second.reader, &mut rest);
    assert!(
        ended.is_ok() && rest.is_empty(),
        "the idle connection did not end: {ended:?} after {:?}",
        started.elapsed()
    );
    // Both shares are back.
    let a = Upgraded::open(&d.socket, &d.token(), &s.id, 9000);
    let b = Upgraded::open(&d.socket, &d.token(), &s.id, 9000);
    drop((a, b));
    for (c, id) in [(&c, &s.id), (&neighbour, &theirs.id)] {
        block_on(c.delete(id)).expect("delete");
    }
}

/// A sandbox paused at its timeout whose lifecycle resumes it on demand: a request through
/// the port proxy resumes it and its server answers.
#[test]
fn a_port_request_resumes_a_sandbox_paused_at_its_timeout() {
    if !root_or_skip("a_port_request_resumes_a_sandbox_paused_at_its_timeout") {
        return;
    }
    let d = Daemon::start();
    let c = d.client();
    let s = serve_from(&d, &c, &common::jail_timing_out(OnTimeout::Pause, true));
    block_on(common::paused_at_timeout(&c, &s.id));
    let (status, body) =
        block_on(c.port_request(&s.id, 8080, "GET", "/", Vec::new())).expect("proxy");
    assert_eq!(
        (status, text(&body).contains(GREETING)),
        (200, true),
        "{}",
        text(&body)
    );
    block_on(c.delete(&s.id)).expect("delete");
}
