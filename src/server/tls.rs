//! TLS for the gRPC port, served by tollgate rather than by tonic so that the certificate,
//! key and client CA can be replaced without a restart (Kubernetes rotates Secrets in
//! place): every handshake takes the configuration current at that moment, and a watcher
//! swaps it when the files' contents change. With a client CA, only clients presenting a
//! certificate signed by it complete the handshake (mTLS: only the gateway may call).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

/// How long a client may take to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes under way at once; a connection past that is closed at once (a flood of
/// half-open handshakes must not grow without bound).
const MAX_HANDSHAKES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found ({reason})")]
    NoKey { path: PathBuf, reason: String },
    #[error("--tls-client-ca {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("invalid TLS certificate or key: {0}")]
    Config(#[from] rustls::Error),
}

/// The files TLS is built from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by this CA (PEM, one or more certificates).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    }

    /// The files' contents, compared to notice a change.
    fn contents(&self) -> Result<Vec<Vec<u8>>, TlsError> {
        let mut v = vec![Self::read(&self.cert)?, Self::read(&self.key)?];
        if let Some(ca) = &self.client_ca {
            v.push(Self::read(ca)?);
        }
        Ok(v)
    }

    /// A server configuration from the files' contents (as [`Self::contents`] returns).
    fn build(&self, contents: &[Vec<u8>]) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&contents[0])
            .filter_map(Result::ok)
            .collect();
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: self.cert.clone(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&contents[1]).map_err(|e| TlsError::NoKey {
            path: self.key.clone(),
            reason: e.to_string(),
        })?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match (&self.client_ca, contents.get(2)) {
            (Some(path), Some(pem)) => {
                let ca_err = |reason: String| TlsError::ClientCa {
                    path: path.clone(),
                    reason,
                };
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(pem) {
                    let c = c.map_err(|e| ca_err(e.to_string()))?;
                    roots.add(c).map_err(|e| ca_err(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(ca_err("no PEM certificate found".into()));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| ca_err(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The current TLS configuration, swapped when the files change.
#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    current: ArcSwap<ServerConfig>,
    contents: parking_lot::Mutex<Vec<Vec<u8>>>,
}

impl ReloadingTls {
    /// Loads the files; an error here stops the start.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let contents = files.contents()?;
        let config = files.build(&contents)?;
        Ok(Arc::new(Self {
            files,
            current: ArcSwap::new(config),
            contents: parking_lot::Mutex::new(contents),
        }))
    }

    /// Re-reads the files and swaps the configuration when they changed. A broken or
    /// half-written set keeps the running configuration (and is retried next time).
    /// Returns true when a new configuration took effect.
    pub fn check(&self) -> bool {
        let contents = match self.files.contents() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "TLS files unreadable; keeping the running certificate");
                return false;
            }
        };
        let mut seen = self.contents.lock();
        if *seen == contents {
            return false;
        }
        match self.files.build(&contents) {
            Ok(config) => {
                self.current.store(config);
                *seen = contents;
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate, key or client CA reloaded");
                true
            }
            Err(e) => {
                // Remember the broken contents so the warning is logged once per change.
                *seen = contents;
                tracing::warn!(error = %e, "new TLS files refused; keeping the running certificate");
                false
            }
        }
    }

    /// Checks the files every `interval` until `stop` turns true.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.check()).await;
                }
                () = async { let _ = stop.wait_for(|v| *v).await; } => return,
            }
        }
    }

    /// Accepts connections on `listener` and hands the ones that complete a handshake to
    /// the returned channel (for tonic's `serve_with_incoming`). A failed handshake (no
    /// client certificate, one from another CA, plain text) is logged and dropped. The
    /// listener closes when `stop` turns true.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
        let (tx, rx) = mpsc::channel(64);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            // EMFILE and the like: wait instead of spinning.
                            tracing::warn!(error = %e, "gRPC accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = tx.closed() => return,
                    () = async { let _ = stop.wait_for(|v| *v).await; } => return,
                };
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "too many TLS handshakes under way; connection closed");
                    continue;
                };
                // Without TCP_NODELAY small answers wait out Nagle + delayed ACK.
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(self.current.load_full());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    drop(permit);
                    match handshake {
                        Ok(Ok(s)) => {
                            let _ = tx.send(Ok(TlsConn(s))).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "gRPC TLS handshake refused");
                        }
                        Err(_) => {
                            tracing::info!(%peer, "gRPC TLS handshake timed out");
                        }
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// A gRPC connection after its handshake.
#[derive(Debug)]
pub struct TlsConn(TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
