use super::*;
use crate::consumer::Operation;

fn product(name: &str, access: Option<&str>) -> ApiProduct {
    ApiProduct {
        name: name.into(),
        description: format!("about {name}"),
        operations: vec![Operation {
            path: "/v1/**".into(),
            models: vec!["gpt-4o".into()],
            ..Default::default()
        }],
        quota: Some(crate::consumer::QuotaSettings {
            limit: 100,
            interval: 1,
            time_unit: crate::consumer::TimeUnit::Minute,
        }),
        llm_token_quota: None,
        approval_type: ApprovalType::Auto,
        attributes: access
            .map(|a| [("access".to_owned(), a.to_owned())].into())
            .unwrap_or_default(),
        origin: Origin::File,
        revision: 0,
    }
}

fn dev(products: &[&str]) -> Developer {
    Developer {
        email: "d@example.com".into(),
        name: "D".into(),
        password_hash: None,
        status: DeveloperStatus::Active,
        products: products.iter().map(|s| s.to_string()).collect(),
        created_at: 0,
        revision: 0,
    }
}

#[test]
fn visibility_follows_the_access_attribute_and_grants() {
    let public = product("pub", Some("Public"));
    let private = product("priv", Some("private"));
    let internal = product("int", Some("internal"));
    let unmarked = product("none", None);
    assert!(visible(&public, None));
    assert!(!visible(&private, None));
    assert!(!visible(&private, Some(&dev(&[]))));
    assert!(visible(&private, Some(&dev(&["priv"]))));
    assert!(!visible(&internal, Some(&dev(&["int"]))));
    assert!(!visible(&unmarked, Some(&dev(&["none"]))));
}

#[test]
fn catalog_lists_what_the_viewer_may_see_with_limits_and_models() {
    let c = Consumers::new(crate::store::Store::memory());
    c.set_file_objects(
        vec![
            product("pub", Some("public")),
            product("priv", Some("private")),
        ],
        vec![],
    );
    let portal = Portal::new(c, None, PortalOptions::default());
    let anon = render_catalog(&portal, None);
    assert!(anon.contains("/products/pub") && !anon.contains("/products/priv"));
    assert!(anon.contains("100 calls per minute") && anon.contains("gpt-4o"));
    let granted = render_catalog(&portal, Some(&dev(&["priv"])));
    assert!(granted.contains("/products/priv"));
}

#[test]
fn slugs_and_forms() {
    assert_eq!(slug("My <App> 1"), "my-app-1");
    assert_eq!(slug("***"), "app");
    let f = form(b"a=1+2&b=%3Cx%3E&a=3");
    assert_eq!(f["a"], "1 2");
    assert_eq!(f["b"], "<x>");
    let mut h = HeaderMap::new();
    h.insert(
        header::COOKIE,
        HeaderValue::from_static("x=1; tg_portal=abc"),
    );
    assert_eq!(cookie(SESSION_COOKIE, &h).as_deref(), Some("abc"));
    assert!(valid_email("a@b.co") && !valid_email("a@b") && !valid_email("<a>@b.co"));
}
