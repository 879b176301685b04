//! Issue 5's scenario with containerd's content store (feature `containerd`): an air-gap
//! tarball imported with `ctr -n k8s.io images import` into a real containerd is shared by
//! node A (`--containerd-content`) with nodes B and C, which reach no registry at all and
//! pull it by tag and by digest. A serves it from containerd without copying it.

use std::process::Command;
use std::time::Duration;

use crate::support::{
    Containerd, Node, Registry, build_image, containerd_digest, eventually_sync, http_get, run,
    sha256_hex, skopeo_copy_retried, skopeo_digest,
};

const NAME: &str = "ksd.test.com/ksd/nginx:1.27";

/// `skopeo copy` of `docker://src` into an OCI layout, retried (bounded) while the nodes'
/// routing tables fill.
fn copy(src: &str, dest: &std::path::Path, logs: &[&Node]) {
    skopeo_copy_retried(
        src,
        &format!("oci:{}:x", dest.display()),
        &format!("skopeo copy {src}"),
        || {
            logs.iter()
                .map(|n| format!("{}:\n{}", n.api, n.log_text()))
                .collect::<String>()
        },
    );
}

/// Node A (the first of its network) on 127.0.0.2 under `dir/a`, sharing the content of the
/// containerd at `socket`.
fn node_a_on_containerd(dir: &std::path::Path, socket: &std::path::Path) -> Node {
    Node::start_with(
        &dir.join("a"),
        "127.0.0.2",
        None,
        &[
            "--containerd-content",
            "--containerd-address",
            socket.to_str().unwrap(),
        ],
    )
}

#[test]
fn containerd_images_are_shared_with_nodes_that_reach_no_registry() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "1.27", 2, 384 * 1024);
    let pushed = format!("{}/ksd/nginx:1.27", registry.addr());
    image.push(&pushed);

    // The air-gap tarball: pulled into a scratch namespace, exported, removed there.
    let containerd = Containerd::start(&dir.path().join("containerd"));
    let ctr = |args: &[&str]| run(containerd.ctr().args(args));
    ctr(&["-n", "scratch", "images", "pull", "--plain-http", &pushed]);
    ctr(&["-n", "scratch", "images", "tag", &pushed, NAME]);
    let tar = dir.path().join("nginx.tar");
    ctr(&[
        "-n",
        "scratch",
        "images",
        "export",
        tar.to_str().unwrap(),
        NAME,
    ]);
    ctr(&["-n", "scratch", "images", "rm", &pushed, NAME]);
    // From here on no registry exists.
    drop(registry);
    ctr(&["-n", "k8s.io", "images", "import", tar.to_str().unwrap()]);
    let digest = containerd_digest(&containerd, "k8s.io", NAME);

    let a = node_a_on_containerd(dir.path(), &containerd.socket);
    // A scans containerd: the manifest, the config and two layers, and the tag.
    eventually_sync(
        Duration::from_secs(20),
        "A to find the image in containerd",
        || {
            let c = a.p2p_status()["containerd"].clone();
            if c["tags"] == 1 && c["blobs"] == 4 {
                assert_eq!(c["namespace"], "k8s.io");
                assert_eq!(c["connected"], true);
                return Ok(());
            }
            Err(format!("{c}\n{}", a.log_text()))
        },
    );

    let b = Node::start(&dir.path().join("b"), "127.0.0.3", Some(&a.p2p));
    let c = Node::start(&dir.path().join("c"), "127.0.0.4", Some(&a.p2p));
    b.wait_for_members();
    c.wait_for_members();

    // B by tag, C by digest.
    copy(
        &format!("{}/{NAME}", b.api),
        &dir.path().join("out-b"),
        &[&a, &b],
    );
    let by_digest = format!("{}/ksd.test.com/ksd/nginx@{digest}", c.api);
    copy(&by_digest, &dir.path().join("out-c"), &[&a, &c]);
    assert_eq!(skopeo_digest(&format!("{}/{NAME}", b.api)), digest);
    // (skopeo inspect would also list the tags, which C never resolved.)
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{by_digest}")));
    assert_eq!(format!("sha256:{}", sha256_hex(&raw.stdout)), digest);

    // The layers' bytes on B and C are containerd's, and A's store holds none of them:
    // A served them from containerd.
    let (status, _, manifest) = http_get(
        &b.api,
        &format!("/v2/ksd.test.com/ksd/nginx/manifests/{digest}"),
    );
    assert_eq!(status, 200);
    assert_eq!(format!("sha256:{}", sha256_hex(&manifest)), digest);
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(layers.len(), 2);
    let content_store = containerd
        .dir
        .join("root/io.containerd.content.v1.content/blobs/sha256");
    for layer in &layers {
        let hex = layer.strip_prefix("sha256:").unwrap();
        let original = std::fs::read(content_store.join(hex)).unwrap();
        for node in [&b, &c] {
            let (status, _, body) = http_get(
                &node.api,
                &format!("/v2/ksd.test.com/ksd/nginx/blobs/{layer}"),
            );
            assert_eq!(status, 200);
            assert!(body == original, "{layer} from {} differs", node.api);
            assert!(
                node.store_blob(layer).exists(),
                "{} did not cache {layer}",
                node.api
            );
        }
        assert!(
            !a.store_blob(layer).exists(),
            "A copied {layer} into its store"
        );
    }
    let served = a.p2p_status()["containerd"]["served_blobs"]
        .as_u64()
        .unwrap();
    assert!(served >= 2, "A served {served} blob(s) from containerd");
}

/// Without --p2p-listen there is nobody to share with: refused at start. An unreachable
/// containerd is not fatal: kagami serves, warns, and reports it in `/p2p/status`.
#[test]
fn containerd_flags_need_p2p_and_an_absent_containerd_is_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let out = crate::support::kagami()
        .args(["serve", "--containerd-content", "--listen", "127.0.0.1:1"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs --p2p-listen"), "{stderr}");

    let socket = dir.path().join("no-containerd.sock");
    let a = node_a_on_containerd(dir.path(), &socket);
    assert_eq!(http_get(&a.api, "/healthz").0, 200);
    eventually_sync(Duration::from_secs(10), "an error reported", || {
        let c = a.p2p_status()["containerd"].clone();
        if c["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(socket.to_str().unwrap()))
        {
            assert_eq!(c["connected"], false);
            return Ok(());
        }
        Err(c)
    });
    assert!(
        a.log_text().contains("containerd is unreachable"),
        "{}",
        a.log_text()
    );
}
