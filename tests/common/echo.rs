//! A loopback server that answers every request with an error page echoing the request's head,
//! as some proxies and firewalls do: a token sent in a header must not reach an error from there.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts the server on 127.0.0.1; every answer is `400 Bad Request`, `text/html`, with the body
/// `<html>Request blocked by policy. Your request: <head, line breaks as " | "></html>`.
pub async fn echoing_error_page() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 8192];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!(
                    "<html>Request blocked by policy. Your request: {}</html>",
                    String::from_utf8_lossy(&head).replace("\r\n", " | ")
                );
                let answer = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    addr
}
