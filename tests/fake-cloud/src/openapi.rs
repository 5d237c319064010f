//! Requests and responses checked against the providers' published OpenAPI documents
//! (vendored under `openapi/`, copied from `shared/specs/`).
//!
//! A document is loaded into one JSON value: DigitalOcean's many YAML files are bundled by
//! inlining every `$ref` to another file; Hetzner's single file keeps its internal
//! `#/components/…` references. OpenAPI 3.0's `nullable: true` becomes a `null` in the JSON
//! Schema type, and every object schema with `properties` that is not part of an
//! `allOf`/`oneOf`/`anyOf` is closed (`additionalProperties: false`), so a misspelt field fails
//! as a strict API server would fail it. Then, per request, the operation is found by method
//! and path template, its query parameters and JSON body are validated, and so is the body of
//! the response for its status (or its `4xx`/`default` entry).
//!
//! It also makes sample instances of a schema ([`Spec::sample`]): the fake's objects start as
//! the smallest valid instance and get their interesting fields set.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value, json};

/// One provider's document, ready to validate against.
#[derive(Debug)]
pub struct Spec {
    document: Value,
    /// Paths with their templates split, e.g. `["servers", "{id}"]`.
    templates: Vec<(String, Vec<String>)>,
    /// The schema of error bodies for statuses an operation does not list: Fly's spec
    /// documents few (no 404, no `wait`'s 408), while its API answers them all with its
    /// `ErrorResponse`.
    undocumented_errors: Option<&'static str>,
    validators: Mutex<HashMap<String, std::sync::Arc<jsonschema::Validator>>>,
}

/// Where a provider's spec lives in this crate.
pub fn spec_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi")
}

impl Spec {
    /// Hetzner Cloud: one JSON file.
    pub fn hetzner() -> Spec {
        let path = spec_dir().join("hetzner/hcloud.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("read `{}`: {error}", path.display()));
        let document: Value = serde_json::from_str(&text).expect("hcloud.json parses");
        Spec::new(document)
    }

    /// DigitalOcean: the root YAML's paths the driver uses, with every file `$ref` inlined.
    pub fn digitalocean(paths: &[&str]) -> Spec {
        let root_path = spec_dir().join("digitalocean/specification/DigitalOcean-public.v2.yaml");
        let root = load_yaml(&root_path);
        let mut bundled = Map::new();
        for path in paths {
            let item = root["paths"]
                .get(*path)
                .unwrap_or_else(|| panic!("no path `{path}` in the DigitalOcean spec"));
            bundled.insert(
                (*path).to_owned(),
                inline(item, root_path.parent().expect("dir"), &root, 0),
            );
        }
        Spec::new(json!({"openapi": "3.0.0", "paths": bundled}))
    }

    /// Fly Machines: one YAML file with internal references.
    pub fn fly() -> Spec {
        let mut spec = Spec::new(load_yaml(&spec_dir().join("fly/openapi.yaml")));
        spec.undocumented_errors = Some("#/components/schemas/ErrorResponse");
        spec
    }

    fn new(mut document: Value) -> Spec {
        convert(&mut document, false);
        let templates = document["paths"]
            .as_object()
            .map(|paths| {
                paths
                    .keys()
                    .map(|path| {
                        let parts = path
                            .trim_matches('/')
                            .split('/')
                            .map(str::to_owned)
                            .collect();
                        (path.clone(), parts)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Spec {
            document,
            templates,
            undocumented_errors: None,
            validators: Mutex::default(),
        }
    }

    /// The path template `path` matches (`/servers/42` → `/servers/{id}`); literal segments
    /// win over parameters.
    pub fn template(&self, path: &str) -> Option<&str> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        self.templates
            .iter()
            .filter(|(_, template)| {
                template.len() == parts.len()
                    && template
                        .iter()
                        .zip(&parts)
                        .all(|(want, got)| want.starts_with('{') || want == got)
            })
            .min_by_key(|(_, template)| {
                template.iter().filter(|part| part.starts_with('{')).count()
            })
            .map(|(path, _)| path.as_str())
    }

    fn operation(&self, method: &str, template: &str) -> Option<&Value> {
        let operation = &self.document["paths"][template][method.to_ascii_lowercase()];
        (!operation.is_null()).then_some(operation)
    }

    /// Checks a request: a known operation, known query parameters of the right type, and a
    /// JSON body (when the operation takes one) valid against its schema.
    pub fn check_request(
        &self,
        method: &str,
        path: &str,
        query: &[(String, String)],
        body: Option<&Value>,
    ) -> Result<(), String> {
        let template = self
            .template(path)
            .ok_or_else(|| format!("{method} {path}: no such path in the spec"))?;
        let operation = self
            .operation(method, template)
            .ok_or_else(|| format!("{method} {template}: no such operation in the spec"))?;
        let parameters: Vec<&Value> = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(
                self.document["paths"][template]["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten(),
            )
            .map(|parameter| self.resolve(parameter))
            .filter(|parameter| parameter["in"] == "query")
            .collect();
        for (name, value) in query {
            let Some(parameter) = parameters
                .iter()
                .find(|parameter| parameter["name"] == name.as_str())
            else {
                return Err(format!(
                    "{method} {template}: unknown query parameter `{name}`"
                ));
            };
            let schema = &parameter["schema"];
            let typed = match self.resolve(schema)["type"].as_str() {
                Some("integer") => value
                    .parse::<i64>()
                    .map(Value::from)
                    .unwrap_or(json!(value)),
                Some("boolean") => value
                    .parse::<bool>()
                    .map(Value::from)
                    .unwrap_or(json!(value)),
                Some("array") => json!([value]),
                _ => json!(value),
            };
            self.validate(schema, &typed)
                .map_err(|error| format!("{method} {template}: query `{name}={value}`: {error}"))?;
        }
        let schema = &operation["requestBody"]["content"]["application/json"]["schema"];
        match (body, schema.is_null()) {
            (Some(body), false) => self
                .validate(schema, body)
                .map_err(|error| format!("{method} {template}: request body: {error}")),
            (Some(_), true) => Err(format!("{method} {template}: takes no body")),
            (None, false) if operation["requestBody"]["required"] == true => {
                Err(format!("{method} {template}: a body is required"))
            }
            (None, _) => Ok(()),
        }
    }

    /// Checks a response body (`None`: empty) against what the operation documents for
    /// `status`.
    pub fn check_response(
        &self,
        method: &str,
        path: &str,
        status: u16,
        body: Option<&Value>,
    ) -> Result<(), String> {
        let template = self
            .template(path)
            .ok_or_else(|| format!("{method} {path}: no such path"))?;
        let operation = self
            .operation(method, template)
            .ok_or_else(|| format!("{method} {template}: no such operation"))?;
        let responses = &operation["responses"];
        let class = format!("{}XX", status / 100);
        let response = [
            status.to_string(),
            class.clone(),
            class.to_lowercase(),
            "default".to_owned(),
        ]
        .iter()
        .map(|key| &responses[key])
        .find(|response| !response.is_null());
        let error_schema;
        let schema = match (response, self.undocumented_errors) {
            (Some(response), _) => &self.resolve(response)["content"]["application/json"]["schema"],
            (None, Some(pointer)) if status >= 400 => {
                error_schema = json!({"$ref": pointer});
                &error_schema
            }
            (None, _) => {
                return Err(format!(
                    "{method} {template}: status {status} is not documented"
                ));
            }
        };
        match (body, schema.is_null()) {
            (Some(body), false) => self
                .validate(schema, body)
                .map_err(|error| format!("{method} {template} → {status}: {error}")),
            (Some(_), true) => Err(format!(
                "{method} {template} → {status}: documented without a body"
            )),
            (None, false) => Err(format!(
                "{method} {template} → {status}: a body is documented"
            )),
            (None, true) => Ok(()),
        }
    }

    /// Checks that the operation documents an `application/octet-stream` body for `status`.
    pub fn check_raw_response(&self, method: &str, path: &str, status: u16) -> Result<(), String> {
        let template = self
            .template(path)
            .ok_or_else(|| format!("{method} {path}: no such path"))?;
        let operation = self
            .operation(method, template)
            .ok_or_else(|| format!("{method} {template}: no such operation"))?;
        let response = self.resolve(&operation["responses"][status.to_string()]);
        if response["content"]["application/octet-stream"].is_null() {
            return Err(format!(
                "{method} {template} → {status}: no raw (octet-stream) body is documented"
            ));
        }
        Ok(())
    }

    /// The smallest instance of the schema at JSON pointer `pointer` (e.g.
    /// `/components/schemas/server`): required members only, `example`s where the spec has
    /// them, `null` where allowed.
    pub fn sample(&self, pointer: &str) -> Value {
        let schema = self
            .document
            .pointer(pointer)
            .unwrap_or_else(|| panic!("no schema at `{pointer}`"));
        self.sample_of(schema, 0)
    }

    fn sample_of(&self, schema: &Value, depth: usize) -> Value {
        let schema = self.resolve(schema);
        if depth > 12 {
            return Value::Null;
        }
        if let Some(parts) = schema["allOf"].as_array() {
            let mut merged = Map::new();
            for part in parts {
                if let Value::Object(members) = self.sample_of(part, depth + 1) {
                    merged.extend(members);
                }
            }
            return Value::Object(merged);
        }
        if schema["anyOf"]
            .as_array()
            .is_some_and(|options| options.iter().any(|option| option["type"] == "null"))
        {
            return Value::Null;
        }
        if let Some(first) = schema["oneOf"]
            .as_array()
            .or(schema["anyOf"].as_array())
            .and_then(|options| options.first())
        {
            return self.sample_of(first, depth + 1);
        }
        let types: Vec<&str> = match &schema["type"] {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if types.contains(&"null") {
            return Value::Null;
        }
        // Examples of scalars only: an object's example may leave out what its schema requires.
        if !schema["example"].is_null()
            && !schema["example"].is_object()
            && !schema["example"].is_array()
        {
            return schema["example"].clone();
        }
        if let Some(first) = schema["enum"].as_array().and_then(|values| values.first()) {
            return first.clone();
        }
        match types.first().copied() {
            Some("object") | None if schema["properties"].is_object() => {
                let mut object = Map::new();
                for name in schema["required"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    object.insert(
                        name.to_owned(),
                        self.sample_of(&schema["properties"][name], depth + 1),
                    );
                }
                Value::Object(object)
            }
            Some("object") => json!({}),
            Some("array") => json!([]),
            Some("integer") => json!(
                schema["multipleOf"]
                    .as_i64()
                    .or(schema["minimum"].as_i64())
                    .unwrap_or(1)
            ),
            Some("number") => json!(1.0),
            Some("boolean") => json!(false),
            Some("string") if schema["format"] == "date-time" => json!("2026-01-01T00:00:00+00:00"),
            Some("string") => json!("x"),
            _ => Value::Null,
        }
    }

    /// Follows a document-internal `$ref`.
    fn resolve<'a>(&'a self, mut value: &'a Value) -> &'a Value {
        for _ in 0..16 {
            match value["$ref"]
                .as_str()
                .and_then(|reference| reference.strip_prefix('#'))
            {
                Some(pointer) => match self.document.pointer(pointer) {
                    Some(target) => value = target,
                    None => return value,
                },
                None => return value,
            }
        }
        value
    }

    fn validate(&self, schema: &Value, instance: &Value) -> Result<(), String> {
        let key = schema.to_string();
        let validator = {
            let mut validators = self
                .validators
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match validators.get(&key) {
                Some(validator) => validator.clone(),
                None => {
                    let mut root = schema.clone();
                    if let (Value::Object(root), Some(components)) =
                        (&mut root, self.document.get("components"))
                    {
                        root.insert("components".to_owned(), components.clone());
                    }
                    let validator = std::sync::Arc::new(
                        jsonschema::options()
                            .with_draft(jsonschema::Draft::Draft4)
                            .build(&root)
                            .map_err(|error| format!("schema does not compile: {error}"))?,
                    );
                    validators.insert(key, validator.clone());
                    validator
                }
            }
        };
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|error| format!("{error} at `{}`", error.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

fn load_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("read `{}`: {error}", path.display()));
    serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|error| panic!("parse `{}`: {error}", path.display()))
}

/// `value` with every `$ref` replaced by what it points to: a file relative to `dir`, or a
/// pointer into `file` (the document `value` comes from).
fn inline(value: &Value, dir: &Path, file: &Value, depth: usize) -> Value {
    assert!(depth < 64, "reference cycle while bundling the spec");
    match value {
        Value::Object(map) => {
            if let Some(reference) = map.get("$ref").and_then(Value::as_str) {
                let (path, pointer) = reference.split_once('#').unwrap_or((reference, ""));
                let (target_dir, target_file) = if path.is_empty() {
                    (dir.to_owned(), file.clone())
                } else {
                    let target = dir.join(path);
                    (target.parent().expect("dir").to_owned(), load_yaml(&target))
                };
                let target = if pointer.is_empty() {
                    target_file.clone()
                } else {
                    target_file
                        .pointer(pointer)
                        .unwrap_or_else(|| panic!("no `{pointer}` in `{path}`"))
                        .clone()
                };
                return inline(&target, &target_dir, &target_file, depth + 1);
            }
            Value::Object(
                map.iter()
                    // Examples and code samples are documentation, some in files not vendored.
                    .filter(|(key, _)| {
                        !matches!(key.as_str(), "examples" | "example" | "x-codeSamples")
                    })
                    .map(|(key, value)| (key.clone(), inline(value, dir, file, depth)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| inline(item, dir, file, depth))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// OpenAPI 3.0 to JSON Schema draft 4: `nullable`, and closed objects (module comment).
fn convert(value: &mut Value, in_composition: bool) {
    match value {
        Value::Object(map) => {
            if map.get("nullable") == Some(&Value::Bool(true)) {
                map.remove("nullable");
                match map.get("type").cloned() {
                    Some(Value::String(one)) => {
                        map.insert("type".to_owned(), json!([one, "null"]));
                    }
                    _ => {
                        let inner = Value::Object(std::mem::take(map));
                        map.insert("anyOf".to_owned(), json!([inner, {"type": "null"}]));
                    }
                }
                if let Some(Value::Array(values)) = map.get_mut("enum") {
                    values.push(Value::Null);
                }
            }
            let composite = ["allOf", "oneOf", "anyOf"]
                .iter()
                .any(|key| map.contains_key(*key));
            if map.contains_key("properties")
                && !map.contains_key("additionalProperties")
                && !in_composition
                && !composite
            {
                map.insert("additionalProperties".to_owned(), Value::Bool(false));
            }
            for (key, child) in map.iter_mut() {
                let composition = matches!(key.as_str(), "allOf" | "oneOf" | "anyOf");
                if composition {
                    if let Value::Array(items) = child {
                        items.iter_mut().for_each(|item| convert(item, true));
                    }
                } else if key == "example" || key == "examples" {
                    // Examples are data, not schemas.
                } else {
                    convert(child, false);
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| convert(item, in_composition)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loaded for the `fly` driver to come: machine bodies are checked as strictly.
    #[test]
    fn fly_machine_bodies_are_checked() {
        let spec = Spec::fly();
        assert_eq!(
            spec.template("/apps/ci-x/machines/abc/wait"),
            Some("/apps/{app_name}/machines/{machine_id}/wait")
        );
        let good = json!({"name": "m", "config": {"image": "alpine", "auto_destroy": true, "restart": {"policy": "no"}}});
        spec.check_request("POST", "/apps/ci-x/machines", &[], Some(&good))
            .unwrap();
        let misspelt = json!({"config": {"imgae": "alpine"}});
        assert!(
            spec.check_request("POST", "/apps/ci-x/machines", &[], Some(&misspelt))
                .is_err()
        );
    }

    #[test]
    fn hetzner_requests_are_checked_strictly() {
        let spec = Spec::hetzner();
        assert_eq!(spec.template("/servers/42"), Some("/servers/{id}"));
        let good = json!({"name": "s", "server_type": "cx23", "image": "docker-ce", "labels": {"ci": "true"}});
        spec.check_request("POST", "/servers", &[], Some(&good))
            .unwrap();
        let misspelt = json!({"name": "s", "server_typ": "cx23", "image": "docker-ce"});
        assert!(
            spec.check_request("POST", "/servers", &[], Some(&misspelt))
                .is_err()
        );
        let unknown_query = [("colour".to_owned(), "red".to_owned())];
        assert!(
            spec.check_request("GET", "/servers", &unknown_query, None)
                .is_err()
        );
        let not_a_number = [("per_page".to_owned(), "many".to_owned())];
        assert!(
            spec.check_request("GET", "/servers", &not_a_number, None)
                .is_err()
        );
        let server = spec.sample("/components/schemas/server");
        spec.check_response("GET", "/servers/1", 200, Some(&json!({"server": server})))
            .unwrap();
        assert!(
            spec.check_response("GET", "/servers/1", 200, Some(&json!({"server": {}})))
                .is_err()
        );
    }
}
