//! Databricks Apps: where newer agents are deployed instead of serving endpoints.
//!
//! `GET /api/2.0/apps` (paged with `page_size` / `page_token`) lists each app with its URL,
//! status and the resources it was granted (serving endpoints it queries, SQL warehouses, MLflow
//! experiments, ...). Discovery uses the resources to tell agent apps from other apps and to find
//! the experiment holding their traces.

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::{DatabricksClient, DatabricksError};

/// `app_status` / `compute_status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppStatus {
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// A serving endpoint an app may query.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointResource {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub permission: Option<String>,
}

/// A SQL warehouse an app may use.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WarehouseResource {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub permission: Option<String>,
}

/// An MLflow experiment an app may write to.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExperimentResource {
    #[serde(default)]
    pub experiment_id: String,
    #[serde(default)]
    pub permission: Option<String>,
}

/// One resource of an app (only the kinds discovery uses are typed; others are ignored).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppResource {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_endpoint: Option<EndpointResource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql_warehouse: Option<WarehouseResource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<ExperimentResource>,
}

/// A Databricks App.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct App {
    pub name: String,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub app_status: Option<AppStatus>,
    #[serde(default)]
    pub compute_status: Option<AppStatus>,
    #[serde(default)]
    pub resources: Vec<AppResource>,
}

#[derive(Deserialize)]
struct AppsPage {
    #[serde(default)]
    apps: Vec<App>,
    #[serde(default)]
    next_page_token: Option<String>,
}

const MAX_PAGES: usize = 10_000;

impl DatabricksClient {
    /// Every app of the workspace (all pages).
    pub async fn list_apps(&self) -> Result<Vec<App>, DatabricksError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut q = vec![("page_size", "100".to_string())];
            if let Some(t) = &token {
                q.push(("page_token", t.clone()));
            }
            let page: AppsPage = self
                .api
                .request(Method::GET, "GET /api/2.0/apps", "/api/2.0/apps", &q, None)
                .await
                .map_err(|e| match e {
                    DatabricksError::PermissionDenied { detail, .. } => {
                        DatabricksError::PermissionDenied {
                            object: "Databricks Apps".into(),
                            detail,
                            fix: "give the service principal CAN VIEW on the apps that run agents"
                                .into(),
                        }
                    }
                    other => other,
                })?;
            out.extend(page.apps);
            match super::next_page("GET /api/2.0/apps", token.as_deref(), page.next_page_token) {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
        Err(DatabricksError::Decode {
            route: "GET /api/2.0/apps".into(),
            detail: format!("more than {MAX_PAGES} pages: the listing never ends"),
        })
    }
}
