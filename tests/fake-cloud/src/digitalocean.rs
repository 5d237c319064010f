//! DigitalOcean's droplets, account ssh keys and tags.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::openapi::Spec;
use crate::server::{Answer, FakeKey, FakeServer, State0, authorize, page, revoke};

/// The paths of the spec the fake serves (and checks).
pub(crate) const PATHS: &[&str] = &[
    "/v2/account/keys",
    "/v2/account/keys/{ssh_key_identifier}",
    "/v2/droplets",
    "/v2/droplets/{droplet_id}",
    "/v2/tags",
    "/v2/tags/{tag_id}/resources",
];

const SIZES: &[&str] = &[
    "s-1vcpu-1gb",
    "s-1vcpu-2gb",
    "s-2vcpu-2gb",
    "s-2vcpu-4gb",
    "s-4vcpu-8gb",
    "s-8vcpu-16gb",
];

const DROPLET: &str = "/paths/~1v2~1droplets~1{droplet_id}/get/responses/200/content/application~1json/schema/properties/droplet";

fn error(status: u16, id: &str, message: &str) -> Answer {
    Answer::error(crate::Api::DigitalOcean, status, id, message)
}

/// Writes the tags into the API object.
pub(crate) fn sync(server: &mut FakeServer) {
    server.object["tags"] = json!(server.labels.keys().collect::<Vec<_>>());
}

fn query<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

fn list(items: Vec<Value>, field: &str, query: &[(String, String)]) -> Answer {
    let (items, page_number, per_page, total) = page(items, query, 20);
    let mut pages = serde_json::Map::new();
    if page_number * per_page < total {
        pages.insert(
            "next".to_owned(),
            json!(format!(
                "https://api.digitalocean.com/v2/{field}?page={}",
                page_number + 1
            )),
        );
    }
    Answer::json(
        200,
        json!({field: items, "links": {"pages": pages}, "meta": {"total": total}}),
    )
}

pub(crate) fn handle(
    state: &mut State0,
    spec: &Spec,
    method: &str,
    template: &str,
    path: &str,
    params: &[(String, String)],
    body: Option<Value>,
) -> Answer {
    let body = body.unwrap_or_default();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let id: Option<u64> = segments.get(2).and_then(|id| id.parse().ok());
    match (method, template) {
        ("POST", "/v2/account/keys") => {
            let name = body["name"].as_str().unwrap_or_default().to_owned();
            let public_key = body["public_key"]
                .as_str()
                .unwrap_or_default()
                .trim()
                .to_owned();
            if state.keys.values().any(|key| key.public_key == public_key) {
                return error(
                    422,
                    "unprocessable_entity",
                    "SSH Key is already in use on your account",
                );
            }
            let id = state.next_id();
            let object = json!({"id": id, "fingerprint": format!("fa:ke:{id}"), "public_key": public_key, "name": name});
            state.keys.insert(
                id,
                FakeKey {
                    id,
                    name,
                    public_key,
                    object: object.clone(),
                },
            );
            Answer::json(201, json!({"ssh_key": object}))
        }
        ("GET", "/v2/account/keys") => {
            let items = state.keys.values().map(|key| key.object.clone()).collect();
            list(items, "ssh_keys", params)
        }
        ("DELETE", "/v2/account/keys/{ssh_key_identifier}") => {
            let wanted = segments.get(3).copied().unwrap_or_default();
            let found = state
                .keys
                .values()
                .find(|key| key.id.to_string() == wanted || key.object["fingerprint"] == wanted)
                .map(|key| key.id);
            match found.and_then(|id| state.keys.remove(&id)) {
                Some(_) => Answer::empty(204),
                None => error(
                    404,
                    "not_found",
                    "The resource you were accessing could not be found.",
                ),
            }
        }
        ("POST", "/v2/droplets") => create(state, spec, &body),
        ("GET", "/v2/droplets") => {
            let tag = query(params, "tag_name");
            let items = state
                .servers
                .values()
                .filter(|server| tag.is_none_or(|tag| server.labels.contains_key(tag)))
                .map(|server| server.object.clone())
                .collect();
            list(items, "droplets", params)
        }
        ("GET", "/v2/droplets/{droplet_id}") => {
            let boot_polls = state.options.boot_polls;
            match id.and_then(|id| state.servers.get_mut(&id)) {
                Some(server) => {
                    server.polls += 1;
                    if server.polls > boot_polls {
                        server.object["status"] = json!("active");
                    }
                    Answer::json(200, json!({"droplet": server.object}))
                }
                None => error(
                    404,
                    "not_found",
                    "The resource you were accessing could not be found.",
                ),
            }
        }
        ("DELETE", "/v2/droplets/{droplet_id}") => {
            match id.and_then(|id| state.servers.remove(&id)) {
                Some(server) => {
                    revoke(state, &server.public_keys);
                    Answer::empty(204)
                }
                None => error(
                    404,
                    "not_found",
                    "The resource you were accessing could not be found.",
                ),
            }
        }
        ("POST", "/v2/tags") => {
            let name = body["name"].as_str().unwrap_or_default().to_owned();
            state.tags.insert(name.clone());
            Answer::json(
                201,
                json!({"tag": {"name": name, "resources": {"count": 0, "last_tagged_uri": "", "droplets": {"count": 0, "last_tagged_uri": ""}}}}),
            )
        }
        ("POST" | "DELETE", "/v2/tags/{tag_id}/resources") => {
            let tag = segments.get(2).copied().unwrap_or_default().to_owned();
            if method == "POST" && !state.tags.contains(&tag) {
                return error(404, "not_found", "tag not found");
            }
            for resource in body["resources"].as_array().into_iter().flatten() {
                let Some(id) = resource["resource_id"]
                    .as_str()
                    .and_then(|id| id.parse::<u64>().ok())
                else {
                    continue;
                };
                if let Some(server) = state.servers.get_mut(&id) {
                    if method == "POST" {
                        server.labels.insert(tag.clone(), String::new());
                    } else {
                        server.labels.remove(&tag);
                    }
                    sync(server);
                }
            }
            Answer::empty(204)
        }
        _ => error(
            404,
            "not_found",
            &format!("the fake does not serve {method} {template}"),
        ),
    }
}

fn create(state: &mut State0, spec: &Spec, body: &Value) -> Answer {
    let name = body["name"].as_str().unwrap_or_default().to_owned();
    let size = body["size"].as_str().unwrap_or_default();
    if !SIZES.contains(&size) {
        return error(
            422,
            "unprocessable_entity",
            "You specified an invalid size for Droplet creation.",
        );
    }
    let mut public_keys = Vec::new();
    for wanted in body["ssh_keys"].as_array().into_iter().flatten() {
        let wanted = wanted
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| wanted.to_string());
        match state.keys.values().find(|key| {
            key.id.to_string() == wanted || key.object["fingerprint"] == wanted.as_str()
        }) {
            Some(key) => public_keys.push(key.public_key.clone()),
            None => {
                return error(
                    422,
                    "unprocessable_entity",
                    &format!("ssh key {wanted} not found"),
                );
            }
        }
    }
    let id = state.next_id();
    let labels: BTreeMap<String, String> = body["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|tag| (tag.to_owned(), String::new()))
        .collect();
    for tag in labels.keys() {
        state.tags.insert(tag.clone());
    }
    let mut object = spec.sample(DROPLET);
    object["id"] = json!(id);
    object["name"] = json!(name);
    object["status"] = json!("new");
    object["created_at"] = json!("2026-12-03T08:00:00Z");
    object["networks"] = json!({"v4": [{
        "ip_address": state.options.server_address,
        "netmask": "255.255.255.0",
        "gateway": "127.0.0.1",
        "type": "public",
    }], "v6": []});
    object["size_slug"] = json!(size);
    object["memory"] = json!(1024);
    object["vcpus"] = json!(1);
    object["disk"] = json!(25);
    let mut server = FakeServer {
        id,
        name,
        labels,
        public_keys: public_keys.clone(),
        object,
        polls: 0,
    };
    sync(&mut server);
    authorize(&state.options, &public_keys);
    let object = server.object.clone();
    state.servers.insert(id, server);
    let action = state.next_id();
    Answer::json(
        202,
        json!({"droplet": object, "links": {"actions": [{"id": action, "rel": "create", "href": format!("https://api.digitalocean.com/v2/actions/{action}")}]}}),
    )
}
