//! `kagami import` with real tools: an image pulled into a real containerd, exported with
//! `ctr images export`, imported into a `kagami serve` that reaches no registry, pulled
//! through it with skopeo (same digest as in containerd) and from a second node over P2P.

use std::process::Command;
use std::time::Duration;

use crate::support::{
    Containerd, Node, Registry, build_image, containerd_digest, eventually_sync, http_get, kagami,
    run, skopeo_copy_retried, skopeo_digest,
};

const NAME: &str = "ksd.test.com/ksd/nginx:1.27";

/// `kagami import` aimed at `node`, with its data directory (where its admin token is).
fn import(node: &Node) -> Command {
    let mut cmd = kagami();
    cmd.arg("import")
        .args(["--addr", &format!("http://{}", node.api)])
        .arg("--data-dir")
        .arg(node.dir.join("data"));
    cmd
}

#[test]
fn ctr_export_imported_then_served_and_shared() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "1.27", 2, 256 * 1024);
    let pushed = format!("{}/ksd/nginx:1.27", registry.addr());
    image.push(&pushed);

    // Into a real containerd, renamed, exported as an air-gap tarball.
    let containerd = Containerd::start(&dir.path().join("containerd"));
    run(containerd
        .ctr()
        .args(["images", "pull", "--plain-http", &pushed]));
    run(containerd.ctr().args(["images", "tag", &pushed, NAME]));
    let digest = containerd_digest(&containerd, "default", NAME);
    let tar = dir.path().join("nginx.tar");
    run(containerd
        .ctr()
        .args(["images", "export"])
        .arg(&tar)
        .arg(NAME));
    drop(containerd);
    drop(registry);

    // Node A reaches no registry: only the import can give it the image.
    let a = Node::start(&dir.path().join("a"), "127.0.0.2", None);
    let via_a = format!("{}/{NAME}", a.api);
    let before = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{via_a}"))
        .output()
        .unwrap();
    assert!(!before.status.success(), "A served the image before import");

    let out = run(import(&a).arg(&tar));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains(&format!("imported {NAME} {digest}")),
        "{stdout}"
    );
    assert!(stdout.contains("advertised to peers"), "{stdout}");

    assert_eq!(skopeo_digest(&via_a), digest);
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{via_a}"))
        .arg(format!("oci:{}:a", dir.path().join("out-a").display())));

    // Importing it again adds nothing; a file that is not an archive is refused (exit 2)
    // with a message naming it.
    let again = run(import(&a).arg(&tar));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("0 blobs added"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, b"not a tar archive at all").unwrap();
    let bad = import(&a).arg(&junk).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    // The message of the server's error envelope, not the raw JSON.
    assert!(stderr.contains("junk.tar"), "{stderr}");
    assert!(!stderr.contains("\"errors\""), "{stderr}");

    // Without the node's admin token (another data directory), nothing is imported.
    let elsewhere = dir.path().join("not-the-data-dir");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("admin.token"), "0".repeat(64)).unwrap();
    let denied = kagami()
        .arg("import")
        .arg(&tar)
        .args(["--addr", &a.api])
        .arg("--data-dir")
        .arg(&elsewhere)
        .output()
        .unwrap();
    assert_eq!(denied.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("admin.token"), "{stderr}");

    // Node B, which reaches no registry either, gets it from A over P2P.
    let b = Node::start(&dir.path().join("b"), "127.0.0.3", Some(&a.p2p));
    eventually_sync(Duration::from_secs(20), "B to see A", || {
        let status = String::from_utf8(http_get(&b.api, "/p2p/status").2).unwrap();
        if status.contains("\"members\":[{") {
            return Ok(());
        }
        Err(format!("{status}\n{}", b.log_text()))
    });
    let via_b = format!("{}/{NAME}", b.api);
    skopeo_copy_retried(
        &via_b,
        &format!("oci:{}:b", dir.path().join("out-b").display()),
        "B to pull the imported image from A",
        || format!("A:\n{}\nB:\n{}", a.log_text(), b.log_text()),
    );
    assert_eq!(skopeo_digest(&via_b), digest);
}

/// Archives written by skopeo: `oci-archive:` keeps the image's manifest (same digest);
/// `docker-archive:` (the `docker save` format, uncompressed layers) is served by tag under
/// a manifest kagami builds, with the same config.
#[test]
fn skopeo_oci_and_docker_archives() {
    let dir = tempfile::tempdir().unwrap();
    let image = build_image(&dir.path().join("image"), "2.0", 2, 128 * 1024);
    let src = format!("oci:{}:2.0", image.layout.display());
    let oci_tar = dir.path().join("app-oci.tar");
    let docker_tar = dir.path().join("app-docker.tar");
    run(Command::new("skopeo")
        .args(["copy", "--quiet", &src])
        .arg(format!(
            "oci-archive:{}:ksd.test.com/ksd/app:oci",
            oci_tar.display()
        )));
    run(Command::new("skopeo")
        .args(["copy", "--quiet", &src])
        .arg(format!(
            "docker-archive:{}:ksd.test.com/ksd/app:docker",
            docker_tar.display()
        )));
    let inspect = |reference: &str, format: &str| {
        let out = run(Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--format", format])
            .arg(reference));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let layout_digest = inspect(&src, "{{.Digest}}");
    let layout_layers = inspect(&src, "{{len .Layers}}");

    let node = Node::start(&dir.path().join("node"), "127.0.0.1", None);
    let out = run(import(&node).arg(&oci_tar).arg(&docker_tar));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("(oci-archive)"), "{stdout}");
    assert!(stdout.contains("(docker-archive)"), "{stdout}");

    let via = |tag: &str| format!("docker://{}/ksd.test.com/ksd/app:{tag}", node.api);
    assert_eq!(inspect(&via("oci"), "{{.Digest}}"), layout_digest);
    let docker_digest = inspect(&via("docker"), "{{.Digest}}");
    assert!(
        stdout.contains(&format!(
            "imported ksd.test.com/ksd/app:docker {docker_digest}"
        )),
        "{stdout}"
    );
    assert_ne!(
        docker_digest, layout_digest,
        "docker save has another manifest"
    );
    assert_eq!(inspect(&via("docker"), "{{len .Layers}}"), layout_layers);
    for tag in ["oci", "docker"] {
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(via(tag))
            .arg(format!("oci:{}:{tag}", dir.path().join("out").display())));
    }
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(via("docker")));
    let m: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(
        m["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar"
    );
}
