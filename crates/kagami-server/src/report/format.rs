//! Formatting shared by the status page (`crate::ui`) and the CLI (`kagami status`,
//! `kagami import`): sizes, durations, UTC dates, short digests.

use super::Pull;

/// `1.5 MiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else if v >= 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// `850 ms`, `1.2 s`, `2m 05s`.
pub fn human_duration_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 60_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        let s = (ms / 1000.0) as u64;
        format!("{}m {:02}s", s / 60, s % 60)
    }
}

/// `3d 4h`, `2h 05m`, `4m 10s`, `12s`.
pub fn human_uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// `2026-11-22 06:21:04` (UTC) from Unix seconds.
pub fn utc_datetime(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `06:21:04` (UTC) from Unix seconds.
pub fn utc_time(secs: u64) -> String {
    utc_datetime(secs)[11..].to_string()
}

/// `sha256:0123456789ab` from a full digest.
pub fn short_digest(d: &str) -> String {
    match d.split_once(':') {
        Some((alg, hex)) if hex.len() > 12 => format!("{alg}:{}", &hex[..12]),
        _ => d.to_string(),
    }
}

/// The image a request was for: `registry/repository`, plus `:tag` for manifests by tag.
pub fn pull_image(p: &Pull) -> String {
    if p.kind == "manifest" && !p.reference.contains(':') {
        format!("{}/{}:{}", p.registry, p.repository, p.reference)
    } else {
        format!("{}/{}", p.registry, p.repository)
    }
}

/// An endpoint's state in words: `healthy`, `failing` (tried, but its last fetch failed),
/// `rate limited until 20:31:05 UTC`, `circuit open until …`, `half-open (probing)`.
pub fn endpoint_state(e: &crate::report::EndpointHealth) -> String {
    let until = || {
        e.until
            .map(|at| format!(" until {} UTC", utc_time(at / 1000)))
            .unwrap_or_default()
    };
    match e.state.as_str() {
        "backing_off" => format!("rate limited{}", until()),
        "open" => format!("circuit open{}", until()),
        "half_open" => "half-open (probing)".into(),
        _ if e.healthy() => "healthy".into(),
        _ => "failing".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_sizes() {
        assert_eq!(utc_datetime(0), "1970-01-01 00:00:00");
        assert_eq!(utc_datetime(1_795_328_464), "2026-11-22 06:21:04");
        assert_eq!(utc_datetime(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(20 * 1024 * 1024 * 1024), "20.0 GiB");
        assert_eq!(human_uptime(3725), "1h 02m");
        assert_eq!(
            short_digest("sha256:0123456789abcdef"),
            "sha256:0123456789ab"
        );
    }
}
