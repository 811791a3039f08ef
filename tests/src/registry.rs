//! The stack's schema registry (Apicurio Registry, through its Confluent-compatible API),
//! as the tests see it: what a subject holds, and registrations made behind Sluice's back.

use serde_json::{json, Value};

/// The Confluent API of the stack's registry.
pub struct StackRegistry {
    url: String,
    client: reqwest::Client,
}

impl Default for StackRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl StackRegistry {
    /// The registry named by the stack's settings.
    pub fn new() -> Self {
        Self {
            url: crate::stack_var("SLUICE_STACK_REGISTRY_URL"),
            client: reqwest::Client::new(),
        }
    }

    /// Its base URL (`…/apis/ccompat/v7`).
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The schema ids of `subject`'s versions, oldest first (none if it has none).
    pub async fn ids(&self, subject: &str) -> Vec<u32> {
        let url = format!("{}/subjects/{subject}/versions", self.url);
        let answer = self.client.get(&url).send().await.unwrap();
        if answer.status() == reqwest::StatusCode::NOT_FOUND {
            return Vec::new();
        }
        let versions: Vec<u64> = answer.error_for_status().unwrap().json().await.unwrap();
        let mut ids = Vec::new();
        for v in versions {
            let one = answer_of(self.client.get(format!("{url}/{v}"))).await;
            ids.push(one["id"].as_u64().unwrap() as u32);
        }
        ids
    }

    /// Register the Avro schema `text` under `subject` as another writer would; its id.
    pub async fn register(&self, subject: &str, text: &str) -> u32 {
        let request = self
            .client
            .post(format!("{}/subjects/{subject}/versions", self.url))
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .json(&json!({ "schema": text }));
        answer_of(request).await["id"].as_u64().unwrap() as u32
    }
}

/// The JSON answer to `request`, which must succeed.
async fn answer_of(request: reqwest::RequestBuilder) -> Value {
    let answer = request.send().await.unwrap().error_for_status().unwrap();
    answer.json().await.unwrap()
}
