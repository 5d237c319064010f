//! The `com.apple.security.virtualization` entitlement: without it the framework refuses every
//! VM with a long localized sentence. This turns that sentence into one line that says how to
//! sign the binary (`mk sign`, which applies `executor/vz/ci-exec.entitlements`); the CLI adds
//! [`SIGN_COMMAND`] as its hint.

use crate::VzError;

/// The entitlement the Virtualization framework requires of the process.
pub const ENTITLEMENT: &str = "com.apple.security.virtualization";

/// What `mk sign` runs (ad-hoc signature, the entitlements file shipped with this crate).
pub const SIGN_COMMAND: &str =
    "codesign --entitlements executor/vz/ci-exec.entitlements --force -s - <binary>";

/// The entitlements file, as shipped beside this crate's `Cargo.toml`.
pub const ENTITLEMENTS_PLIST: &str = include_str!("../ci-exec.entitlements");

/// Whether a framework error message is the missing-entitlement refusal. The framework words it
/// as "The process doesn’t have the “com.apple.security.virtualization” entitlement." (curly
/// quotes, localized around the name), so only the entitlement's name and the word are matched.
pub fn is_missing_entitlement(message: &str) -> bool {
    message.contains(ENTITLEMENT) && message.to_lowercase().contains("entitlement")
}

/// The error for a framework failure while doing `action`: [`VzError::MissingEntitlement`] when
/// that is what the message says, else the message itself.
pub fn framework_error(action: impl Into<String>, message: impl Into<String>) -> VzError {
    let message = message.into();
    if is_missing_entitlement(&message) {
        VzError::MissingEntitlement
    } else {
        VzError::Framework {
            action: action.into(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_framework_refusal_becomes_one_line_naming_mk_sign() {
        // The framework's own text (macOS 13–15), from `validateWithError:` and `start`.
        for message in [
            "Invalid virtual machine configuration. The process doesn\u{2019}t have the \
             \u{201c}com.apple.security.virtualization\u{201d} entitlement.",
            "The process doesn't have the \"com.apple.security.virtualization\" entitlement.",
        ] {
            let error = framework_error("validate the VM configuration", message);
            assert!(matches!(error, VzError::MissingEntitlement), "{error}");
            let text = error.to_string();
            assert_eq!(text.lines().count(), 1, "{text}");
            assert!(text.ends_with("sign it with `mk sign`"), "{text}");
        }
    }

    #[test]
    fn other_framework_errors_keep_their_message() {
        let error = framework_error("start the VM", "The storage device attachment is invalid.");
        assert_eq!(
            error.to_string(),
            "Virtualization framework failed to start the VM: The storage device attachment is invalid."
        );
        // The hypervisor entitlement is another matter (and another fix).
        assert!(!is_missing_entitlement(
            "missing com.apple.security.hypervisor entitlement"
        ));
    }

    #[test]
    fn the_shipped_plist_grants_the_entitlement() {
        let plist: String = ENTITLEMENTS_PLIST.split_whitespace().collect();
        assert!(
            plist.contains(&format!("<key>{ENTITLEMENT}</key><true/>")),
            "{ENTITLEMENTS_PLIST}"
        );
        assert!(plist.starts_with("<?xmlversion=\"1.0\"encoding=\"UTF-8\"?>"));
    }

    #[test]
    fn the_mkfile_sign_target_runs_the_documented_command() {
        let mkfile = include_str!("../../../mkfile");
        let recipe = mkfile
            .split("\nsign:V:")
            .nth(1)
            .expect("a `sign:V:` target in the top-level mkfile");
        let command = SIGN_COMMAND.trim_end_matches("<binary>");
        assert!(recipe.contains(command), "{recipe}");
    }
}
