//! Signatures and SBOMs through the mirror (OCI 1.1 referrers) with real parts: the Debian
//! docker-registry (2.8) has no referrers API, so kagami builds the answer from the
//! referrers tag schema (the image index under the tag `sha256-<hex>`, which cosign, notation
//! and oras maintain on such registries). The artifact and the index are pushed with plain
//! HTTP PUTs, as those clients do; the registry stores them byte for byte. (The Python oras
//! SDK on PyPI can push a manifest with a `subject`, but it keeps no tag-schema index and
//! sets no `artifactType`, so the part under test would be written by hand anyway.)

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::node::Node;
use crate::support::{Registry, build_image, eventually_sync, http_get, private, run, sha256_hex};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const SBOM: &str = "application/spdx+json";
const EMPTY: &str = "application/vnd.oci.empty.v1+json";

/// `curl` GET of `url` with `Accept: accept`: (status, body).
fn curl_get(url: &str, accept: &str) -> (u16, Vec<u8>) {
    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "30", "-H"])
        .arg(format!("Accept: {accept}"))
        .args(["-w", "\n%{http_code}"])
        .arg(url));
    let mut body = out.stdout;
    let nl = body.iter().rposition(|b| *b == b'\n').unwrap();
    let status = String::from_utf8_lossy(&body[nl + 1..]).parse().unwrap();
    body.truncate(nl);
    (status, body)
}

/// Uploads `data` as a blob of `repo` (POST, then one PUT); returns its digest.
fn put_blob(dir: &Path, registry: &str, repo: &str, data: &[u8]) -> String {
    let digest = format!("sha256:{}", sha256_hex(data));
    let file = dir.join(digest.replace(':', "-"));
    std::fs::write(&file, data).unwrap();
    let out = run(Command::new("curl")
        .args(["-sS", "-f", "-i", "-X", "POST"])
        .arg(format!("http://{registry}/v2/{repo}/blobs/uploads/")));
    let head = String::from_utf8(out.stdout).unwrap();
    let location = head
        .lines()
        .find_map(|l| {
            l.split_once(": ")
                .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
        })
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| panic!("no Location in {head}"));
    let url = if location.starts_with("http") {
        location
    } else {
        format!("http://{registry}{location}")
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    run(Command::new("curl")
        .args([
            "-sS",
            "-f",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("{url}{sep}digest={digest}")));
    digest
}

/// PUTs a manifest (or index) of `media_type` under `reference` (a tag or its digest).
fn put_manifest(
    dir: &Path,
    registry: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &str,
) {
    let file = dir.join(format!("manifest-{}", sha256_hex(body.as_bytes())));
    std::fs::write(&file, body).unwrap();
    run(Command::new("curl")
        .args(["-sS", "-f", "-X", "PUT", "-H"])
        .arg(format!("Content-Type: {media_type}"))
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(format!("http://{registry}/v2/{repo}/manifests/{reference}")));
}

/// A `kagami serve` with P2P on `ip`, configured by `config`.
fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|l| {
        l.split_once(": ")
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    })
}

/// An SBOM attached to an image on docker-registry 2.8 (no referrers API: the index under
/// the tag-schema tag): kagami answers `referrers/<digest>` with it, filters by artifact
/// type, answers an empty list for a manifest without referrers, and serves the SBOM's
/// manifest and blobs by digest. A second node, with the registry stopped, gets the list,
/// the manifest and the SBOM from the first.
#[test]
fn referrers_from_the_tag_schema_reach_a_second_node_with_the_registry_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let reg = registry.addr();
    let image = build_image(&dir.path().join("image"), "1", 1, 1024);
    image.push(&format!("{reg}/team/app:1"));
    let (status, subject_bytes) = curl_get(
        &format!("http://{reg}/v2/team/app/manifests/1"),
        OCI_MANIFEST,
    );
    assert_eq!(status, 200);
    let hex = sha256_hex(&subject_bytes);
    let subject = format!("sha256:{hex}");

    // The SBOM, as an OCI 1.1 artifact whose subject is the image.
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let empty = put_blob(&work, &reg, "team/app", b"{}");
    let sbom = br#"{"spdxVersion":"SPDX-2.3","name":"app","packages":[]}"#;
    let sbom_digest = put_blob(&work, &reg, "team/app", sbom);
    let annotations =
        serde_json::json!({"org.opencontainers.image.created": "2026-11-28T00:00:00Z"});
    let artifact = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SBOM,
        "config": {"mediaType": EMPTY, "digest": empty, "size": 2},
        "layers": [{"mediaType": SBOM, "digest": sbom_digest, "size": sbom.len()}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": subject_bytes.len()},
        "annotations": annotations,
    })
    .to_string();
    let artifact_digest = format!("sha256:{}", sha256_hex(artifact.as_bytes()));
    put_manifest(
        &work,
        &reg,
        "team/app",
        &artifact_digest,
        OCI_MANIFEST,
        &artifact,
    );
    // What the clients maintain on a registry without the referrers API.
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": artifact_digest,
            "size": artifact.len(),
            "artifactType": SBOM,
            "annotations": annotations,
        }],
    })
    .to_string();
    put_manifest(
        &work,
        &reg,
        "team/app",
        &format!("sha256-{hex}"),
        OCI_INDEX,
        &index,
    );
    let (status, _) = curl_get(
        &format!("http://{reg}/v2/team/app/referrers/{subject}"),
        OCI_INDEX,
    );
    assert_eq!(status, 404, "docker-registry 2.8 has no referrers API");

    let psk = dir.path().join("psk");
    std::fs::write(&psk, crate::support::node::PSK).unwrap();
    private(&psk);
    let config = dir.path().join("registries.yaml");
    std::fs::write(
        &config,
        format!("mirrors:\n  registry.example.test:\n    endpoint: [\"http://{reg}\"]\n"),
    )
    .unwrap();
    let a = Node::start_configured(&dir.path().join("a"), "127.0.0.2", &config, &psk, None, &[]);
    let path = format!("/v2/registry.example.test/team/app/referrers/{subject}");
    let (status, head, body) = http_get(&a.api, &path);
    assert_eq!(status, 200, "{head}\n{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&head, "content-type"), Some(OCI_INDEX));
    assert_eq!(header(&head, "oci-filters-applied"), None);
    let list = json(&body);
    assert_eq!(list["mediaType"], OCI_INDEX);
    let manifests = list["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{list}");
    assert_eq!(manifests[0]["digest"], artifact_digest.as_str());
    assert_eq!(manifests[0]["artifactType"], SBOM);
    assert_eq!(manifests[0]["annotations"], annotations);

    // Filtered by artifact type (here, by kagami: the registry cannot).
    let (status, head, body) = http_get(
        &a.api,
        &format!("{path}?artifactType=application%2Fvnd.dev.cosign.simplesigning.v1%2Bjson"),
    );
    assert_eq!(status, 200);
    assert_eq!(header(&head, "oci-filters-applied"), Some("artifactType"));
    assert_eq!(json(&body)["manifests"].as_array().unwrap().len(), 0);
    let (_, head, body) = http_get(
        &a.api,
        &format!("{path}?artifactType=application%2Fspdx%2Bjson"),
    );
    assert_eq!(header(&head, "oci-filters-applied"), Some("artifactType"));
    assert_eq!(json(&body)["manifests"].as_array().unwrap().len(), 1);

    // A manifest nothing refers to: an empty list, not a 404.
    let (status, _, body) = http_get(
        &a.api,
        &format!(
            "/v2/registry.example.test/team/app/referrers/sha256:{}",
            "0".repeat(64)
        ),
    );
    assert_eq!(status, 200);
    assert_eq!(json(&body)["manifests"], serde_json::json!([]));

    // The SBOM itself through kagami's normal paths, verified by digest.
    let manifest_path = format!("/v2/registry.example.test/team/app/manifests/{artifact_digest}");
    let blob_path = format!("/v2/registry.example.test/team/app/blobs/{sbom_digest}");
    let (status, _, body) = http_get(&a.api, &manifest_path);
    assert_eq!((status, body.as_slice()), (200, artifact.as_bytes()));
    let (status, _, body) = http_get(&a.api, &blob_path);
    assert_eq!((status, body.as_slice()), (200, &sbom[..]));

    // A second node joins; the registry goes away.
    let b = Node::start_configured(
        &dir.path().join("b"),
        "127.0.0.3",
        &config,
        &psk,
        Some(&a.p2p),
        &[],
    );
    drop(registry);
    // Provider records take a moment to spread: asked again until the answer comes.
    eventually_sync(
        Duration::from_secs(30),
        "node b to get the referrers from node a".to_string(),
        || {
            let (status, _, body) = http_get(&b.api, &path);
            let list: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if status == 200 && list["manifests"][0]["digest"] == artifact_digest.as_str() {
                return Ok(());
            }
            Err(format!(
                "{status} {}\n{}",
                String::from_utf8_lossy(&body),
                std::fs::read_to_string(&b.log).unwrap_or_default()
            ))
        },
    );
    let (status, _, body) = http_get(&b.api, &manifest_path);
    assert_eq!((status, body.as_slice()), (200, artifact.as_bytes()));
    let (status, _, body) = http_get(&b.api, &blob_path);
    assert_eq!((status, body.as_slice()), (200, &sbom[..]));
    let metrics = String::from_utf8(http_get(&b.api, "/metrics").2).unwrap();
    assert!(
        metrics.contains("route=\"referrers\""),
        "the referrers route is counted: {metrics}"
    );
    // Node a answers from its own record with the registry gone.
    let (status, _, body) = http_get(&a.api, &path);
    assert_eq!(
        status,
        200,
        "{}",
        std::fs::read_to_string(&a.log).unwrap_or_default()
    );
    assert_eq!(
        json(&body)["manifests"][0]["digest"],
        artifact_digest.as_str()
    );
}
