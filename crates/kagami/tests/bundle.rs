//! `kagami bundle`, the air-gap bundle, with real parts: images pulled from a loopback
//! docker-registry, the kagami image from scripts/build-image.sh, the bundle's image
//! archives loaded into a real containerd (`ctr images import`, what K3s does with its
//! agent/images folder) and into a `kagami serve` that reaches no registry (`kagami
//! import`), which then serves them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{
    Containerd, Node, Registry, build_image, containerd_digest, kagami, run, skopeo_digest,
};

const NAME_APP: &str = "ksd.test.com/team/app:1.0";
const NAME_TOOL: &str = "ksd.test.com/tools/debug:2.1";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn bundle_carries_kagami_deploy_files_and_images_into_an_air_gap() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let registry = Registry::start(&d.join("registry"));
    let image = build_image(&d.join("image"), "1.0", 2, 128 * 1024);
    // The site's images are named ksd.test.com/...; outside, that name is mirrored to
    // the loopback registry.
    image.push(&format!("{}/team/app:1.0", registry.addr()));
    image.push(&format!("{}/tools/debug:2.1", registry.addr()));
    let (app, tool) = (NAME_APP.to_string(), NAME_TOOL.to_string());
    let config = d.join("registries.yaml");
    std::fs::write(
        &config,
        format!(
            "mirrors:\n  ksd.test.com:\n    endpoint: [\"http://{}\"]\n",
            registry.addr()
        ),
    )
    .unwrap();
    let list = d.join("images.txt");
    std::fs::write(
        &list,
        format!("# what the site runs\n{tool}\n{app}  # twice\n"),
    )
    .unwrap();

    // The kagami image, as an operator builds it.
    let kagami_tar = d.join("kagami.tar");
    run(Command::new(repo().join("scripts/build-image.sh"))
        .arg(&kagami_tar)
        .env("KAGAMI_BIN", env!("CARGO_BIN_EXE_kagami"))
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .env("IMAGE_NAME", "localhost/kagami:test"));

    let bundle = |out: &Path| {
        run(kagami()
            .arg("bundle")
            .arg("--config")
            .arg(&config)
            .arg(&app)
            .arg("--images-file")
            .arg(&list)
            .arg("--kagami-image")
            .arg(&kagami_tar)
            .arg("--output")
            .arg(out))
    };
    let out = bundle(&d.join("bundle.tar"));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 images"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Reproducible: the same inputs give the same bytes.
    bundle(&d.join("again.tar"));
    assert!(
        std::fs::read(d.join("bundle.tar")).unwrap() == std::fs::read(d.join("again.tar")).unwrap(),
        "two bundles of the same images differ"
    );

    let x = d.join("x");
    std::fs::create_dir_all(&x).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(d.join("bundle.tar"))
        .arg("-C")
        .arg(&x));
    let root = x.join("kagami-bundle");
    for f in [
        "daemonset.yaml",
        "configmap.yaml",
        "kustomization.yaml",
        "namespace.yaml",
        "secret.yaml",
        "service.yaml",
    ] {
        assert_eq!(
            std::fs::read(root.join("deploy/kubernetes").join(f)).unwrap(),
            std::fs::read(repo().join("deploy/kubernetes").join(f)).unwrap(),
            "{f} differs from the repository's"
        );
    }
    assert!(
        std::fs::read(root.join("images/kagami.tar")).unwrap()
            == std::fs::read(&kagami_tar).unwrap(),
        "the bundle's kagami image is not the one built"
    );
    let digest = skopeo_digest(&format!("{}/team/app:1.0", registry.addr()));
    let listed = std::fs::read_to_string(root.join("images.txt")).unwrap();
    assert_eq!(listed, format!("{app} {digest}\n{tool} {digest}\n"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("localhost/kagami:test"), "{readme}");
    assert!(readme.contains("agent/images"), "{readme}");

    // The air gap: nothing below reaches the registry.
    drop(registry);

    // What K3s does with agent/images (and the README's containerd step): ctr import.
    let containerd = Containerd::start(&d.join("containerd"));
    run(containerd
        .ctr()
        .args(["images", "import"])
        .arg(root.join("images/kagami.tar")));
    run(containerd
        .ctr()
        .args(["images", "import"])
        .arg(root.join("images/preload.tar")));
    assert_eq!(containerd_digest(&containerd, "default", &app), digest);
    assert_eq!(containerd_digest(&containerd, "default", &tool), digest);
    assert!(
        containerd.images().contains("localhost/kagami:test"),
        "{}",
        containerd.images()
    );
    drop(containerd);

    // Into a kagami that reaches no registry, which then serves both names.
    let node = Node::start(&d.join("node"), "127.0.0.2", None);
    let out = run(kagami()
        .arg("import")
        .args(["--addr", &format!("http://{}", node.api)])
        .arg("--data-dir")
        .arg(node.dir.join("data"))
        .arg(root.join("images/preload.tar")));
    let stdout = String::from_utf8(out.stdout).unwrap();
    for name in [&app, &tool] {
        assert!(
            stdout.contains(&format!("imported {name} {digest}")),
            "{stdout}"
        );
        assert_eq!(skopeo_digest(&format!("{}/{name}", node.api)), digest);
    }
}

#[test]
fn bundle_refuses_what_is_not_a_kagami_image_and_bad_lists() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let not_image = d.join("kagami.tar");
    std::fs::write(&not_image, "not a tar").unwrap();
    // `kagami bundle ARGS --kagami-image <not an image> --output b.tar`: its stderr, after
    // checking that it failed with exit code 2.
    let refused = |args: &[&std::ffi::OsStr]| -> String {
        let out = kagami()
            .arg("bundle")
            .args(args)
            .arg("--kagami-image")
            .arg(&not_image)
            .arg("--output")
            .arg(d.join("b.tar"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&["alpine:3.20".as_ref()]);
    assert!(
        err.contains("--kagami-image") && err.contains("not an OCI archive"),
        "{err}"
    );

    let list = d.join("list.txt");
    std::fs::write(&list, "alpine:3.20\nNot/A Valid:Name\n").unwrap();
    let err = refused(&["--images-file".as_ref(), list.as_os_str()]);
    assert!(err.contains(&format!("{}:2", list.display())), "{err}");
    assert!(!d.join("b.tar").exists(), "a bundle was written");
}
