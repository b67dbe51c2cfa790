//! The Databricks side over real sockets: auth, retries, pagination, discovery, and the
//! troubleshooting messages each failure must produce.

mod common;

use std::time::Duration;

use common::*;
use databricks_emulator::Privilege;
use databricks_shield::databricks::sql::Statement;
use databricks_shield::databricks::{
    ClientOptions, Credentials, DatabricksClient, DatabricksError, RetryPolicy,
};
use databricks_shield::discovery::{self, TableKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_finds_every_agent_kind_and_maps_endpoints_to_tables() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let inv = discovery::discover(&c, "workspace", "default", "")
        .await
        .unwrap();
    // Every inference table of the ground truth is read by exactly one agent.
    let truth_tables: std::collections::BTreeSet<String> =
        emu.ground_truth().into_iter().map(|r| r.table).collect();
    let read: std::collections::BTreeSet<String> =
        inv.readable().map(|(_, t)| t.full_name.clone()).collect();
    assert_eq!(read, truth_tables);
    let kinds: std::collections::BTreeSet<_> = inv.readable().map(|(_, t)| t.kind).collect();
    assert!(
        kinds.contains(&TableKind::AiGatewayPayload) && kinds.contains(&TableKind::LegacyPayload)
    );
    // Agent endpoints carry their task and models; a table-only agent exists too.
    assert!(inv
        .agents
        .iter()
        .any(|a| a.task.as_deref() == Some("agent/v1/responses") && a.table.is_some()));
    assert!(inv
        .agents
        .iter()
        .any(|a| a.task.as_deref() == Some("agent/v2/chat")));
    assert!(inv
        .agents
        .iter()
        .any(|a| a.endpoint.is_none() && a.table.is_some()));
    assert!(inv
        .agents
        .iter()
        .filter(|a| a.endpoint.is_some())
        .all(|a| !a.models.is_empty()));
    assert!(!inv.tools.is_empty() && !inv.models.is_empty());
    assert!(!inv.otel_span_tables.is_empty());
    // The plain LLM endpoints are listed, not read.
    assert!(inv
        .llm_endpoints
        .iter()
        .any(|a| a.models.iter().any(|m| m.kind == "foundation_model")));
    let table = discovery::render_table(&inv);
    assert!(table.contains("AGENT") && table.contains("agent/v1/responses"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_filters_tables_and_distractors_are_ignored() {
    let mut cfg = emulator_config();
    cfg.table_prefix = "prod_".into();
    let emu = emulator(cfg).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let inv = discovery::discover(&c, "workspace", "default", "prod_")
        .await
        .unwrap();
    assert!(inv
        .readable()
        .all(|(_, t)| t.full_name.starts_with("workspace.default.prod_")));
    assert!(inv.tables_matching_prefix < inv.tables_total);
    assert!(!inv.filtered_out_examples.is_empty());
    let none = discovery::discover(&c, "workspace", "default", "nothing_matches_")
        .await
        .unwrap();
    assert_eq!(none.readable().count(), 0);
    assert_eq!(none.tables_matching_prefix, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_say_authentication_failed_and_never_echo_the_secret() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", "wrong-secret-value-123");
    let err = c.authenticate().await.unwrap_err();
    assert!(matches!(err, DatabricksError::Auth { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("Authentication failed") && msg.contains("DATABRICKS_CLIENT_SECRET"),
        "{msg}"
    );
    // An OAuth `invalid_client` answer: its words are kept, and the fix says which secret works.
    assert!(
        msg.contains("invalid client credentials") && msg.contains("invalid_client"),
        "{msg}"
    );
    assert!(msg.contains("Databricks OAuth secret"), "{msg}");
    assert!(
        !msg.contains("wrong-secret-value-123")
            && !format!("{err:?}").contains("wrong-secret-value-123")
    );
    // The refused token request is counted like every API call (metrics show the 401s).
    let refused: u64 = c
        .stats()
        .snapshot()
        .iter()
        .filter(|((route, status), _)| route == "POST /oidc/v1/token" && status == "401")
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(refused, 1, "{:?}", c.stats().snapshot());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_host_says_failed_to_connect() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = client(&format!("http://127.0.0.1:{port}"), "id", "secret");
    let err = c.authenticate().await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("Failed to connect to Databricks workspace"),
        "{err}"
    );
    assert!(err.is_retriable());
    // The advice names the port of DATABRICKS_HOST, not always 443.
    let text = err.to_string();
    assert!(
        text.contains(&format!("reach it on port {port} ")),
        "{text}"
    );
    assert!(!text.contains("port 443"), "{text}");
}

/// A token endpoint that refuses with a Databricks error body (an IP access list, a proxy), not
/// an OAuth one: its words are kept, and it is not called a wrong secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_request_refused_with_403_keeps_the_answer_and_names_ip_access_lists() {
    let emu = emulator(emulator_config()).await;
    emu.set_faults("route=/oidc,kind=403,count=unlimited")
        .unwrap();
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let err = c.authenticate().await.unwrap_err();
    assert!(matches!(err, DatabricksError::Auth { .. }), "{err:?}");
    assert!(!err.is_retriable());
    let msg = err.to_string();
    assert!(
        msg.contains("HTTP 403 PERMISSION_DENIED")
            && msg.contains("User does not have permission to access this resource"),
        "{msg}"
    );
    assert!(msg.contains("IP access list"), "{msg}");
    assert!(!msg.contains("invalid client credentials"), "{msg}");
    assert!(!msg.contains(SECRET) && !format!("{err:?}").contains(SECRET));
}

/// A refused personal access token is named as such: no OAuth advice, no status repeated as
/// its code, no `..`, and never the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_personal_access_token_is_named_with_its_fix() {
    let mut cfg = emulator_config();
    cfg.pat = Some("dapi-right-token-0123".into());
    let emu = emulator(cfg).await;
    let c = DatabricksClient::new(
        &url::Url::parse(&emu.base_url()).unwrap(),
        Credentials::Pat("dapiWRONG-token-9876".to_string().into()),
        fast_retry(),
    )
    .unwrap();
    let err = c.list_warehouses().await.unwrap_err();
    assert!(matches!(err, DatabricksError::Auth { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("DATABRICKS_TOKEN was refused: GET /api/2.0/sql/warehouses answered 403: Invalid access token. Fix:"),
        "{msg}"
    );
    assert!(
        msg.contains("expired, revoked or not a token of this workspace"),
        "{msg}"
    );
    assert!(!msg.contains("DATABRICKS_CLIENT_ID"), "{msg}");
    assert!(!msg.contains("403 403") && !msg.contains(".."), "{msg}");
    assert!(!msg.contains("dapiWRONG") && !format!("{err:?}").contains("dapiWRONG"));
}

/// A proxy's or firewall's error page that echoes the request's headers: the token it shows
/// never reaches the error (its Display or Debug).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_page_echoing_the_token_does_not_carry_it_into_the_error() {
    let addr = common::echo::echoing_error_page().await;
    let c = DatabricksClient::new(
        &url::Url::parse(&format!("http://{addr}")).unwrap(),
        Credentials::Pat("dapi-echoed-token-5555".to_string().into()),
        fast_retry(),
    )
    .unwrap();
    let err = c.list_warehouses().await.unwrap_err();
    let (msg, debug) = (err.to_string(), format!("{err:?}"));
    assert!(msg.contains("Request blocked by policy"), "{msg}");
    assert!(msg.contains("[redacted]"), "the echo was there: {msg}");
    assert!(!msg.contains("dapi-echoed-token") && !debug.contains("dapi-echoed-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_grants_print_the_grant_statements() {
    let emu = emulator(emulator_config()).await;
    emu.revoke("emulator-client", Privilege::UseSchema);
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let err = discovery::discover(&c, "workspace", "default", "")
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("Access denied"), "{msg}");
    assert!(
        msg.contains("GRANT USE SCHEMA ON SCHEMA `workspace`.`default` TO `emulator-client`"),
        "{msg}"
    );
    assert!(msg.contains("SHOW GRANTS"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_catalog_is_not_found_with_the_fix() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let err = discovery::discover(&c, "no_such_catalog", "default", "")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            DatabricksError::NotFound { .. } | DatabricksError::PermissionDenied { .. }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("no_such_catalog"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_unavailability_are_retried_with_retry_after() {
    let emu = emulator(emulator_config()).await;
    emu.set_faults(
        "route=/api/2.1/unity-catalog/tables,kind=429,count=2,retry_after=1;\
         route=/api/2.0/serving-endpoints,kind=503,count=2",
    )
    .unwrap();
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    let inv = discovery::discover(&c, "workspace", "default", "")
        .await
        .unwrap();
    assert!(inv.readable().count() > 0);
    assert!(c.stats().retries() >= 4, "retries: {}", c.stats().retries());
    // The two 429s asked for `Retry-After: 1`: the waits chosen before the retries add up to
    // 2 s at least. Without it they are backoffs of this client (20 ms, 40 ms, ...): far less.
    // (The waits chosen are counted, not the time they took: no clock is asserted.)
    let waited = c.stats().retry_wait();
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_replaced_once_without_failing() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    c.authenticate().await.unwrap();
    emu.set_faults("route=/api/2.1/unity-catalog/tables,kind=expire_tokens,count=1")
        .unwrap();
    let inv = discovery::discover(&c, "workspace", "default", "")
        .await
        .unwrap();
    assert!(inv.readable().count() > 0);
    let oidc: u64 = c
        .stats()
        .snapshot()
        .iter()
        .filter(|((route, status), _)| route.contains("tables") && status == "403")
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(
        oidc, 1,
        "one 403 refusing the expired token (as the workspace answers), then a fresh token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_personal_access_token_works_too() {
    let mut cfg = emulator_config();
    cfg.pat = Some("dapi-test-token-0123".into());
    let emu = emulator(cfg).await;
    let c = databricks_shield::databricks::DatabricksClient::new(
        &url::Url::parse(&emu.base_url()).unwrap(),
        databricks_shield::databricks::Credentials::Pat("dapi-test-token-0123".to_string().into()),
        fast_retry(),
    )
    .unwrap();
    let inv = discovery::discover(&c, "workspace", "default", "")
        .await
        .unwrap();
    assert!(inv.readable().count() > 0);
}

/// The seed's 90-day rotation, in service mode: a secret read from a file is read again when a
/// secret is needed, so the rotated OAuth secret (the old one deleted) and the rotated PAT are
/// picked up without a restart. A client that keeps the secret it started with is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_secret_files_are_picked_up_without_a_restart() {
    use databricks_shield::databricks::{Credentials, DatabricksClient};
    let mut cfg = emulator_config();
    cfg.pat = Some("dapi-before-rotation".into());
    let emu = emulator(cfg).await;
    let url = url::Url::parse(&emu.base_url()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("client_secret");
    let pat_file = dir.path().join("token");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    std::fs::write(&pat_file, "dapi-before-rotation\n").unwrap();
    let oauth = client(&emu.base_url(), "emulator-client", SECRET)
        .reread_secret_from(secret_file.clone(), "DATABRICKS_CLIENT_SECRET_FILE");
    let fixed = client(&emu.base_url(), "emulator-client", SECRET);
    let pat = DatabricksClient::new(
        &url,
        Credentials::Pat("dapi-before-rotation".to_string().into()),
        fast_retry(),
    )
    .unwrap()
    .reread_secret_from(pat_file.clone(), "DATABRICKS_TOKEN_FILE");
    for c in [&oauth, &fixed, &pat] {
        discovery::discover(c, "workspace", "default", "")
            .await
            .unwrap();
    }

    // Rotation: new secrets in the files, the old ones no longer accepted; the OAuth access
    // tokens issued before expire.
    std::fs::write(&secret_file, "rotated-client-secret-2\n").unwrap();
    std::fs::write(&pat_file, "dapi-after-rotation\n").unwrap();
    emu.rotate_secrets(Some("rotated-client-secret-2"), Some("dapi-after-rotation"));
    emu.set_faults("route=/api/2.1/unity-catalog/tables,kind=expire_tokens,count=1")
        .unwrap();

    let inv = discovery::discover(&oauth, "workspace", "default", "")
        .await
        .expect("the rotated OAuth secret is read from its file");
    assert!(inv.readable().count() > 0);
    let inv = discovery::discover(&pat, "workspace", "default", "")
        .await
        .expect("the rotated PAT is read from its file after the old one was refused");
    assert!(inv.readable().count() > 0);
    let err = discovery::discover(&fixed, "workspace", "default", "")
        .await
        .expect_err("a secret kept from the start is refused after the rotation");
    assert!(matches!(err, DatabricksError::Auth { .. }), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Statements are never left running on the warehouse (src/databricks/sql.rs module doc)

/// A statement of the first inference table, with the given timeout.
fn statement(emu: &databricks_emulator::Emulator, timeout: Duration) -> Statement {
    let table = emu
        .ground_truth()
        .into_iter()
        .next()
        .expect("the emulator has rows")
        .table;
    Statement {
        warehouse_id: "4b9f1c2d3e5a6001".into(),
        statement: format!("SELECT databricks_request_id FROM {table} LIMIT 5"),
        parameters: vec![],
        table,
        timeout,
    }
}

fn counter(emu: &databricks_emulator::Emulator, name: &str) -> u64 {
    emu.stats()[name].as_u64().unwrap_or(u64::MAX)
}

/// Polls the emulator's counters until `done` holds (bounded: 10 s), then returns them.
async fn settled(
    emu: &databricks_emulator::Emulator,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..500 {
        if done(&emu.stats()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    emu.stats()
}

fn cancelled_and_none_running(s: &serde_json::Value) -> bool {
    s["statements_cancelled"].as_u64() == Some(1) && s["statements_running"].as_u64() == Some(0)
}

/// A client whose retries give up after a second.
fn impatient_client(emu: &databricks_emulator::Emulator) -> DatabricksClient {
    DatabricksClient::new(
        &url::Url::parse(&emu.base_url()).unwrap(),
        Credentials::OAuth {
            client_id: "emulator-client".into(),
            client_secret: SECRET.to_string().into(),
        },
        ClientOptions {
            retry: RetryPolicy {
                max_elapsed: Duration::from_secs(1),
                base_delay: Duration::from_millis(20),
                max_delay: Duration::from_millis(200),
            },
            ..fast_retry()
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_statement_whose_caller_leaves_is_cancelled() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    c.authenticate().await.unwrap();
    emu.set_faults("route=/api/2.0/sql/statements,kind=pending,polls=100000")
        .unwrap();
    // The caller gives up long before its own statement timeout (a reader aborted, shutdown).
    let st = statement(&emu, Duration::from_secs(600));
    let left = tokio::time::timeout(Duration::from_millis(800), c.execute(&st)).await;
    assert!(left.is_err(), "the statement stays PENDING: {left:?}");
    let stats = settled(&emu, cancelled_and_none_running).await;
    assert!(
        cancelled_and_none_running(&stats),
        "the abandoned statement still runs on the warehouse: {stats}"
    );
    assert_eq!(counter(&emu, "statements_executed"), 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_caller_leaves_while_it_starts_is_cancelled() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    c.authenticate().await.unwrap();
    // The start request waits while the statement runs (wait_timeout): the caller leaves
    // before its answer, which then says PENDING.
    emu.set_faults(
        "route=/api/2.0/sql/statements,kind=slow,ms=1500;\
         route=/api/2.0/sql/statements,kind=pending,polls=100000",
    )
    .unwrap();
    let st = statement(&emu, Duration::from_secs(600));
    let left = tokio::time::timeout(Duration::from_millis(300), c.execute(&st)).await;
    assert!(left.is_err(), "the statement is slow: {left:?}");
    let stats = settled(&emu, cancelled_and_none_running).await;
    assert!(
        cancelled_and_none_running(&stats),
        "the statement started by the abandoned request still runs: {stats}"
    );
    assert_eq!(
        c.stats().settle_background(Duration::from_secs(10)).await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_polls_keep_failing_is_cancelled() {
    let emu = emulator(emulator_config()).await;
    let c = impatient_client(&emu);
    // Polls (GET) answer 503 until the retries run out; cancels (POST) get through.
    emu.set_faults(
        "route=/api/2.0/sql/statements,kind=pending,polls=100000;\
         route=/api/2.0/sql/statements/,method=GET,kind=503,count=unlimited",
    )
    .unwrap();
    let err = c
        .execute(&statement(&emu, Duration::from_secs(600)))
        .await
        .expect_err("every poll fails");
    assert!(
        matches!(err, DatabricksError::Exhausted { status: 503, .. }),
        "{err:?}"
    );
    assert!(err.is_retriable());
    let stats = settled(&emu, cancelled_and_none_running).await;
    assert!(
        cancelled_and_none_running(&stats),
        "the statement whose polls failed still runs: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_start_whose_answer_is_lost_is_not_sent_twice() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    c.authenticate().await.unwrap();
    // The warehouse creates the statement (which keeps running), then the connection drops
    // before the answer: the statement's id never reaches the client.
    emu.set_faults(
        "route=/api/2.0/sql/statements,method=POST,kind=drop_after,count=1;\
         route=/api/2.0/sql/statements,kind=pending,polls=100000,count=unlimited",
    )
    .unwrap();
    let err = c
        .execute(&statement(&emu, Duration::from_secs(2)))
        .await
        .expect_err("the answer was lost");
    let stats = emu.stats();
    assert_eq!(
        counter(&emu, "statements_executed"),
        1,
        "a second statement was started beside the first: {stats}"
    );
    assert!(counter(&emu, "statements_running") <= 1, "{stats}");
    assert_eq!(counter(&emu, "dropped_connections"), 1, "{stats}");
    let msg = err.to_string();
    assert!(err.is_retriable(), "{err:?}");
    assert!(msg.contains("not sent again"), "{msg}");
    assert!(!msg.contains(SECRET), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_starts_refused_with_429_or_503_are_still_retried() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    // A refusal (429, 503) means the workspace did not start the statement: sent again.
    emu.set_faults(
        "route=/api/2.0/sql/statements,method=POST,kind=429,count=2,retry_after=0;\
         route=/api/2.0/sql/statements,method=POST,kind=503,count=2",
    )
    .unwrap();
    let rows = c
        .execute(&statement(&emu, Duration::from_secs(60)))
        .await
        .expect("429 and 503 are retried")
        .collect_all()
        .await
        .unwrap();
    assert!(!rows.is_empty());
    assert_eq!(counter(&emu, "statements_executed"), 1);
    assert!(c.stats().retries() >= 4, "retries: {}", c.stats().retries());
    assert_eq!(counter(&emu, "statements_running"), 0);
}

/// A dropped connection is retried whatever the request's URL holds: a schema named `dns_logs`
/// (or a page token with "tls" in it) once made it a "DNS lookup failed", never retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_retried_whatever_the_url_says() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    c.authenticate().await.unwrap();
    emu.set_faults("route=/api/2.1/unity-catalog/tables,kind=drop,count=1")
        .unwrap();
    let r = c.list_tables("workspace", "dns_tls_logs").await;
    assert!(
        !matches!(r, Err(DatabricksError::Connect { .. })),
        "the drop was not retried: {r:?}"
    );
    assert_eq!(c.stats().retries(), 1, "{r:?}");
    emu.shutdown().await;
}

/// A token refresh that fails while the token in hand is still valid (refreshes start early)
/// does not fail the requests: the valid token is used meanwhile, and the requests queued
/// behind the failed refresh do not each repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refresh_keeps_using_the_still_valid_token() {
    let mut cfg = emulator_config();
    // Stale (refreshed) after 2 s, valid for 4 s.
    cfg.token_ttl_secs = 4;
    let emu = emulator(cfg).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    c.authenticate().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2300)).await;
    emu.set_faults("route=/oidc,kind=403,count=unlimited")
        .unwrap();
    let (a, b, d) = tokio::join!(
        c.list_warehouses(),
        c.list_warehouses(),
        c.list_warehouses()
    );
    for r in [a, b, d] {
        r.expect("the still valid token serves the requests");
    }
    let refreshes: u64 = c
        .stats()
        .snapshot()
        .iter()
        .filter(|((route, _), _)| route == "POST /oidc/v1/token")
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(refreshes, 2, "one token at start, one failed refresh");
    emu.set_faults("").unwrap();
    emu.shutdown().await;
}

/// A statement's poll that is itself retrying (the poll route answers 503) does not stretch
/// STATEMENT_TIMEOUT_SECONDS: the statement times out (and is cancelled) at its limit, not
/// after the poll's own retry budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_poll_does_not_stretch_the_statement_timeout() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    c.authenticate().await.unwrap();
    emu.set_faults(
        "route=/api/2.0/sql/statements,kind=pending,polls=100000;\
         route=/api/2.0/sql/statements/,method=GET,kind=503,count=unlimited",
    )
    .unwrap();
    let st = statement(&emu, Duration::from_secs(1));
    let Err(e) = c.execute(&st).await else {
        panic!("the statement times out")
    };
    assert!(
        matches!(&e, DatabricksError::Statement { error_code, .. } if error_code == "STATEMENT_TIMEOUT"),
        "{e}"
    );
    // And it is cancelled on the warehouse (once the poll route answers again).
    emu.set_faults("").unwrap();
    let stats = settled(&emu, cancelled_and_none_running).await;
    assert!(cancelled_and_none_running(&stats), "{stats}");
    emu.shutdown().await;
}

/// While one request refreshes the token (here a token endpoint answering slowly), the others
/// go on with the token still valid instead of queueing behind the refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_refresh_does_not_hold_up_the_other_requests() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let mut cfg = emulator_config();
    // Stale (refreshed) after 3 s, valid for 6 s.
    cfg.token_ttl_secs = 6;
    let emu = emulator(cfg).await;
    let c = Arc::new(client(&emu.base_url(), "emulator-client", SECRET));
    c.authenticate().await.unwrap();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    emu.set_faults("route=/oidc,kind=latency,ms=2000,count=1")
        .unwrap();
    let order = Arc::new(AtomicUsize::new(0));
    let call = |c: Arc<DatabricksClient>, order: Arc<AtomicUsize>| async move {
        c.list_warehouses().await.expect("served");
        order.fetch_add(1, Ordering::SeqCst)
    };
    // The first request takes the (slow) refresh; the second starts while it runs.
    let refreshing = tokio::spawn(call(c.clone(), order.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = tokio::spawn(call(c.clone(), order.clone()));
    let (refreshing, other) = (refreshing.await.unwrap(), other.await.unwrap());
    assert_eq!(
        (other, refreshing),
        (0, 1),
        "the second request finished first, with the valid token"
    );
    emu.shutdown().await;
}

/// A statement that ends FAILED for a passing reason on the warehouse (`INTERNAL_ERROR`, here an
/// injected fault) may succeed when run again; one refused as bad SQL (`BAD_REQUEST`) cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_statement_is_retriable_only_for_a_passing_reason() {
    let emu = emulator(emulator_config()).await;
    let c = client(&emu.base_url(), "emulator-client", SECRET);
    c.authenticate().await.unwrap();
    emu.set_faults("route=/api/2.0/sql/statements,kind=fail,count=1")
        .unwrap();
    let st = statement(&emu, Duration::from_secs(30));
    let Err(e) = c.execute(&st).await else {
        panic!("the injected fault fails the statement")
    };
    assert!(
        matches!(&e, DatabricksError::Statement { state, error_code, .. }
            if state == "FAILED" && error_code == "INTERNAL_ERROR"),
        "{e}"
    );
    assert!(e.is_retriable(), "{e}");
    emu.set_faults("").unwrap();
    let mut bad = statement(&emu, Duration::from_secs(30));
    bad.statement = format!("SELEC databricks_request_id FROM {}", bad.table);
    let Err(e) = c.execute(&bad).await else {
        panic!("bad SQL fails")
    };
    assert!(
        matches!(&e, DatabricksError::Statement { state, error_code, .. }
            if state == "FAILED" && error_code == "BAD_REQUEST"),
        "{e}"
    );
    assert!(!e.is_retriable(), "{e}");
    emu.shutdown().await;
}
