use super::*;
use jsonwebtoken::{DecodingKey, Validation};
use ring::signature::{
    EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING,
};

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn build_y(y: &str) -> Result<Arc<dyn Policy>, SpecError> {
    let ctx = BuildContext {
        name: "gen".into(),
        ..Default::default()
    };
    build(&ctx, serde_norway::from_str(y).unwrap())
}

fn run(p: &Arc<dyn Policy>, ex: &mut Exchange) -> Outcome {
    match p.run(ex, Direction::Request) {
        Hook::Ready(o) => o,
        Hook::Pending(_) => panic!("GenerateJwt never waits"),
    }
}

fn decode_part(token: &str, i: usize) -> serde_json::Value {
    let part = token.split('.').nth(i).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn hs256_with_claims_verifies() {
    let p = build_y(&format!(
        r#"
algorithm: HS256
secretKey: {{value: "{SECRET}", id: "k-{{flow.name}}"}}
issuer: urn://tollgate
subject: "{{client_id}}"
audience: [backend, "{{flow.name}}"]
expiresIn: 1h
id: ""
additionalClaims: {{tier: "{{tier}}", admin: false, n: 3}}
additionalHeaders: {{x-origin: tollgate}}
"#
    ))
    .unwrap();
    let mut ex = Exchange {
        flow: "f".into(),
        ..Default::default()
    };
    ex.set_var("client_id", "app-1");
    ex.set_var("tier", "gold");
    assert_eq!(run(&p, &mut ex), Outcome::Continue);
    let token = ex.lookup("jwt.gen.generated_jwt").unwrap().into_owned();
    let header = decode_part(&token, 0);
    assert_eq!(header["alg"], "HS256");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["kid"], "k-f");
    assert_eq!(header["x-origin"], "tollgate");
    let mut v = Validation::new(Algorithm::HS256);
    v.set_audience(&["backend"]);
    v.set_issuer(&["urn://tollgate"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &v,
    )
    .expect("the token verifies")
    .claims;
    assert_eq!(claims["sub"], "app-1");
    assert_eq!(claims["aud"], serde_json::json!(["backend", "f"]));
    assert_eq!(claims["tier"], "gold");
    assert_eq!(claims["admin"], false);
    assert_eq!(claims["n"], 3);
    let iat = claims["iat"].as_i64().unwrap();
    assert_eq!(claims["exp"].as_i64().unwrap() - iat, 3600);
    assert_eq!(claims["jti"].as_str().unwrap().len(), 36);
}

#[test]
fn es256_from_a_variable_key() {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
    let pem = format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n");
    let p = build_y(
        r#"{algorithm: ES256, privateKey: {value: "{private.key}"}, subject: s, outputVariable: out.jwt}"#,
    )
    .unwrap();
    let mut ex = Exchange::default();
    // The key variable is missing: Apigee's FailedToResolveVariable.
    let Outcome::Reject(f) = run(&p, &mut ex) else {
        panic!("no key");
    };
    assert_eq!(
        (f.status, f.code.as_str()),
        (401, "steps.jwt.FailedToResolveVariable")
    );
    ex.set_var("private.key", "not a key");
    let Outcome::Reject(f) = run(&p, &mut ex) else {
        panic!("bad key");
    };
    assert_eq!(f.code, "steps.jwt.KeyParsingFailed");
    ex.set_var("private.key", pem.as_str());
    for _ in 0..2 {
        // The second run reuses the parsed key.
        assert_eq!(run(&p, &mut ex), Outcome::Continue);
        let token = ex.lookup("out.jwt").unwrap().into_owned();
        let (message, sig) = token.rsplit_once('.').unwrap();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .unwrap();
        ring::signature::UnparsedPublicKey::new(
            &ECDSA_P256_SHA256_FIXED,
            pair.public_key().as_ref(),
        )
        .verify(message.as_bytes(), &sig)
        .expect("signed with the variable's key");
        assert_eq!(decode_part(&token, 0)["alg"], "ES256");
        assert_eq!(decode_part(&token, 1)["sub"], "s");
    }
}

#[test]
fn unresolved_claims_and_short_secrets() {
    let p = build_y(&format!(
        r#"{{algorithm: HS256, secretKey: {{value: "{SECRET}"}}, subject: "{{nope}}"}}"#
    ))
    .unwrap();
    let mut ex = Exchange::default();
    let Outcome::Reject(f) = run(&p, &mut ex) else {
        panic!("unresolved");
    };
    assert_eq!(f.code, "steps.jwt.FailedToResolveVariable");
    let p = build_y(&format!(
        r#"{{algorithm: HS256, secretKey: {{value: "{SECRET}"}}, subject: "{{nope}}", ignoreUnresolvedVariables: true}}"#
    ))
    .unwrap();
    assert_eq!(run(&p, &mut ex), Outcome::Continue);
    let token = ex.lookup("jwt.gen.generated_jwt").unwrap().into_owned();
    assert_eq!(decode_part(&token, 1)["sub"], "");

    // A secret from a variable that is too short for HS256.
    let p =
        build_y(r#"{algorithm: HS256, secretKey: {value: "{private.s}", encoding: hex}}"#).unwrap();
    ex.set_var("private.s", "00ff");
    let Outcome::Reject(f) = run(&p, &mut ex) else {
        panic!("short");
    };
    assert_eq!(f.code, "steps.jwt.InsufficientKeyLength");
    ex.set_var("private.s", "ab".repeat(32));
    assert_eq!(run(&p, &mut ex), Outcome::Continue);
}

#[test]
fn intervals() {
    assert_eq!(interval_ms("300"), Some(300_000));
    assert_eq!(interval_ms("1500ms"), Some(1500));
    assert_eq!(interval_ms("2h"), Some(7_200_000));
    assert_eq!(interval_ms("1w"), Some(604_800_000));
    assert_eq!(interval_ms("h"), None);
    assert_eq!(interval_ms("5y"), None);
}

#[test]
fn refused_at_load() {
    let field = |y: &str| build_y(y).unwrap_err().field;
    assert_eq!(
        field("{algorithm: none, secretKey: {value: x}}"),
        "algorithm"
    );
    assert_eq!(
        field("{algorithm: HS256, privateKey: {value: x}}"),
        "secretKey"
    );
    assert_eq!(
        field("{algorithm: RS256, secretKey: {value: x}}"),
        "privateKey"
    );
    assert_eq!(
        field("{algorithm: HS256, secretKey: {value: short}}"),
        "secretKey.value"
    );
    assert_eq!(
        field("{algorithm: RS256, privateKey: {value: not-a-pem}}"),
        "privateKey.value"
    );
    assert_eq!(
        field("{algorithm: ES256, privateKey: {value: '{k}', encoding: hex}}"),
        "privateKey.encoding"
    );
    assert_eq!(field("{algorithm: ES256, privateKey: {}}"), "privateKey");
    assert_eq!(
        field(&format!(
            "{{algorithm: HS256, secretKey: {{value: {SECRET}}}, expiresIn: soon}}"
        )),
        "expiresIn"
    );
    assert_eq!(
        field(&format!(
            "{{algorithm: HS256, secretKey: {{value: {SECRET}}}, additionalClaims: {{exp: 1}}}}"
        )),
        "additionalClaims.exp"
    );
    assert_eq!(
        field(&format!(
            "{{algorithm: HS256, secretKey: {{value: {SECRET}}}, outputVariable: request.x}}"
        )),
        "outputVariable"
    );
}
