//! The local LLM upstream (`scripts/llm_upstream.py`: every LLM API tollgate understands,
//! streamed and not, usage set per request with `x-test-usage`, faults on demand) as a child
//! process, and the official-SDK driver (`tests/sdk/clients.py`) run from Rust.
//!
//! ```text
//! clients.py (openai / anthropic / google-genai SDK) ──▶ Envoy ──▶ llm_upstream.py
//!                                                          │ ext_proc
//!                                                          ▼
//!                                                       tollgate
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{raw_get, repo_root, Proc};

/// The Python that has the SDKs: `.tools/venv/bin/python` (scripts/setup.sh installs them
/// there), else `python3` on `PATH` (enough for the upstream, which needs only the standard
/// library).
pub fn python() -> PathBuf {
    let venv = repo_root().join(".tools/venv/bin/python");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// `scripts/llm_upstream.py` on a free loopback port, killed on drop.
pub struct LlmUpstream {
    proc: Proc,
    pub addr: SocketAddr,
}

impl LlmUpstream {
    /// Starts it with its log in `dir/llm_upstream.log` and waits (up to 15 s) until it says
    /// which port it listens on.
    pub async fn start(dir: &Path) -> Self {
        let log = dir.join("llm_upstream.log");
        let mut cmd = Command::new(python());
        cmd.arg(repo_root().join("scripts/llm_upstream.py"))
            .arg("0")
            .env("PYTHONUNBUFFERED", "1");
        let mut proc = Proc::spawn("llm_upstream", cmd, log.clone());
        let deadline = Instant::now() + Duration::from_secs(15);
        let addr = loop {
            proc.check_alive();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let port = text
                .lines()
                .find_map(|l| l.strip_prefix("llm_upstream listening on 127.0.0.1:"))
                .and_then(|p| p.trim().parse::<u16>().ok());
            if let Some(port) = port {
                break SocketAddr::from(([127, 0, 0, 1], port));
            }
            assert!(
                Instant::now() < deadline,
                "llm_upstream did not start within 15 s: {text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Self { proc, addr }
    }

    /// Every request received so far: `[{"method","path","headers","body"}]`, headers with
    /// lower-case names.
    pub async fn requests(&self) -> Vec<Value> {
        let (status, body) = raw_get(self.addr, "/_upstream/requests")
            .await
            .expect("the LLM upstream answers");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("a JSON list")
    }

    /// The requests received so far whose path starts with `prefix`.
    pub async fn requests_to(&self, prefix: &str) -> Vec<Value> {
        self.requests()
            .await
            .into_iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
            .collect()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }
}

/// The official SDKs, driven by `tests/sdk/clients.py`.
pub struct Sdks {
    python: PathBuf,
    /// Which SDK families import: `openai`, `anthropic`, `gemini`.
    pub have: Value,
}

impl Sdks {
    /// The SDKs that import, or `Err` with why none can run (the caller skips and says so).
    pub fn find() -> Result<Self, String> {
        let python = python();
        let out = Command::new(&python)
            .arg(repo_root().join("tests/sdk/clients.py"))
            .arg("check")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
        let have: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "{} tests/sdk/clients.py check: {e}: {}",
                python.display(),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok(Self { python, have })
    }

    /// Whether the SDK for `case` (`openai.chat`, `anthropic.messages`, ...) is installed.
    pub fn has(&self, case: &str) -> bool {
        let family = case.split('.').next().unwrap_or_default();
        self.have[family].as_bool().unwrap_or(false)
    }

    /// Runs one `case` against the server at `root` (`http://host:port`) with `api_key` and
    /// extra request `headers`; the JSON line the driver printed (`ok`, `text`, `usage`,
    /// `error`, `status`, `headers`...).
    pub async fn run(
        &self,
        case: &str,
        root: &str,
        api_key: &str,
        headers: &[(&str, &str)],
    ) -> Value {
        self.run_many(&[case], root, api_key, headers)
            .await
            .pop()
            .expect("one line")
    }

    /// Runs `cases` one after the other in one driver process (the SDKs imported once): one
    /// JSON line each, in order.
    pub async fn run_many(
        &self,
        cases: &[&str],
        root: &str,
        api_key: &str,
        headers: &[(&str, &str)],
    ) -> Vec<Value> {
        self.run_many_prompt(cases, root, api_key, headers, None)
            .await
    }

    /// [`Self::run_many`] with the prompt the SDKs send (the driver's default otherwise).
    pub async fn run_many_prompt(
        &self,
        cases: &[&str],
        root: &str,
        api_key: &str,
        headers: &[(&str, &str)],
        prompt: Option<&str>,
    ) -> Vec<Value> {
        self.run_many_with(cases, root, api_key, headers, prompt, None)
            .await
    }

    /// [`Self::run_many_prompt`] with the model the SDKs ask for (the driver's default
    /// otherwise).
    pub async fn run_many_with(
        &self,
        cases: &[&str],
        root: &str,
        api_key: &str,
        headers: &[(&str, &str)],
        prompt: Option<&str>,
        model: Option<&str>,
    ) -> Vec<Value> {
        let mut cmd = Command::new(&self.python);
        cmd.arg(repo_root().join("tests/sdk/clients.py"))
            .args(cases)
            .args(["--base-url", root, "--api-key", api_key]);
        if let Some(m) = model {
            cmd.arg("--model").arg(m);
        }
        if let Some(p) = prompt {
            cmd.arg("--prompt").arg(p);
        }
        for (k, v) in headers {
            cmd.arg("--header").arg(format!("{k}={v}"));
        }
        // The SDKs would read these and talk elsewhere.
        for var in [
            "OPENAI_BASE_URL",
            "ANTHROPIC_BASE_URL",
            "GOOGLE_GEMINI_BASE_URL",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("NO_PROXY", "*");
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("cannot run the SDK driver: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<Value> = stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        assert_eq!(
            lines.len(),
            cases.len(),
            "{cases:?}: the driver printed {} JSON lines for {} cases ({}):\n{stdout}\n{}",
            lines.len(),
            cases.len(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        lines
    }
}

/// An SDK's way in: Envoy (bodies in one mode) → tollgate (`config` as its flows) →
/// [`LlmUpstream`], in a temporary directory. Fields drop in order: Envoy goes down first.
pub struct LlmBed {
    pub envoy: super::Envoy,
    pub tollgate: super::Tollgate,
    pub upstream: LlmUpstream,
    _tmp: tempfile::TempDir,
}

impl LlmBed {
    /// `name` prefixes the temporary directory; `body_mode` is Envoy's for both bodies
    /// (`FULL_DUPLEX_STREAMED`, `BUFFERED`, `STREAMED`).
    pub async fn start(name: &str, config: &str, body_mode: &'static str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("tollgate-{name}-"))
            .tempdir()
            .expect("temp dir");
        let config_dir = tmp.path().join("config");
        std::fs::create_dir(&config_dir).expect("config dir");
        std::fs::write(config_dir.join("flows.yaml"), config).expect("flows.yaml");
        let upstream = LlmUpstream::start(tmp.path()).await;
        let tollgate = super::Tollgate::start(&config_dir, tmp.path(), &[]).await;
        let opts = super::EnvoyOptions::bodies(body_mode);
        let envoy = super::Envoy::start(tmp.path(), &opts, tollgate.grpc, upstream.addr).await;
        LlmBed {
            envoy,
            tollgate,
            upstream,
            _tmp: tmp,
        }
    }

    /// The server root an SDK is given (it adds `/v1` for the OpenAI SDK).
    pub fn root(&self) -> String {
        format!("http://{}", self.envoy.listen)
    }

    /// The last 40 lines of tollgate's and Envoy's logs, for assertion messages.
    pub fn logs(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "──── tollgate ────\n{}\n──── envoy ────\n{}",
            tail(self.tollgate.log()),
            tail(self.envoy.log())
        )
    }
}
