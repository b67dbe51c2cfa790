use databricks_emulator::EmulatorConfig;
use serde_json::Value;

use crate::{default_env, get_token, start};

#[tokio::test]
async fn discovery_documents() {
    let env = default_env().await;
    let v: Value = env.get_open("/.well-known/databricks-config").await.1;
    assert_eq!(v["oidc_endpoint"], format!("{}/oidc", env.base));
    assert!(v["workspace_id"].as_str().is_some_and(|s| !s.is_empty()));
    let v: Value = env
        .get_open("/oidc/.well-known/oauth-authorization-server")
        .await
        .1;
    assert_eq!(v["token_endpoint"], format!("{}/oidc/v1/token", env.base));
    assert!(v["authorization_endpoint"].is_string());
    env.emu.shutdown().await;
}

#[tokio::test]
async fn token_good_bad_and_api_requires_it() {
    let env = default_env().await;
    let r = env
        .http
        .post(format!("{}/oidc/v1/token", env.base))
        .basic_auth("emulator-client", Some("emulator-secret"))
        .form(&[("grant_type", "client_credentials"), ("scope", "all-apis")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3600);
    assert!(v["access_token"].as_str().is_some_and(|t| t.len() > 20));

    let r = env
        .http
        .post(format!("{}/oidc/v1/token", env.base))
        .basic_auth("emulator-client", Some("wrong"))
        .form(&[("grant_type", "client_credentials"), ("scope", "all-apis")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_client");
    assert!(v["error_description"].is_string());
    assert!(!v.to_string().contains("emulator-secret"));

    let r = env
        .http
        .post(format!("{}/oidc/v1/token", env.base))
        .basic_auth("emulator-client", Some("emulator-secret"))
        .form(&[("grant_type", "password")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "unsupported_grant_type"
    );

    // No token -> 401 UNAUTHENTICATED; a bad token -> 403 with a numeric error_code.
    let r = env
        .http
        .get(format!("{}/api/2.0/serving-endpoints", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error_code"],
        "UNAUTHENTICATED"
    );
    let r = env
        .http
        .get(format!("{}/api/2.0/serving-endpoints", env.base))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v = r.json::<Value>().await.unwrap();
    assert_eq!(v["error_code"], 403);
    assert_eq!(v["message"], "Invalid access token.");
    let (s, _) = env.get("/api/2.0/serving-endpoints").await;
    assert_eq!(s, 200);
    env.emu.shutdown().await;
}

#[tokio::test]
async fn tokens_expire_and_pat_works() {
    let cfg = EmulatorConfig {
        token_ttl_secs: 1,
        pat: Some("dapi-test-pat".into()),
        ..Default::default()
    };
    let env = start(cfg).await;
    let (s, _) = env.get("/api/2.0/sql/warehouses").await;
    assert_eq!(s, 200);
    // Wait (bounded) until the 1 s token is refused.
    let mut expired = false;
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if env.get("/api/2.0/sql/warehouses").await.0 == 403 {
            expired = true;
            break;
        }
    }
    assert!(expired, "token never expired");
    let (_, v) = env.get("/api/2.0/sql/warehouses").await;
    assert_eq!(v["error_code"], 403);
    assert!(v["message"].as_str().unwrap_or("").contains("expired"));
    let r = env
        .http
        .get(format!("{}/api/2.0/sql/warehouses", env.base))
        .bearer_auth("dapi-test-pat")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A fresh token works again.
    let t = get_token(&env.http, &env.base, "emulator-client", "emulator-secret").await;
    let r = env
        .http
        .get(format!("{}/api/2.0/sql/warehouses", env.base))
        .bearer_auth(t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    env.emu.shutdown().await;
}

#[test]
fn config_debug_redacts_secrets() {
    let cfg = EmulatorConfig {
        pat: Some("dapi-secret-pat".into()),
        ..Default::default()
    };
    let d = format!("{cfg:?}");
    assert!(
        !d.contains("emulator-secret") && !d.contains("dapi-secret-pat"),
        "{d}"
    );
}
