//! The upstream client's auth behaviour, end to end through `kagami pull`: Bearer tokens
//! with exactly one scope (the rewritten path, override-path prefix included), cached;
//! and credentials never sent across a redirect to another host.

use crate::fake_registry::{Fake, FakeOptions};
use crate::pull::{REWRITTEN, digest_of, ok, pull, pull_expecting, write_config};
use std::path::Path;
use std::process::Output;

use crate::support::{TestImage, build_image};

/// The scope the registry sees: override path prefix + rewritten repository.
const SCOPE: &str = "repository:prefix/production/busybox:pull";

fn token_pull(auth_yaml: &str, token: FakeOptions) -> (Fake, Fake) {
    let tmp = tempfile::tempdir().unwrap();
    let img = build_image(&tmp.path().join("img"), "1.35", 2, 64 * 1024);
    let tokens = img.fake(FakeOptions {
        token_scope: Some(SCOPE.into()),
        ..token
    });
    let registry = img.fake(FakeOptions {
        bearer_realm: Some(format!("{}/token", tokens.url())),
        ..Default::default()
    });
    let cfg = write_config(
        tmp.path(),
        &format!(
            "mirrors:\n  registry.example.test:\n    endpoint: [\"http://{}/v2/prefix\"]\n    rewrite:\n      \"^rancher/(.*)\": \"production/$1\"\n{auth_yaml}",
            registry.addr
        )
        .replace("REGISTRY", &registry.addr.to_string()),
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.layout.join("index.json")).unwrap()).unwrap();
    let want = digest_of(&index, |m| {
        m["annotations"]["org.opencontainers.image.ref.name"] == "1.35"
    });
    let out = tmp.path().join("out");
    pull_expecting(Some(&cfg), REWRITTEN, &out, "1.35", &want);
    (tokens, registry)
}

fn check_token_traffic(tokens: &Fake, registry: &Fake, grant: Option<&str>) {
    let token_reqs = tokens.seen();
    assert_eq!(
        token_reqs.len(),
        1,
        "exactly one token request (then cached): {token_reqs:#?}"
    );
    let t = &token_reqs[0];
    assert_eq!(
        t.scopes,
        vec![SCOPE.to_string()],
        "one scope, the path sent"
    );
    assert_eq!(t.status, 200, "{t:#?}");
    assert_eq!(t.grant.as_deref(), grant, "{t:#?}");
    let reqs = registry.seen();
    // HEAD + GET manifest, config and two layers; one 401 to learn the challenge.
    assert!(reqs.len() >= 5, "{reqs:#?}");
    assert_eq!(
        reqs.iter().filter(|r| r.status == 401).count(),
        1,
        "{reqs:#?}"
    );
    for r in &reqs {
        assert!(
            r.path.starts_with("/v2/prefix/production/busybox/"),
            "rewritten path with the override prefix: {r:#?}"
        );
        assert!(r.query.contains("ns=registry.example.test"), "{r:#?}");
        if r.status != 401 {
            assert_eq!(
                r.authorization.as_deref(),
                Some(format!("Bearer tok:{SCOPE}").as_str())
            );
            assert_eq!(r.status, 200, "{r:#?}");
        }
    }
}

#[test]
fn bearer_token_anonymous_has_one_scope_and_is_cached() {
    let (tokens, registry) = token_pull("", FakeOptions::default());
    check_token_traffic(&tokens, &registry, None);
    assert_eq!(tokens.seen()[0].method, "GET");
}

#[test]
fn bearer_token_with_basic_credentials() {
    let (tokens, registry) = token_pull(
        "configs:\n  \"REGISTRY\":\n    auth:\n      username: bob\n      password: pw\n",
        FakeOptions {
            token_basic: Some(("bob".into(), "pw".into())),
            ..Default::default()
        },
    );
    check_token_traffic(&tokens, &registry, Some("password"));
    assert_eq!(tokens.seen()[0].method, "POST");
}

#[test]
fn bearer_token_from_identity_token() {
    let (tokens, registry) = token_pull(
        "configs:\n  \"REGISTRY\":\n    auth:\n      identity_token: refresh-123\n",
        FakeOptions {
            token_refresh: Some("refresh-123".into()),
            ..Default::default()
        },
    );
    check_token_traffic(&tokens, &registry, Some("refresh_token"));
}

/// Pulls `library/redirected:1` from a registry on 127.0.0.1 that wants Basic auth
/// (alice/secret, which the config gives it) and redirects blob GETs to `storage`. Returns
/// the registry and the pull's output.
fn pull_redirected(tmp: &Path, img: &TestImage, storage: &Fake) -> (Fake, Output) {
    let registry = img.fake(FakeOptions {
        basic: Some(("alice".into(), "secret".into())),
        redirect_blobs_to: Some(storage.url()),
        ..Default::default()
    });
    let cfg = write_config(
        tmp,
        &format!(
            "configs:\n  \"{}\":\n    auth:\n      username: alice\n      password: secret\n",
            registry.addr
        ),
    );
    let o = pull(
        Some(&cfg),
        &format!("{}/library/redirected:1", registry.addr),
        &tmp.join("out"),
        &[],
    );
    (registry, o)
}

#[test]
fn credentials_not_sent_across_redirect_to_another_host() {
    let tmp = tempfile::tempdir().unwrap();
    let img = build_image(&tmp.path().join("img"), "1", 1, 64 * 1024);
    // Blob storage on another loopback address records what it receives.
    let storage = Fake::start("127.0.0.2", &img.layout, FakeOptions::default());
    let (registry, o) = pull_redirected(tmp.path(), &img, &storage);
    let summary = ok(&o);
    assert!(
        summary.contains("2 fetched") || summary.contains("3 fetched"),
        "{summary}"
    );
    let reg = registry.seen();
    let redirected: Vec<_> = reg.iter().filter(|r| r.status == 307).collect();
    assert_eq!(redirected.len(), 2, "config and layer redirected: {reg:#?}");
    for r in &redirected {
        assert_eq!(r.authorization.as_deref(), Some("Basic YWxpY2U6c2VjcmV0"));
    }
    let got = storage.seen();
    assert_eq!(got.len(), 2, "{got:#?}");
    for r in &got {
        assert!(r.path.contains("/blobs/sha256:"), "{r:#?}");
        assert_eq!(
            r.authorization, None,
            "credentials leaked to another host: {r:#?}"
        );
        assert_eq!(r.status, 200);
    }
}

#[test]
fn server_errors_are_retried_once_on_the_last_attempt_only() {
    let tmp = tempfile::tempdir().unwrap();
    let img = build_image(&tmp.path().join("img"), "1", 1, 16 * 1024);
    let run = |fail_first: usize| {
        let fake = img.fake(FakeOptions {
            fail_first,
            ..Default::default()
        });
        let out = tmp.path().join(format!("out{fail_first}"));
        let o = pull(None, &format!("{}/library/flaky:1", fake.addr), &out, &[]);
        (o, fake.seen())
    };
    // One 503, then fine: the retry succeeds.
    let (o, seen) = run(1);
    ok(&o);
    assert_eq!(seen[0].status, 503);
    // Two 503s in a row: retried once only, then the pull fails naming the status.
    let (o, seen) = run(2);
    let err = crate::pull::failed(&o);
    assert!(err.contains("HTTP 503"), "{err}");
    assert_eq!(seen.len(), 2, "exactly one retry: {seen:#?}");
}

/// A 401 from the target of a cross-origin redirect is not answered with the endpoint's
/// credentials: its challenge names a token service chosen by that other origin (here on
/// the endpoint's own host name, where kagami would otherwise send the password over
/// plain http).
#[test]
fn credentials_not_sent_to_a_token_service_named_by_a_redirect_target() {
    let tmp = tempfile::tempdir().unwrap();
    let img = build_image(&tmp.path().join("img"), "1", 1, 16 * 1024);
    let tokens = img.fake(FakeOptions {
        token_scope: Some("repository:library/redirected:pull".into()),
        token_basic: Some(("alice".into(), "secret".into())),
        ..Default::default()
    });
    let storage = Fake::start(
        "127.0.0.2",
        &img.layout,
        FakeOptions {
            bearer_realm: Some(format!("{}/token", tokens.url())),
            ..Default::default()
        },
    );
    let (_registry, o) = pull_redirected(tmp.path(), &img, &storage);
    let err = crate::pull::failed(&o);
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(
        storage.seen().iter().all(|r| r.status == 401),
        "{:#?}",
        storage.seen()
    );
    assert_eq!(
        tokens.seen().len(),
        0,
        "credentials went to the redirect target's token service: {:#?}",
        tokens.seen()
    );
}
