//! `--driver=` strings: parsing, validation and resolution against the registry.
//!
//! Three forms, as the seeds write them:
//! - `name` — defaults and environment variables only;
//! - `name://namespace?k=v&k=v` — namespace and parameters percent-decoded (`%2C`, `%26`; a `+`
//!   stays a `+`, since tokens and paths contain it more often than spaces);
//! - `name:k=v,k=v` — not decoded; `namespace=` sets the namespace. A segment without `=`, or
//!   one whose key is unknown while the previous parameter is a list, continues the previous
//!   value, so `hetzner:labels=env=prod,app=x` gives `labels=env=prod,app=x`.
//!
//! Precedence: DSN > the parameter's environment variable > its default.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::registry::{DriverSpec, ParamKind, ParamSpec, driver_spec, drivers};

/// Shown instead of a secret's value.
pub const REDACTED: &str = "<redacted>";

/// A bad `--driver=` string. Messages never contain a secret's value, and each says how to
/// fix the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsnError {
    #[error("empty driver DSN: pass `--driver=NAME`, e.g. `--driver=native`")]
    Empty,

    #[error(
        "malformed driver name `{name}`: a DSN starts with a driver name such as `qemu` \
         (letters, digits, `_` or `-`), e.g. `qemu:memory=4096`"
    )]
    MalformedName { name: String },

    #[error("unknown driver `{driver}`: use one of {known}")]
    UnknownDriver { driver: String, known: String },

    #[error(
        "malformed DSN for driver `{driver}`: {reason}; write `{driver}://NAMESPACE?KEY=VALUE&…` \
         or `{driver}:KEY=VALUE,…`"
    )]
    Malformed { driver: String, reason: String },

    #[error(
        "malformed DSN for driver `{driver}`: segment `{segment}` is not `KEY=VALUE`; \
         write `{driver}:KEY=VALUE,…`"
    )]
    MalformedSegment { driver: String, segment: String },

    #[error("invalid percent-encoding `{escape}` in DSN for driver `{driver}`: write `%` as `%25`")]
    PercentEncoding { driver: String, escape: String },

    #[error(
        "invalid namespace `{namespace}`: {reason}; use letters, digits, `_`, `.` or `-`, \
         starting with a letter or digit, at most 63 characters"
    )]
    InvalidNamespace {
        namespace: String,
        reason: &'static str,
    },

    #[error(
        "namespace given twice in DSN for driver `{driver}`: keep either `{driver}://NAMESPACE` or `namespace=`"
    )]
    NamespaceTwice { driver: String },

    #[error("parameter `{param}` given twice in DSN for driver `{driver}`: keep one")]
    DuplicateParameter { driver: String, param: String },

    #[error(
        "invalid value `{value}` for parameter `{param}` of driver `{driver}` (from {origin}): \
         expected {expected}"
    )]
    InvalidValue {
        driver: String,
        param: String,
        /// The value as given, or `<redacted>` for a secret.
        value: String,
        origin: String,
        expected: String,
    },

    #[error(
        "missing parameter `{param}` of driver `{driver}`: set it in the DSN \
         (`{driver}:{param}=…`){env_hint}"
    )]
    MissingRequired {
        driver: String,
        param: String,
        /// `` or `QEMU_X` `` — " or in `VAR`" when the parameter has an environment variable.
        env_hint: String,
    },
}

/// A parameter's resolved value, typed by its [`ParamKind`].
#[derive(Clone, PartialEq, Eq)]
pub enum ParamValue {
    Text(String),
    Integer(u64),
    Bool(bool),
    Duration(Duration),
}

/// Where a resolved value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamSource {
    Dsn,
    Env(&'static str),
    Default,
    /// Neither given nor defaulted: the driver decides.
    Unset,
}

/// One known parameter after resolution.
#[derive(Clone)]
pub struct ResolvedParam {
    pub spec: &'static ParamSpec,
    /// The text as given (DSN, environment) or defaulted.
    pub raw: Option<String>,
    pub value: Option<ParamValue>,
    pub source: ParamSource,
}

/// A resolved `--driver=` string: which driver, which namespace, and every parameter the
/// driver knows with its value.
#[derive(Clone)]
pub struct DriverConfig {
    pub driver: String,
    pub namespace: String,
    /// Whether the user named the namespace. One-shot commands only clean up namespaces they
    /// generated, so two `ci-exec run --driver=native://ns` share volumes.
    pub namespace_given: bool,
    spec: &'static DriverSpec,
    params: Vec<ResolvedParam>,
    unknown: BTreeMap<String, String>,
}

impl DriverConfig {
    /// Parses `dsn`, reading parameter environment variables from the process environment.
    pub fn parse(dsn: &str) -> Result<DriverConfig, DsnError> {
        Self::parse_with_env(dsn, &|name| std::env::var(name).ok())
    }

    /// Parses `dsn`, reading parameter environment variables through `env`.
    pub fn parse_with_env(
        dsn: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<DriverConfig, DsnError> {
        let dsn = dsn.trim();
        if dsn.is_empty() {
            return Err(DsnError::Empty);
        }
        let (name, rest) = match dsn.split_once(':') {
            Some((name, rest)) => (name, Some(rest)),
            None => (dsn, None),
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(DsnError::MalformedName {
                name: name.chars().take(40).collect(),
            });
        }
        let spec = driver_spec(name).ok_or_else(|| DsnError::UnknownDriver {
            driver: name.to_owned(),
            known: drivers()
                .iter()
                .map(|driver| format!("`{}`", driver.name))
                .collect::<Vec<_>>()
                .join(", "),
        })?;

        let given = match rest {
            None => Given::default(),
            Some(rest) => match rest.strip_prefix("//") {
                Some(url) => parse_url_form(spec, url)?,
                None => parse_colon_form(spec, rest)?,
            },
        };

        let namespace_given = given.namespace.is_some();
        let namespace = match given.namespace {
            Some(namespace) => {
                validate_namespace(&namespace)?;
                namespace
            }
            None => generate_namespace(),
        };

        let mut dsn_params = given.params;
        let mut params = Vec::with_capacity(spec.params.len());
        for param in spec.params {
            let (raw, source) = if let Some(value) = dsn_params.remove(param.name) {
                (Some(value), ParamSource::Dsn)
            } else if let Some((variable, value)) = param
                .env
                .and_then(|variable| env(variable).map(|value| (variable, value)))
                .filter(|(_, value)| !value.is_empty())
            {
                (Some(value), ParamSource::Env(variable))
            } else if let Some(value) = param.default.value() {
                (Some(value), ParamSource::Default)
            } else {
                (None, ParamSource::Unset)
            };
            let value =
                match &raw {
                    Some(raw) => Some(parse_value(param, raw).map_err(|expected| {
                        DsnError::InvalidValue {
                            driver: spec.name.to_owned(),
                            param: param.name.to_owned(),
                            value: if param.secret {
                                REDACTED.to_owned()
                            } else {
                                raw.clone()
                            },
                            origin: match source {
                                ParamSource::Dsn => "the DSN".to_owned(),
                                ParamSource::Env(variable) => format!("`{variable}`"),
                                ParamSource::Default | ParamSource::Unset => {
                                    "the default".to_owned()
                                }
                            },
                            expected,
                        }
                    })?),
                    None if param.required => {
                        return Err(DsnError::MissingRequired {
                            driver: spec.name.to_owned(),
                            param: param.name.to_owned(),
                            env_hint: param
                                .env
                                .map(|variable| format!(" or in `{variable}`"))
                                .unwrap_or_default(),
                        });
                    }
                    None => None,
                };
            params.push(ResolvedParam {
                spec: param,
                raw,
                value,
                source,
            });
        }

        for name in dsn_params.keys() {
            tracing::warn!(
                "unknown parameter `{name}` for driver `{}` kept but not used (known: {})",
                spec.name,
                known_params(spec)
            );
        }

        Ok(DriverConfig {
            driver: spec.name.to_owned(),
            namespace,
            namespace_given,
            spec,
            params,
            unknown: dsn_params,
        })
    }

    /// The registry entry of this config's driver.
    pub fn spec(&self) -> &'static DriverSpec {
        self.spec
    }

    /// Every known parameter, resolved, in the registry's order.
    pub fn params(&self) -> &[ResolvedParam] {
        &self.params
    }

    /// Parameters the DSN gave that the driver does not know (kept, and warned about).
    pub fn unknown(&self) -> &BTreeMap<String, String> {
        &self.unknown
    }

    fn resolved(&self, name: &str) -> Option<&ResolvedParam> {
        self.params.iter().find(|param| param.spec.name == name)
    }

    /// The text of parameter `name` (known or unknown), if it has a value.
    pub fn str(&self, name: &str) -> Option<&str> {
        match self.resolved(name) {
            Some(param) => param.raw.as_deref(),
            None => self.unknown.get(name).map(String::as_str),
        }
    }

    /// Integer parameter `name`.
    pub fn u64(&self, name: &str) -> Option<u64> {
        match self.resolved(name)?.value {
            Some(ParamValue::Integer(value)) => Some(value),
            _ => None,
        }
    }

    /// Boolean parameter `name`.
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.resolved(name)?.value {
            Some(ParamValue::Bool(value)) => Some(value),
            _ => None,
        }
    }

    /// Duration parameter `name`; `0` gives [`Duration::ZERO`] (the seeds' "no limit").
    pub fn duration(&self, name: &str) -> Option<Duration> {
        match self.resolved(name)?.value {
            Some(ParamValue::Duration(value)) => Some(value),
            _ => None,
        }
    }

    /// List parameter `name`, split on commas.
    pub fn list(&self, name: &str) -> Option<Vec<&str>> {
        self.str(name)
            .map(|text| text.split(',').filter(|item| !item.is_empty()).collect())
    }

    /// Where parameter `name`'s value came from.
    pub fn source(&self, name: &str) -> Option<ParamSource> {
        self.resolved(name).map(|param| param.source)
    }

    /// `{"driver", "namespace", "params": {name: value}, "unknown": {name: value}}`, with every
    /// known parameter (`null` when unset), integers and booleans typed, secrets `<redacted>`.
    pub fn to_json(&self) -> serde_json::Value {
        let params: serde_json::Map<String, serde_json::Value> = self
            .params
            .iter()
            .map(|param| {
                let value = match (&param.value, param.spec.secret) {
                    (None, _) => serde_json::Value::Null,
                    (Some(_), true) => REDACTED.into(),
                    (Some(ParamValue::Integer(value)), false) => (*value).into(),
                    (Some(ParamValue::Bool(value)), false) => (*value).into(),
                    (Some(ParamValue::Text(_) | ParamValue::Duration(_)), false) => {
                        param.raw.clone().unwrap_or_default().into()
                    }
                };
                (param.spec.name.to_owned(), value)
            })
            .collect();
        let unknown: serde_json::Map<String, serde_json::Value> = self
            .unknown
            .iter()
            .map(|(name, value)| (name.clone(), value.clone().into()))
            .collect();
        serde_json::json!({
            "driver": self.driver,
            "namespace": self.namespace,
            "params": params,
            "unknown": unknown,
        })
    }
}

impl fmt::Debug for DriverConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriverConfig")
            .field("driver", &self.driver)
            .field("namespace", &self.namespace)
            .field("namespace_given", &self.namespace_given)
            .field("params", &self.params)
            .field("unknown", &self.unknown)
            .finish()
    }
}

impl fmt::Debug for ResolvedParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let raw = match (&self.raw, self.spec.secret) {
            (Some(_), true) => Some(REDACTED),
            (raw, _) => raw.as_deref(),
        };
        f.debug_struct("ResolvedParam")
            .field("name", &self.spec.name)
            .field("raw", &raw)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Debug for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Text may be a secret; `ResolvedParam`'s Debug shows the raw value when it is not.
            ParamValue::Text(_) => f.write_str("Text(..)"),
            ParamValue::Integer(value) => write!(f, "Integer({value})"),
            ParamValue::Bool(value) => write!(f, "Bool({value})"),
            ParamValue::Duration(value) => write!(f, "Duration({value:?})"),
        }
    }
}

#[derive(Default)]
struct Given {
    namespace: Option<String>,
    params: BTreeMap<String, String>,
}

impl Given {
    fn insert(&mut self, spec: &DriverSpec, key: String, value: String) -> Result<(), DsnError> {
        if key.is_empty() {
            return Err(DsnError::Malformed {
                driver: spec.name.to_owned(),
                reason: format!(
                    "parameter with value but no name (`={}`)",
                    shown(spec, "", &value)
                ),
            });
        }
        if key == "namespace" {
            if self.namespace.is_some() {
                return Err(DsnError::NamespaceTwice {
                    driver: spec.name.to_owned(),
                });
            }
            self.namespace = Some(value);
            return Ok(());
        }
        if self.params.contains_key(&key) {
            return Err(DsnError::DuplicateParameter {
                driver: spec.name.to_owned(),
                param: key,
            });
        }
        self.params.insert(key, value);
        Ok(())
    }
}

/// `value` as it may appear in a message: redacted when `key` is a secret of `spec`.
fn shown(spec: &DriverSpec, key: &str, value: &str) -> String {
    match spec.param(key) {
        Some(param) if param.secret => REDACTED.to_owned(),
        _ => value.to_owned(),
    }
}

fn parse_url_form(spec: &DriverSpec, url: &str) -> Result<Given, DsnError> {
    let (authority, query) = match url.split_once('?') {
        Some((authority, query)) => (authority, Some(query)),
        None => (url, None),
    };
    if authority.contains('/') {
        return Err(DsnError::Malformed {
            driver: spec.name.to_owned(),
            reason: "a path after the namespace".to_owned(),
        });
    }
    if authority.contains('#') || query.is_some_and(|query| query.contains('#')) {
        return Err(DsnError::Malformed {
            driver: spec.name.to_owned(),
            reason: "a `#` fragment (write `#` as `%23`)".to_owned(),
        });
    }
    let mut given = Given::default();
    if !authority.is_empty() {
        given.namespace = Some(percent_decode(spec, authority)?);
    }
    for segment in query.unwrap_or_default().split('&') {
        if segment.is_empty() {
            continue;
        }
        let Some((key, value)) = segment.split_once('=') else {
            return Err(DsnError::MalformedSegment {
                driver: spec.name.to_owned(),
                segment: percent_decode(spec, segment)?,
            });
        };
        let key = percent_decode(spec, key)?;
        let value = percent_decode(spec, value)?;
        given.insert(spec, key, value)?;
    }
    Ok(given)
}

fn parse_colon_form(spec: &DriverSpec, text: &str) -> Result<Given, DsnError> {
    let mut given = Given::default();
    // The key of the value the next segment may continue.
    let mut previous: Option<String> = None;
    for segment in text.split(',') {
        if segment.is_empty() {
            continue;
        }
        let continues = match (segment.split_once('='), &previous) {
            (None, Some(_)) => true,
            (None, None) => {
                return Err(DsnError::MalformedSegment {
                    driver: spec.name.to_owned(),
                    segment: segment.to_owned(),
                });
            }
            (Some((key, _)), Some(previous)) => {
                key != "namespace"
                    && spec.param(key).is_none()
                    && spec
                        .param(previous)
                        .is_some_and(|param| param.kind == ParamKind::List)
            }
            (Some(_), None) => false,
        };
        if continues {
            let previous = previous.as_deref().unwrap_or_default();
            let value = if previous == "namespace" {
                given.namespace.as_mut()
            } else {
                given.params.get_mut(previous)
            };
            if let Some(value) = value {
                value.push(',');
                value.push_str(segment);
            }
            continue;
        }
        let Some((key, value)) = segment.split_once('=') else {
            continue;
        };
        given.insert(spec, key.to_owned(), value.to_owned())?;
        previous = Some(key.to_owned());
    }
    Ok(given)
}

fn percent_decode(spec: &DriverSpec, text: &str) -> Result<String, DsnError> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let escape = text.get(index..index + 3).unwrap_or(&text[index..]);
            let byte = escape
                .get(1..3)
                .filter(|hex| hex.bytes().all(|byte| byte.is_ascii_hexdigit()))
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| DsnError::PercentEncoding {
                    driver: spec.name.to_owned(),
                    escape: escape.to_owned(),
                })?;
            decoded.push(byte);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| DsnError::PercentEncoding {
        driver: spec.name.to_owned(),
        escape: "non-UTF-8 bytes".to_owned(),
    })
}

fn known_params(spec: &DriverSpec) -> String {
    if spec.params.is_empty() {
        return "none".to_owned();
    }
    spec.params
        .iter()
        .map(|param| format!("`{}`", param.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a namespace is usable as a file name, a container-name prefix and a label value.
pub fn validate_namespace(namespace: &str) -> Result<(), DsnError> {
    let reason = if namespace.is_empty() {
        Some("it is empty")
    } else if namespace.len() > 63 {
        Some("it is longer than 63 characters")
    } else if !namespace
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        Some("it must start with a letter or digit")
    } else if !namespace
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        Some("it contains a character other than letters, digits, `_`, `.` or `-`")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(DsnError::InvalidNamespace {
            namespace: namespace.chars().take(80).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

/// A fresh namespace, `ci-` and 12 hex digits, for a DSN that names none.
pub fn generate_namespace() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::time::SystemTime;

    // `RandomState` is seeded from the OS once per process and advanced per instance, so
    // concurrent processes and repeated calls in one process get different namespaces.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(now) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    format!("ci-{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

/// Whether `namespace` has the form [`generate_namespace`] gives: a namespace nobody named, so
/// nobody will name it again, and a driver may remove what a killed run left in it.
pub fn is_generated_namespace(namespace: &str) -> bool {
    namespace.strip_prefix("ci-").is_some_and(|digits| {
        digits.len() == 12
            && digits
                .bytes()
                .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
    })
}

/// Parses `raw` as a value of `param`, or says what was expected.
pub(crate) fn parse_value(param: &ParamSpec, raw: &str) -> Result<ParamValue, String> {
    if raw.is_empty() {
        return Err(format!("a non-empty {}", param.kind.describe()));
    }
    match param.kind {
        ParamKind::String | ParamKind::List => Ok(ParamValue::Text(raw.to_owned())),
        ParamKind::Integer { min } => match raw.parse::<u64>() {
            Ok(value) if value >= min => Ok(ParamValue::Integer(value)),
            _ if min > 0 => Err(format!("a whole number of at least {min}")),
            _ => Err("a whole number".to_owned()),
        },
        ParamKind::Bool => match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(ParamValue::Bool(true)),
            "false" | "0" | "no" | "off" => Ok(ParamValue::Bool(false)),
            _ => Err("`true` or `false`".to_owned()),
        },
        ParamKind::Duration => parse_duration(raw)
            .map(ParamValue::Duration)
            .ok_or_else(|| "a duration such as `30s`, `10m` or `1h30m` (`0` for none)".to_owned()),
        ParamKind::Enum(words) => words
            .iter()
            .find(|word| **word == raw)
            .map(|word| ParamValue::Text((*word).to_owned()))
            .ok_or_else(|| {
                format!(
                    "one of {}",
                    words
                        .iter()
                        .map(|word| format!("`{word}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
    }
}

/// `300ms`, `10s`, `5m`, `1h30m`, `2d`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    if text.is_empty() {
        return None;
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86400),
            _ => return None,
        };
        total = total.checked_add(unit.checked_mul(u32::try_from(number).ok()?)?)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(dsn: &str) -> Result<DriverConfig, DsnError> {
        DriverConfig::parse_with_env(dsn, &no_env)
    }

    fn parse_env(dsn: &str, vars: &[(&str, &str)]) -> Result<DriverConfig, DsnError> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        DriverConfig::parse_with_env(dsn, &move |name| vars.get(name).cloned())
    }

    fn message(dsn: &str) -> String {
        match parse(dsn) {
            Ok(config) => panic!("`{dsn}` parsed: {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn simple_name_uses_defaults_and_generates_a_namespace() {
        let config = parse("qemu").expect("parse");
        assert_eq!(config.driver, "qemu");
        assert!(!config.namespace_given);
        assert!(config.namespace.starts_with("ci-"));
        validate_namespace(&config.namespace).expect("generated namespace is valid");
        assert_eq!(config.u64("memory"), Some(2048));
        assert_eq!(config.u64("cpus"), Some(2));
        assert_eq!(config.str("accel"), Some("auto"));
        assert_eq!(config.str("image"), Some("debian-bookworm"));
        assert_eq!(
            config.duration("boot_timeout"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(config.source("memory"), Some(ParamSource::Default));
        assert_ne!(parse("qemu").expect("parse").namespace, config.namespace);
        assert!(is_generated_namespace(&config.namespace));
        for named in [
            "ci",
            "ci-",
            "ci-0123456789a",
            "ci-0123456789abc",
            "ci-0123456789AB",
            "main",
        ] {
            assert!(!is_generated_namespace(named), "{named}");
        }
    }

    #[test]
    fn url_form_sets_namespace_and_decodes_percent_escapes() {
        let config = parse("qemu://my-namespace?memory=4096&cpus=4").expect("parse");
        assert_eq!(config.namespace, "my-namespace");
        assert!(config.namespace_given);
        assert_eq!(config.u64("memory"), Some(4096));
        assert_eq!(config.u64("cpus"), Some(4));

        let config =
            parse("hetzner://ns?token=a%2Bb%26c&labels=env%3Dprod%2Capp%3Dx+y").expect("parse");
        assert_eq!(config.str("token"), Some("a+b&c"));
        assert_eq!(config.str("labels"), Some("env=prod,app=x+y"));
        assert_eq!(config.list("labels"), Some(vec!["env=prod", "app=x+y"]));
    }

    #[test]
    fn url_form_with_empty_namespace_generates_one() {
        let config = parse("qemu://?memory=512").expect("parse");
        assert!(!config.namespace_given);
        assert_eq!(config.u64("memory"), Some(512));
    }

    #[test]
    fn colon_form_splits_on_commas_and_continues_lists() {
        let config = parse("hetzner:token=xxx,labels=env=prod,app=x").expect("parse");
        assert_eq!(config.str("labels"), Some("env=prod,app=x"));
        let config = parse("digitalocean:token=t,tags=prod,myapp,size=auto").expect("parse");
        assert_eq!(config.str("tags"), Some("prod,myapp"));
        assert_eq!(config.str("size"), Some("auto"));
        let config = parse("docker:host=ssh://user@host:22").expect("parse");
        assert_eq!(config.str("host"), Some("ssh://user@host:22"));
        let config = parse("docker:host=unix:///var/run/docker.sock").expect("parse");
        assert_eq!(config.str("host"), Some("unix:///var/run/docker.sock"));
    }

    #[test]
    fn colon_form_namespace_key_sets_the_namespace() {
        let config = parse("k8s:namespace=staging,region=us-west,timeout=600").expect("parse");
        assert_eq!(config.namespace, "staging");
        assert!(config.namespace_given);
        assert_eq!(config.str("region"), Some("us-west"));
        assert_eq!(config.str("timeout"), Some("600"));
        assert_eq!(config.unknown().len(), 2);
    }

    #[test]
    fn unknown_parameters_are_kept() {
        let config = parse("k8s://staging?region=us-east&timeout=300").expect("parse");
        assert_eq!(config.namespace, "staging");
        assert_eq!(config.str("region"), Some("us-east"));
        assert_eq!(config.to_json()["unknown"]["timeout"], "300");
    }

    #[test]
    fn precedence_is_dsn_then_env_then_default() {
        let vars = [("QEMU_MEMORY", "1024"), ("QEMU_CPUS", "8")];
        let config = parse_env("qemu:memory=4096", &vars).expect("parse");
        assert_eq!(config.u64("memory"), Some(4096));
        assert_eq!(config.source("memory"), Some(ParamSource::Dsn));
        assert_eq!(config.u64("cpus"), Some(8));
        assert_eq!(config.source("cpus"), Some(ParamSource::Env("QEMU_CPUS")));
        assert_eq!(config.str("accel"), Some("auto"));
        assert_eq!(config.source("accel"), Some(ParamSource::Default));
        // An empty variable counts as unset.
        let config = parse_env("qemu", &[("QEMU_MEMORY", "")]).expect("parse");
        assert_eq!(config.u64("memory"), Some(2048));
    }

    #[test]
    fn typed_values() {
        let config =
            parse("hetzner:token=t,reuse_worker=yes,max_workers=3,poll_interval=5s,wait_timeout=0")
                .expect("parse");
        assert_eq!(config.bool("reuse_worker"), Some(true));
        assert_eq!(config.u64("max_workers"), Some(3));
        assert_eq!(
            config.duration("poll_interval"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(config.duration("wait_timeout"), Some(Duration::ZERO));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("300"), Some(Duration::from_secs(300)));
        for bad in ["", "m", "10x", "1.5h", "h1", "-1s"] {
            assert_eq!(parse_duration(bad), None, "`{bad}`");
        }
    }

    #[test]
    fn secrets_are_redacted_in_json_debug_and_errors() {
        let config = parse("fly:token=fo1_secret,app=my-ci").expect("parse");
        let json = config.to_json().to_string();
        assert!(!json.contains("fo1_secret"), "{json}");
        assert_eq!(config.to_json()["params"]["token"], REDACTED);
        assert_eq!(config.to_json()["params"]["app"], "my-ci");
        assert!(!format!("{config:?}").contains("fo1_secret"));
        assert_eq!(config.str("token"), Some("fo1_secret"));
    }

    #[test]
    fn json_lists_every_parameter_typed() {
        let config = parse("qemu://ns?cpus=4").expect("parse");
        let json = config.to_json();
        assert_eq!(json["driver"], "qemu");
        assert_eq!(json["namespace"], "ns");
        let params = json["params"].as_object().expect("params object");
        let names: Vec<_> = params.keys().map(String::as_str).collect();
        let mut expected: Vec<_> = config.spec().params.iter().map(|p| p.name).collect();
        expected.sort_unstable();
        assert_eq!(names, expected);
        assert_eq!(json["params"]["cpus"], 4);
        assert_eq!(json["params"]["boot_timeout"], "5m");
        let docker = parse("docker").expect("parse").to_json();
        assert!(docker["params"]["host"].is_null());
    }

    #[test]
    fn error_messages() {
        let cases: &[(&str, &str)] = &[
            (
                "",
                "empty driver DSN: pass `--driver=NAME`, e.g. `--driver=native`",
            ),
            (
                "nope",
                "unknown driver `nope`: use one of `k8s`, `docker`, `podman`, `native`, \
                 `digitalocean`, `hetzner`, `fly`, `qemu`, `vz`",
            ),
            (
                "Q EMU:x=1",
                "malformed driver name `Q EMU`: a DSN starts with a driver name such as `qemu` \
                 (letters, digits, `_` or `-`), e.g. `qemu:memory=4096`",
            ),
            (
                "qemu:memory",
                "malformed DSN for driver `qemu`: segment `memory` is not `KEY=VALUE`; \
                 write `qemu:KEY=VALUE,…`",
            ),
            (
                "qemu://ns/path",
                "malformed DSN for driver `qemu`: a path after the namespace; write \
                 `qemu://NAMESPACE?KEY=VALUE&…` or `qemu:KEY=VALUE,…`",
            ),
            (
                "qemu://ns?memory=1%zz",
                "invalid percent-encoding `%zz` in DSN for driver `qemu`: write `%` as `%25`",
            ),
            (
                "qemu://bad%20ns",
                "invalid namespace `bad ns`: it contains a character other than letters, \
                 digits, `_`, `.` or `-`; use letters, digits, `_`, `.` or `-`, starting with a \
                 letter or digit, at most 63 characters",
            ),
            (
                "qemu://a?namespace=b",
                "namespace given twice in DSN for driver `qemu`: keep either \
                 `qemu://NAMESPACE` or `namespace=`",
            ),
            (
                "qemu:cpus=1,cpus=2",
                "parameter `cpus` given twice in DSN for driver `qemu`: keep one",
            ),
            (
                "qemu:memory=lots",
                "invalid value `lots` for parameter `memory` of driver `qemu` (from the DSN): \
                 expected a whole number of at least 64",
            ),
            (
                "qemu:accel=fast",
                "invalid value `fast` for parameter `accel` of driver `qemu` (from the DSN): \
                 expected one of `auto`, `kvm`, `hvf`, `tcg`",
            ),
            (
                "qemu:boot_timeout=soon",
                "invalid value `soon` for parameter `boot_timeout` of driver `qemu` (from the \
                 DSN): expected a duration such as `30s`, `10m` or `1h30m` (`0` for none)",
            ),
            (
                "hetzner:token=t,reuse_worker=maybe",
                "invalid value `maybe` for parameter `reuse_worker` of driver `hetzner` (from \
                 the DSN): expected `true` or `false`",
            ),
            (
                "hetzner",
                "missing parameter `token` of driver `hetzner`: set it in the DSN \
                 (`hetzner:token=…`) or in `HETZNER_TOKEN`",
            ),
            (
                "fly:token=",
                "invalid value `<redacted>` for parameter `token` of driver `fly` (from the \
                 DSN): expected a non-empty string",
            ),
            (
                "qemu:=4",
                "malformed DSN for driver `qemu`: parameter with value but no name (`=4`); \
                 write `qemu://NAMESPACE?KEY=VALUE&…` or `qemu:KEY=VALUE,…`",
            ),
        ];
        for (dsn, expected) in cases {
            assert_eq!(&message(dsn), expected, "DSN `{dsn}`");
        }
    }

    #[test]
    fn env_errors_name_the_variable() {
        let error = parse_env("qemu", &[("QEMU_CPUS", "zero")]).expect_err("bad env");
        assert_eq!(
            error.to_string(),
            "invalid value `zero` for parameter `cpus` of driver `qemu` (from `QEMU_CPUS`): \
             expected a whole number of at least 1"
        );
        let config = parse_env("hetzner", &[("HETZNER_TOKEN", "tok")]).expect("token from env");
        assert_eq!(
            config.source("token"),
            Some(ParamSource::Env("HETZNER_TOKEN"))
        );
    }

    /// Every example DSN the seeds write must parse (tokens come from the DSN or, for the
    /// examples that say so, the environment).
    #[test]
    fn every_seed_example_parses() {
        let examples = [
            "native",
            "docker",
            "k8s",
            "k8s://production",
            "k8s://staging?region=us-east&timeout=300",
            "k8s:namespace=production",
            "k8s:namespace=staging,region=us-west,timeout=600",
            "k8s://my-namespace",
            "k8s:namespace=staging",
            "k8s:namespace=prod,kubeconfig=/etc/k8s/config",
            "k8s://production?kubeconfig=/path/to/config",
            "k8s://staging?region=us-east",
            "k8s://production?region=us-west",
            "docker:host=unix:///var/run/docker.sock",
            "docker:host=ssh://user@host:22",
            "docker:host=ssh://user@remote:22",
            "digitalocean:token=dop_v1_xxx",
            "digitalocean:token=dop_v1_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "digitalocean://ci-namespace?token=dop_v1_xxx&image=docker-20-04&size=s-2vcpu-4gb&region=sfo3&disk_size=50",
            "digitalocean:token=dop_v1_xxx,size=auto,region=nyc1",
            "digitalocean:token=dop_v1_xxx,max_workers=3",
            "digitalocean:token=dop_v1_xxx,reuse_worker=true,max_workers=2",
            "hetzner:token=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
            "hetzner://ci-namespace?token=xxx&image=docker-ce&server_type=cx33&location=nbg1&disk_size=50",
            "hetzner:token=xxx,server_type=auto,location=fsn1",
            "hetzner:token=xxx,max_workers=3",
            "hetzner:token=xxx,reuse_worker=true,max_workers=2",
            "fly://my-namespace?token=fo1_xxx&app=my-ci&region=lax",
            "fly:token=fo1_xxx,app=my-ci,region=ord,org=my-org,size=shared-cpu-2x",
            "qemu",
            "qemu:memory=4096,cpus=4",
            "qemu://my-namespace?memory=4096&cpus=4",
            "qemu:image=/path/to/custom.qcow2",
            "qemu:accel=tcg",
            "vz",
            "vz:memory=4096,cpus=4",
            "vz://my-namespace?memory=4096&cpus=4",
            "vz:image=/path/to/custom.raw",
        ];
        for dsn in examples {
            parse(dsn).unwrap_or_else(|error| panic!("`{dsn}`: {error}"));
        }
        let from_env = [
            ("digitalocean", "DIGITALOCEAN_TOKEN"),
            ("digitalocean:size=auto", "DIGITALOCEAN_TOKEN"),
            ("hetzner", "HETZNER_TOKEN"),
            ("hetzner:server_type=auto", "HETZNER_TOKEN"),
            ("fly", "FLY_API_TOKEN"),
            ("fly:app=my-ci-app,region=ord", "FLY_API_TOKEN"),
        ];
        for (dsn, variable) in from_env {
            parse_env(dsn, &[(variable, "secret")])
                .unwrap_or_else(|error| panic!("`{dsn}`: {error}"));
        }
        let config = parse(
            "digitalocean://ci-namespace?token=dop_v1_xxx&image=docker-20-04&size=s-2vcpu-4gb&region=sfo3&disk_size=50",
        )
        .expect("parse");
        assert_eq!(config.namespace, "ci-namespace");
        assert_eq!(config.str("region"), Some("sfo3"));
        assert_eq!(config.u64("disk_size"), Some(50));
        assert_eq!(config.str("tags"), None);
        assert_eq!(config.u64("max_workers"), Some(1));
        assert_eq!(
            config.duration("wait_timeout"),
            Some(Duration::from_secs(600))
        );
    }
}
