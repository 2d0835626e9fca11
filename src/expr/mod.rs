//! The expression languages over flow variables, all compiled at configuration load (the
//! request path only evaluates):
//!
//! - [`Condition`]: a step's condition, in CEL ([`Condition::compile`], module
//!   `cel_condition`) or in Apigee's condition language ([`Condition::compile_apigee`],
//!   module [`apigee`]: `request.verb = "POST" and proxy.pathsuffix MatchesPath "/v1/**"`).
//! - [`Template`]: text with `{flow.variable}` references and Apigee's message-template
//!   functions (`{jsonPath($.a,request.content)}`, `{firstnonnull(x,'default')}`; module
//!   [`template`], the functions in `functions`).
//!
//! Every name resolves through one lookup ([`crate::vars::Exchange::resolve`]): a name
//! means the same in a CEL condition, an Apigee condition and a template.

pub mod apigee;
mod cel_condition;
mod functions;
pub mod template;
mod timefmt;

pub(crate) use functions::uuid_v4 as new_uuid;
pub use template::Template;

use crate::vars::Exchange;

#[derive(Debug, thiserror::Error)]
pub enum ExprError {
    #[error("invalid condition `{source_text}`: {message}")]
    Parse {
        source_text: String,
        message: String,
    },
    #[error("invalid template `{0}`: {1}")]
    Template(String, String),
}

/// A compiled step condition, in CEL or in Apigee's condition language; both evaluate to
/// a boolean over the exchange ([`Condition::eval`]), so a step runs either the same way.
pub struct Condition {
    lang: Lang,
}

enum Lang {
    Cel(cel_condition::Condition),
    Apigee(apigee::Condition),
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Condition")
            .field(&self.language())
            .field(&self.source())
            .finish()
    }
}

impl Condition {
    /// Compiles a CEL condition.
    pub fn compile(source: &str) -> Result<Self, ExprError> {
        Ok(Self {
            lang: Lang::Cel(cel_condition::Condition::compile(source)?),
        })
    }

    /// Compiles a condition in Apigee's language (see [`apigee`]).
    pub fn compile_apigee(source: &str) -> Result<Self, ExprError> {
        Ok(Self {
            lang: Lang::Apigee(apigee::Condition::compile(source)?),
        })
    }

    pub fn source(&self) -> &str {
        match &self.lang {
            Lang::Cel(c) => c.source(),
            Lang::Apigee(c) => c.source(),
        }
    }

    /// `cel` or `apigee`.
    pub fn language(&self) -> &'static str {
        match &self.lang {
            Lang::Cel(_) => "cel",
            Lang::Apigee(_) => "apigee",
        }
    }

    /// True when the condition holds; an evaluation that fails is false.
    pub fn eval(&self, ex: &Exchange) -> bool {
        match &self.lang {
            Lang::Cel(c) => c.eval(ex),
            Lang::Apigee(c) => c.eval(ex),
        }
    }
}
