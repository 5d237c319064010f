//! The DigitalOcean API (`https://api.digitalocean.com`, paths under `/v2`): droplets, account
//! ssh keys, tags.
//!
//! Droplets have tags, not labels. A label `key=value` is the tag `key:value` (tags allow
//! `[A-Za-z0-9_:-]`), except seed `001_…`'s two fixed tags: `ci` and `namespace-<ns>`; a tag of
//! the user's is a label with an empty value. `POST /v2/droplets` answers 202 (accepted, not
//! done) with action links; the driver polls the droplet until it is `active` with a public
//! IPv4. Changing tags is one request per tag added or removed, after a read of the current
//! ones. Two claimers writing `ci-claim:<token>` both leave their tag; every reader takes the
//! smallest token as the claim, so both re-reads agree on one winner.

use async_trait::async_trait;
use reqwest::Method;
use serde_json::{Value, json};

use crate::CloudError;
use crate::api::Api;
use crate::provider::{Labels, Provider, Server, ServerRequest, SshKey, label};

/// Page size of list requests (DigitalOcean's maximum is 200).
const PER_PAGE: u32 = 200;

#[derive(Debug)]
pub(crate) struct DigitalOcean {
    pub(crate) api: Api,
}

/// The tag of one label.
pub(crate) fn tag_of(key: &str, value: &str) -> String {
    match (key, value) {
        (label::CI, _) => label::CI.to_owned(),
        (label::NAMESPACE, namespace) => format!("namespace-{namespace}"),
        (tag, "") => tag.to_owned(),
        (key, value) => format!("{key}:{value}"),
    }
}

/// The labels of a droplet's tags (see the module comment).
pub(crate) fn labels_of(tags: &[String]) -> Labels {
    let mut labels = Labels::new();
    for tag in tags {
        let (key, value) = if tag == label::CI {
            (label::CI.to_owned(), "true".to_owned())
        } else if let Some(namespace) = tag.strip_prefix("namespace-") {
            (label::NAMESPACE.to_owned(), namespace.to_owned())
        } else if let Some((key, value)) = tag.split_once(':') {
            (key.to_owned(), value.to_owned())
        } else {
            (tag.clone(), String::new())
        };
        match labels.get(&key) {
            // Racing claims: the smallest token is the claim, for every reader alike.
            Some(existing) if key == label::CLAIM && existing.as_str() <= value.as_str() => {}
            _ => {
                labels.insert(key, value);
            }
        }
    }
    labels
}

fn id_of(value: &Value) -> Option<String> {
    value["id"].as_u64().map(|id| id.to_string())
}

impl DigitalOcean {
    fn droplet_of(&self, value: &Value, action: &str) -> Result<(Server, Vec<String>), CloudError> {
        let id =
            id_of(value).ok_or_else(|| self.api.protocol(action, "a droplet without an `id`"))?;
        let tags: Vec<String> = value["tags"]
            .as_array()
            .map(|tags| {
                tags.iter()
                    .filter_map(|tag| tag.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let address = value["networks"]["v4"].as_array().and_then(|networks| {
            networks
                .iter()
                .find(|network| network["type"] == "public")
                .and_then(|network| network["ip_address"].as_str())
                .map(str::to_owned)
        });
        Ok((
            Server {
                id,
                name: value["name"].as_str().unwrap_or_default().to_owned(),
                running: value["status"] == "active",
                address,
                labels: labels_of(&tags),
            },
            tags,
        ))
    }

    /// Every page of a list request.
    async fn list(
        &self,
        path: &str,
        field: &str,
        query: Vec<(&str, String)>,
        action: &str,
    ) -> Result<Vec<Value>, CloudError> {
        let mut items = Vec::new();
        let mut page = 1u64;
        loop {
            let mut paged = query.clone();
            paged.push(("per_page", PER_PAGE.to_string()));
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
            if body["links"]["pages"]["next"].as_str().is_none() || found.is_empty() {
                return Ok(items);
            }
            page += 1;
        }
    }

    async fn droplet(&self, id: &str) -> Result<Option<(Server, Vec<String>)>, CloudError> {
        let action = format!("read droplet {id}");
        match self
            .api
            .call(
                Method::GET,
                &format!("/v2/droplets/{id}"),
                &[],
                None,
                &action,
                true,
            )
            .await?
        {
            Some(answer) => Ok(Some(self.droplet_of(&answer["droplet"], &action)?)),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl Provider for DigitalOcean {
    fn driver(&self) -> &'static str {
        "digitalocean"
    }

    async fn create_key(&self, name: &str, public_key: &str) -> Result<SshKey, CloudError> {
        let action = format!("create ssh key `{name}`");
        let body = json!({"name": name, "public_key": public_key});
        let answer = self
            .api
            .call(
                Method::POST,
                "/v2/account/keys",
                &[],
                Some(&body),
                &action,
                false,
            )
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
            .list("/v2/account/keys", "ssh_keys", Vec::new(), "list ssh keys")
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
            .delete(&format!("/v2/account/keys/{}", key.id), &action)
            .await
    }

    async fn create_server(&self, request: &ServerRequest) -> Result<Server, CloudError> {
        let action = format!("create droplet `{}`", request.name);
        let tags: Vec<String> = request
            .labels
            .iter()
            .map(|(key, value)| tag_of(key, value))
            .chain(request.user_tags.iter().cloned())
            .collect();
        let ssh_key: u64 = request.ssh_key.id.parse().map_err(|_| {
            self.api.protocol(
                &action,
                format!("ssh key id `{}` is not a number", request.ssh_key.id),
            )
        })?;
        let body = json!({
            "name": request.name,
            "region": request.location,
            "size": request.size,
            "image": request.image,
            "ssh_keys": [ssh_key],
            "tags": tags,
            "ipv6": true,
        });
        let answer = self
            .api
            .call(
                Method::POST,
                "/v2/droplets",
                &[],
                Some(&body),
                &action,
                false,
            )
            .await?
            .unwrap_or_default();
        Ok(self.droplet_of(&answer["droplet"], &action)?.0)
    }

    async fn server(&self, id: &str) -> Result<Option<Server>, CloudError> {
        Ok(self.droplet(id).await?.map(|(server, _)| server))
    }

    async fn servers(&self, labels: &[(&str, &str)]) -> Result<Vec<Server>, CloudError> {
        let action = "list droplets";
        let mut query = Vec::new();
        if let Some((key, value)) = labels.first() {
            query.push(("tag_name", tag_of(key, value)));
        }
        let found = self.list("/v2/droplets", "droplets", query, action).await?;
        let mut servers = Vec::new();
        for droplet in &found {
            let (server, _) = self.droplet_of(droplet, action)?;
            if labels
                .iter()
                .all(|(key, value)| server.label(key) == Some(value))
            {
                servers.push(server);
            }
        }
        Ok(servers)
    }

    async fn set_labels(&self, server: &Server, labels: &Labels) -> Result<(), CloudError> {
        let action = format!("tag droplet `{}`", server.name);
        let Some((_, current)) = self.droplet(&server.id).await? else {
            return Err(self.api.protocol(&action, "the droplet is gone"));
        };
        let wanted: Vec<String> = labels
            .iter()
            .map(|(key, value)| tag_of(key, value))
            .collect();
        let resources =
            json!({"resources": [{"resource_id": server.id, "resource_type": "droplet"}]});
        for tag in wanted.iter().filter(|tag| !current.contains(tag)) {
            self.api
                .call(
                    Method::POST,
                    "/v2/tags",
                    &[],
                    Some(&json!({"name": tag})),
                    &action,
                    false,
                )
                .await?;
            self.api
                .call(
                    Method::POST,
                    &format!("/v2/tags/{tag}/resources"),
                    &[],
                    Some(&resources),
                    &action,
                    false,
                )
                .await?;
        }
        for tag in current.iter().filter(|tag| !wanted.contains(tag)) {
            // Another claimer's token stays: removing it could make two winners.
            if tag.starts_with(&format!("{}:", label::CLAIM)) && labels.get(label::CLAIM).is_some()
            {
                continue;
            }
            self.api
                .call(
                    Method::DELETE,
                    &format!("/v2/tags/{tag}/resources"),
                    &[],
                    Some(&resources),
                    &action,
                    true,
                )
                .await?;
        }
        Ok(())
    }

    async fn delete_server(&self, id: &str) -> Result<(), CloudError> {
        let action = format!("delete droplet {id}");
        self.api
            .delete(&format!("/v2/droplets/{id}"), &action)
            .await
    }

    fn requests(&self) -> u64 {
        self.api.requests()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_tags_round_trip() {
        let tags: Vec<String> = [
            "ci",
            "namespace-my-ns",
            "ci-worker:ab12",
            "ci-worker-status:busy",
            "prod",
        ]
        .map(str::to_owned)
        .to_vec();
        let labels = labels_of(&tags);
        assert_eq!(labels.get("ci").map(String::as_str), Some("true"));
        assert_eq!(labels.get("namespace").map(String::as_str), Some("my-ns"));
        assert_eq!(
            labels.get("ci-worker-status").map(String::as_str),
            Some("busy")
        );
        assert_eq!(labels.get("prod").map(String::as_str), Some(""));
        let mut again: Vec<String> = labels
            .iter()
            .map(|(key, value)| tag_of(key, value))
            .collect();
        again.sort();
        let mut tags = tags;
        tags.sort();
        assert_eq!(again, tags);
    }

    #[test]
    fn racing_claims_resolve_to_the_smallest_token_for_every_reader() {
        let one = labels_of(&["ci-claim:bbb".to_owned(), "ci-claim:aaa".to_owned()]);
        let other = labels_of(&["ci-claim:aaa".to_owned(), "ci-claim:bbb".to_owned()]);
        assert_eq!(one.get("ci-claim").map(String::as_str), Some("aaa"));
        assert_eq!(other.get("ci-claim").map(String::as_str), Some("aaa"));
    }
}
