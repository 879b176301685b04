//! The status view of a real `kagami serve` after real pulls: `kagami status` agrees with
//! `/status.json`, and a real headless browser (Debian's chromium) renders `/status` with
//! every section and takes a screenshot of it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kagami_server::status::Report;

use crate::serve::Kagami;
use crate::support::{
    Registry, build_image, eventually_sync, http_get, kagami, require, run, run_bounded,
};

/// A running kagami that has served an image twice (cold, then warm) and failed one tag.
struct Pulled {
    _dir: tempfile::TempDir,
    _registry: Registry,
    kagami: Kagami,
}

fn serve_and_pull() -> Pulled {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry"));
    let image = build_image(&dir.path().join("image"), "3", 3, 384 * 1024);
    image.push(&format!("{}/team/tool:3", registry.addr()));
    let config = dir.path().join("registries.yaml");
    std::fs::write(
        &config,
        format!(
            "mirrors:\n  registry.example.test:\n    endpoint: [\"http://{}\"]\n",
            registry.addr()
        ),
    )
    .unwrap();
    let k = Kagami::start(
        dir.path(),
        &config,
        &[
            "--disable-default-registry-endpoint",
            "--max-store-size",
            "64MiB",
        ],
    );
    let via = format!("{}/registry.example.test/team/tool:3", k.addr());
    for copy in ["cold", "warm"] {
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{via}"))
            .arg(format!("oci:{}:3", dir.path().join(copy).display())));
    }
    // A tag the upstream does not have: a failure in the endpoint health.
    let (status, _, _) = http_get(
        &k.addr(),
        "/v2/registry.example.test/team/tool/manifests/missing",
    );
    assert_eq!(status, 404);
    // A request kagami refuses (malformed percent-encoding in ns): listed first.
    let (status, _, _) = http_get(
        &k.addr(),
        "/v2/team/tool/manifests/3?ns=registry.example.test%3",
    );
    assert_eq!(status, 400);
    Pulled {
        _dir: dir,
        _registry: registry,
        kagami: k,
    }
}

fn report(addr: &str) -> Report {
    let (status, _, body) = http_get(addr, "/status.json");
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

/// The report once every request has been recorded (recent pulls no longer growing).
fn settled(addr: &str) -> Report {
    let mut last = report(addr);
    eventually_sync(
        Duration::from_secs(10),
        "the recent pulls to stop growing",
        || {
            std::thread::sleep(Duration::from_millis(200));
            let r = report(addr);
            let seen = last.recent_pulls.len();
            if r.recent_pulls.len() == seen {
                return Ok(r);
            }
            last = r;
            Err(format!("{seen} recent pulls"))
        },
    )
}

#[test]
fn kagami_status_prints_what_status_json_says() {
    let p = serve_and_pull();
    let addr = p.kagami.addr();
    let before = settled(&addr);
    let out = run(kagami().args(["status", "--addr", &format!("http://{addr}")]));
    let text = String::from_utf8(out.stdout).unwrap();
    let after = report(&addr);
    // Nothing moved while the CLI ran.
    assert_eq!(
        serde_json::to_value(before.bytes_served).unwrap(),
        serde_json::to_value(after.bytes_served).unwrap()
    );
    let r = after;
    // The refused request leads the report and the text, and the missing tag (a genuine
    // not-found) is not among the refusals.
    assert_eq!(r.refused.len(), 1, "{:?}", r.refused);
    assert_eq!(
        (r.refused[0].registry.as_str(), r.refused[0].reason.as_str()),
        ("-", "invalid_name")
    );
    let first = text.lines().nth(2).unwrap_or_default();
    assert!(
        first.starts_with("REFUSED: 1 request pulled around this mirror"),
        "{text}"
    );
    assert!(
        text.contains("malformed percent-encoding at byte"),
        "{text}"
    );
    for section in [
        "Node\n",
        "Members (0)\n",
        "Store\n",
        "Hit ratio\n",
        "Bytes served by source\n",
        "Recent pulls (",
        "Upstream endpoints (",
    ] {
        assert!(text.contains(section), "{section:?} missing:\n{text}");
    }
    assert!(
        text.contains(&format!("address      {addr}")),
        "the address asked for:\n{text}"
    );
    assert!(text.contains("P2P          off"), "{text}");
    // The numbers are the report's.
    assert!(
        text.contains(&format!("({} bytes) of 64.0 MiB", r.store.bytes)),
        "{text}"
    );
    assert!(text.contains(&format!("blobs        {}\n", r.store.blobs)));
    for (name, v) in [
        ("local", r.bytes_served.local),
        ("peer", r.bytes_served.peer),
        ("upstream", r.bytes_served.upstream),
    ] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(name) && l.contains(" bytes)"))
            .unwrap_or_else(|| panic!("no {name} line:\n{text}"));
        assert!(line.ends_with(&format!("({v} bytes)")), "{line}");
    }
    assert!(r.bytes_served.upstream > 3 * 384 * 1024, "{text}");
    assert!(r.bytes_served.local >= r.bytes_served.upstream, "{text}");
    let c = &r.cache;
    assert!(c.hits > 0 && c.misses > 0, "{text}");
    assert!(
        text.contains(&format!(
            "{:.1}%  ({} hits, {} misses)",
            c.hit_ratio.unwrap() * 100.0,
            c.hits,
            c.misses
        )),
        "{text}"
    );
    assert!(text.contains(&format!("Recent pulls ({})", r.recent_pulls.len())));
    // Every recent pull is a row (short digests), with both sources present.
    assert!(r.recent_pulls.iter().any(|p| p.source == "upstream"));
    assert!(r.recent_pulls.iter().any(|p| p.source == "local"));
    let rows = text
        .lines()
        .filter(|l| l.contains("registry.example.test/team/tool") && l.contains(" GET "))
        .count();
    assert_eq!(rows, r.recent_pulls.len(), "{text}");
    // The endpoint that answered, and the failure of the missing tag.
    let ep = format!("http://{}/v2", p._registry.addr());
    let e = r.endpoints.iter().find(|e| e.endpoint == ep).unwrap();
    assert!(e.fetches > 0 && e.failures == 1, "{:?}", r.endpoints);
    let line = text
        .lines()
        .find(|l| l.contains(&ep) && l.contains(" UTC"))
        .unwrap();
    assert!(line.contains("failing"), "{line}");
    assert!(
        line.contains(&format!(" {} ", e.fetches)) && line.contains(" 1 "),
        "{line}"
    );
    // The series over time carries the same bytes, and draws a sparkline.
    let sum: u64 = r.series.samples.iter().map(|s| s.upstream).sum();
    assert_eq!(sum, r.bytes_served.upstream);
    assert!(text.contains("| now"), "{text}");
    assert!(
        text.contains(&format!(
            "last error of {ep}:\n    manifest registry.example.test/team/tool:missing"
        )),
        "{text}"
    );

    let json = run(kagami().args(["status", "--format", "json", "--addr", &addr]));
    let again: Report = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(again.store.bytes, r.store.bytes);

    // A kagami that is not there: a clear error, exit code 2.
    let port = crate::support::free_port();
    let out = kagami()
        .args(["status", "--addr", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `kagami serve` running there?"));
}

/// Runs chromium with `args`, killed after 90 s; returns (success, stdout, stderr).
fn chromium(profile: &Path, args: &[String]) -> (bool, String, String) {
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .stdin(Stdio::null());
    let done = run_bounded(&mut cmd, Duration::from_secs(90));
    let Some(status) = done.status else {
        panic!("chromium {args:?} did not finish within 90 s");
    };
    (status.success(), done.stdout, done.stderr)
}

/// (width, height) from a PNG's IHDR chunk, after checking the signature.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.len() > 24, "PNG of {} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG signature");
    assert_eq!(&png[12..16], b"IHDR", "first chunk is not IHDR");
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(png[20..24].try_into().unwrap());
    (w, h)
}

#[test]
fn a_headless_browser_renders_the_status_page() {
    require(&["chromium"]);
    let p = serve_and_pull();
    let addr = p.kagami.addr();
    settled(&addr);
    let url = format!("http://{addr}/status");
    let work = tempfile::tempdir().unwrap();

    let shot = work.path().join("status.png");
    let (ok, _, err) = chromium(
        &work.path().join("profile-shot"),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,1600".into(),
            url.clone(),
        ],
    );
    assert!(ok && shot.exists(), "chromium --screenshot failed:\n{err}");
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(png_size(&png), (1280, 1600));
    // A blank or error page compresses to a few kilobytes; the page has text, tables
    // and a chart.
    assert!(
        png.len() > 40 * 1024,
        "screenshot of only {} bytes",
        png.len()
    );
    if let Some(keep) = std::env::var_os("KAGAMI_STATUS_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }

    let (ok, dom, err) = chromium(
        &work.path().join("profile-dom"),
        &["--dump-dom".into(), url],
    );
    assert!(ok, "chromium --dump-dom failed:\n{err}");
    for section in [
        "<h2>Node</h2>",
        "<h2>Store</h2>",
        "<h2>Hit ratio</h2>",
        "<h2>Bytes served</h2>",
        "Bytes served by source",
        "<h2>Members (0)</h2>",
        "<h2>Upstream endpoints</h2>",
        "Recent pulls",
    ] {
        assert!(dom.contains(section), "{section} not in the DOM:\n{dom}");
    }
    // The chart has bars, the pulls table rows with both sources.
    assert!(dom.contains("<svg") && dom.contains("<rect"), "{dom}");
    assert!(dom.contains("registry.example.test/team/tool"), "{dom}");
    assert!(dom.contains(">upstream</span>") && dom.contains(">local</span>"));
    assert!(dom.contains(&addr), "the node's address");
    // The refused requests come first on the page.
    let refused = dom.find("id=\"refused\"").expect("a refused section");
    assert!(refused < dom.find("id=\"node\"").unwrap(), "{dom}");
    assert!(
        dom.contains("Refused requests: 1 pulled around this mirror"),
        "{dom}"
    );
}
