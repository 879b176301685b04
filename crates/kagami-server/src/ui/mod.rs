//! The web UI: the `/status` page, server-rendered HTML with inline SVG, no JavaScript and
//! no external assets (the stylesheet, `status.css`, is compiled in). It renders a
//! [`Report`] and nothing else; only the HTTP layer (`crate::status`) uses it, so the
//! registry and its services never depend on the page.

use std::fmt::Write as _;

use crate::report::format::{
    human_bytes, human_duration_ms, human_uptime, pull_image, short_digest, utc_datetime, utc_time,
};
use crate::report::{HitMiss, RECENT, Report, SOURCES};

/// The page's stylesheet, inlined into `<style>` (the page's CSP allows only that).
const CSS: &str = include_str!("status.css");

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const COLORS: [&str; 3] = ["#2f9e6a", "#3b82f6", "#f08c2e"];

fn source_color(source: &str) -> &'static str {
    match source {
        "local" => COLORS[0],
        "peer" => COLORS[1],
        "upstream" => COLORS[2],
        _ => "#8a94a3",
    }
}

/// Renders the page. Every string from outside is escaped.
pub fn render_html(r: &Report) -> String {
    let mut h = String::with_capacity(32 * 1024);
    let title = match (&r.node.listen, &r.node.address) {
        (Some(a), _) | (None, Some(a)) => format!("kagami status · {a}"),
        _ => "kagami status".to_string(),
    };
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{CSS}</style></head><body>\n",
        escape(&title)
    );
    let _ = write!(
        h,
        "<header><h1>kagami</h1><span class=\"sub\">registry mirror · node status</span>\
         <span class=\"right\">updated {} UTC · refreshes every 5 s · <a style=\"color:#9fb0c4\" href=\"/status.json\">JSON</a></span></header>\n<main>\n",
        utc_datetime(r.generated_at)
    );
    refused_card(&mut h, r);
    node_card(&mut h, r);
    store_card(&mut h, r);
    hit_card(&mut h, r);
    bytes_card(&mut h, r);
    chart_card(&mut h, r);
    members_card(&mut h, r);
    containerd_card(&mut h, r);
    warm_card(&mut h, r);
    pinned_card(&mut h, r);
    endpoints_card(&mut h, r);
    pulls_card(&mut h, r);
    h.push_str("</main></body></html>\n");
    h
}

/// First on the page, and only when there is something to say.
fn refused_card(h: &mut String, r: &Report) {
    if r.refused.is_empty() {
        return;
    }
    let total: u64 = r.refused.iter().map(|x| x.count).sum();
    let _ = write!(
        h,
        "<section class=\"wide\" id=\"refused\"><h2 class=\"bad\">Refused requests: {total} pulled around this mirror</h2>\
         <p class=\"muted\">containerd takes any error from kagami as \"try the next host\" and pulls from the registry itself: \
         no cache and no sharing for these. <code>kagami doctor</code> checks a node's setup.</p>\
         <table><tr><th>registry</th><th>reason</th><th class=\"num\">count</th><th class=\"num\">last</th><th class=\"num\">status</th><th>last request</th></tr>"
    );
    for x in &r.refused {
        let _ = write!(
            h,
            "<tr class=\"joined\"><td class=\"mono\">{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num muted\">{}</td><td class=\"num bad\">{}</td><td class=\"mono\">{}</td></tr>\
             <tr><td colspan=\"6\" class=\"err\">{}</td></tr>",
            escape(&x.registry),
            escape(&x.reason),
            x.count,
            ago(r.generated_at, x.last_at),
            x.last_status,
            escape(&ellipsis(&x.last_request, 120)),
            escape(&x.last_message),
        );
    }
    h.push_str("</table></section>\n");
}

fn node_card(h: &mut String, r: &Report) {
    let n = &r.node;
    h.push_str("<section id=\"node\"><h2>Node</h2>");
    let addr = n
        .listen
        .as_deref()
        .or(n.address.as_deref())
        .unwrap_or("unknown");
    let _ = write!(
        h,
        "<div class=\"big mono\" style=\"font-size:20px\">{}</div><dl class=\"kv\">\
         <dt>version</dt><dd>{}</dd><dt>up</dt><dd>{} <span class=\"muted\">(since {} UTC)</span></dd>",
        escape(addr),
        escape(&n.version),
        human_uptime(n.uptime_seconds),
        utc_time(n.started_at)
    );
    match &n.peer_id {
        Some(id) => {
            let _ = write!(
                h,
                "<dt>P2P</dt><dd><span class=\"ok\">on</span></dd><dt>peer id</dt><dd class=\"mono\" title=\"{}\">{}</dd>",
                escape(id),
                escape(&ellipsis(id, 24))
            );
        }
        None => h.push_str("<dt>P2P</dt><dd class=\"muted\">off</dd>"),
    }
    let _ = writeln!(
        h,
        "<dt>fetching</dt><dd>{} blob{}</dd></dl></section>",
        r.inflight_fetches,
        if r.inflight_fetches == 1 { "" } else { "s" }
    );
}

fn ellipsis(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let head: String = s.chars().take(max / 2).collect();
    let tail: String = s
        .chars()
        .rev()
        .take(max / 2 - 1)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{head}…{tail}")
}

fn store_card(h: &mut String, r: &Report) {
    let s = &r.store;
    let _ = write!(
        h,
        "<section id=\"store\"><h2>Store</h2><div class=\"big\">{}</div>",
        human_bytes(s.bytes)
    );
    match s.max_bytes {
        Some(max) if max > 0 => {
            let pct = (s.bytes as f64 / max as f64 * 100.0).min(100.0);
            let color = if pct > 90.0 { "#c4372b" } else { "#3b82f6" };
            let _ = write!(
                h,
                "<div class=\"bar\"><span style=\"width:{pct:.1}%;background:{color}\"></span></div>\
                 <div class=\"muted\">{pct:.0}% of {}</div>",
                human_bytes(max)
            );
        }
        _ => h.push_str(
            "<div class=\"bar\"><span style=\"width:0\"></span></div><div class=\"muted\">no size limit</div>",
        ),
    }
    let _ = writeln!(
        h,
        "<div class=\"rows\" style=\"margin-top:8px\"><div><span>blobs</span><b>{}</b></div>\
         <div><span>evictions</span><b>{}</b></div><div><span>writes in progress</span><b>{}</b></div></div></section>",
        s.blobs, s.evictions, s.writing
    );
}

fn hit_card(h: &mut String, r: &Report) {
    let c = &r.cache;
    h.push_str("<section id=\"hit-ratio\"><h2>Hit ratio</h2><div class=\"donut\">");
    // A ring: hits in green over a grey track.
    let (radius, stroke) = (31.0_f64, 11.0);
    let circ = 2.0 * std::f64::consts::PI * radius;
    let ratio = c.hit_ratio.unwrap_or(0.0);
    let label = c
        .hit_ratio
        .map_or("–".to_string(), |v| format!("{:.0}%", v * 100.0));
    let _ = write!(
        h,
        "<svg width=\"84\" height=\"84\" viewBox=\"0 0 84 84\" role=\"img\" aria-label=\"hit ratio {label}\">\
         <circle cx=\"42\" cy=\"42\" r=\"{radius}\" fill=\"none\" stroke=\"#e7ebf0\" stroke-width=\"{stroke}\"/>\
         <circle cx=\"42\" cy=\"42\" r=\"{radius}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{stroke}\" \
         stroke-dasharray=\"{:.2} {:.2}\" transform=\"rotate(-90 42 42)\"/>\
         <text x=\"42\" y=\"48\" text-anchor=\"middle\" font-size=\"17\" font-weight=\"650\" fill=\"#1c2430\">{label}</text></svg>",
        COLORS[0],
        circ * ratio,
        circ
    );
    let total = c.hits + c.misses;
    let _ = write!(
        h,
        "<div class=\"muted\">{} of {} lookup{} answered from the store</div></div>",
        c.hits,
        total,
        if total == 1 { "" } else { "s" }
    );
    let row = |name: &str, hm: &HitMiss| {
        format!(
            "<div><span>{name}</span><b>{} <span class=\"muted\" style=\"font-weight:400\">· {} of {}</span></b></div>",
            hm.ratio()
                .map_or("–".to_string(), |v| format!("{:.0}%", v * 100.0)),
            hm.hits,
            hm.hits + hm.misses,
        )
    };
    let _ = writeln!(
        h,
        "<div class=\"rows\" style=\"margin-top:10px\">{}{}</div></section>",
        row("blobs", &c.blob),
        row("manifests", &c.manifest)
    );
}

fn bytes_card(h: &mut String, r: &Report) {
    let b = &r.bytes_served;
    let total = b.total();
    let _ = write!(
        h,
        "<section id=\"bytes\"><h2>Bytes served</h2><div class=\"big\">{}</div><div class=\"bar\">",
        human_bytes(total)
    );
    let values = [b.local, b.peer, b.upstream];
    if total > 0 {
        for (i, v) in values.iter().enumerate() {
            let _ = write!(
                h,
                "<span style=\"width:{:.2}%;background:{}\"></span>",
                *v as f64 / total as f64 * 100.0,
                COLORS[i]
            );
        }
    }
    h.push_str("</div><div class=\"rows\">");
    for (i, v) in values.iter().enumerate() {
        let pct = if total > 0 {
            format!("{:.0}%", *v as f64 / total as f64 * 100.0)
        } else {
            "–".into()
        };
        let _ = write!(
            h,
            "<div><span><i class=\"sw\" style=\"background:{}\"></i> {}</span><b>{} <span class=\"muted\" style=\"font-weight:400\">{pct}</span></b></div>",
            COLORS[i],
            SOURCES[i],
            human_bytes(*v)
        );
    }
    h.push_str("</div></section>\n");
}

/// The y axis of the chart: a step (1, 2, 2.5 or 5 times a power of ten, in the unit of
/// the largest value, so that labels read "0.5 MiB/s", "1 MiB/s", "1.5 MiB/s") that fits
/// `max` in at most five steps, and that unit.
fn axis(max: f64) -> (f64, Axis) {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut u = 0;
    while max >= 1024f64.powi(u as i32 + 1) && u < UNITS.len() - 1 {
        u += 1;
    }
    let unit = 1024f64.powi(u as i32);
    let x = (max / unit).max(1.0);
    let mut step = 10f64.powf((x / 5.0).log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        let candidate = 10f64.powf((x / 5.0).log10().floor()) * m;
        if x / candidate <= 5.0 {
            step = candidate;
            break;
        }
    }
    if u == 0 {
        step = step.max(1.0).round();
    }
    (
        step * unit,
        Axis {
            unit,
            name: UNITS[u],
        },
    )
}

struct Axis {
    unit: f64,
    name: &'static str,
}

impl Axis {
    fn label(&self, bytes_per_sec: f64) -> String {
        let v = bytes_per_sec / self.unit;
        let text = format!("{v:.2}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        format!("{text} {}/s", self.name)
    }
}

fn chart_card(h: &mut String, r: &Report) {
    let samples = &r.series.samples;
    let interval = r.series.interval_seconds.max(1) as f64;
    let (w, ht) = (1160.0_f64, 240.0_f64);
    let (left, right, top, bottom) = (78.0, 12.0, 12.0, 28.0);
    let (pw, ph) = (w - left - right, ht - top - bottom);
    let _ = write!(
        h,
        "<section class=\"wide\" id=\"bytes-by-source\"><h2>Bytes served by source · last {} minutes</h2><div class=\"legend\">",
        samples.len() as u64 * r.series.interval_seconds / 60
    );
    for (i, s) in SOURCES.iter().enumerate() {
        let _ = write!(
            h,
            "<span><i class=\"sw\" style=\"background:{}\"></i>{s}</span>",
            COLORS[i]
        );
    }
    let _ = write!(
        h,
        "<span class=\"muted\">bytes per second, {}-second buckets</span></div>",
        r.series.interval_seconds
    );
    let max = samples.iter().map(|s| s.total()).max().unwrap_or(0) as f64 / interval;
    let (step, axis) = axis(max);
    let ticks = ((max / step).ceil() as usize).max(1);
    let top_value = step * ticks as f64;
    let _ = write!(
        h,
        "<svg viewBox=\"0 0 {w} {ht}\" width=\"100%\" role=\"img\" aria-label=\"bytes served by source over time\">"
    );
    // Grid and y labels.
    for i in 0..=ticks {
        let v = step * i as f64;
        let y = top + ph - v / top_value * ph;
        let _ = write!(
            h,
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"{}\" stroke-width=\"1\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"11\" fill=\"#6b7686\">{}</text>",
            left + pw,
            if i == 0 { "#c9d0d9" } else { "#edf0f4" },
            left - 8.0,
            y + 4.0,
            if max > 0.0 || i == 0 {
                axis.label(v)
            } else {
                String::new()
            }
        );
    }
    // X labels every 5 minutes, counted back from now.
    let n = samples.len().max(1);
    let slot_w = pw / n as f64;
    let per_label = (300.0 / interval).round().max(1.0) as usize;
    for k in (0..n).rev().step_by(per_label) {
        let back = (n - 1 - k) as u64 * r.series.interval_seconds;
        let x = left + slot_w * (k as f64 + 0.5);
        let text = if back == 0 {
            "now".to_string()
        } else {
            format!("−{} min", back / 60)
        };
        let _ = write!(
            h,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#6b7686\">{text}</text>",
            ht - 8.0
        );
    }
    if n > per_label {
        let _ = write!(
            h,
            "<text x=\"{left}\" y=\"{:.1}\" text-anchor=\"start\" font-size=\"11\" fill=\"#6b7686\">−{} min</text>",
            ht - 8.0,
            n as u64 * r.series.interval_seconds / 60
        );
    }
    // Stacked bars.
    let bar_w = (slot_w * 0.78).max(1.0);
    for (k, s) in samples.iter().enumerate() {
        if s.total() == 0 {
            continue;
        }
        let x = left + slot_w * k as f64 + (slot_w - bar_w) / 2.0;
        let _ = write!(
            h,
            "<g><title>{} UTC · local {} · peer {} · upstream {}</title>",
            utc_time(s.at),
            human_bytes(s.local),
            human_bytes(s.peer),
            human_bytes(s.upstream)
        );
        let mut base = top + ph;
        for (i, v) in [s.local, s.peer, s.upstream].iter().enumerate() {
            if *v == 0 {
                continue;
            }
            let bh = (*v as f64 / interval / top_value * ph).max(1.0);
            base -= bh;
            let _ = write!(
                h,
                "<rect x=\"{x:.1}\" y=\"{base:.1}\" width=\"{bar_w:.1}\" height=\"{bh:.1}\" fill=\"{}\"/>",
                COLORS[i]
            );
        }
        h.push_str("</g>");
    }
    if max == 0.0 {
        let _ = write!(
            h,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"14\" fill=\"#8a94a3\">nothing served in the last 30 minutes</text>",
            left + pw / 2.0,
            top + ph / 2.0
        );
    }
    h.push_str("</svg></section>\n");
}

fn members_card(h: &mut String, r: &Report) {
    let _ = write!(
        h,
        "<section class=\"members\" id=\"members\"><h2>Members ({})</h2>",
        r.members.len()
    );
    if !r.peers.enabled {
        h.push_str("<div class=\"empty\">Sharing between nodes is off (no <span class=\"mono\">--p2p-listen</span>).</div></section>\n");
        return;
    }
    let _ = write!(
        h,
        "<div class=\"muted\" style=\"margin-bottom:8px\">{} lookups, {} found content on another node</div>",
        r.peers.lookups, r.peers.lookup_hits
    );
    if r.members.is_empty() {
        h.push_str("<div class=\"empty\">No other node known yet.</div></section>\n");
        return;
    }
    h.push_str(
        "<table><tr><th>peer id</th><th>HTTP address</th><th class=\"num\">received</th></tr>",
    );
    for m in &r.members {
        let _ = write!(
            h,
            "<tr><td class=\"mono\" title=\"{}\">{}</td><td class=\"mono\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&m.id),
            escape(&ellipsis(&m.id, 24)),
            escape(m.http_addr.as_deref().unwrap_or("–")),
            human_bytes(m.received_bytes)
        );
    }
    h.push_str("</table></section>\n");
}

/// containerd's content store, when its images are shared with other nodes.
fn containerd_card(h: &mut String, r: &Report) {
    let Some(c) = &r.containerd else {
        return;
    };
    let (dot, state) = if c.connected {
        ("#2f9e6a", "connected")
    } else {
        ("#c4372b", "unreachable")
    };
    let _ = write!(
        h,
        "<section id=\"containerd\"><h2>containerd's content store</h2>\
         <div class=\"muted\"><i class=\"dot\" style=\"background:{dot}\"></i>{state} · \
         <span class=\"mono\">{}</span> · namespace <span class=\"mono\">{}</span></div>\
         <div class=\"rows\" style=\"margin-top:8px\">\
         <div><span>images of shared registries</span><b>{}</b></div>\
         <div><span>blobs</span><b>{}</b></div><div><span>tags</span><b>{}</b></div>\
         <div><span>served to other nodes</span><b>{} ({} blobs, {} manifests)</b></div>\
         <div><span>last scan</span><b>{}</b></div></div>",
        escape(&c.socket),
        escape(&c.namespace),
        c.images,
        c.blobs,
        c.tags,
        human_bytes(c.served_bytes),
        c.served_blobs,
        c.served_manifests,
        c.last_scan_seconds_ago
            .map_or_else(|| "never".to_string(), |s| format!("{s:.0} s ago")),
    );
    if let Some(e) = &c.last_error {
        let _ = write!(h, "<div class=\"err\">{}</div>", escape(e));
    }
    h.push_str("</section>\n");
}

/// The warm list (docs/warm.md), when the node has one.
fn warm_card(h: &mut String, r: &Report) {
    let Some(w) = &r.warm else {
        return;
    };
    let copies = w
        .copies
        .map_or_else(|| "every node".to_string(), |k| format!("{k} copies"));
    let _ = write!(
        h,
        "<section class=\"wide\" id=\"warm\"><h2>Warm images ({})</h2>\
         <div class=\"muted\" style=\"margin-bottom:8px\">policy: {copies} among {} node{} · last pass {}</div>",
        w.images.len(),
        w.nodes,
        if w.nodes == 1 { "" } else { "s" },
        w.last_pass_at
            .map_or_else(|| "not yet".to_string(), |t| format!("{} UTC", utc_time(t))),
    );
    h.push_str(
        "<table><tr><th>image</th><th>listed by</th><th>state</th><th class=\"num\">blobs</th>\
         <th class=\"num\">bytes</th><th class=\"num\">copies seen</th></tr>",
    );
    for i in &w.images {
        let (dot, state) = match i.state.as_str() {
            "held" => ("#2f9e6a", "held".to_string()),
            "failed" => ("#c4372b", "failed".to_string()),
            "fetching" => ("#d08a1e", "fetching".to_string()),
            "not_chosen" => (
                "#9fb0c4",
                format!("not chosen here: held by {}", i.chosen.join(", ")),
            ),
            other => ("#9fb0c4", other.to_string()),
        };
        let _ = write!(
            h,
            "<tr{}><td class=\"mono\">{}</td><td>{}</td><td><i class=\"dot\" style=\"background:{dot}\"></i>{}</td>\
             <td class=\"num\">{} / {}</td><td class=\"num\">{} / {}</td><td class=\"num\">{}</td></tr>",
            if i.error.is_some() {
                " class=\"joined\""
            } else {
                ""
            },
            escape(&i.image),
            escape(&i.listed_by),
            escape(&state),
            i.blobs_held.min(i.blobs_total),
            i.blobs_total,
            human_bytes(i.bytes_held),
            human_bytes(i.bytes_total),
            i.copies_seen,
        );
        if let Some(e) = &i.error {
            let _ = write!(
                h,
                "<tr><td colspan=\"6\" class=\"err\">{}</td></tr>",
                escape(e)
            );
        }
    }
    h.push_str("</table></section>\n");
}

/// The images the policy file pins, when it pins any.
fn pinned_card(h: &mut String, r: &Report) {
    if r.pinned.is_empty() {
        return;
    }
    h.push_str(
        "<section id=\"pinned\"><h2>Pinned images</h2>\
         <div class=\"muted\">kept by the policy file: eviction never removes them; pinning fetches nothing</div>\
         <table><tr><th>image</th><th>on this node</th><th class=\"num\">held</th><th class=\"num\">blobs</th></tr>",
    );
    for p in &r.pinned {
        let dot = match p.held.as_str() {
            "held" => "#2f9e6a",
            "partly held" => "#d08a1c",
            _ => "#8a96a3",
        };
        let _ = write!(
            h,
            "<tr><td class=\"mono\">{}</td><td><i class=\"dot\" style=\"background:{dot}\"></i>{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{} held, {} missing</td></tr>",
            escape(&p.image),
            escape(&p.held),
            human_bytes(p.held_bytes),
            p.blobs_held,
            p.blobs_missing,
        );
    }
    h.push_str("</table></section>\n");
}

fn ago(now: u64, at_ms: u64) -> String {
    let secs = now.saturating_sub(at_ms / 1000);
    format!("{} ago", human_uptime(secs))
}

fn endpoints_card(h: &mut String, r: &Report) {
    h.push_str("<section class=\"endpoints\" id=\"endpoints\"><h2>Upstream endpoints</h2>");
    if r.endpoints.is_empty() {
        h.push_str("<div class=\"empty\">No upstream fetch yet.</div></section>\n");
        return;
    }
    h.push_str(
        "<table><tr><th>endpoint</th><th>state</th><th class=\"num\">fetches</th><th class=\"num\">failures</th>\
         <th class=\"num\">in a row</th><th class=\"num\">last answer</th><th class=\"num\">last error</th></tr>",
    );
    for e in &r.endpoints {
        let state = crate::report::format::endpoint_state(e);
        let dot = match e.state.as_str() {
            "backing_off" | "half_open" => "#d08a1e",
            _ if e.healthy() => "#2f9e6a",
            _ => "#c4372b",
        };
        let when = |at: Option<u64>| at.map_or("–".to_string(), |at| ago(r.generated_at, at));
        let errors: Vec<&String> = e.last_failure.iter().chain(&e.last_error).collect();
        let error_row = !errors.is_empty();
        let _ = write!(
            h,
            "<tr{}><td class=\"mono nowrap\"><i class=\"dot\" style=\"background:{dot}\" title=\"{}\"></i>{}</td>\
             <td class=\"nowrap\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num muted\">{}</td><td class=\"num muted\">{}</td></tr>",
            if error_row { " class=\"joined\"" } else { "" },
            escape(&e.state),
            escape(&e.endpoint),
            escape(&state),
            e.fetches,
            e.failures,
            e.consecutive_failures,
            when(e.last_ok_at),
            when(e.last_error_at),
        );
        if error_row {
            let text: Vec<String> = errors.iter().map(|t| escape(t)).collect();
            let _ = write!(
                h,
                "<tr><td colspan=\"7\" class=\"err\">{}</td></tr>",
                text.join("<br>")
            );
        }
    }
    h.push_str("</table></section>\n");
}

fn pulls_card(h: &mut String, r: &Report) {
    let _ = write!(
        h,
        "<section class=\"wide\" id=\"recent-pulls\"><h2>Recent pulls (last {})</h2>",
        RECENT
    );
    if r.recent_pulls.is_empty() {
        h.push_str("<div class=\"empty\">No manifest or blob requests yet.</div></section>\n");
        return;
    }
    h.push_str(
        "<table><tr><th>time (UTC)</th><th>request</th><th>image</th><th>digest</th><th>source</th>\
         <th class=\"num\">bytes</th><th class=\"num\">duration</th><th class=\"num\">status</th></tr>",
    );
    for p in &r.recent_pulls {
        let status_class = match p.status {
            200..=299 if p.complete => "ok",
            200..=299 => "warn",
            404 => "warn",
            _ => "bad",
        };
        let digest = p.digest.as_deref().map_or("–".to_string(), short_digest);
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{} {}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td>\
             <td><span class=\"pill\" style=\"background:{}\">{}</span></td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num {status_class}\">{}{}</td></tr>",
            utc_time(p.at / 1000),
            escape(&p.method),
            escape(&p.kind),
            escape(&pull_image(p)),
            escape(&digest),
            source_color(&p.source),
            escape(&p.source),
            human_bytes(p.bytes),
            human_duration_ms(p.duration_ms),
            p.status,
            if p.complete { "" } else { " cut" }
        );
    }
    h.push_str("</table></section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::*;

    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(
            escape(r#"<script>alert("x&y")</script>'"#),
            "&lt;script&gt;alert(&quot;x&amp;y&quot;)&lt;/script&gt;&#39;"
        );
        assert_eq!(escape("plain/text:1"), "plain/text:1");
    }

    #[test]
    fn axis_steps_read_well() {
        let labels = |max: f64| {
            let (step, a) = axis(max);
            let ticks = (max / step).ceil().max(1.0) as usize;
            assert!(ticks <= 5, "{max}: {ticks} ticks");
            (0..=ticks)
                .map(|i| a.label(step * i as f64))
                .collect::<Vec<_>>()
                .join(", ")
        };
        assert_eq!(labels(0.0), "0 B/s, 1 B/s");
        assert_eq!(
            labels(1000.0),
            "0 B/s, 200 B/s, 400 B/s, 600 B/s, 800 B/s, 1000 B/s"
        );
        assert_eq!(
            labels(1.2 * 1024.0 * 1024.0),
            "0 MiB/s, 0.25 MiB/s, 0.5 MiB/s, 0.75 MiB/s, 1 MiB/s, 1.25 MiB/s"
        );
        assert_eq!(
            labels(230.0 * 1024.0),
            "0 KiB/s, 50 KiB/s, 100 KiB/s, 150 KiB/s, 200 KiB/s, 250 KiB/s"
        );
        assert_eq!(
            labels(3.0 * 1024.0 * 1024.0),
            "0 MiB/s, 1 MiB/s, 2 MiB/s, 3 MiB/s"
        );
    }

    fn hostile_report() -> Report {
        let evil = "<img src=x onerror=alert(1)>\"'&";
        Report {
            generated_at: 1_795_328_464,
            refused: vec![],
            node: Node {
                version: "0.1.0".into(),
                listen: None,
                address: Some(evil.into()),
                started_at: 1_795_328_000,
                uptime_seconds: 464,
                peer_id: Some(evil.into()),
                p2p_addrs: vec![],
            },
            peers: PeersSummary {
                enabled: true,
                lookups: 3,
                lookup_hits: 1,
            },
            members: vec![MemberInfo {
                id: evil.into(),
                http_addr: Some(evil.into()),
                addrs: vec![],
                received_bytes: 5,
            }],
            store: StoreInfo {
                bytes: 1 << 20,
                blobs: 3,
                evictions: 0,
                writing: 0,
                max_bytes: Some(10 << 20),
            },
            cache: CacheInfo {
                hits: 1,
                misses: 1,
                hit_ratio: Some(0.5),
                blob: HitMiss { hits: 1, misses: 1 },
                manifest: HitMiss::default(),
            },
            bytes_served: BytesBySource {
                local: 10,
                peer: 0,
                upstream: 20,
            },
            series: Series {
                interval_seconds: 10,
                samples: vec![],
            },
            recent_pulls: vec![Pull {
                at: 1_795_328_464_000,
                method: "GET".into(),
                kind: "manifest".into(),
                registry: evil.into(),
                repository: evil.into(),
                reference: evil.into(),
                digest: Some(evil.into()),
                source: evil.into(),
                bytes: 1,
                duration_ms: 1.0,
                status: 200,
                complete: true,
            }],
            endpoints: vec![EndpointHealth {
                endpoint: evil.into(),
                fetches: 1,
                failures: 1,
                last_ok_at: None,
                last_error: Some(evil.into()),
                last_error_at: Some(1_795_328_464_000),
                state: evil.into(),
                until: Some(1_795_328_464_000),
                consecutive_failures: 3,
                last_failure: Some(evil.into()),
                rate_limited: 1,
                circuit_opens: 1,
            }],
            inflight_fetches: 0,
            stale_tags_served: 0,
            containerd: Some(ContainerdInfo {
                socket: evil.into(),
                namespace: evil.into(),
                connected: false,
                images: 1,
                blobs: 2,
                tags: 1,
                last_scan_seconds_ago: Some(3.0),
                last_error: Some(evil.into()),
                served_blobs: 0,
                served_manifests: 0,
                served_bytes: 0,
            }),
            warm: Some(WarmReport {
                copies: Some(2),
                nodes: 3,
                last_pass_at: Some(1_795_328_464),
                images: vec![WarmImage {
                    image: evil.into(),
                    listed_by: evil.into(),
                    state: "not_chosen".into(),
                    digest: Some(evil.into()),
                    platform_digest: None,
                    blobs_total: 2,
                    blobs_held: 1,
                    bytes_total: 10,
                    bytes_held: 5,
                    error: Some(evil.into()),
                    chosen: vec![evil.into()],
                    copies_seen: 2,
                    updated_at: 1_795_328_464,
                }],
            }),
            pinned: vec![PinnedImage {
                image: evil.into(),
                digest: Some(evil.into()),
                held: evil.into(),
                held_bytes: 1,
                blobs_held: 1,
                blobs_missing: 0,
            }],
        }
    }

    #[test]
    fn every_outside_string_is_escaped() {
        let page = render_html(&hostile_report());
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("\"'&<"), "{page}");
        assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;"));
        for heading in [
            "Node",
            "Members",
            "Store",
            "Hit ratio",
            "Bytes served by source",
            "Recent pulls",
            "Upstream endpoints",
            "containerd's content store",
            "Warm images",
            "Pinned images",
        ] {
            assert!(page.contains(&format!(">{heading}")), "{heading}");
        }
    }
}
