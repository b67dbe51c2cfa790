//! Model Serving: the endpoints agents and LLMs run behind, with their inference-table settings.

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::{DatabricksClient, DatabricksError};

/// Where an endpoint logs its requests (AI Gateway `inference_table_config` or legacy
/// `auto_capture_config`). The table is `{catalog}.{schema}.{table_name_prefix}_payload`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct InferenceTableConfig {
    #[serde(default)]
    pub catalog_name: Option<String>,
    #[serde(default)]
    pub schema_name: Option<String>,
    #[serde(default)]
    pub table_name_prefix: Option<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
}

impl InferenceTableConfig {
    /// The payload table's full name, when the config names one and is not disabled.
    pub fn payload_table(&self) -> Option<String> {
        if self.enabled == Some(false) {
            return None;
        }
        Some(format!(
            "{}.{}.{}_payload",
            self.catalog_name.as_deref()?,
            self.schema_name.as_deref()?,
            self.table_name_prefix.as_deref()?
        ))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AiGateway {
    #[serde(default)]
    pub inference_table_config: Option<InferenceTableConfig>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExternalModel {
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FoundationModel {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
}

/// One model or agent an endpoint serves.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServedEntity {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub entity_name: Option<String>,
    #[serde(default, deserialize_with = "opt_string_or_number")]
    pub entity_version: Option<String>,
    #[serde(default)]
    pub external_model: Option<ExternalModel>,
    #[serde(default)]
    pub foundation_model: Option<FoundationModel>,
    /// Legacy `served_models` entries name the model here.
    #[serde(default)]
    pub model_name: Option<String>,
    #[serde(default, deserialize_with = "opt_string_or_number")]
    pub model_version: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EndpointConfig {
    #[serde(default)]
    pub served_entities: Vec<ServedEntity>,
    #[serde(default)]
    pub served_models: Vec<ServedEntity>,
    #[serde(default)]
    pub auto_capture_config: Option<InferenceTableConfig>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EndpointState {
    #[serde(default)]
    pub ready: Option<String>,
    #[serde(default)]
    pub config_update: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tag {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
}

/// A serving endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServingEndpoint {
    pub name: String,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub state: Option<EndpointState>,
    #[serde(default)]
    pub config: Option<EndpointConfig>,
    /// The config being deployed. While an endpoint is first created (`NOT_READY`) it has no
    /// `config` yet: its served entities and legacy auto-capture settings are only here.
    #[serde(default)]
    pub pending_config: Option<EndpointConfig>,
    #[serde(default)]
    pub task: Option<String>,
    #[serde(default)]
    pub tags: Vec<Tag>,
    #[serde(default)]
    pub creator: Option<String>,
    #[serde(default)]
    pub creation_timestamp: Option<i64>,
    #[serde(default)]
    pub ai_gateway: Option<AiGateway>,
}

impl ServingEndpoint {
    /// The config in effect: `config`, else (an endpoint being created) `pending_config`.
    pub fn effective_config(&self) -> Option<&EndpointConfig> {
        self.config.as_ref().or(self.pending_config.as_ref())
    }

    /// Served entities, new-style or legacy, of [`Self::effective_config`].
    pub fn served(&self) -> impl Iterator<Item = &ServedEntity> {
        self.effective_config()
            .into_iter()
            .flat_map(|c| c.served_entities.iter().chain(c.served_models.iter()))
    }

    /// The inference table this endpoint logs to: AI Gateway first, then legacy auto-capture
    /// (of [`Self::effective_config`]).
    pub fn inference_table(&self) -> Option<String> {
        self.ai_gateway
            .as_ref()
            .and_then(|g| g.inference_table_config.as_ref())
            .and_then(|c| c.payload_table())
            .or_else(|| {
                self.effective_config()
                    .and_then(|c| c.auto_capture_config.as_ref())
                    .and_then(|c| c.payload_table())
            })
    }
}

#[derive(Deserialize)]
struct EndpointList {
    #[serde(default)]
    endpoints: Vec<ServingEndpoint>,
}

fn opt_string_or_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    })
}

impl DatabricksClient {
    /// All serving endpoints of the workspace (the list omits legacy auto-capture settings).
    pub async fn list_serving_endpoints(&self) -> Result<Vec<ServingEndpoint>, DatabricksError> {
        let list: EndpointList = self
            .api
            .request(
                Method::GET,
                "GET /api/2.0/serving-endpoints",
                "/api/2.0/serving-endpoints",
                &[],
                None,
            )
            .await
            .map_err(|e| match e {
                DatabricksError::PermissionDenied { detail, .. } => DatabricksError::PermissionDenied {
                    object: "serving endpoints".into(),
                    detail,
                    fix: "give the service principal CAN VIEW (or higher) on the serving endpoints of its agents".into(),
                },
                other => other,
            })?;
        Ok(list.endpoints)
    }

    /// One endpoint with its full config (including legacy `auto_capture_config`).
    pub async fn get_serving_endpoint(
        &self,
        name: &str,
    ) -> Result<ServingEndpoint, DatabricksError> {
        self.api
            .request(
                Method::GET,
                "GET /api/2.0/serving-endpoints/{name}",
                &format!(
                    "/api/2.0/serving-endpoints/{}",
                    crate::traffic::host::encode_segment(name)
                ),
                &[],
                None,
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_being_created_is_read_from_its_pending_config() {
        let ep: ServingEndpoint = serde_json::from_value(serde_json::json!({
            "name": "agents_main-prod-bot",
            "state": {"ready": "NOT_READY", "config_update": "IN_PROGRESS"},
            "task": "agent/v1/chat",
            "pending_config": {
                "served_models": [{"model_name": "main.prod.bot", "model_version": 3}],
                "auto_capture_config": {"catalog_name": "main", "schema_name": "prod",
                    "table_name_prefix": "bot", "enabled": true},
                "config_version": 1
            }
        }))
        .unwrap();
        let served: Vec<_> = ep.served().collect();
        assert_eq!(served.len(), 1);
        assert_eq!(served[0].model_name.as_deref(), Some("main.prod.bot"));
        assert_eq!(served[0].model_version.as_deref(), Some("3"));
        assert_eq!(
            ep.inference_table().as_deref(),
            Some("main.prod.bot_payload")
        );
    }

    #[test]
    fn the_config_in_effect_wins_over_the_pending_one() {
        let ep: ServingEndpoint = serde_json::from_value(serde_json::json!({
            "name": "bot",
            "config": {
                "served_entities": [{"entity_name": "main.prod.bot", "entity_version": "2"}],
                "auto_capture_config": {"catalog_name": "main", "schema_name": "prod",
                    "table_name_prefix": "bot"}
            },
            "pending_config": {
                "served_entities": [{"entity_name": "main.prod.bot", "entity_version": "3"}],
                "auto_capture_config": {"catalog_name": "main", "schema_name": "next",
                    "table_name_prefix": "bot"}
            }
        }))
        .unwrap();
        let versions: Vec<_> = ep
            .served()
            .filter_map(|s| s.entity_version.as_deref())
            .collect();
        assert_eq!(versions, ["2"]);
        assert_eq!(
            ep.inference_table().as_deref(),
            Some("main.prod.bot_payload")
        );
        // Neither config: nothing served, no table.
        let bare: ServingEndpoint =
            serde_json::from_value(serde_json::json!({"name": "x"})).unwrap();
        assert_eq!(bare.served().count(), 0);
        assert_eq!(bare.inference_table(), None);
    }
}
