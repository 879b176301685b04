//! What `kagami import`, `kagami warm` and `kagami purge` share: the running server they
//! talk to (`--addr`), the admin token that server wrote to its data directory
//! (`--data-dir`, `--admin-token-file`), and a JSON `POST` to one of its admin routes.
//! The server does the work (one process owns the store); these commands only ask.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use kagami_server::admin::{ADMIN_TOKEN_FILE, read_token};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The flags naming the running server and its admin token.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// The running kagami to ask: its --listen address, as http://host:port or host:port.
    #[arg(
        long,
        env = "KAGAMI_ADDR",
        default_value = "http://127.0.0.1:5000",
        value_name = "URL"
    )]
    pub addr: String,
    /// The data directory of that kagami (its --data-dir): the admin token is read from
    /// admin.token there, a file only root can read.
    #[arg(
        long,
        env = "KAGAMI_DATA_DIR",
        default_value = "/var/lib/kagami",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,
    /// The admin token file to use instead of <data-dir>/admin.token.
    #[arg(long, env = "KAGAMI_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// A client of one server's admin routes, with its own single-threaded runtime.
pub struct AdminClient {
    /// The server's base URL (`http://host:port`).
    pub base: String,
    pub http: reqwest::Client,
    pub rt: tokio::runtime::Runtime,
    token: String,
}

impl AdminArgs {
    /// Reads the token and builds the client. `timeout` bounds each whole request (none:
    /// only the connection is bounded, for routes that work as long as the input is big).
    pub fn connect(&self, timeout: Option<Duration>) -> anyhow::Result<AdminClient> {
        let base = super::normalise_base(&self.addr)
            .with_context(|| format!("--addr {:?} is not an http(s) address", self.addr))?;
        let token_file = self
            .admin_token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join(ADMIN_TOKEN_FILE));
        let token = read_token(&token_file).with_context(|| {
            format!(
                "reading the admin token {} (written by `kagami serve` at start, readable by root only; run as root, or give the server's --data-dir or --admin-token-file)",
                token_file.display()
            )
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let mut http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .no_proxy();
        if let Some(t) = timeout {
            http = http.timeout(t);
        }
        let http = http.build().context("building the HTTP client")?;
        Ok(AdminClient {
            base,
            http,
            rt,
            token,
        })
    }
}

impl AdminClient {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `req` as JSON to the admin route `path` and reads the answer: the decoded value
    /// and the raw text (for `--json`). `doing` completes "asking <url> to …" in errors;
    /// `answer` names what a success carries ("an import report"). An error answer becomes
    /// the server's own message.
    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        doing: &str,
        answer: &str,
        req: &Req,
    ) -> anyhow::Result<(Resp, String)> {
        let url = self.url(path);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(req).expect("a request serialises"))
            .send()
            .await
            .with_context(|| {
                format!("asking {url} to {doing} (is `kagami serve` running there?)")
            })?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .with_context(|| format!("reading the answer of {url}"))?;
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| format!("{url} answered {status}: {}", body.trim()));
            anyhow::bail!("{message}");
        }
        let value = serde_json::from_str(&body)
            .with_context(|| format!("{url} did not answer {answer}"))?;
        Ok((value, body))
    }

    /// Runs `each` for every item, printing an error for each that fails: exit 0 when none
    /// failed, 2 otherwise (like `kagami import`'s other failures).
    pub fn for_each<T>(
        &self,
        items: &[T],
        mut each: impl AsyncFnMut(&AdminClient, &T) -> anyhow::Result<()>,
    ) -> ExitCode {
        let mut failed = 0;
        for item in items {
            if let Err(e) = self.rt.block_on(each(self, item)) {
                eprintln!("kagami: error: {e:#}");
                failed += 1;
            }
        }
        if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        }
    }
}
