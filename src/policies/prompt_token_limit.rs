//! `PromptTokenLimit`: Apigee's PromptTokenLimit — a SpikeArrest weighed in prompt tokens,
//! per replica.
//!
//! ```yaml
//! spec:
//!   type: PromptTokenLimit
//!   rate: 1000pm                # prompt tokens per second (ps) or minute (pm)
//!   identifier: "{client_id}"   # optional: one limiter per identifier
//!   useEffectiveCount: false    # false: smoothed (GCRA); true: a sliding window
//!   # userPromptSource: "{request.header.x-user-prompt}"  # count this text instead
//! ```
//!
//! The weight is the request's prompt tokens as the LLM tracker counted them
//! (`llm.prompt_tokens`: every message and part), or, with `userPromptSource`, the tokens of
//! that template's text (counted with the request's model's tokenizer, or ~4 characters per
//! token when the request is not an LLM request). Smoothed (default): `1000pm` lets a prompt
//! of w tokens through when the limiter is idle and holds the next one back w × 60 ms, so one
//! large prompt is admitted and then everyone on its identifier waits for it. With
//! `useEffectiveCount: true`, at most `rate` tokens are admitted in any sliding second or
//! minute, and a prompt larger than the whole rate is always refused. A request with no
//! prompt (not an LLM request, no `userPromptSource`) passes uncounted. A refusal is 429
//! `policies.prompttokenlimit.PromptTokenLimitViolation` with `Retry-After`.

use std::sync::Arc;

use serde::Deserialize;

use super::spike_arrest::{self, SpikeArrest};
use super::{parse_spec, BuildContext, SpecError};
use crate::expr::Template;
use crate::llm::tokens::{CountingConfig, TokenCounter};
use crate::llm::Api;
use crate::pipeline::{Direction, Hook, Hooks, Policy};
use crate::vars::Exchange;

pub const TYPE: &str = "PromptTokenLimit";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    rate: String,
    #[serde(default)]
    identifier: Option<String>,
    #[serde(default)]
    use_effective_count: bool,
    #[serde(default)]
    user_prompt_source: Option<String>,
}

#[derive(Debug)]
struct PromptTokenLimit {
    core: SpikeArrest,
    user_prompt: Option<(Template, TokenCounter)>,
}

pub fn build(ctx: &BuildContext, spec: serde_norway::Value) -> Result<Arc<dyn Policy>, SpecError> {
    let spec: Spec = parse_spec(spec)?;
    let user_prompt = match spec.user_prompt_source.as_deref() {
        None => None,
        Some(t) => Some((
            Template::compile(t).map_err(|e| SpecError::new("userPromptSource", e.to_string()))?,
            TokenCounter::new(CountingConfig::default())
                .map_err(|e| SpecError::new("userPromptSource", e.to_string()))?,
        )),
    };
    let core = spike_arrest::build_core(
        ctx,
        &spec.rate,
        spec.identifier.as_deref(),
        None,
        spec.use_effective_count,
        (
            b"prompttokenlimit",
            (
                "policies.prompttokenlimit.PromptTokenLimitViolation",
                "Prompt token limit violation.",
            ),
        ),
    )?;
    Ok(Arc::new(PromptTokenLimit { core, user_prompt }))
}

impl PromptTokenLimit {
    /// The tokens this request weighs, when it has a prompt.
    fn weight(&self, ex: &Exchange) -> Option<u64> {
        let Some((template, counter)) = &self.user_prompt else {
            return ex.state.llm_prompt_tokens;
        };
        let text = template.render(ex);
        let (api, model) = match &ex.state.llm {
            Some(r) => (r.api, r.model.as_deref().unwrap_or("")),
            // Not an LLM request: no model, so the approximation.
            None => (Api::AnthropicMessages, ""),
        };
        Some(counter.count(api, model, &text))
    }
}

impl Policy for PromptTokenLimit {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn needs_body(&self, dir: Direction) -> bool {
        dir == Direction::Request
    }

    fn hooks(&self) -> Hooks {
        Hooks {
            llm: true,
            ..Hooks::default()
        }
    }

    fn run<'a>(&'a self, ex: &'a mut Exchange, dir: Direction) -> Hook<'a> {
        if dir != Direction::Request {
            return Hook::CONTINUE;
        }
        match self.weight(ex) {
            Some(w) if w > 0 => Hook::from(self.core.check_weight(ex, w)),
            _ => Hook::CONTINUE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Outcome;
    use crate::ratelimit::{Counters, FakeClock};
    use crate::services::Services;

    fn policy(yaml: &str) -> (Arc<dyn Policy>, Arc<FakeClock>) {
        let clock = FakeClock::new(1_700_000_000_000);
        let services = Services {
            counters: Counters::memory(clock.clone(), 1000),
            ..Default::default()
        };
        let ctx = BuildContext {
            name: "ptl".into(),
            config_dir: None,
            services,
        };
        (
            build(&ctx, serde_norway::from_str(yaml).unwrap()).unwrap(),
            clock,
        )
    }

    fn run(p: &Arc<dyn Policy>, prompt: Option<u64>) -> Result<(), crate::fault::Fault> {
        let mut ex = Exchange::default();
        ex.state.llm_prompt_tokens = prompt;
        let r = match p.run(&mut ex, Direction::Request) {
            Hook::Ready(Outcome::Continue) => Ok(()),
            Hook::Ready(Outcome::Reject(f)) => Err(f),
            _ => panic!("decides at once"),
        };
        r
    }

    #[test]
    fn smoothed_prompt_tokens_hold_the_next_request_back() {
        // 1000 tokens a minute: one per 60 ms.
        let (p, clock) = policy("{rate: 1000pm}");
        assert!(p.hooks().llm && p.needs_body(Direction::Request));
        run(&p, Some(500)).unwrap();
        let f = run(&p, Some(10)).unwrap_err();
        assert_eq!(f.status, 429);
        assert_eq!(
            f.code,
            "policies.prompttokenlimit.PromptTokenLimitViolation"
        );
        assert!(
            f.message.starts_with("Prompt token limit violation."),
            "{}",
            f.message
        );
        assert_eq!(f.headers, vec![("retry-after".into(), "30".into())]);
        clock.advance(29_999);
        assert!(run(&p, Some(1)).is_err());
        clock.advance(1);
        run(&p, Some(1)).unwrap();
        // No prompt known (not an LLM request): passes uncounted.
        run(&p, None).unwrap();
        run(&p, Some(0)).unwrap();
    }

    #[test]
    fn effective_count_admits_the_rate_in_any_window_and_refuses_a_larger_prompt() {
        let (p, clock) = policy("{rate: 1000pm, useEffectiveCount: true}");
        run(&p, Some(600)).unwrap();
        run(&p, Some(400)).unwrap();
        assert!(run(&p, Some(1)).is_err());
        clock.advance(60_000);
        assert!(run(&p, Some(1001)).is_err(), "never fits");
        run(&p, Some(1000)).unwrap();
    }

    #[test]
    fn user_prompt_source_is_counted_instead_of_the_whole_prompt() {
        let (p, _clock) = policy(
            "{rate: 10pm, useEffectiveCount: true, userPromptSource: '{request.header.x-p}'}",
        );
        let mut ex = Exchange::default();
        ex.state.llm_prompt_tokens = Some(5_000);
        ex.set_header(Direction::Request, "x-p", "abcdabcd".into());
        assert!(matches!(
            p.run(&mut ex, Direction::Request),
            Hook::Ready(Outcome::Continue)
        ));
    }

    #[test]
    fn bad_specs_name_the_field() {
        let ctx = BuildContext {
            name: "ptl".into(),
            config_dir: None,
            services: Services::default(),
        };
        let e = build(&ctx, serde_norway::from_str("{rate: lots}").unwrap()).unwrap_err();
        assert!(e.to_string().contains("rate"), "{e}");
        let e = build(
            &ctx,
            serde_norway::from_str("{rate: 1pm, weight: 2}").unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("weight"), "{e}");
    }
}
