//! `kagami status`: asks a running `kagami serve` for `/status.json` and prints it for a
//! terminal.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use kagami_server::report::Report;
use kagami_server::report::format::{
    endpoint_state, human_bytes, human_duration_ms, human_uptime, pull_image, short_digest,
    utc_datetime, utc_time,
};

use crate::Format;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The kagami to ask: its --listen address, as http://host:port or host:port.
    #[arg(
        long,
        env = "KAGAMI_STATUS_ADDR",
        default_value = "http://127.0.0.1:5000",
        value_name = "URL"
    )]
    addr: String,
    /// text: a summary for people; json: /status.json as it came.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let base = super::normalise_base(&args.addr)
        .with_context(|| format!("--addr {:?} is not an http(s) address", args.addr))?;
    let url = format!("{base}/status.json");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let body = rt.block_on(fetch(&url))?;
    if args.format == Format::Json {
        println!("{}", body.trim_end());
        return Ok(ExitCode::SUCCESS);
    }
    let report: Report = serde_json::from_str(&body)
        .with_context(|| format!("{url} did not answer a kagami status report"))?;
    print!("{}", render(&report, &base));
    Ok(ExitCode::SUCCESS)
}

async fn fetch(url: &str) -> anyhow::Result<String> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    let resp = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("asking {url} (is `kagami serve` running there?)"))?;
    let status = resp.status();
    let body = resp
        .text()
        .await
        .with_context(|| format!("reading {url}"))?;
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}");
    }
    Ok(body)
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn percent(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.1}%", v * 100.0))
}

/// A table with left-aligned text columns and right-aligned numeric ones.
fn table(out: &mut String, header: &[&str], right: &[bool], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |out: &mut String, cells: &[String]| {
        let mut l = String::from(" ");
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i] - c.chars().count();
            l.push(' ');
            if right[i] {
                l.push_str(&" ".repeat(pad));
                l.push_str(c);
            } else {
                l.push_str(c);
                l.push_str(&" ".repeat(pad));
            }
            l.push(' ');
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(
        out,
        &header.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    for r in rows {
        line(out, r);
    }
}

/// One character per three buckets (90 s), from the oldest to now.
fn sparkline(r: &Report) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let per = 3;
    let sums: Vec<u64> = r
        .series
        .samples
        .chunks(per)
        .map(|c| c.iter().map(|s| s.total()).sum())
        .collect();
    let max = sums.iter().copied().max().unwrap_or(0);
    sums.iter()
        .map(|&v| {
            if v == 0 || max == 0 {
                ' '
            } else {
                let i = ((v as f64 / max as f64) * 7.0).round() as usize;
                BARS[i.min(7)]
            }
        })
        .collect()
}

/// The terminal summary.
pub fn render(r: &Report, base: &str) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "kagami status · {base} · {} UTC\n",
        utc_datetime(r.generated_at)
    );

    if !r.refused.is_empty() {
        let total: u64 = r.refused.iter().map(|x| x.count).sum();
        let _ = writeln!(
            o,
            "REFUSED: {} pulled around this mirror (containerd tried its next host)",
            plural(total, "request", "requests")
        );
        let rows: Vec<Vec<String>> = r
            .refused
            .iter()
            .map(|x| {
                vec![
                    x.registry.clone(),
                    x.reason.clone(),
                    x.count.to_string(),
                    x.last_status.to_string(),
                    x.last_request.clone(),
                ]
            })
            .collect();
        table(
            &mut o,
            &["registry", "reason", "count", "status", "last request"],
            &[false, false, true, true, false],
            &rows,
        );
        for x in &r.refused {
            let _ = writeln!(o, "  {} {}: {}", x.registry, x.reason, x.last_message);
        }
        let _ = writeln!(o);
    }

    let n = &r.node;
    let _ = writeln!(o, "Node");
    let address = n
        .listen
        .as_deref()
        .or(n.address.as_deref())
        .unwrap_or("unknown");
    let _ = writeln!(o, "  address      {address}");
    let _ = writeln!(o, "  version      {}", n.version);
    let _ = writeln!(
        o,
        "  up           {} (since {} UTC)",
        human_uptime(n.uptime_seconds),
        utc_datetime(n.started_at)
    );
    match &n.peer_id {
        Some(id) => {
            let _ = writeln!(o, "  P2P          on, peer id {id}");
            for a in &n.p2p_addrs {
                let _ = writeln!(o, "               {a}");
            }
        }
        None => {
            let _ = writeln!(o, "  P2P          off");
        }
    }
    let _ = writeln!(
        o,
        "  fetching     {}",
        plural(r.inflight_fetches.max(0) as u64, "blob", "blobs")
    );

    let _ = writeln!(o, "\nMembers ({})", r.members.len());
    if !r.peers.enabled {
        let _ = writeln!(o, "  sharing between nodes is off");
    } else {
        let _ = writeln!(
            o,
            "  {} lookups, {} found content on another node",
            r.peers.lookups, r.peers.lookup_hits
        );
        if r.members.is_empty() {
            let _ = writeln!(o, "  no other node known yet");
        } else {
            let rows: Vec<Vec<String>> = r
                .members
                .iter()
                .map(|m| {
                    vec![
                        m.id.clone(),
                        m.http_addr.clone().unwrap_or_else(|| "–".into()),
                        human_bytes(m.received_bytes),
                    ]
                })
                .collect();
            table(
                &mut o,
                &["PEER ID", "HTTP ADDRESS", "RECEIVED"],
                &[false, false, true],
                &rows,
            );
        }
    }

    let s = &r.store;
    let _ = writeln!(o, "\nStore");
    let limit = match s.max_bytes {
        Some(max) if max > 0 => format!(
            " of {} ({:.0}%)",
            human_bytes(max),
            s.bytes as f64 / max as f64 * 100.0
        ),
        _ => ", no size limit".into(),
    };
    let _ = writeln!(
        o,
        "  used         {} ({} bytes){limit}",
        human_bytes(s.bytes),
        s.bytes
    );
    let _ = writeln!(o, "  blobs        {}", s.blobs);
    let _ = writeln!(o, "  evictions    {}", s.evictions);
    let _ = writeln!(o, "  writing      {}", s.writing);

    if let Some(c) = &r.containerd {
        let _ = writeln!(o, "\ncontainerd's content store (shared with other nodes)");
        let state = if c.connected {
            "connected"
        } else {
            "unreachable"
        };
        let _ = writeln!(o, "  socket       {} ({state})", c.socket);
        let _ = writeln!(o, "  namespace    {}", c.namespace);
        let _ = writeln!(
            o,
            "  images       {} ({} blobs, {} tags)",
            c.images, c.blobs, c.tags
        );
        let _ = writeln!(
            o,
            "  served       {} ({} blobs, {} manifests)",
            human_bytes(c.served_bytes),
            c.served_blobs,
            c.served_manifests
        );
        if let Some(e) = &c.last_error {
            let _ = writeln!(o, "  last error   {e}");
        }
    }

    if let Some(w) = &r.warm {
        let copies = w
            .copies
            .map_or_else(|| "every node".to_string(), |k| format!("{k} copies"));
        let _ = writeln!(
            o,
            "\nWarm images ({}; policy: {copies} among {})",
            w.images.len(),
            plural(w.nodes as u64, "node", "nodes")
        );
        for i in &w.images {
            let _ = writeln!(o, "  {} [{}]", super::warm::render(i), i.listed_by);
        }
    }
    if !r.pinned.is_empty() {
        let _ = writeln!(o, "\nPinned images (policy file)");
        for p in &r.pinned {
            let _ = writeln!(
                o,
                "  {}  {}  {} ({} blobs held, {} missing)",
                p.image,
                p.held,
                human_bytes(p.held_bytes),
                p.blobs_held,
                p.blobs_missing
            );
        }
    }

    let c = &r.cache;
    let _ = writeln!(o, "\nHit ratio");
    let _ = writeln!(
        o,
        "  all          {:>6}  ({}, {})",
        percent(c.hit_ratio),
        plural(c.hits, "hit", "hits"),
        plural(c.misses, "miss", "misses")
    );
    for (name, hm) in [("blobs", &c.blob), ("manifests", &c.manifest)] {
        let _ = writeln!(
            o,
            "  {name:<12} {:>6}  ({}, {})",
            percent(hm.ratio()),
            plural(hm.hits, "hit", "hits"),
            plural(hm.misses, "miss", "misses")
        );
    }

    let b = &r.bytes_served;
    let total = b.total();
    let _ = writeln!(o, "\nBytes served by source");
    for (name, v) in [
        ("local", b.local),
        ("peer", b.peer),
        ("upstream", b.upstream),
    ] {
        let share = if total > 0 {
            format!("{:.0}%", v as f64 / total as f64 * 100.0)
        } else {
            "–".into()
        };
        let _ = writeln!(
            o,
            "  {name:<12} {:>10}  {share:>4}  ({v} bytes)",
            human_bytes(v)
        );
    }
    let window = r.series.samples.len() as u64 * r.series.interval_seconds / 60;
    let _ = writeln!(o, "  last {window} min  |{}| now", sparkline(r));

    let _ = writeln!(o, "\nRecent pulls ({})", r.recent_pulls.len());
    if r.recent_pulls.is_empty() {
        let _ = writeln!(o, "  none yet");
    } else {
        let rows: Vec<Vec<String>> = r
            .recent_pulls
            .iter()
            .map(|p| {
                vec![
                    utc_time(p.at / 1000),
                    format!("{} {}", p.method, p.kind),
                    pull_image(p),
                    p.digest.as_deref().map_or("–".to_string(), short_digest),
                    p.source.clone(),
                    human_bytes(p.bytes),
                    human_duration_ms(p.duration_ms),
                    format!("{}{}", p.status, if p.complete { "" } else { " cut" }),
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "TIME", "REQUEST", "IMAGE", "DIGEST", "SOURCE", "BYTES", "TOOK", "STATUS",
            ],
            &[false, false, false, false, false, true, true, true],
            &rows,
        );
    }

    let _ = writeln!(o, "\nUpstream endpoints ({})", r.endpoints.len());
    if r.endpoints.is_empty() {
        let _ = writeln!(o, "  no upstream fetch yet");
    } else {
        let rows: Vec<Vec<String>> = r
            .endpoints
            .iter()
            .map(|e| {
                vec![
                    e.endpoint.clone(),
                    endpoint_state(e),
                    e.fetches.to_string(),
                    e.failures.to_string(),
                    e.consecutive_failures.to_string(),
                    e.last_error_at
                        .map_or("–".into(), |at| format!("{} UTC", utc_time(at / 1000))),
                ]
            })
            .collect();
        table(
            &mut o,
            &[
                "ENDPOINT",
                "STATE",
                "FETCHES",
                "FAILURES",
                "IN A ROW",
                "LAST ERROR",
            ],
            &[false, false, true, true, true, false],
            &rows,
        );
        for e in &r.endpoints {
            if let Some(err) = &e.last_failure {
                let _ = writeln!(o, "  last failure of {}:\n    {err}", e.endpoint);
            }
            if let Some(err) = &e.last_error {
                let _ = writeln!(o, "  last error of {}:\n    {err}", e.endpoint);
            }
        }
    }
    o
}
