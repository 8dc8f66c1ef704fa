//! What the crate's error types carry: a message safe to log and an optional cause.

use std::borrow::Cow;
use std::error::Error;
use std::fmt;

type Source = Box<dyn Error + Send + Sync + 'static>;

/// Boxed inside each error type, so that results carrying one stay small (a lookup result
/// is moved on every request).
pub(crate) struct ErrorDetail {
    message: Cow<'static, str>,
    source: Option<Source>,
}

impl ErrorDetail {
    pub(crate) fn new(message: impl Into<Cow<'static, str>>, source: Option<Source>) -> Box<Self> {
        Box::new(ErrorDetail {
            message: message.into(),
            source,
        })
    }

    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }

    /// `Name { message, source }`, for the error types' `Debug`.
    pub(crate) fn debug(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(name)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for ErrorDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.message),
            None => f.write_str(&self.message),
        }
    }
}
