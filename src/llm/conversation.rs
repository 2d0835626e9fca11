//! A request's conversation by role: the system text apart from the turns, each turn's
//! text. The semantic cache keys on it (the system prompt and earlier turns exactly, the
//! last user turn by meaning) and the model router reads the last user turn; the flat
//! prompt of [`super::LlmRequest`] (all text in one string, for counting and guards) cannot
//! tell who said what.

use serde_json::Value;

use super::request::{
    anthropic_block, gemini_content, openai_message, responses_item, text_or_parts, text_or_tokens,
    Prompt,
};
use super::{Api, LlmError};

/// Who a turn is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    User,
    Assistant,
    /// A tool call or a tool's result (an agent loop, not a question).
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub text: String,
}

/// The conversation a request carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversation {
    /// System prompts, developer messages and instructions, `\n`-joined.
    pub system: String,
    pub turns: Vec<Turn>,
    /// Images, audio, files: parts whose meaning the text does not carry.
    pub media_parts: u64,
    /// Pre-tokenized prompt tokens (Completions token arrays): no text to read.
    pub token_ids: u64,
}

impl Conversation {
    /// The last turn's text when it is the user's, else `None` (the request continues a
    /// tool loop or an assistant prefill).
    pub fn last_user(&self) -> Option<&str> {
        match self.turns.last() {
            Some(t) if t.role == Role::User => Some(&t.text),
            _ => None,
        }
    }

    /// Every turn before the last.
    pub fn earlier(&self) -> &[Turn] {
        match self.turns.split_last() {
            Some((_, rest)) => rest,
            None => &[],
        }
    }
}

/// Reads `v`, a request body to `api`. Errors as [`super::parse_request_json`] does on the
/// same body (the tracker has already refused malformed ones).
pub fn conversation(api: Api, v: &Value) -> Result<Conversation, LlmError> {
    let obj = v.as_object().ok_or(LlmError::NotObject)?;
    let mut c = Conversation::default();
    let mut system = Prompt::default();
    let turn = |c: &mut Conversation, role: Role, p: Prompt| {
        c.media_parts += p.media;
        c.turns.push(Turn { role, text: p.text });
    };
    match api {
        Api::OpenAiChat => {
            for m in obj
                .get("messages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
                let mut p = Prompt::default();
                openai_message(m, &mut p)?;
                match role {
                    "system" | "developer" => {
                        system.media += p.media;
                        system.push(&p.text);
                    }
                    "assistant" if m.get("tool_calls").is_some() => turn(&mut c, Role::Tool, p),
                    "assistant" => turn(&mut c, Role::Assistant, p),
                    "tool" | "function" => turn(&mut c, Role::Tool, p),
                    _ => turn(&mut c, Role::User, p),
                }
            }
        }
        Api::OpenAiCompletions | Api::OpenAiEmbeddings => {
            let field = if api == Api::OpenAiCompletions {
                "prompt"
            } else {
                "input"
            };
            let mut p = Prompt::default();
            c.token_ids = text_or_tokens(obj.get(field), field, &mut p)?;
            turn(&mut c, Role::User, p);
        }
        Api::OpenAiResponses => {
            if let Some(Value::String(s)) = obj.get("instructions") {
                system.push(s);
            }
            match obj.get("input") {
                Some(Value::String(s)) => {
                    let mut p = Prompt::default();
                    p.push(s);
                    turn(&mut c, Role::User, p);
                }
                Some(Value::Array(items)) => {
                    for item in items {
                        let mut p = Prompt::default();
                        responses_item(item, &mut p)?;
                        let kind = item
                            .get("type")
                            .and_then(Value::as_str)
                            .unwrap_or("message");
                        let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                        match (kind, role) {
                            ("message", "system" | "developer") => {
                                system.media += p.media;
                                system.push(&p.text);
                            }
                            ("message", "assistant") => turn(&mut c, Role::Assistant, p),
                            ("message", _) => turn(&mut c, Role::User, p),
                            _ => turn(&mut c, Role::Tool, p),
                        }
                    }
                }
                _ => {}
            }
        }
        Api::AnthropicMessages => {
            text_or_parts(
                obj.get("system"),
                &mut system,
                "system",
                "a string or an array",
                anthropic_block,
            )?;
            for m in obj
                .get("messages")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let mut p = Prompt::default();
                let content = m.get("content");
                text_or_parts(
                    content,
                    &mut p,
                    "messages[].content",
                    "a string or an array",
                    anthropic_block,
                )?;
                let tool = content.and_then(Value::as_array).is_some_and(|bs| {
                    bs.iter().any(|b| {
                        matches!(
                            b.get("type").and_then(Value::as_str),
                            Some("tool_use" | "tool_result" | "server_tool_use")
                        )
                    })
                });
                let role = match m.get("role").and_then(Value::as_str) {
                    _ if tool => Role::Tool,
                    Some("assistant") => Role::Assistant,
                    _ => Role::User,
                };
                turn(&mut c, role, p);
            }
        }
        Api::Gemini | Api::VertexAi => {
            for key in ["systemInstruction", "system_instruction"] {
                if let Some(s) = obj.get(key) {
                    gemini_content(s, &mut system)?;
                }
            }
            let contents: Vec<&Value> = match obj.get("contents") {
                Some(Value::Array(cs)) => cs.iter().collect(),
                Some(one @ Value::Object(_)) => vec![one],
                _ => Vec::new(),
            };
            for content in contents {
                let mut p = Prompt::default();
                gemini_content(content, &mut p)?;
                let tool = content
                    .get("parts")
                    .and_then(Value::as_array)
                    .is_some_and(|ps| {
                        ps.iter().any(|part| {
                            [
                                "functionCall",
                                "function_call",
                                "functionResponse",
                                "function_response",
                            ]
                            .iter()
                            .any(|k| part.get(k).is_some())
                        })
                    });
                let role = match content.get("role").and_then(Value::as_str) {
                    _ if tool => Role::Tool,
                    Some("model") => Role::Assistant,
                    Some("function" | "tool") => Role::Tool,
                    _ => Role::User,
                };
                turn(&mut c, role, p);
            }
        }
    }
    c.system = system.text;
    c.media_parts += system.media;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv(api: Api, v: Value) -> Conversation {
        conversation(api, &v).expect("reads")
    }

    #[test]
    fn openai_chat_by_role() {
        let c = conv(
            Api::OpenAiChat,
            json!({"model":"m","messages":[
                {"role":"system","content":"Be brief."},
                {"role":"user","content":"Hi"},
                {"role":"assistant","content":"Hello!"},
                {"role":"developer","content":[{"type":"text","text":"No emojis."}]},
                {"role":"user","content":[{"type":"text","text":"What is Rust?"},{"type":"image_url","image_url":{"url":"x"}}]}
            ]}),
        );
        assert_eq!(c.system, "Be brief.\nNo emojis.");
        assert_eq!(c.turns.len(), 3);
        assert_eq!(c.last_user(), Some("What is Rust?"));
        assert_eq!(c.earlier()[1].role, Role::Assistant);
        assert_eq!(c.media_parts, 1);
    }

    #[test]
    fn tool_loops_end_in_no_user_question() {
        let c = conv(
            Api::OpenAiChat,
            json!({"messages":[
                {"role":"user","content":"Weather in Paris?"},
                {"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"w","arguments":"{}"}}]},
                {"role":"tool","tool_call_id":"1","content":"12C"}
            ]}),
        );
        assert_eq!(c.last_user(), None);
        let a = conv(
            Api::AnthropicMessages,
            json!({"system":"S","messages":[
                {"role":"user","content":"Weather?"},
                {"role":"assistant","content":[{"type":"tool_use","id":"t","name":"w","input":{}}]},
                {"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"12C"}]}
            ]}),
        );
        assert_eq!(a.system, "S");
        assert_eq!(a.last_user(), None);
    }

    #[test]
    fn responses_anthropic_gemini_completions() {
        let r = conv(
            Api::OpenAiResponses,
            json!({"instructions":"Sys","input":[
                {"role":"developer","content":"Dev"},
                {"role":"user","content":[{"type":"input_text","text":"Q1"}]}
            ]}),
        );
        assert_eq!(r.system, "Sys\nDev");
        assert_eq!(r.last_user(), Some("Q1"));
        let s = conv(Api::OpenAiResponses, json!({"input":"Just this"}));
        assert_eq!(s.last_user(), Some("Just this"));
        let a = conv(
            Api::AnthropicMessages,
            json!({"system":[{"type":"text","text":"S1"}],"messages":[{"role":"user","content":"Q"}]}),
        );
        assert_eq!((a.system.as_str(), a.last_user()), ("S1", Some("Q")));
        let g = conv(
            Api::Gemini,
            json!({"systemInstruction":{"parts":[{"text":"GS"}]},"contents":[
                {"role":"user","parts":[{"text":"A"}]},
                {"role":"model","parts":[{"text":"B"}]},
                {"role":"user","parts":[{"text":"C"}]}
            ]}),
        );
        assert_eq!(g.system, "GS");
        assert_eq!(g.earlier().len(), 2);
        assert_eq!(g.last_user(), Some("C"));
        let t = conv(Api::OpenAiCompletions, json!({"prompt":[[1,2,3]]}));
        assert_eq!(t.token_ids, 3);
    }

    #[test]
    fn malformed_content_is_an_error_never_a_panic() {
        assert!(conversation(Api::OpenAiChat, &json!([1])).is_err());
        assert!(conversation(
            Api::OpenAiChat,
            &json!({"messages":[{"role":"user","content":7}]})
        )
        .is_err());
        let empty = conv(Api::OpenAiChat, json!({"messages":"nope"}));
        assert_eq!(empty.last_user(), None);
    }
}
