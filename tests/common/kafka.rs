//! A real Kafka-protocol broker for tests: `tansu` in memory on a free loopback port, plus
//! helpers to create topics and read everything back.
//!
//! The broker binary is `~/.cargo/bin/tansu` (or `$TANSU_BIN`). When it is missing, tests fail
//! if `CI` is set and otherwise skip with a loud message.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

/// Kills and reaps the broker when the test ends, however it ends.
pub struct Broker {
    pub child: Option<Child>,
    pub addr: SocketAddr,
}

impl Broker {
    pub fn brokers(&self) -> String {
        self.addr.to_string()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(child.id().to_string())
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -{sig} failed");
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A stopped process must be continued to die cleanly on some systems.
            self.signal("CONT");
        }
        self.kill();
    }
}

pub fn tansu_bin() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("TANSU_BIN").map(PathBuf::from),
        std::env::var_os("CARGO_HOME").map(|h| PathBuf::from(h).join("bin/tansu")),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// Starts a broker on a free loopback port, or returns None (skip) when tansu is missing
/// outside CI.
pub fn start_broker() -> Option<Broker> {
    start_broker_with(&[])
}

/// [`start_broker`] with extra `tansu broker` arguments (e.g. `--authentication`: clients must
/// authenticate with SASL).
pub fn start_broker_with(extra: &[&str]) -> Option<Broker> {
    start_broker_advertising(extra, None)
}

/// [`start_broker_with`] advertising `advertised` (e.g. a front in between) instead of its own
/// address: clients bootstrap anywhere, then reach the broker at `advertised`.
pub fn start_broker_advertising(extra: &[&str], advertised: Option<SocketAddr>) -> Option<Broker> {
    let Some(bin) = tansu_bin() else {
        if std::env::var_os("CI").is_some() {
            panic!("the Kafka broker binary `tansu` is missing and CI is set: install it with `cargo install tansu --locked --no-default-features --features dynostore`");
        }
        eprintln!("\n!!!!!!!! SKIPPING Kafka sink test: `tansu` not found (~/.cargo/bin/tansu or $TANSU_BIN); install it with `cargo install tansu --locked --no-default-features --features dynostore` !!!!!!!!\n");
        return None;
    };
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised_url = advertised.map_or_else(|| url.clone(), |a| format!("tcp://{a}"));
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised_url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tansu");
        let mut broker = Broker {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&broker.addr, Duration::from_millis(200)).is_ok() {
                return Some(broker);
            }
            if let Some(child) = broker.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited (port taken?): try another port
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        broker.kill();
    }
    panic!("tansu did not start accepting connections on loopback");
}

pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    create_topic_with(brokers, topic, partitions, &[]).await
}

/// [`create_topic`] with topic configs, e.g. `("max.message.bytes", "65536")`.
pub async fn create_topic_with(
    brokers: &str,
    topic: &str,
    partitions: i32,
    configs: &[(&str, &str)],
) {
    create_topic_as(brokers, topic, partitions, configs, &[]).await
}

/// [`create_topic_with`] with extra client settings (e.g. SASL credentials).
pub async fn create_topic_as(
    brokers: &str,
    topic: &str,
    partitions: i32,
    configs: &[(&str, &str)],
    client: &[(&str, &str)],
) {
    let admin: AdminClient<DefaultClientContext> = client_config(brokers, client)
        .create()
        .expect("admin client");
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for (k, v) in configs {
        new = new.set(k, v);
    }
    let res = admin
        .create_topics(
            &[new],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_topics");
    for r in res {
        r.expect("topic created");
    }
}

pub const SENTINEL: &str = "__end_of_test_data__";

/// Everything stored in `topic`, read back from the beginning: a sentinel is appended to every
/// partition first and each partition is read up to its sentinel (bounded in time). Returns
/// (partition, key, value) in consumption order, sentinels excluded.
pub async fn consume_all(
    brokers: &str,
    topic: &str,
    partitions: i32,
) -> Vec<(i32, String, String)> {
    consume_all_as(brokers, topic, partitions, &[]).await
}

fn client_config(brokers: &str, client: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in client {
        c.set(*k, *v);
    }
    c
}

/// [`consume_all`] with extra client settings (e.g. SASL credentials).
pub async fn consume_all_as(
    brokers: &str,
    topic: &str,
    partitions: i32,
    client: &[(&str, &str)],
) -> Vec<(i32, String, String)> {
    let producer: FutureProducer = client_config(brokers, client)
        .set("message.timeout.ms", "20000")
        .create()
        .expect("producer");
    for p in 0..partitions {
        producer
            .send(
                FutureRecord::<str, str>::to(topic)
                    .partition(p)
                    .payload(SENTINEL),
                Duration::from_secs(20),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("sentinel delivered");
    }
    let consumer: StreamConsumer = client_config(brokers, client)
        .set("group.id", format!("sink-test-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut done: HashSet<i32> = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while done.len() < usize::try_from(partitions).unwrap() {
        let msg = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("end of topic not reached in time ({} read)", out.len()))
            .expect("consume");
        let value =
            String::from_utf8(msg.payload().unwrap_or_default().to_vec()).expect("utf-8 value");
        if value == SENTINEL {
            done.insert(msg.partition());
            continue;
        }
        assert!(!done.contains(&msg.partition()), "data after the sentinel");
        let key = String::from_utf8(msg.key().unwrap_or_default().to_vec()).expect("utf-8 key");
        out.push((msg.partition(), key, value));
    }
    out
}

/// The partitions' high watermarks summed: only a progress signal (tansu 0.6 reports the last
/// batch's base offset + 1, not the message count).
pub fn progress(brokers: &str, topic: &str, partitions: i32) -> i64 {
    tokio::task::block_in_place(|| {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("consumer");
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .map(|(_, hi)| hi)
                    .unwrap_or(0)
            })
            .sum()
    })
}

/// A TCP relay on `listener` to `upstream` that holds every chunk `delay` before passing it on,
/// both ways: a broker at the other end of a slow link (round trip about twice `delay`). The
/// broker must advertise the relay's address so that clients stay on it.
pub fn slow_link(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
    delay: Duration,
) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        delay: Duration,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                break;
            }
            tokio::time::sleep(delay).await;
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, delay));
            tokio::spawn(pipe(sr, cw, delay));
        }
    })
}
