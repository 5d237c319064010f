//! The Hetzner Cloud API (`https://api.hetzner.cloud/v1`): servers, ssh keys, label selectors.
//!
//! `POST /servers` answers 201 with the server (already holding its public IPv4) and a create
//! action; the driver then polls `GET /servers/{id}` until `status` is `running` rather than
//! the action, which says nothing about sshd.

use async_trait::async_trait;
use reqwest::Method;
use serde_json::{Value, json};

use crate::CloudError;
use crate::api::Api;
use crate::provider::{Labels, Provider, Server, ServerRequest, SshKey};

/// Page size of list requests (Hetzner's maximum is 50).
const PER_PAGE: u32 = 50;

#[derive(Debug)]
pub(crate) struct Hetzner {
    pub(crate) api: Api,
}

fn id_of(value: &Value) -> Option<String> {
    value["id"].as_u64().map(|id| id.to_string())
}

impl Hetzner {
    fn server_of(&self, value: &Value, action: &str) -> Result<Server, CloudError> {
        let id =
            id_of(value).ok_or_else(|| self.api.protocol(action, "a server without an `id`"))?;
        let labels: Labels = value["labels"]
            .as_object()
            .map(|labels| {
                labels
                    .iter()
                    .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Server {
            id,
            name: value["name"].as_str().unwrap_or_default().to_owned(),
            running: value["status"] == "running",
            address: value["public_net"]["ipv4"]["ip"]
                .as_str()
                .filter(|ip| !ip.is_empty())
                .map(str::to_owned),
            labels,
        })
    }

    /// Every page of a list request.
    async fn list(
        &self,
        path: &str,
        field: &str,
        mut query: Vec<(&str, String)>,
        action: &str,
    ) -> Result<Vec<Value>, CloudError> {
        query.push(("per_page", PER_PAGE.to_string()));
        let mut items = Vec::new();
        let mut page = 1u64;
        loop {
            let mut paged = query.clone();
            paged.push(("page", page.to_string()));
            let body = self
                .api
                .call(Method::GET, path, &paged, None, action, false)
                .await?
                .unwrap_or_default();
            let Some(found) = body[field].as_array() else {
                return Err(self.api.protocol(action, format!("no `{field}` array")));
            };
            items.extend(found.iter().cloned());
            match body["meta"]["pagination"]["next_page"].as_u64() {
                Some(next) if next > page => page = next,
                _ => return Ok(items),
            }
        }
    }
}

/// A Hetzner label selector matching every `(name, value)`.
fn selector(labels: &[(&str, &str)]) -> String {
    labels
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[async_trait]
impl Provider for Hetzner {
    fn driver(&self) -> &'static str {
        "hetzner"
    }

    async fn create_key(&self, name: &str, public_key: &str) -> Result<SshKey, CloudError> {
        let action = format!("create ssh key `{name}`");
        let body = json!({"name": name, "public_key": public_key, "labels": {"ci": "true"}});
        let answer = self
            .api
            .call(Method::POST, "/ssh_keys", &[], Some(&body), &action, false)
            .await?
            .unwrap_or_default();
        let id = id_of(&answer["ssh_key"])
            .ok_or_else(|| self.api.protocol(&action, "no `ssh_key.id`"))?;
        Ok(SshKey {
            id,
            name: name.to_owned(),
        })
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<SshKey>, CloudError> {
        let keys = self
            .list(
                "/ssh_keys",
                "ssh_keys",
                vec![("label_selector", "ci=true".to_owned())],
                "list ssh keys",
            )
            .await?;
        Ok(keys
            .iter()
            .filter_map(|key| {
                let name = key["name"].as_str()?;
                let id = id_of(key)?;
                name.starts_with(prefix).then(|| SshKey {
                    id,
                    name: name.to_owned(),
                })
            })
            .collect())
    }

    async fn delete_key(&self, key: &SshKey) -> Result<(), CloudError> {
        let action = format!("delete ssh key `{}`", key.name);
        self.api
            .delete(&format!("/ssh_keys/{}", key.id), &action)
            .await
    }

    async fn create_server(&self, request: &ServerRequest) -> Result<Server, CloudError> {
        let action = format!("create server `{}`", request.name);
        let body = json!({
            "name": request.name,
            "server_type": request.size,
            "image": request.image,
            "location": request.location,
            "ssh_keys": [request.ssh_key.name],
            "labels": request.labels,
            "start_after_create": true,
            "public_net": {"enable_ipv4": true, "enable_ipv6": true},
        });
        let answer = self
            .api
            .call(Method::POST, "/servers", &[], Some(&body), &action, false)
            .await?
            .unwrap_or_default();
        self.server_of(&answer["server"], &action)
    }

    async fn server(&self, id: &str) -> Result<Option<Server>, CloudError> {
        let action = format!("read server {id}");
        match self
            .api
            .call(
                Method::GET,
                &format!("/servers/{id}"),
                &[],
                None,
                &action,
                true,
            )
            .await?
        {
            Some(answer) => Ok(Some(self.server_of(&answer["server"], &action)?)),
            None => Ok(None),
        }
    }

    async fn servers(&self, labels: &[(&str, &str)]) -> Result<Vec<Server>, CloudError> {
        let action = "list servers";
        let found = self
            .list(
                "/servers",
                "servers",
                vec![("label_selector", selector(labels))],
                action,
            )
            .await?;
        found
            .iter()
            .map(|server| self.server_of(server, action))
            .collect()
    }

    async fn set_labels(&self, server: &Server, labels: &Labels) -> Result<(), CloudError> {
        let action = format!("label server `{}`", server.name);
        self.api
            .call(
                Method::PUT,
                &format!("/servers/{}", server.id),
                &[],
                Some(&json!({"labels": labels})),
                &action,
                false,
            )
            .await?;
        Ok(())
    }

    async fn delete_server(&self, id: &str) -> Result<(), CloudError> {
        let action = format!("delete server {id}");
        self.api.delete(&format!("/servers/{id}"), &action).await
    }

    fn requests(&self) -> u64 {
        self.api.requests()
    }
}

#[cfg(test)]
mod tests {
    use super::selector;

    #[test]
    fn selectors_join_with_commas() {
        assert_eq!(
            selector(&[("ci", "true"), ("ci-worker", "ab12")]),
            "ci=true,ci-worker=ab12"
        );
    }
}
