//! Which LLM API a request speaks, from its method, path and (for Anthropic) headers.
//!
//! Paths are matched on their tail so that prefixes added by gateways (`/openai/v1/...`,
//! Azure's `/openai/deployments/{d}/...`) still match; the query is read only for Gemini's
//! `alt=sse`.

/// The LLM APIs tollgate understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// OpenAI `POST /v1/chat/completions` (and every server that speaks it: vLLM, Azure...).
    OpenAiChat,
    /// OpenAI legacy `POST /v1/completions`.
    OpenAiCompletions,
    /// OpenAI `POST /v1/embeddings`.
    OpenAiEmbeddings,
    /// OpenAI `POST /v1/responses`.
    OpenAiResponses,
    /// Anthropic `POST /v1/messages` (also Claude on Vertex AI, `:rawPredict`).
    AnthropicMessages,
    /// Gemini API `.../models/{model}:generateContent` / `:streamGenerateContent`.
    Gemini,
    /// Vertex AI `/v1/projects/{p}/locations/{l}/publishers/google/models/{m}:...`.
    VertexAi,
}

impl Api {
    /// The value of the `llm.api` flow variable.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::OpenAiChat => "openai.chat_completions",
            Api::OpenAiCompletions => "openai.completions",
            Api::OpenAiEmbeddings => "openai.embeddings",
            Api::OpenAiResponses => "openai.responses",
            Api::AnthropicMessages => "anthropic.messages",
            Api::Gemini => "gemini.generate_content",
            Api::VertexAi => "vertex_ai.generate_content",
        }
    }

    /// OpenTelemetry `gen_ai.operation.name`.
    pub fn operation_name(self) -> &'static str {
        match self {
            Api::OpenAiChat | Api::OpenAiResponses | Api::AnthropicMessages => "chat",
            Api::OpenAiCompletions => "text_completion",
            Api::OpenAiEmbeddings => "embeddings",
            Api::Gemini | Api::VertexAi => "generate_content",
        }
    }

    /// OpenTelemetry `gen_ai.provider.name`.
    pub fn provider_name(self) -> &'static str {
        match self {
            Api::OpenAiChat
            | Api::OpenAiCompletions
            | Api::OpenAiEmbeddings
            | Api::OpenAiResponses => "openai",
            Api::AnthropicMessages => "anthropic",
            Api::Gemini => "gcp.gemini",
            Api::VertexAi => "gcp.vertex_ai",
        }
    }

    /// Whether the OpenAI tokenizers apply to this API's models by default.
    pub fn is_openai(self) -> bool {
        matches!(
            self,
            Api::OpenAiChat | Api::OpenAiCompletions | Api::OpenAiEmbeddings | Api::OpenAiResponses
        )
    }
}

/// How the path itself says a response streams (Gemini and Vertex only; the OpenAI and
/// Anthropic APIs say it in the body's `stream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamShape {
    /// `:streamGenerateContent?alt=sse` (or Claude's `:streamRawPredict`): server-sent events.
    Sse,
    /// `:streamGenerateContent` without `alt=sse`: one JSON array streamed element by element.
    JsonArray,
}

/// A detected LLM endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub api: Api,
    /// The model named in the path (Gemini, Vertex AI, Azure deployments), if any.
    pub path_model: Option<String>,
    /// `Some` when the path asks for a streamed answer.
    pub path_stream: Option<StreamShape>,
}

/// Detect the API from the method, the path (query included, as in `:path`) and a header
/// lookup (`name` is lower case). `None` when the request is not an LLM call tollgate knows.
pub fn detect<'h>(
    method: &str,
    path_and_query: &str,
    header: impl Fn(&str) -> Option<&'h str>,
) -> Option<Endpoint> {
    if !method.eq_ignore_ascii_case("POST") {
        return None;
    }
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, q),
        None => (path_and_query, ""),
    };
    let path = path.trim_end_matches('/');

    // `{...}/models/{model}:{method}`: Gemini, Vertex AI, Claude on Vertex AI.
    if let Some((head, verb)) = path.rsplit_once(':') {
        if !verb.contains('/') {
            return detect_google(head, verb, query);
        }
    }

    let azure_deployment = azure_deployment(path);
    let openai = |api| {
        Some(Endpoint {
            api,
            path_model: azure_deployment.clone(),
            path_stream: None,
        })
    };
    if path.ends_with("/chat/completions") {
        return openai(Api::OpenAiChat);
    }
    if path.ends_with("/completions") {
        return openai(Api::OpenAiCompletions);
    }
    if path.ends_with("/embeddings") {
        return openai(Api::OpenAiEmbeddings);
    }
    if path.ends_with("/responses") {
        return openai(Api::OpenAiResponses);
    }
    // `/v1/threads/{id}/messages` (OpenAI Assistants) also ends in `/messages`: only the
    // exact `/v1/messages` tail, or a client that says it speaks Anthropic, is Anthropic.
    if path.ends_with("/v1/messages")
        || (path.ends_with("/messages") && header("anthropic-version").is_some())
    {
        return Some(Endpoint {
            api: Api::AnthropicMessages,
            path_model: None,
            path_stream: None,
        });
    }
    None
}

fn detect_google(head: &str, verb: &str, query: &str) -> Option<Endpoint> {
    let (prefix, model) = head.rsplit_once('/')?;
    if model.is_empty() {
        return None;
    }
    let alt_sse = query
        .split('&')
        .any(|kv| kv.eq_ignore_ascii_case("alt=sse"));
    if prefix.ends_with("/publishers/anthropic/models") {
        let path_stream = match verb {
            "rawPredict" => None,
            "streamRawPredict" => Some(StreamShape::Sse),
            _ => return None,
        };
        return Some(Endpoint {
            api: Api::AnthropicMessages,
            path_model: Some(model.to_owned()),
            path_stream,
        });
    }
    let path_stream = match verb {
        "generateContent" => None,
        "streamGenerateContent" if alt_sse => Some(StreamShape::Sse),
        "streamGenerateContent" => Some(StreamShape::JsonArray),
        _ => return None,
    };
    // Vertex AI paths are project-scoped; the Gemini API's are not.
    let api = if prefix.contains("/projects/") {
        Api::VertexAi
    } else if prefix.ends_with("/models") || prefix.ends_with("/tunedModels") {
        Api::Gemini
    } else {
        return None;
    };
    Some(Endpoint {
        api,
        path_model: Some(model.to_owned()),
        path_stream,
    })
}

/// Azure OpenAI names the deployment, not the model, in the path.
fn azure_deployment(path: &str) -> Option<String> {
    let rest = path.split_once("/openai/deployments/")?.1;
    let name = rest.split('/').next()?;
    (!name.is_empty()).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &str) -> Option<&'static str> {
        None
    }

    fn api(method: &str, path: &str) -> Option<Api> {
        detect(method, path, none).map(|e| e.api)
    }

    #[test]
    fn openai_paths() {
        assert_eq!(api("POST", "/v1/chat/completions"), Some(Api::OpenAiChat));
        assert_eq!(
            api("post", "/openai/v1/chat/completions/"),
            Some(Api::OpenAiChat)
        );
        assert_eq!(api("POST", "/v1/completions"), Some(Api::OpenAiCompletions));
        assert_eq!(api("POST", "/v1/embeddings"), Some(Api::OpenAiEmbeddings));
        assert_eq!(api("POST", "/v1/responses"), Some(Api::OpenAiResponses));
        assert_eq!(api("GET", "/v1/chat/completions"), None);
        assert_eq!(api("GET", "/v1/responses/resp_1"), None);
        assert_eq!(api("POST", "/v1/models"), None);
        let e = detect(
            "POST",
            "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21",
            none,
        )
        .unwrap();
        assert_eq!(e.api, Api::OpenAiChat);
        assert_eq!(e.path_model.as_deref(), Some("my-gpt4o"));
    }

    #[test]
    fn anthropic_paths() {
        assert_eq!(api("POST", "/v1/messages"), Some(Api::AnthropicMessages));
        // OpenAI Assistants' thread messages are not Anthropic...
        assert_eq!(api("POST", "/v1/threads/t1/messages"), None);
        // ...unless the client says it speaks Anthropic.
        let e = detect("POST", "/anthropic/messages", |h| {
            (h == "anthropic-version").then_some("2023-06-01")
        });
        assert_eq!(e.map(|e| e.api), Some(Api::AnthropicMessages));
        let e = detect(
            "POST",
            "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4:streamRawPredict",
            none,
        )
        .unwrap();
        assert_eq!(e.api, Api::AnthropicMessages);
        assert_eq!(e.path_model.as_deref(), Some("claude-sonnet-4"));
        assert_eq!(e.path_stream, Some(StreamShape::Sse));
    }

    #[test]
    fn gemini_and_vertex_paths() {
        let e = detect(
            "POST",
            "/v1beta/models/gemini-2.5-flash:generateContent",
            none,
        )
        .unwrap();
        assert_eq!(e.api, Api::Gemini);
        assert_eq!(e.path_model.as_deref(), Some("gemini-2.5-flash"));
        assert_eq!(e.path_stream, None);

        let e = detect(
            "POST",
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent?key=k&alt=sse",
            none,
        )
        .unwrap();
        assert_eq!(e.path_stream, Some(StreamShape::Sse));
        let e = detect(
            "POST",
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
            none,
        )
        .unwrap();
        assert_eq!(e.path_stream, Some(StreamShape::JsonArray));

        let e = detect(
            "POST",
            "/v1/projects/my-proj/locations/us-central1/publishers/google/models/gemini-2.0-flash-001:streamGenerateContent?alt=sse",
            none,
        )
        .unwrap();
        assert_eq!(e.api, Api::VertexAi);
        assert_eq!(e.path_model.as_deref(), Some("gemini-2.0-flash-001"));
        assert_eq!(e.path_stream, Some(StreamShape::Sse));

        assert_eq!(
            api("POST", "/v1beta/models/gemini-2.5-pro:countTokens"),
            None
        );
        assert_eq!(api("POST", "/v1beta/models/:generateContent"), None);
        assert_eq!(api("POST", "/weird:generateContent"), None);
    }
}
