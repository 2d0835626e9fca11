//! A JWKS endpoint for the VerifyJwt benchmark flow (`/jwt/...` in
//! `benches/configs/bench.yaml`): generates an RSA key at start (no key is committed),
//! serves its public half at `http://<addr>/jwks` (`Cache-Control: max-age=3600`), and prints
//! one RS256 token for that flow (valid for a day) on the first line of stdout.
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
    let token = jsonwebtoken::encode(
        &header,
        &serde_json::json!({"iss": "https://bench.tollgate", "aud": "bench", "sub": "bench-user",
            "iat": now, "exp": now + 86_400}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes())?,
    )?;
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
