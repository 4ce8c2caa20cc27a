//! A Docker registry token server of the test's own, for a registry with `auth: token`: it
//! answers `GET /token?scope=…&service=…` with a JWT (ES256) granting the actions asked for,
//! only to a client presenting the right basic credentials (401 otherwise), signed with the
//! key of a self-signed certificate made here. The registry trusts that certificate
//! (`rootcertbundle`); the token carries it in its `x5c` header, as Distribution's token
//! access controller expects.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

/// The tokens' issuer (`iss`), as the registry's `auth.token.issuer` names it.
pub const ISSUER: &str = "mvm-test-token-server";
/// The registry's service name: the tokens' audience (`aud`).
pub const SERVICE: &str = "mvm-test-registry";

/// A running token server, stopped on drop.
pub struct TokenServer {
    /// Its token endpoint: the registry's `realm`.
    pub realm: String,
    /// The PEM certificate whose key signs the tokens: the registry's `rootcertbundle`.
    pub certificate: String,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
    thread: Option<JoinHandle<()>>,
}

/// What signs tokens and whom they are for.
struct Issuer {
    key: EcdsaKeyPair,
    /// The certificate (DER, base64) for the `x5c` header.
    x5c: String,
    user: String,
    password: String,
}

impl TokenServer {
    /// Starts a token server that gives tokens to `user` with `password` only.
    pub fn start(user: &str, password: &str) -> Result<TokenServer, String> {
        let key_pair = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = rcgen::CertificateParams::new(vec![ISSUER.to_owned()])
            .and_then(|p| p.self_signed(&key_pair))
            .map_err(|e| e.to_string())?;
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key_pair.serialize_der(),
            &SystemRandom::new(),
        )
        .map_err(|e| e.to_string())?;
        let issuer = Issuer {
            key,
            x5c: STANDARD.encode(cert.der()),
            user: user.to_owned(),
            password: password.to_owned(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    // A client that hangs up mid-request is its own problem.
                    let _ = issuer.answer(stream);
                }
            }
        });
        Ok(TokenServer {
            realm: format!("http://{addr}/token"),
            certificate: cert.pem(),
            stop,
            addr,
            thread: Some(thread),
        })
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Issuer {
    /// Reads one request and answers it (one request a connection).
    fn answer(&self, stream: TcpStream) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        let mut authorization = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("authorization") {
                    authorization = Some(value.trim().to_owned());
                }
            }
        }
        let target = request_line.split_whitespace().nth(1).unwrap_or("");
        let (status, body) = match self.authorized(authorization.as_deref()) {
            Some(user) => match scope(target) {
                Some((repository, actions)) => (
                    "200 OK",
                    serde_json::json!({
                        "token": self.token(&user, &repository, &actions),
                        "expires_in": 300,
                    }),
                ),
                None => (
                    "400 Bad Request",
                    error("DENIED", "no repository scope asked for"),
                ),
            },
            None => (
                "401 Unauthorized",
                error("UNAUTHORIZED", "wrong or missing credentials"),
            ),
        };
        let body = body.to_string();
        let mut stream = stream;
        write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
    }

    /// The user, if `authorization` is basic auth with the right credentials.
    fn authorized(&self, authorization: Option<&str>) -> Option<String> {
        let encoded = authorization?.strip_prefix("Basic ")?;
        let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
        let (user, password) = decoded.split_once(':')?;
        (user == self.user && password == self.password).then(|| user.to_owned())
    }

    /// A signed JWT granting `actions` on `repository` to `user`.
    fn token(&self, user: &str, repository: &str, actions: &[String]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]});
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": user,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("{now}-{repository}"),
            "access": [{"type": "repository", "name": repository, "actions": actions}],
        });
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&SystemRandom::new(), signed.as_bytes())
            .expect("ES256 signature");
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

/// The repository and actions of the `scope=repository:NAME:ACTIONS` query parameter.
fn scope(target: &str) -> Option<(String, Vec<String>)> {
    let query = target.split_once('?')?.1;
    let value = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("scope="))
        .map(percent_decode)?;
    let (kind_and_name, actions) = value.rsplit_once(':')?;
    let name = kind_and_name.strip_prefix("repository:")?;
    Some((
        name.to_owned(),
        actions.split(',').map(str::to_owned).collect(),
    ))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn error(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"errors": [{"code": code, "message": message}]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_read_from_the_query() {
        assert_eq!(
            scope("/token?scope=repository%3Aprivate%2Fapp%3Apull%2Cpush&service=s"),
            Some(("private/app".into(), vec!["pull".into(), "push".into()]))
        );
        assert_eq!(scope("/token?service=s"), None);
    }
}
