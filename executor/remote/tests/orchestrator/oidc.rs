//! CI jobs' OIDC ID tokens at the orchestrator: a fake issuer on loopback, a real server
//! trusting it, and every token that must be refused or kept out of the trusted scope.

use serde_json::{Value, json};

use super::issuer::{self, Issuer};
use super::*;
use ci_exec_remote::server::oidc::OidcOptions;

const REPOSITORY_ID: u64 = 4242;
const OWNER_ID: u64 = 77;

/// An orchestrator that accepts `issuer`'s tokens, with `REPO` bound to its ids.
fn serve(issuer: &Issuer) -> Running {
    let server = start_with(None, "127.0.0.1:0", |options| {
        options.oidc = Some(OidcOptions {
            issuers: vec![issuer.url.clone()],
            audience: String::new(),
            session: std::time::Duration::from_secs(600),
        })
    });
    server
        .storage()
        .bind(
            &issuer.url,
            &REPOSITORY_ID.to_string(),
            &OWNER_ID.to_string(),
            REPO,
        )
        .expect("bind");
    server
}

fn main_push() -> Value {
    issuer::github(REPOSITORY_ID, OWNER_ID, "push", "refs/heads/main", true)
}

/// A client that logged in with `token`.
fn logged_in(server: &Running, token: String) -> (Orchestrator, ci_exec_remote::wire::Login) {
    let mut client = Orchestrator::new(ClientOptions {
        url: server.url.clone(),
        id_token: Some(token),
        repository: REPO.into(),
        ..ClientOptions::default()
    })
    .expect("client");
    let login = client.log_in().expect("login").expect("a session");
    (client, login)
}

/// `POST /<REPO>/login` with `token`: status and error.
fn login_raw(server: &Running, token: &str) -> (u16, String) {
    raw(
        server.addr(),
        &request("POST", &format!("/{REPO}/login"), Some(token), b""),
    )
}

#[test]
fn a_protected_push_logs_in_with_its_id_token_and_publishes_to_the_trusted_scope() {
    let issuer = Issuer::start();
    let server = serve(&issuer);
    let (client, login) = logged_in(&server, issuer.token(main_push(), &server.url));
    assert!(login.publish);
    assert_eq!(login.scope, None);
    assert!(login.token.starts_with("cis_"));

    let a = executor("a");
    let record = recorded(&a.store, &key(1));
    assert_eq!(
        client.publish(&record, &a.store, &a.key).expect("publish"),
        Published::Created
    );
    // A laptop with a read token sees it, signed by a key the repository now trusts.
    let read = server.token(REPO, false);
    let b = executor("b");
    let fetched = server
        .client(Some(&read))
        .fetch(&key(1), &b.store, &[], &b.key.public())
        .expect("fetch");
    assert!(matches!(fetched, Fetched::Stored(_)), "{fetched:?}");
    assert_eq!(issuer.jwks_fetches(), 1);
}

#[test]
fn bad_id_tokens_are_refused_each_with_its_reason() {
    let issuer = Issuer::start();
    let server = serve(&issuer);
    let audience = server.url.clone();
    let now = issuer::now();
    let with = |changes: Value| {
        let mut claims = main_push();
        if let (Some(claims), Some(changes)) = (claims.as_object_mut(), changes.as_object()) {
            for (name, value) in changes {
                claims.insert(name.clone(), value.clone());
            }
        }
        claims
    };
    let complete = |claims: Value| issuer.complete(claims, &audience);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong audience",
            issuer.token(main_push(), "https://other.example.org"),
            "not `http://127.0.0.1",
        ),
        (
            "expired",
            issuer.token(
                with(json!({"iat": now - 900, "nbf": now - 900, "exp": now - 600})),
                &audience,
            ),
            "expired",
        ),
        (
            "not valid yet",
            issuer.token(with(json!({"nbf": now + 3600})), &audience),
            "not valid yet",
        ),
        (
            "issued in the future",
            issuer.token(with(json!({"iat": now + 3600})), &audience),
            "issued in the future",
        ),
        (
            "signed by another key",
            issuer::impostor(&complete(main_push())),
            "signature does not verify",
        ),
        (
            "of an issuer not trusted",
            issuer.token(with(json!({"iss": "https://evil.example.org"})), &audience),
            "not accepted here",
        ),
        (
            // A fork runs its own CI as its own repository: another id, whatever its name.
            "of a fork (another repository id, same name)",
            issuer.token(
                issuer::github(9999, 12, "push", "refs/heads/main", true),
                &audience,
            ),
            "no repository is bound",
        ),
        (
            // Same id, another owner: the repository was transferred or re-registered.
            "of another owner",
            issuer.token(
                issuer::github(REPOSITORY_ID, 12, "push", "refs/heads/main", true),
                &audience,
            ),
            "owner id 12",
        ),
        (
            "without jti",
            issuer.sign(&{
                let mut claims = complete(main_push());
                if let Some(claims) = claims.as_object_mut() {
                    claims.remove("jti");
                }
                claims
            }),
            "no `jti`",
        ),
        (
            "signed with HS256",
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &complete(main_push()),
                &jsonwebtoken::EncodingKey::from_secret(b"guessable").expect("key"),
            )
            .expect("sign"),
            "only RS256",
        ),
    ];
    for (case, token, reason) in cases {
        let (status, body) = login_raw(&server, &token);
        assert_eq!(status, 401, "{case}: {body}");
        assert!(body.contains(reason), "{case}: {body}");
    }
    // The first token for an unknown `kid` could fetch the keys again; none did, because they
    // were fetched less than a minute ago.
    assert_eq!(issuer.jwks_fetches(), 1);
}

#[test]
fn an_id_token_is_good_for_one_login() {
    let issuer = Issuer::start();
    let server = serve(&issuer);
    let token = issuer.token(main_push(), &server.url);
    let (status, body) = login_raw(&server, &token);
    assert_eq!(status, 200, "{body}");
    let (status, body) = login_raw(&server, &token);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("already used"), "{body}");
    // Nor is it a bearer for anything else once used.
    let (status, _) = raw(
        server.addr(),
        &request("GET", &format!("/{REPO}/keys"), Some(&token), b""),
    );
    assert_eq!(status, 401);
}

#[test]
fn unknown_key_ids_fetch_the_issuers_keys_at_most_once_a_minute() {
    let issuer = Issuer::start();
    let server = serve(&issuer);
    for _ in 0..3 {
        let claims = issuer.complete(main_push(), &server.url);
        let token = issuer::sign_with(
            &claims,
            &std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/oidc-issuer.pem"))
                .expect("key"),
            "rotated-away",
        );
        let (status, body) = login_raw(&server, &token);
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("no key `rotated-away`"), "{body}");
    }
    assert_eq!(issuer.jwks_fetches(), 1, "one fetch for three unknown kids");
}

#[test]
fn a_pull_request_writes_its_own_scope_and_reads_the_trusted_one() {
    let issuer = Issuer::start();
    let server = serve(&issuer);
    let pull = |number: u32| {
        issuer.token(
            issuer::github(
                REPOSITORY_ID,
                OWNER_ID,
                "pull_request",
                &format!("refs/pull/{number}/merge"),
                false,
            ),
            &server.url,
        )
    };
    let (pr7, login) = logged_in(&server, pull(7));
    assert!(login.publish);
    assert_eq!(login.scope.as_deref(), Some("pr/7"));
    let a = executor("a");
    let from_pr = recorded(&a.store, &key(2));
    assert_eq!(
        pr7.publish(&from_pr, &a.store, &a.key).expect("publish"),
        Published::Created
    );

    // The default branch never sees it: no poisoned result in front of `main`.
    let (main, _) = logged_in(&server, issuer.token(main_push(), &server.url));
    let b = executor("b");
    let fetched = main
        .fetch(&key(2), &b.store, &[], &b.key.public())
        .expect("fetch");
    assert!(matches!(fetched, Fetched::Miss), "{fetched:?}");
    let read = server.token(REPO, false);
    let fetched = server
        .client(Some(&read))
        .fetch(&key(2), &b.store, &[], &b.key.public())
        .expect("fetch");
    assert!(matches!(fetched, Fetched::Miss), "{fetched:?}");
    // Another pull request does not either; a later run of the same one does.
    let (pr8, _) = logged_in(&server, pull(8));
    let fetched = pr8
        .fetch(&key(2), &b.store, &[], &b.key.public())
        .expect("fetch");
    assert!(matches!(fetched, Fetched::Miss), "{fetched:?}");
    let (pr7_again, _) = logged_in(&server, pull(7));
    let fetched = pr7_again
        .fetch(&key(2), &b.store, &[], &b.key.public())
        .expect("fetch");
    assert!(matches!(fetched, Fetched::Stored(_)), "{fetched:?}");

    // A result of `main` is read by the pull request.
    let c = executor("c");
    let from_main = recorded(&c.store, &key(3));
    assert_eq!(
        main.publish(&from_main, &c.store, &c.key).expect("publish"),
        Published::Created
    );
    let d = executor("d");
    let fetched = pr8
        .fetch(&key(3), &d.store, &[], &d.key.public())
        .expect("fetch");
    assert!(matches!(fetched, Fetched::Stored(_)), "{fetched:?}");
}

#[test]
fn untrusted_triggers_and_unprotected_refs_never_write_the_trusted_scope() {
    let issuer = Issuer::start();
    let server = serve(&issuer);
    let a = executor("a");
    let record = recorded(&a.store, &key(4));

    // `pull_request_target` runs on behalf of a fork in the base's context: read-only.
    let (target, login) = logged_in(
        &server,
        issuer.token(
            issuer::github(
                REPOSITORY_ID,
                OWNER_ID,
                "pull_request_target",
                "refs/heads/main",
                true,
            ),
            &server.url,
        ),
    );
    assert!(!login.publish);
    assert_eq!(
        target.publish(&record, &a.store, &a.key).expect("publish"),
        Published::ReadOnly
    );

    // A push to an unprotected branch writes only that branch's scope.
    let (topic, login) = logged_in(
        &server,
        issuer.token(
            issuer::github(REPOSITORY_ID, OWNER_ID, "push", "refs/heads/topic", false),
            &server.url,
        ),
    );
    assert_eq!(login.scope.as_deref(), Some("ref/refs/heads/topic"));
    assert_eq!(
        topic.publish(&record, &a.store, &a.key).expect("publish"),
        Published::Created
    );
    let (main, _) = logged_in(&server, issuer.token(main_push(), &server.url));
    let b = executor("b");
    let fetched = main
        .fetch(&key(4), &b.store, &[], &b.key.public())
        .expect("fetch");
    assert!(matches!(fetched, Fetched::Miss), "{fetched:?}");
}

#[test]
fn gitlab_tokens_map_by_project_and_namespace_id() {
    let issuer = Issuer::start();
    let server = serve(&issuer);
    server
        .storage()
        .bind(&issuer.url, "31", "5", "gitlab.com/acme/widget")
        .expect("bind");
    let mut client = Orchestrator::new(ClientOptions {
        url: server.url.clone(),
        id_token: Some(issuer.token(issuer::gitlab(31, 5, "push", "main", true), &server.url)),
        repository: "gitlab.com/acme/widget".into(),
        ..ClientOptions::default()
    })
    .expect("client");
    let login = client.log_in().expect("login").expect("session");
    assert!(login.publish);
    assert_eq!(login.scope, None);

    let merge_request = json!({"ref_path": "refs/merge-requests/3/head"});
    let mut claims = issuer::gitlab(31, 5, "merge_request_event", "topic", false);
    if let (Some(claims), Some(changes)) = (claims.as_object_mut(), merge_request.as_object()) {
        claims.extend(changes.clone());
    }
    let mut client = Orchestrator::new(ClientOptions {
        url: server.url.clone(),
        id_token: Some(issuer.token(claims, &server.url)),
        repository: "gitlab.com/acme/widget".into(),
        ..ClientOptions::default()
    })
    .expect("client");
    let login = client.log_in().expect("login").expect("session");
    assert_eq!(login.scope.as_deref(), Some("mr/3"));

    // A token of a GitLab project cannot act for the GitHub repository bound beside it.
    let (status, body) = login_raw(
        &server,
        &issuer.token(issuer::gitlab(31, 5, "push", "main", true), &server.url),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("gitlab.com/acme/widget"), "{body}");
}
