//! OpenAPI 3.0 and 3.1 descriptions compiled for checking exchanges against them: an
//! [`Api`], built once at load, and the [`Violations`] a request or a response shows.
//!
//! Everything is compiled at load: path templates into segment matchers, every operation's
//! parameter and body schemas into `jsonschema` validators over a registry that holds the
//! document and the sibling files it `$ref`s. OpenAPI-only schema keywords are rewritten
//! first: 3.0 `nullable` and boolean `exclusiveMinimum`/`exclusiveMaximum` (3.0 schemas are
//! then validated as draft 7, 3.1 as 2020-12), `readOnly` properties are not required in
//! requests (nor `writeOnly` ones in responses), and a `discriminator` over `$ref`s becomes
//! a dispatch on the property's value, so a body is checked against the one schema it names.
//! A `$ref` cycle that never descends into the instance (`A: {allOf: [$ref: A]}`), a remote
//! `$ref`, or a `$ref` leaving the spec's directory refuses the configuration.
//!
//! The parts, each using only those listed before it:
//! - `document`: the description and the sibling files its `$ref`s reach, read as JSON, and
//!   `$ref`s followed between them;
//! - `dialect`: OpenAPI's schema keywords rewritten into plain JSON Schema, discriminators
//!   planned as dispatches;
//! - `paths`: path templates and how a request path matches one;
//! - `compile`: the compiled description ([`Api`]: operations, parameters, media types);
//! - `check`: an exchange checked against it;
//! - `error`: why a description does not load.

mod check;
mod compile;
mod dialect;
mod document;
mod error;
mod paths;

pub use check::Violations;
pub use compile::{AllowSpec, Api, Options};
pub use document::read_document;
pub use error::OasError;
pub use paths::match_path_template;
