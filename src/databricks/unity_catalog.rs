//! Unity Catalog: tables, registered models and their versions, functions (agent tools).

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::{grants_fix, DatabricksClient, DatabricksError};
use crate::traffic::host::encode_segment;

/// A column of a table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ColumnInfo {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub type_name: Option<String>,
    #[serde(default)]
    pub type_text: Option<String>,
    #[serde(default)]
    pub position: Option<i64>,
    #[serde(default)]
    pub nullable: Option<bool>,
}

/// `TableInfo`, the fields the connector reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TableInfo {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub full_name: Option<String>,
    #[serde(default)]
    pub catalog_name: Option<String>,
    #[serde(default)]
    pub schema_name: Option<String>,
    #[serde(default)]
    pub table_type: Option<String>,
    #[serde(default)]
    pub data_source_format: Option<String>,
    #[serde(default)]
    pub columns: Vec<ColumnInfo>,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub updated_at: Option<i64>,
}

#[derive(Deserialize)]
struct TablesPage {
    #[serde(default)]
    tables: Vec<TableInfo>,
    #[serde(default)]
    next_page_token: Option<String>,
}

/// A UC registered model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegisteredModel {
    #[serde(default)]
    pub full_name: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub updated_at: Option<i64>,
    #[serde(default)]
    pub aliases: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct ModelsPage {
    #[serde(default)]
    registered_models: Vec<RegisteredModel>,
    #[serde(default)]
    next_page_token: Option<String>,
}

/// A version of a UC model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModelVersion {
    #[serde(default, deserialize_with = "string_or_number")]
    pub version: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub run_id: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
}

#[derive(Deserialize)]
struct VersionsPage {
    #[serde(default)]
    model_versions: Vec<ModelVersion>,
    #[serde(default)]
    next_page_token: Option<String>,
}

/// A UC function (agents call these as tools).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FunctionInfo {
    #[serde(default)]
    pub full_name: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub data_type: Option<String>,
    #[serde(default)]
    pub routine_body: Option<String>,
}

#[derive(Deserialize)]
struct FunctionsPage {
    #[serde(default)]
    functions: Vec<FunctionInfo>,
    #[serde(default)]
    next_page_token: Option<String>,
}

fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    })
}

/// The path listing the versions of the model `full_name`: the name is one path segment,
/// percent-encoded (a `#`, `?`, `%`, `/` or space in a backquoted UC name must not end or split it).
fn model_versions_path(full_name: &str) -> String {
    format!(
        "/api/2.1/unity-catalog/models/{}/versions",
        encode_segment(full_name)
    )
}

/// Upper bound on pages, so a server that always returns a token cannot loop us forever.
const MAX_PAGES: usize = 10_000;

/// One page of a UC listing: its items and the token of the next page.
trait Page: serde::de::DeserializeOwned {
    type Item;
    fn into_parts(self) -> (Vec<Self::Item>, Option<String>);
}

macro_rules! page {
    ($page:ty, $field:ident, $item:ty) => {
        impl Page for $page {
            type Item = $item;
            fn into_parts(self) -> (Vec<$item>, Option<String>) {
                (self.$field, self.next_page_token)
            }
        }
    };
}
page!(TablesPage, tables, TableInfo);
page!(ModelsPage, registered_models, RegisteredModel);
page!(VersionsPage, model_versions, ModelVersion);
page!(FunctionsPage, functions, FunctionInfo);

impl DatabricksClient {
    /// Follows every page of a listing. A page may be empty yet carry a token: stop only when
    /// the token is absent.
    async fn list_all<P: Page>(
        &self,
        route: &str,
        path: &str,
        query: Vec<(&str, String)>,
    ) -> Result<Vec<P::Item>, DatabricksError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut q = query.clone();
            q.push(("max_results", "100".to_string()));
            if let Some(t) = &token {
                q.push(("page_token", t.clone()));
            }
            let page: P = self.api.request(Method::GET, route, path, &q, None).await?;
            let (items, next) = page.into_parts();
            out.extend(items);
            match super::next_page(route, token.as_deref(), next) {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
        Err(DatabricksError::Decode {
            route: route.to_string(),
            detail: format!("more than {MAX_PAGES} pages: the listing never ends"),
        })
    }

    /// A listing of one schema, with catalog/schema context on its errors.
    async fn list_in_schema<P: Page>(
        &self,
        path: &str,
        catalog: &str,
        schema: &str,
    ) -> Result<Vec<P::Item>, DatabricksError> {
        let query = vec![
            ("catalog_name", catalog.to_string()),
            ("schema_name", schema.to_string()),
        ];
        self.list_all::<P>(&format!("GET {path}"), path, query)
            .await
            .map_err(|e| self.in_schema(e, catalog, schema))
    }

    /// Adds catalog/schema context (and the GRANT fix) to a permission or not-found error.
    pub(crate) fn in_schema(
        &self,
        e: DatabricksError,
        catalog: &str,
        schema: &str,
    ) -> DatabricksError {
        match e {
            DatabricksError::PermissionDenied { detail, .. } => DatabricksError::PermissionDenied {
                object: format!("catalog/schema {catalog}.{schema}"),
                detail,
                fix: grants_fix(catalog, schema, &self.principal()),
            },
            DatabricksError::NotFound {
                error_code,
                message,
                ..
            } => {
                let fix = if error_code == "METASTORE_DOES_NOT_EXIST" {
                    "Unity Catalog is not enabled for this workspace (no metastore is assigned \
                     to it): an account admin must assign a Unity Catalog metastore to the \
                     workspace (account console > Catalog > the metastore > Workspaces > \
                     Assign); inference tables and agents live in Unity Catalog"
                        .to_string()
                } else if error_code == "CATALOG_DOES_NOT_EXIST" {
                    format!("catalog '{catalog}' does not exist: set DATABRICKS_CATALOG to an existing catalog (SHOW CATALOGS;)")
                } else if error_code == "SCHEMA_DOES_NOT_EXIST" {
                    format!(
                        "schema '{schema}' does not exist in catalog '{catalog}': set DATABRICKS_SCHEMA (SHOW SCHEMAS IN {};)",
                        super::error::quote_ident(catalog)
                    )
                } else {
                    format!("check DATABRICKS_CATALOG ({catalog}) and DATABRICKS_SCHEMA ({schema})")
                };
                DatabricksError::NotFound {
                    object: format!("{catalog}.{schema}"),
                    error_code,
                    message,
                    fix,
                }
            }
            other => other,
        }
    }

    /// Every table of `catalog.schema`.
    pub async fn list_tables(
        &self,
        catalog: &str,
        schema: &str,
    ) -> Result<Vec<TableInfo>, DatabricksError> {
        self.list_in_schema::<TablesPage>("/api/2.1/unity-catalog/tables", catalog, schema)
            .await
    }

    /// Registered models of `catalog.schema`.
    pub async fn list_models(
        &self,
        catalog: &str,
        schema: &str,
    ) -> Result<Vec<RegisteredModel>, DatabricksError> {
        self.list_in_schema::<ModelsPage>("/api/2.1/unity-catalog/models", catalog, schema)
            .await
    }

    /// One registered model: answers `PermissionDenied` when the principal may not EXECUTE it
    /// (the listing leaves such a model out instead), `NotFound` when it does not exist.
    pub async fn get_model(&self, full_name: &str) -> Result<RegisteredModel, DatabricksError> {
        self.api
            .request(
                Method::GET,
                "GET /api/2.1/unity-catalog/models/{name}",
                &format!(
                    "/api/2.1/unity-catalog/models/{}",
                    encode_segment(full_name)
                ),
                &[],
                None,
            )
            .await
    }

    /// Versions of one registered model.
    pub async fn list_model_versions(
        &self,
        full_name: &str,
    ) -> Result<Vec<ModelVersion>, DatabricksError> {
        self.list_all::<VersionsPage>(
            "GET /api/2.1/unity-catalog/models/{name}/versions",
            &model_versions_path(full_name),
            Vec::new(),
        )
        .await
    }

    /// UC functions of `catalog.schema` (agent tools).
    pub async fn list_functions(
        &self,
        catalog: &str,
        schema: &str,
    ) -> Result<Vec<FunctionInfo>, DatabricksError> {
        self.list_in_schema::<FunctionsPage>("/api/2.1/unity-catalog/functions", catalog, schema)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_one_encoded_path_segment() {
        assert_eq!(
            model_versions_path("main.agents.support_bot"),
            "/api/2.1/unity-catalog/models/main.agents.support_bot/versions"
        );
        assert_eq!(
            model_versions_path("main.agents.bot #1?v=2%/x y"),
            "/api/2.1/unity-catalog/models/main.agents.bot%20%231%3Fv%3D2%25%2Fx%20y/versions"
        );
        // The encoded path is a valid URL whose path keeps the name in one segment.
        let url = url::Url::parse(&format!(
            "https://adb-1.azuredatabricks.net{}",
            model_versions_path("c.s.a#b?c")
        ))
        .unwrap();
        assert_eq!(url.query(), None);
        assert_eq!(url.fragment(), None);
        assert_eq!(url.path_segments().unwrap().count(), 6);
    }

    #[test]
    fn schema_fixes_quote_a_hyphenated_catalog() {
        let host = url::Url::parse("https://adb-1.azuredatabricks.net").unwrap();
        let client = DatabricksClient::new(
            &host,
            crate::databricks::Credentials::OAuth {
                client_id: "sp-1".into(),
                client_secret: secrecy::SecretString::from("unused"),
            },
            crate::databricks::ClientOptions::default(),
        )
        .unwrap();
        let missing = DatabricksError::NotFound {
            object: String::new(),
            error_code: "SCHEMA_DOES_NOT_EXIST".into(),
            message: String::new(),
            fix: String::new(),
        };
        let text = client.in_schema(missing, "prod-agents", "ai").to_string();
        assert!(text.contains("SHOW SCHEMAS IN `prod-agents`;"), "{text}");
        let denied = DatabricksError::PermissionDenied {
            object: String::new(),
            detail: String::new(),
            fix: String::new(),
        };
        let text = client.in_schema(denied, "prod-agents", "ai").to_string();
        assert!(
            text.contains("GRANT USE CATALOG ON CATALOG `prod-agents` TO `sp-1`;"),
            "{text}"
        );
    }
}
