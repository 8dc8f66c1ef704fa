//! Header rules: what to set, append, default or remove, from a value or from the request.

use std::fmt;
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Request};

type MakeFn = dyn Fn(&RequestHead<'_>) -> Option<HeaderValue> + Send + Sync;

/// A request's head as a header maker sees it: everything but the body, borrowed.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a http::Method,
    /// The URI.
    pub uri: &'a http::Uri,
    /// The headers, as the rules before this one left them.
    pub headers: &'a http::HeaderMap,
    /// The extensions, e.g. the caller's [`Identity`](crate::Identity).
    pub extensions: &'a http::Extensions,
}

impl<'a> RequestHead<'a> {
    /// The head of `req`.
    pub fn of<B>(req: &'a Request<B>) -> Self {
        RequestHead {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }
}

/// One thing to do to one request header.
///
/// A value is either static or made per request from the request's head (method, URI,
/// headers, extensions — e.g. the caller's [`Identity`](crate::Identity)). A maker that
/// returns `None` leaves the request as it is.
///
/// ```
/// use http::{HeaderName, HeaderValue};
/// use tower_gateway_auth::Identity;
/// use tower_gateway_auth::inject::HeaderRule;
///
/// let rules = [
///     HeaderRule::overwrite(HeaderName::from_static("x-gateway"), HeaderValue::from_static("1")),
///     HeaderRule::if_absent(HeaderName::from_static("accept"), HeaderValue::from_static("application/json")),
///     HeaderRule::remove(HeaderName::from_static("cookie")),
///     HeaderRule::overwrite_with(HeaderName::from_static("x-caller"), |req| {
///         let who = req.extensions.get::<Identity>()?;
///         HeaderValue::try_from(who.id().to_string()).ok()
///     }),
/// ];
/// assert_eq!(rules[2].name(), "cookie");
/// ```
#[derive(Clone)]
pub struct HeaderRule {
    name: HeaderName,
    action: Action,
}

#[derive(Clone)]
enum Action {
    Set { mode: Mode, value: Value },
    Remove,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Replace every value the request had.
    Overwrite,
    /// Add a value, keeping the ones there.
    Append,
    /// Set only when the request has none.
    IfAbsent,
}

#[derive(Clone)]
enum Value {
    Static(HeaderValue),
    Made(Arc<MakeFn>),
}

impl HeaderRule {
    fn set(name: HeaderName, mode: Mode, value: Value) -> Self {
        HeaderRule {
            name,
            action: Action::Set { mode, value },
        }
    }

    /// Sets `name` to `value`, replacing whatever the request carried.
    pub fn overwrite(name: HeaderName, value: HeaderValue) -> Self {
        Self::set(name, Mode::Overwrite, Value::Static(value))
    }

    /// Adds `value` to `name`, keeping the values already there.
    pub fn append(name: HeaderName, value: HeaderValue) -> Self {
        Self::set(name, Mode::Append, Value::Static(value))
    }

    /// Sets `name` to `value` only when the request carries no `name` at all.
    pub fn if_absent(name: HeaderName, value: HeaderValue) -> Self {
        Self::set(name, Mode::IfAbsent, Value::Static(value))
    }

    /// Removes every `name` header.
    pub fn remove(name: HeaderName) -> Self {
        HeaderRule {
            name,
            action: Action::Remove,
        }
    }

    /// [`overwrite`](Self::overwrite) with a value made from each request.
    pub fn overwrite_with<F>(name: HeaderName, make: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Option<HeaderValue> + Send + Sync + 'static,
    {
        Self::set(name, Mode::Overwrite, Value::Made(Arc::new(make)))
    }

    /// [`append`](Self::append) with a value made from each request.
    pub fn append_with<F>(name: HeaderName, make: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Option<HeaderValue> + Send + Sync + 'static,
    {
        Self::set(name, Mode::Append, Value::Made(Arc::new(make)))
    }

    /// [`if_absent`](Self::if_absent) with a value made from each request; the maker is
    /// called only when the header is absent.
    pub fn if_absent_with<F>(name: HeaderName, make: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Option<HeaderValue> + Send + Sync + 'static,
    {
        Self::set(name, Mode::IfAbsent, Value::Made(Arc::new(make)))
    }

    /// The header this rule acts on.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }

    /// The header this rule removes, when that is all it does.
    pub(crate) fn removed(&self) -> Option<&HeaderName> {
        matches!(self.action, Action::Remove).then_some(&self.name)
    }

    /// Applies the rule to a request, in place (a request is never taken apart and rebuilt:
    /// moving it costs time on every request).
    pub(crate) fn apply<B>(&self, req: &mut Request<B>) {
        let (mode, value) = match &self.action {
            Action::Remove => {
                req.headers_mut().remove(&self.name);
                return;
            }
            Action::Set { mode, value } => (*mode, value),
        };
        if mode == Mode::IfAbsent && req.headers().contains_key(&self.name) {
            return;
        }
        let value = match value {
            Value::Static(value) => value.clone(),
            Value::Made(make) => match make(&RequestHead::of(req)) {
                Some(value) => value,
                None => return,
            },
        };
        match mode {
            Mode::Overwrite | Mode::IfAbsent => {
                req.headers_mut().insert(self.name.clone(), value);
            }
            Mode::Append => {
                req.headers_mut().append(self.name.clone(), value);
            }
        }
    }
}

/// Values are left out: a static value may well be a secret.
impl fmt::Debug for HeaderRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match &self.action {
            Action::Remove => "remove",
            Action::Set { mode, value } => match (mode, value) {
                (Mode::Overwrite, Value::Static(_)) => "overwrite",
                (Mode::Append, Value::Static(_)) => "append",
                (Mode::IfAbsent, Value::Static(_)) => "if_absent",
                (Mode::Overwrite, Value::Made(_)) => "overwrite_with",
                (Mode::Append, Value::Made(_)) => "append_with",
                (Mode::IfAbsent, Value::Made(_)) => "if_absent_with",
            },
        };
        write!(f, "{action}({})", self.name)
    }
}
