//! Bodies checked against the Kubernetes OpenAPI (v1.35, core/v1, vendored in `openapi/`).
//!
//! The published schemas allow unknown fields (they carry no `additionalProperties: false`),
//! so every object schema is closed here before compiling: an unknown or misspelt field fails
//! as `kubectl`'s strict field validation makes a real API server fail it. JSON `null` means
//! "unset" to the API server, so nulls are dropped before validation.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

pub const CORE_V1: &str = include_str!("../openapi/api__v1_openapi.json");

/// The kinds the fake receives or returns.
pub const KINDS: &[&str] = &[
    "io.k8s.api.core.v1.Pod",
    "io.k8s.api.core.v1.PodList",
    "io.k8s.api.core.v1.PersistentVolumeClaim",
    "io.k8s.api.core.v1.PersistentVolumeClaimList",
    "io.k8s.api.core.v1.Namespace",
    "io.k8s.apimachinery.pkg.apis.meta.v1.Status",
    "io.k8s.apimachinery.pkg.apis.meta.v1.DeleteOptions",
    "io.k8s.apimachinery.pkg.apis.meta.v1.WatchEvent",
    "io.k8s.apimachinery.pkg.apis.meta.v1.APIResourceList",
];

static VALIDATORS: OnceLock<HashMap<&'static str, jsonschema::Validator>> = OnceLock::new();

fn validators() -> &'static HashMap<&'static str, jsonschema::Validator> {
    VALIDATORS.get_or_init(|| {
        let document: Value = serde_json::from_str(CORE_V1).expect("vendored OpenAPI parses");
        let mut schemas = document["components"]["schemas"].clone();
        if let Value::Object(map) = &mut schemas {
            for schema in map.values_mut() {
                close(schema);
            }
        }
        KINDS
            .iter()
            .map(|kind| {
                let root = serde_json::json!({
                    "$ref": format!("#/components/schemas/{kind}"),
                    "components": { "schemas": schemas.clone() },
                });
                let validator = jsonschema::options()
                    .with_draft(jsonschema::Draft::Draft202012)
                    .build(&root)
                    .unwrap_or_else(|error| panic!("schema of `{kind}` compiles: {error}"));
                (*kind, validator)
            })
            .collect()
    })
}

/// Closes every object schema with properties (see the module comment).
fn close(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".to_owned(), Value::Bool(false));
            }
            for value in map.values_mut() {
                close(value);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close),
        _ => {}
    }
}

/// Drops `null` members, which the API server reads as unset.
pub fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, value)| !value.is_null())
                .map(|(key, value)| (key.clone(), without_nulls(value)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// Checks `value` against the schema of `kind`; the error lists every violation.
pub fn check(kind: &str, value: &Value) -> Result<(), String> {
    let validator = validators()
        .get(kind)
        .unwrap_or_else(|| panic!("no schema compiled for `{kind}`"));
    let value = without_nulls(value);
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|error| format!("{} at `{}`", error, error.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{kind}: {}", errors.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::check;
    use serde_json::json;

    #[test]
    fn pods_are_checked_strictly() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i"}]}});
        check("io.k8s.api.core.v1.Pod", &pod).unwrap();
        let misspelt = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "imgae": "i"}]}});
        assert!(check("io.k8s.api.core.v1.Pod", &misspelt).is_err());
        let no_name = json!({"spec": {"containers": [{"image": "i"}]}});
        assert!(check("io.k8s.api.core.v1.Pod", &no_name).is_err());
        let wrong_type = json!({"spec": {"containers": [{"name": "c", "stdin": "yes"}]}});
        assert!(check("io.k8s.api.core.v1.Pod", &wrong_type).is_err());
    }
}
