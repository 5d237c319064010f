//! Hetzner Cloud's servers and ssh keys, with label selectors and pagination.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::openapi::Spec;
use crate::server::{Answer, FakeKey, FakeServer, State0, authorize, page, revoke};

/// Server types the fake knows (the seeds' table and its neighbours).
const SERVER_TYPES: &[&str] = &[
    "cx22", "cx23", "cx32", "cx33", "cx42", "cx43", "cx52", "cx53", "cpx11", "cax11",
];

fn error(status: u16, code: &str, message: &str) -> Answer {
    Answer::error(crate::Api::Hetzner, status, code, message)
}

fn now() -> String {
    "2026-12-03T08:00:00+00:00".to_owned()
}

/// Whether `labels` match a Hetzner label selector: comma-separated `k=v`, `k==v`, `k!=v`,
/// `k`, `!k`.
pub fn matches(labels: &BTreeMap<String, String>, selector: &str) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .all(|term| {
            if let Some((key, value)) = term.split_once("!=") {
                labels.get(key.trim()).map(String::as_str) != Some(value.trim())
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                labels.get(key.trim()).map(String::as_str) == Some(value.trim())
            } else if let Some(key) = term.strip_prefix('!') {
                !labels.contains_key(key.trim())
            } else {
                labels.contains_key(term)
            }
        })
}

fn query<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Writes the labels (and status) into the API object.
pub(crate) fn sync(server: &mut FakeServer) {
    server.object["labels"] = json!(server.labels);
    server.object["name"] = json!(server.name);
}

fn action(state: &mut State0, command: &str, server: u64) -> Value {
    json!({
        "id": state.next_id(),
        "command": command,
        "status": "running",
        "progress": 0,
        "started": now(),
        "finished": null,
        "resources": [{"id": server, "type": "server"}],
        "error": null,
    })
}

fn list(items: Vec<Value>, field: &str, query: &[(String, String)]) -> Answer {
    let (items, page_number, per_page, total) = page(items, query, 25);
    let last = total.div_ceil(per_page).max(1);
    Answer::json(
        200,
        json!({
            field: items,
            "meta": {"pagination": {
                "page": page_number,
                "per_page": per_page,
                "previous_page": if page_number > 1 { json!(page_number - 1) } else { Value::Null },
                "next_page": if page_number < last { json!(page_number + 1) } else { Value::Null },
                "last_page": last,
                "total_entries": total,
            }},
        }),
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
    let id: Option<u64> = path.rsplit('/').next().and_then(|last| last.parse().ok());
    match (method, template) {
        ("POST", "/ssh_keys") => {
            let name = body["name"].as_str().unwrap_or_default().to_owned();
            let public_key = body["public_key"]
                .as_str()
                .unwrap_or_default()
                .trim()
                .to_owned();
            if state.keys.values().any(|key| key.name == name) {
                return error(
                    409,
                    "uniqueness_error",
                    "SSH key with the same name already exists",
                );
            }
            if state.keys.values().any(|key| key.public_key == public_key) {
                return error(
                    409,
                    "uniqueness_error",
                    "SSH key with the same fingerprint already exists",
                );
            }
            let id = state.next_id();
            let mut object = spec.sample("/components/schemas/ssh_key");
            object["id"] = json!(id);
            object["name"] = json!(name);
            object["public_key"] = json!(public_key);
            object["labels"] = body.get("labels").cloned().unwrap_or_else(|| json!({}));
            object["created"] = json!(now());
            object["fingerprint"] = json!(format!("fake:{id}"));
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
        ("GET", "/ssh_keys") => {
            let selector = query(params, "label_selector").unwrap_or_default();
            let name = query(params, "name");
            let items = state
                .keys
                .values()
                .filter(|key| name.is_none_or(|name| key.name == name))
                .filter(|key| {
                    let labels: BTreeMap<String, String> =
                        serde_json::from_value(key.object["labels"].clone()).unwrap_or_default();
                    matches(&labels, selector)
                })
                .map(|key| key.object.clone())
                .collect();
            list(items, "ssh_keys", params)
        }
        ("DELETE", "/ssh_keys/{id}") => match id.and_then(|id| state.keys.remove(&id)) {
            Some(_) => Answer::empty(204),
            None => error(404, "not_found", "SSH key not found"),
        },
        ("POST", "/servers") => create_server(state, spec, &body),
        ("GET", "/servers") => {
            let selector = query(params, "label_selector").unwrap_or_default();
            let name = query(params, "name");
            let items = state
                .servers
                .values()
                .filter(|server| matches(&server.labels, selector))
                .filter(|server| name.is_none_or(|name| server.name == name))
                .map(|server| server.object.clone())
                .collect();
            list(items, "servers", params)
        }
        ("GET", "/servers/{id}") => {
            let boot_polls = state.options.boot_polls;
            match id.and_then(|id| state.servers.get_mut(&id)) {
                Some(server) => {
                    server.polls += 1;
                    if server.polls > boot_polls {
                        server.object["status"] = json!("running");
                    }
                    Answer::json(200, json!({"server": server.object}))
                }
                None => error(404, "not_found", "server not found"),
            }
        }
        ("PUT", "/servers/{id}") => match id.and_then(|id| state.servers.get_mut(&id)) {
            Some(server) => {
                if let Some(labels) = body.get("labels") {
                    server.labels = serde_json::from_value(labels.clone()).unwrap_or_default();
                }
                if let Some(name) = body["name"].as_str() {
                    server.name = name.to_owned();
                }
                sync(server);
                Answer::json(200, json!({"server": server.object}))
            }
            None => error(404, "not_found", "server not found"),
        },
        ("DELETE", "/servers/{id}") => match id.and_then(|id| state.servers.remove(&id)) {
            Some(server) => {
                revoke(state, &server.public_keys);
                let action = action(state, "delete_server", server.id);
                Answer::json(200, json!({"action": action}))
            }
            None => error(404, "not_found", "server not found"),
        },
        _ => error(
            404,
            "not_found",
            &format!("the fake does not serve {method} {template}"),
        ),
    }
}

fn create_server(state: &mut State0, spec: &Spec, body: &Value) -> Answer {
    let name = body["name"].as_str().unwrap_or_default().to_owned();
    let server_type = body["server_type"].as_str().unwrap_or_default();
    if !SERVER_TYPES.contains(&server_type) {
        return error(
            422,
            "invalid_input",
            &format!("server type {server_type} not found"),
        );
    }
    if state.servers.values().any(|server| server.name == name) {
        return error(409, "uniqueness_error", "server name is already used");
    }
    let mut public_keys = Vec::new();
    for wanted in body["ssh_keys"].as_array().into_iter().flatten() {
        let wanted = wanted
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| wanted.to_string());
        match state
            .keys
            .values()
            .find(|key| key.name == wanted || key.id.to_string() == wanted)
        {
            Some(key) => public_keys.push(key.public_key.clone()),
            None => return error(422, "invalid_input", &format!("ssh key {wanted} not found")),
        }
    }
    let id = state.next_id();
    let labels: BTreeMap<String, String> =
        serde_json::from_value(body["labels"].clone()).unwrap_or_default();
    let mut object = spec.sample("/components/schemas/server");
    object["id"] = json!(id);
    object["status"] = json!("initializing");
    object["created"] = json!(now());
    object["public_net"]["ipv4"] = json!({
        "id": id,
        "ip": state.options.server_address,
        "blocked": false,
        "dns_ptr": format!("static.{id}.fake"),
    });
    object["server_type"]["name"] = json!(server_type);
    if let Some(location) = body["location"].as_str() {
        object["location"]["name"] = json!(location);
    }
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
    let action = action(state, "create_server", id);
    Answer::json(
        201,
        json!({"server": object, "action": action, "next_actions": [], "root_password": null}),
    )
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn label_selectors() {
        let labels = [("ci", "true"), ("ci-worker", "ab")]
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .into_iter()
            .collect();
        for (selector, want) in [
            ("", true),
            ("ci=true", true),
            ("ci==true", true),
            ("ci=true,ci-worker=ab", true),
            ("ci=true,ci-worker=cd", false),
            ("ci-worker!=cd", true),
            ("ci", true),
            ("!ci", false),
            ("!other", true),
        ] {
            assert_eq!(matches(&labels, selector), want, "{selector}");
        }
    }
}
