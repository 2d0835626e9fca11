//! Translation between ext_proc protobuf messages and tollgate's own types. This is the only
//! module besides the stream driver that knows about protobuf.

use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderMap, HeaderValue, HeaderValueOption, Metadata,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_proc::v3::ProcessingMode;
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation, common_response::ResponseStatus, processing_response::Response,
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::Struct;

use crate::fault::Rendered;
use crate::vars::{HeaderMutations, Headers};

/// The `tollgate-flow` key a GKE traffic extension (or any Envoy metadata namespace) uses to
/// name the flow for the request.
pub const FLOW_METADATA_KEY: &str = "tollgate-flow";

/// Reads headers from `raw_value` (Envoy 1.40 leaves `value` empty), falling back to
/// `value` for other clients. Invalid UTF-8 is replaced, never rejected. The message's strings
/// are taken over, not copied (Envoy sends lower-case names and, nearly always, UTF-8).
pub fn headers_from(map: Option<HeaderMap>) -> Headers {
    let Some(map) = map else {
        return Headers::new();
    };
    // Room for a few headers the policies add without growing the list.
    let mut h = Headers::with_capacity(map.headers.len() + 4);
    for hv in map.headers {
        let value = if hv.raw_value.is_empty() {
            hv.value
        } else {
            match String::from_utf8(hv.raw_value) {
                Ok(v) => v,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            }
        };
        let mut name = hv.key;
        name.make_ascii_lowercase();
        h.push(name, value);
    }
    h
}

/// A flow name from extension metadata: the first string `tollgate-flow` field in any
/// namespace (GKE uses `com.google.<extension_type>.<resource>.<chain>.<ext>`).
pub fn flow_from_metadata(md: Option<&Metadata>) -> Option<String> {
    let md = md?;
    let mut namespaces: Vec<_> = md.filter_metadata.iter().collect();
    namespaces.sort_by(|a, b| a.0.cmp(b.0));
    namespaces.into_iter().find_map(|(_, s)| {
        s.fields.get(FLOW_METADATA_KEY).and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
            _ => None,
        })
    })
}

/// Flattens Envoy's `attributes` (a Struct per filter name) into `name -> text`.
pub fn attributes_into(
    attrs: &std::collections::HashMap<String, Struct>,
    out: &mut std::collections::HashMap<String, String>,
) {
    for s in attrs.values() {
        for (k, v) in &s.fields {
            let text = match &v.kind {
                Some(Kind::StringValue(s)) => s.clone(),
                Some(Kind::NumberValue(n)) => {
                    if n.fract() == 0.0 && n.abs() < 1e15 {
                        format!("{}", *n as i64)
                    } else {
                        n.to_string()
                    }
                }
                Some(Kind::BoolValue(b)) => b.to_string(),
                _ => continue,
            };
            out.insert(k.clone(), text);
        }
    }
}

// Envoy 1.40's ext_proc reads only the deprecated `append` flag (envoyproxy/envoy#36982) and
// ignores `append_action`; both are set so newer Envoys that read `append_action` agree.
#[allow(deprecated)]
fn header_value(name: String, value: String, append: bool) -> HeaderValueOption {
    HeaderValueOption {
        append: append.then_some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
        header: Some(HeaderValue {
            key: name,
            value: String::new(),
            raw_value: value.into_bytes(),
        }),
        append_action: if append {
            HeaderAppendAction::AppendIfExistsOrAdd as i32
        } else {
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        },
        keep_empty_value: true,
    }
}

pub fn header_mutation(m: HeaderMutations) -> Option<HeaderMutation> {
    if m.is_empty() {
        return None;
    }
    Some(HeaderMutation {
        set_headers: m
            .set
            .into_iter()
            .map(|(n, v, a)| header_value(n, v, a))
            .collect(),
        remove_headers: m.remove,
    })
}

pub fn common(
    header_mutation: Option<HeaderMutation>,
    body_mutation: Option<Mutation>,
) -> Option<CommonResponse> {
    if header_mutation.is_none() && body_mutation.is_none() {
        return None;
    }
    Some(CommonResponse {
        status: ResponseStatus::Continue as i32,
        header_mutation,
        body_mutation: body_mutation.map(|m| BodyMutation { mutation: Some(m) }),
        trailers: None,
        clear_route_cache: false,
    })
}

fn wrap(r: Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

pub fn request_headers(
    m: Option<HeaderMutation>,
    clear_route_cache: bool,
    mode: Option<ProcessingMode>,
) -> ProcessingResponse {
    let mut response = common(m, None);
    if let Some(c) = response.as_mut() {
        c.clear_route_cache = clear_route_cache;
    }
    let mut r = wrap(Response::RequestHeaders(HeadersResponse { response }));
    r.mode_override = mode;
    r
}

pub fn response_headers(
    m: Option<HeaderMutation>,
    mode: Option<ProcessingMode>,
) -> ProcessingResponse {
    let mut r = wrap(Response::ResponseHeaders(HeadersResponse {
        response: common(m, None),
    }));
    r.mode_override = mode;
    r
}

pub fn body(request: bool, common: Option<CommonResponse>) -> ProcessingResponse {
    let b = BodyResponse { response: common };
    wrap(if request {
        Response::RequestBody(b)
    } else {
        Response::ResponseBody(b)
    })
}

/// A FULL_DUPLEX_STREAMED body answer: the chunk to pass on.
pub fn streamed_body(request: bool, chunk: Vec<u8>, end_of_stream: bool) -> ProcessingResponse {
    body(
        request,
        common(
            None,
            Some(Mutation::StreamedResponse(StreamedBodyResponse {
                body: chunk,
                end_of_stream,
                ..Default::default()
            })),
        ),
    )
}

pub fn trailers(request: bool) -> ProcessingResponse {
    let t = TrailersResponse {
        header_mutation: None,
    };
    wrap(if request {
        Response::RequestTrailers(t)
    } else {
        Response::ResponseTrailers(t)
    })
}

/// An immediate answer to the client.
pub fn immediate(r: Rendered, code: &str) -> ProcessingResponse {
    let headers = HeaderMutation {
        set_headers: r
            .headers
            .into_iter()
            .map(|(n, v)| header_value(n, v, false))
            .collect(),
        remove_headers: Vec::new(),
    };
    // Response-code details must not contain whitespace.
    let details: String = format!("tollgate_{code}")
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect();
    wrap(Response::ImmediateResponse(ImmediateResponse {
        status: Some(HttpStatus {
            code: i32::from(r.status),
        }),
        headers: Some(headers),
        body: r.body,
        grpc_status: None,
        details,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Value as PbValue;
    use std::collections::HashMap;

    #[test]
    fn raw_values_and_lossy_utf8() {
        let map = HeaderMap {
            headers: vec![
                HeaderValue {
                    key: ":path".into(),
                    value: String::new(),
                    raw_value: b"/a".to_vec(),
                },
                HeaderValue {
                    key: "X-Bin".into(),
                    value: String::new(),
                    raw_value: vec![0xff, b'a'],
                },
                HeaderValue {
                    key: "x-old".into(),
                    value: "v".into(),
                    raw_value: Vec::new(),
                },
            ],
        };
        let h = headers_from(Some(map));
        assert_eq!(h.get(":path"), Some("/a"));
        assert_eq!(h.get("x-bin"), Some("\u{fffd}a"));
        assert_eq!(h.get("x-old"), Some("v"));
    }

    #[test]
    fn mutations_use_raw_value_only() {
        let m = header_mutation(HeaderMutations {
            set: vec![("x-a".into(), "1".into(), false)],
            remove: vec!["x-b".into()],
        })
        .unwrap();
        let hv = m.set_headers[0].header.as_ref().unwrap();
        assert!(hv.value.is_empty());
        assert_eq!(hv.raw_value, b"1");
        assert_eq!(m.remove_headers, ["x-b"]);
        assert!(header_mutation(HeaderMutations::default()).is_none());
    }

    #[test]
    fn flow_name_from_any_namespace() {
        let mut fields = HashMap::new();
        fields.insert(
            FLOW_METADATA_KEY.to_string(),
            PbValue {
                kind: Some(Kind::StringValue("chat".into())),
            },
        );
        let mut md = Metadata::default();
        md.filter_metadata
            .insert("com.google.ext_proc.gw.chain.ext".into(), Struct { fields });
        assert_eq!(flow_from_metadata(Some(&md)).as_deref(), Some("chat"));
        assert_eq!(flow_from_metadata(None), None);
    }
}
