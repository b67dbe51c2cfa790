//! A SASL front for the test broker: it does, on loopback, what a Kafka broker's
//! `SASL_PLAINTEXT` listener does, then relays the authenticated connection to tansu unchanged.
//!
//! Why: tansu's own SASL does not complete a PLAIN login with librdkafka, and with
//! `--authentication` even creating a SCRAM user needs a login first. The front speaks the real
//! Kafka wire protocol (SaslHandshake v0–v1, SaslAuthenticate v0–v2, framed) and the mechanisms
//! `PLAIN`, `SCRAM-SHA-256` and `SCRAM-SHA-512` (RFC 5802: the client's proof checked, the
//! server's signature sent), so the client side, librdkafka configured by the connector, is
//! exercised exactly as against a real broker:
//! - `ApiVersions` is relayed to the broker (clients ask it before authenticating);
//! - any other request before a successful login closes the connection, as Kafka does;
//! - a wrong user or password is answered with `SASL_AUTHENTICATION_FAILED` (58) and the
//!   connection is closed.
//!
//! tansu must advertise the front's address (`--advertised-listener-url`), so that clients reach
//! every broker through it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const API_SASL_HANDSHAKE: i16 = 17;
const API_VERSIONS: i16 = 18;
const API_SASL_AUTHENTICATE: i16 = 36;
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
const ILLEGAL_SASL_STATE: i16 = 34;
const SASL_AUTHENTICATION_FAILED: i16 = 58;
/// Larger frames are not a login: refused (bounds what a broken client can make us buffer).
const MAX_FRAME: usize = 100 << 20;

/// What the front saw: one entry per login attempt (user, accepted), and requests refused
/// because they came before a login.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub logins: Vec<(String, bool)>,
    pub refused_before_login: Vec<i16>,
}

/// The running front; stops with the test's runtime.
pub struct SaslFront {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

impl SaslFront {
    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }
}

/// The user the fronted broker accepts.
pub const USER: &str = "akto-connector";

/// A tansu broker reached only through a front accepting [`USER`] / `password`, or None (skip)
/// when tansu is missing outside CI. The broker is kept alive by the returned handle.
pub async fn fronted_broker(password: &str) -> Option<(super::kafka::Broker, SaslFront)> {
    let (listener, front_addr) = bind().await;
    let broker = super::kafka::start_broker_advertising(&[], Some(front_addr))?;
    let front = serve(listener, broker.addr, USER, password);
    Some((broker, front))
}

/// librdkafka settings that log in to the front as [`USER`].
pub fn login(password: &str) -> [(&'static str, &str); 4] {
    [
        ("security.protocol", "SASL_PLAINTEXT"),
        ("sasl.mechanism", "PLAIN"),
        ("sasl.username", USER),
        ("sasl.password", password),
    ]
}

/// Binds the front on a free loopback port; it relays to `upstream` once `upstream` is set
/// (the broker starts after it, since it must advertise the front's address).
pub async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Serves `listener`: PLAIN logins of `user`/`password` only, then relays to `upstream`.
pub fn serve(listener: TcpListener, upstream: SocketAddr, user: &str, password: &str) -> SaslFront {
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let creds = Arc::new((user.to_string(), password.to_string()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (s, creds) = (s.clone(), creds.clone());
            tokio::spawn(async move {
                let _ = connection(client, upstream, &creds, &s).await;
            });
        }
    });
    SaslFront { addr, seen }
}

struct Request {
    api_key: i16,
    api_version: i16,
    correlation_id: i32,
    /// The whole frame, size prefix excluded.
    frame: Vec<u8>,
    /// Offset of the body (after the request header).
    body: usize,
}

async fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let n = s.read_i32().await?;
    let n = usize::try_from(n)
        .ok()
        .filter(|n| *n <= MAX_FRAME)
        .ok_or_else(|| std::io::Error::other("bad frame size"))?;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame(s: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as i32).to_be_bytes());
    out.extend_from_slice(body);
    s.write_all(&out).await
}

fn i16_at(b: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// An unsigned varint (Kafka's flexible versions) at `at`: (value, bytes used).
fn uvarint_at(b: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for i in 0..10 {
        let byte = *b.get(at + i)?;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Parses the request header: v1 (`client_id` as a nullable string), plus tagged fields when
/// `flexible` (header v2).
fn parse(frame: Vec<u8>, flexible: impl Fn(i16, i16) -> bool) -> Option<Request> {
    let api_key = i16_at(&frame, 0)?;
    let api_version = i16_at(&frame, 2)?;
    let correlation_id = i32_at(&frame, 4)?;
    let client_id_len = i16_at(&frame, 8)?;
    let mut body = 10 + usize::try_from(client_id_len.max(0)).ok()?;
    if flexible(api_key, api_version) {
        let (n, used) = uvarint_at(&frame, body)?;
        body += used;
        for _ in 0..n {
            let (_tag, u1) = uvarint_at(&frame, body)?;
            let (len, u2) = uvarint_at(&frame, body + u1)?;
            body += u1 + u2 + usize::try_from(len).ok()?;
        }
    }
    (body <= frame.len()).then_some(Request {
        api_key,
        api_version,
        correlation_id,
        frame,
        body,
    })
}

fn header_is_flexible(api_key: i16, api_version: i16) -> bool {
    match api_key {
        API_VERSIONS => api_version >= 3,
        API_SASL_AUTHENTICATE => api_version >= 2,
        API_SASL_HANDSHAKE => false,
        // Not parsed past the correlation id.
        _ => false,
    }
}

/// The mechanisms the front offers.
const MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// Where a login stands.
enum Login {
    /// No SaslHandshake yet.
    NoMechanism,
    Plain,
    /// SCRAM, before the client's first message.
    Scram(Scram),
    /// SCRAM after the server's first message: (client-first-bare, server-first, nonce).
    ScramSent(Scram, String, String, String),
}

#[derive(Clone, Copy)]
struct Scram {
    pbkdf2: ring::pbkdf2::Algorithm,
    hmac: ring::hmac::Algorithm,
    digest: &'static ring::digest::Algorithm,
    len: usize,
}

impl Scram {
    fn of(mechanism: &[u8]) -> Option<Scram> {
        match mechanism {
            b"SCRAM-SHA-256" => Some(Scram {
                pbkdf2: ring::pbkdf2::PBKDF2_HMAC_SHA256,
                hmac: ring::hmac::HMAC_SHA256,
                digest: &ring::digest::SHA256,
                len: 32,
            }),
            b"SCRAM-SHA-512" => Some(Scram {
                pbkdf2: ring::pbkdf2::PBKDF2_HMAC_SHA512,
                hmac: ring::hmac::HMAC_SHA512,
                digest: &ring::digest::SHA512,
                len: 64,
            }),
            _ => None,
        }
    }

    fn hmac(&self, key: &[u8], data: &[u8]) -> Vec<u8> {
        ring::hmac::sign(&ring::hmac::Key::new(self.hmac, key), data)
            .as_ref()
            .to_vec()
    }

    /// The server's check of a client-final message (RFC 5802): Some(server-final) when the
    /// proof is right for `password`.
    fn verify(
        &self,
        password: &str,
        (client_first_bare, server_first, nonce): (&str, &str, &str),
        client_final: &str,
    ) -> Option<String> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let (without_proof, proof) = client_final.rsplit_once(",p=")?;
        if !without_proof.split(',').any(|a| a == format!("r={nonce}")) {
            return None;
        }
        let proof = b64.decode(proof).ok()?;
        let mut salted = vec![0u8; self.len];
        ring::pbkdf2::derive(
            self.pbkdf2,
            std::num::NonZeroU32::new(SCRAM_ITERATIONS)?,
            SCRAM_SALT,
            password.as_bytes(),
            &mut salted,
        );
        let client_key = self.hmac(&salted, b"Client Key");
        let stored_key = ring::digest::digest(self.digest, &client_key);
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = self.hmac(stored_key.as_ref(), auth_message.as_bytes());
        if proof.len() != signature.len() {
            return None;
        }
        let recovered: Vec<u8> = proof.iter().zip(&signature).map(|(p, s)| p ^ s).collect();
        if ring::digest::digest(self.digest, &recovered).as_ref() != stored_key.as_ref() {
            return None;
        }
        let server_key = self.hmac(&salted, b"Server Key");
        let server_signature = self.hmac(&server_key, auth_message.as_bytes());
        Some(format!("v={}", b64.encode(server_signature)))
    }
}

const SCRAM_SALT: &[u8] = b"databricks-shield-test-salt";
/// Kafka's minimum for SCRAM.
const SCRAM_ITERATIONS: u32 = 4096;

/// The SaslAuthenticate answer: `code` 0 with `auth_bytes`, or an error and its message.
fn authenticate_response(req: &Request, code: i16, message: &str, auth_bytes: &[u8]) -> Vec<u8> {
    let flexible = req.api_version >= 2;
    let mut out = req.correlation_id.to_be_bytes().to_vec();
    if flexible {
        out.push(0); // response header v1: no tagged fields
    }
    out.extend_from_slice(&code.to_be_bytes());
    if flexible {
        if code == 0 {
            out.push(0); // null message
        } else {
            put_uvarint(&mut out, message.len() as u64 + 1);
            out.extend_from_slice(message.as_bytes());
        }
        put_uvarint(&mut out, auth_bytes.len() as u64 + 1);
        out.extend_from_slice(auth_bytes);
    } else {
        if code == 0 {
            out.extend_from_slice(&(-1i16).to_be_bytes());
        } else {
            out.extend_from_slice(&(message.len() as i16).to_be_bytes());
            out.extend_from_slice(message.as_bytes());
        }
        out.extend_from_slice(&(auth_bytes.len() as i32).to_be_bytes());
        out.extend_from_slice(auth_bytes);
    }
    if req.api_version >= 1 {
        out.extend_from_slice(&0i64.to_be_bytes()); // session_lifetime_ms
    }
    if flexible {
        out.push(0); // no tagged fields
    }
    out
}

/// One client connection: login, then relay.
async fn connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    (user, password): &(String, String),
    seen: &Mutex<Seen>,
) -> std::io::Result<()> {
    let mut broker = TcpStream::connect(upstream).await?;
    let mut login = Login::NoMechanism;
    loop {
        let frame = read_frame(&mut client).await?;
        let Some(req) = parse(frame, header_is_flexible) else {
            return Ok(()); // unreadable header: close, as a broker does
        };
        match req.api_key {
            API_VERSIONS => {
                write_frame(&mut broker, &req.frame).await?;
                let resp = read_frame(&mut broker).await?;
                write_frame(&mut client, &resp).await?;
            }
            API_SASL_HANDSHAKE if req.api_version <= 1 => {
                let body = &req.frame[req.body..];
                let len = i16_at(body, 0).unwrap_or(-1).max(0) as usize;
                let mech = body.get(2..2 + len).unwrap_or_default();
                login = match (mech, Scram::of(mech)) {
                    (b"PLAIN", _) => Login::Plain,
                    (_, Some(s)) => Login::Scram(s),
                    _ => Login::NoMechanism,
                };
                let supported = !matches!(login, Login::NoMechanism);
                let mut out = req.correlation_id.to_be_bytes().to_vec();
                let code = if supported {
                    0
                } else {
                    UNSUPPORTED_SASL_MECHANISM
                };
                out.extend_from_slice(&code.to_be_bytes());
                out.extend_from_slice(&(MECHANISMS.len() as i32).to_be_bytes());
                for m in MECHANISMS {
                    out.extend_from_slice(&(m.len() as i16).to_be_bytes());
                    out.extend_from_slice(m.as_bytes());
                }
                write_frame(&mut client, &out).await?;
                if !supported {
                    return Ok(());
                }
            }
            API_SASL_AUTHENTICATE if req.api_version <= 2 => {
                let body = &req.frame[req.body..];
                let auth: &[u8] = if req.api_version >= 2 {
                    let (n, used) = uvarint_at(body, 0).unwrap_or((0, 0));
                    let n = (n as usize).saturating_sub(1);
                    body.get(used..used + n).unwrap_or_default()
                } else {
                    let n = i32_at(body, 0).unwrap_or(-1).max(0) as usize;
                    body.get(4..4 + n).unwrap_or_default()
                };
                let refused = "Authentication failed: Invalid username or password";
                // (user, accepted, final auth bytes), or the next SCRAM step.
                let (who, accepted, final_bytes) =
                    match std::mem::replace(&mut login, Login::NoMechanism) {
                        Login::NoMechanism => {
                            let out = authenticate_response(
                                &req,
                                ILLEGAL_SASL_STATE,
                                "no SaslHandshake before SaslAuthenticate",
                                &[],
                            );
                            write_frame(&mut client, &out).await?;
                            return Ok(());
                        }
                        Login::Plain => {
                            // [authzid] NUL authcid NUL passwd.
                            let mut parts = auth.split(|b| *b == 0);
                            let (_authz, authc, pass) = (parts.next(), parts.next(), parts.next());
                            let who =
                                String::from_utf8_lossy(authc.unwrap_or_default()).into_owned();
                            let ok = authc == Some(user.as_bytes())
                                && pass == Some(password.as_bytes())
                                && parts.next().is_none();
                            (who, ok, String::new())
                        }
                        Login::Scram(scram) => {
                            // client-first: gs2 header, then "n=<user>,r=<nonce>".
                            let text = String::from_utf8_lossy(auth).into_owned();
                            let bare = text.splitn(3, ',').nth(2).unwrap_or_default().to_string();
                            let attr = |k: &str| {
                                bare.split(',')
                                    .find_map(|a| a.strip_prefix(k))
                                    .unwrap_or_default()
                                    .to_string()
                            };
                            let nonce = format!("{}{:016x}", attr("r="), rand::random::<u64>());
                            let server_first = format!("r={nonce},s={},i={SCRAM_ITERATIONS}", {
                                use base64::Engine as _;
                                base64::engine::general_purpose::STANDARD.encode(SCRAM_SALT)
                            });
                            let out = authenticate_response(&req, 0, "", server_first.as_bytes());
                            write_frame(&mut client, &out).await?;
                            login = Login::ScramSent(scram, bare, server_first, nonce);
                            continue;
                        }
                        Login::ScramSent(scram, bare, server_first, nonce) => {
                            let who = bare
                                .split(',')
                                .find_map(|a| a.strip_prefix("n="))
                                .unwrap_or_default()
                                .to_string();
                            let verified = (who == *user)
                                .then(|| {
                                    scram.verify(
                                        password,
                                        (&bare, &server_first, &nonce),
                                        &String::from_utf8_lossy(auth),
                                    )
                                })
                                .flatten();
                            match verified {
                                Some(server_final) => (who, true, server_final),
                                None => (who, false, String::new()),
                            }
                        }
                    };
                seen.lock().unwrap().logins.push((who, accepted));
                let out = if accepted {
                    authenticate_response(&req, 0, "", final_bytes.as_bytes())
                } else {
                    authenticate_response(&req, SASL_AUTHENTICATION_FAILED, refused, &[])
                };
                write_frame(&mut client, &out).await?;
                if !accepted {
                    return Ok(());
                }
                // Logged in: from here on the broker answers everything.
                tokio::io::copy_bidirectional(&mut client, &mut broker).await?;
                return Ok(());
            }
            other => {
                seen.lock().unwrap().refused_before_login.push(other);
                return Ok(());
            }
        }
    }
}
