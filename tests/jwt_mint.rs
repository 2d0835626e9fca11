//! `tollgate jwt mint`: tokens signed with a secret or a PEM key, `iat`/`exp` filled in, bad
//! input refused with a clear message; and the command policies/jwt.yaml's comments show
//! mints a token its VerifyJwt accepts in the real process.

use std::process::{Command, Stdio};

use envoy_types::pb::envoy::service::ext_proc::v3::{
    external_processor_client::ExternalProcessorClient, processing_response::Response,
    ProcessingRequest,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;

mod support;

use support::{ext_proc, free_port, repo_root, tollgate_bin, ServeProcess};

/// (exit success, stdout, stderr) of `tollgate jwt mint ARGS`.
fn mint(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(tollgate_bin())
        .args(["jwt", "mint"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn hs256_with_iat_exp_and_kid() {
    let (ok, token, err) = mint(&[
        "--secret",
        "a-secret-of-some-length",
        "--claims",
        r#"{"sub":"u1","aud":"me","tier":"gold"}"#,
        "--expires-in",
        "10m",
        "--kid",
        "k1",
    ]);
    assert!(ok, "{err}");
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::HS256);
    assert_eq!(header.kid.as_deref(), Some("k1"));
    let mut v = Validation::new(Algorithm::HS256);
    v.set_audience(&["me"]);
    let data = jsonwebtoken::decode::<Value>(
        &token,
        &DecodingKey::from_secret(b"a-secret-of-some-length"),
        &v,
    )
    .unwrap();
    let c = data.claims;
    assert_eq!(c["sub"], "u1");
    assert_eq!(c["tier"], "gold");
    let (iat, exp) = (c["iat"].as_u64().unwrap(), c["exp"].as_u64().unwrap());
    assert_eq!(exp - iat, 600);

    // A wrong secret does not verify it.
    assert!(
        jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_secret(b"other"), &v).is_err()
    );

    // Claims that set exp keep it; the secret can come from the environment.
    let out = Command::new(tollgate_bin())
        .args(["jwt", "mint", "--secret-env", "MY_JWT_SECRET"])
        .args(["--claims", r#"{"exp": 4102444800}"#])
        .env("MY_JWT_SECRET", "from-the-env")
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut v = Validation::new(Algorithm::HS256);
    v.required_spec_claims.clear();
    let c = jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_secret(b"from-the-env"), &v)
        .unwrap()
        .claims;
    assert_eq!(c["exp"], 4102444800u64);
}

#[test]
fn es256_with_a_pem_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap(); // ECDSA P-256, PKCS#8
    let file = dir.path().join("key.pem");
    std::fs::write(&file, key.serialize_pem()).unwrap();
    let (ok, token, err) = mint(&[
        "--alg",
        "ES256",
        "--key",
        file.to_str().unwrap(),
        "--claims",
        r#"{"sub":"svc"}"#,
    ]);
    assert!(ok, "{err}");
    let public = DecodingKey::from_ec_pem(key.public_key_pem().as_bytes()).unwrap();
    let c = jsonwebtoken::decode::<Value>(&token, &public, &Validation::new(Algorithm::ES256))
        .unwrap()
        .claims;
    assert_eq!(c["sub"], "svc");
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let (ok, _, err) = mint(&["--secret", "s", "--claims", "[1,2]"]);
    assert!(!ok);
    assert!(err.contains("--claims must be a JSON object"), "{err}");
    let (ok, _, err) = mint(&["--alg", "RS256", "--claims", "{}"]);
    assert!(!ok);
    assert!(err.contains("needs --key"), "{err}");
    let (ok, _, err) = mint(&["--alg", "XX999", "--secret", "s"]);
    assert!(!ok);
    assert!(err.contains("unknown algorithm"), "{err}");
    let (ok, _, err) = mint(&["--claims", "{}"]);
    assert!(!ok);
    assert!(err.contains("--secret"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a key").unwrap();
    let (ok, _, err) = mint(&["--alg", "ES256", "--key", junk.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("--key is not a ES256 key"), "{err}");
}

/// The `TOKEN=$(tollgate jwt mint …)` command of policies/jwt.yaml's comments, joined
/// across its continuation lines.
fn comment_command(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| l.trim_start_matches('#').trim())
        .collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("TOKEN=$(tollgate jwt mint"))
        .expect("policies/jwt.yaml shows how to mint a token");
    let mut cmd = String::new();
    for l in &lines[start..] {
        match l.strip_suffix('\\') {
            Some(part) => cmd.push_str(part),
            None => {
                cmd.push_str(l);
                break;
            }
        }
    }
    cmd
}

fn request(token: Option<&str>) -> ProcessingRequest {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![
        (":method", "GET"),
        (":path", "/jwt/hello"),
        (":authority", "localhost"),
    ];
    if let Some(b) = &bearer {
        headers.push(("authorization", b));
    }
    ext_proc::request_headers(&headers, true)
}

#[tokio::test]
async fn the_jwt_example_comment_mints_a_token_its_policy_accepts() {
    let text = std::fs::read_to_string(repo_root().join("policies/jwt.yaml")).unwrap();
    let cmd = comment_command(&text);
    // Run as a user would paste it, with `tollgate` on the PATH.
    let bin_dir = tollgate_bin().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -e; {cmd}; printf '%s' \"$TOKEN\""))
        .env("PATH", path)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "`{cmd}` failed");
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token:?}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwt.yaml"), &text).unwrap();
    let (grpc, admin) = (free_port(), free_port());
    let mut c = Command::new(tollgate_bin());
    c.arg("serve")
        .arg("--config")
        .arg(dir.path())
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--store", "memory"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _p = ServeProcess::ready(&mut c, dir, grpc, admin);
    let mut client = ExternalProcessorClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .unwrap();
    for (token, want_subject) in [(Some(token.as_str()), true), (None, false)] {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tx.send(request(token)).await.unwrap();
        let mut answers = client
            .process(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let r = answers.message().await.unwrap().unwrap();
        match (r.response, want_subject) {
            (Some(Response::RequestHeaders(h)), true) => {
                let set: Vec<(String, String)> = h
                    .response
                    .and_then(|c| c.header_mutation)
                    .map(|m| {
                        m.set_headers
                            .into_iter()
                            .filter_map(|o| o.header)
                            .map(|h| (h.key, String::from_utf8_lossy(&h.raw_value).into_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                assert!(
                    set.contains(&("x-tollgate-subject".to_owned(), "user-1".to_owned())),
                    "{set:?}"
                );
            }
            (Some(Response::ImmediateResponse(i)), false) => {
                assert_eq!(i.status.map(|s| s.code), Some(401));
            }
            (other, _) => panic!("token {token:?}: unexpected answer {other:?}"),
        }
    }
}
