//! A JWKS endpoint for the VerifyJwt benchmark flow (`/jwt/...` in
//! `benches/configs/bench.yaml`): generates an RSA key at start (no key is committed),
//! serves its public half at `http://<addr>/jwks` (`Cache-Control: max-age=3600`), and prints
//! one RS256 token for that flow (valid for a day) on the first line of stdout. With
//! `--tokens N --tokens-file F` it first writes N distinct tokens to F (see grpc-compare.sh's
//! `jwt-fresh` target).
//!
//!     cargo build --release --example jwks_fixture
//!     target/release/examples/jwks_fixture --addr 127.0.0.1:19876

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use clap::Parser;
use rsa::pkcs8::EncodePrivateKey;
use rsa::traits::PublicKeyParts;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:19876")]
    addr: String,
    /// Also write this many distinct tokens (`Bearer <jwt>`, one per line) to --tokens-file,
    /// for a run in which every stream brings a token the verifier has not seen.
    #[arg(long, default_value_t = 0)]
    tokens: usize,
    #[arg(long, default_value = "jwt-tokens.txt")]
    tokens_file: std::path::PathBuf,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048)?;
    let pem = key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)?;
    let jwks =
        serde_json::json!({"keys": [{"kty": "RSA", "kid": "bench", "alg": "RS256", "use": "sig",
        "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be())}]})
        .to_string();
    let now = jsonwebtoken::get_current_timestamp();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("bench".into());
    let signer = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes())?;
    let sign = |sub: &str| {
        jsonwebtoken::encode(
            &header,
            &serde_json::json!({"iss": "https://bench.tollgate", "aud": "bench", "sub": sub,
                "iat": now, "exp": now + 86_400}),
            &signer,
        )
    };
    let token = sign("bench-user")?;
    if args.tokens > 0 {
        let mut out = String::with_capacity(args.tokens * 400);
        for i in 0..args.tokens {
            out.push_str("Bearer ");
            out.push_str(&sign(&format!("bench-user-{i}"))?);
            out.push('\n');
        }
        std::fs::write(&args.tokens_file, out)?;
    }
    let listener = tokio::net::TcpListener::bind(&args.addr).await?;
    println!("{token}");
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let body = jwks.clone();
            async move {
                (
                    [
                        ("content-type", "application/json"),
                        ("cache-control", "max-age=3600"),
                    ],
                    body,
                )
            }
        }),
    );
    axum::serve(listener, app).await?;
    Ok(())
}
