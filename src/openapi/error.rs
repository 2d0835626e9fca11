//! Why a description does not load.

/// Why a spec does not load.
#[derive(Debug, thiserror::Error)]
pub enum OasError {
    #[error("cannot read `{path}`: {message}")]
    Read { path: String, message: String },
    #[error("`{path}` is not valid YAML or JSON: {message}")]
    Parse { path: String, message: String },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("cyclic $ref that never descends into the instance: {0}")]
    Cycle(String),
    #[error("{at}: {message}")]
    Invalid { at: String, message: String },
}

pub(super) fn invalid(at: impl Into<String>, message: impl Into<String>) -> OasError {
    OasError::Invalid {
        at: at.into(),
        message: message.into(),
    }
}
