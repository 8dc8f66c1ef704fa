//! [`HeaderInjectLayer`]: set, append, default or remove request headers on the way to the
//! provider, give each request an id, and add the provider headers a gateway usually needs.
//!
//! The data path of one request, top to bottom:
//!
//! 1. the request id, if configured: the client's kept (when allowed and well formed) or a
//!    fresh UUID v4, so the rules below can read it; it also goes into the request's
//!    extensions as a [`RequestIdValue`];
//! 2. every [`HeaderRule`], in the order given;
//! 3. the inner service; on the way back, the request id is echoed on the response when
//!    configured.
//!
//! The same [`HeaderRule`]s carry the extra headers of the provider presets
//! ([`Provider`](crate::upstream::Provider)), so both layers treat headers alike.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::upstream::provider::{anthropic_rules, openai_rules};

mod request_id;
mod rules;

pub use request_id::{RequestId, RequestIdValue, X_REQUEST_ID};
pub use rules::{HeaderRule, RequestHead};

/// A layer that edits request headers on their way to the inner service.
///
/// ```
/// use std::convert::Infallible;
/// use http::{HeaderName, HeaderValue, Request, Response};
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_gateway_auth::HeaderInjectLayer;
/// use tower_gateway_auth::inject::RequestId;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let service = ServiceBuilder::new()
///     .layer(
///         HeaderInjectLayer::new()
///             .anthropic(HeaderValue::from_static("2023-06-01"), Some(HeaderValue::from_static("tools-2024-04-04")))
///             .remove(HeaderName::from_static("cookie"))
///             .request_id(RequestId::new().echo(true)),
///     )
///     .service_fn(|req: Request<()>| async move {
///         assert_eq!(req.headers()["anthropic-version"], "2023-06-01");
///         assert!(req.headers().get("cookie").is_none());
///         Ok::<_, Infallible>(Response::new(()))
///     });
///
/// let req = Request::builder().header("cookie", "session=1").body(()).unwrap();
/// let response = service.oneshot(req).await.unwrap();
/// assert_eq!(response.headers()["x-request-id"].len(), 36);
/// # });
/// ```
#[derive(Clone, Default)]
pub struct HeaderInjectLayer {
    config: Arc<InjectConfig>,
}

#[derive(Clone, Default)]
struct InjectConfig {
    rules: Vec<HeaderRule>,
    request_id: Option<RequestId>,
}

impl HeaderInjectLayer {
    /// A layer that changes nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn config_mut(&mut self) -> &mut InjectConfig {
        Arc::make_mut(&mut self.config)
    }

    /// Adds a rule; rules run in the order they were added.
    pub fn rule(mut self, rule: HeaderRule) -> Self {
        self.config_mut().rules.push(rule);
        self
    }

    /// Adds several rules, in order.
    pub fn rules(mut self, rules: impl IntoIterator<Item = HeaderRule>) -> Self {
        self.config_mut().rules.extend(rules);
        self
    }

    /// Sets `name` to `value`, replacing the client's. See [`HeaderRule::overwrite`].
    pub fn overwrite(self, name: HeaderName, value: HeaderValue) -> Self {
        self.rule(HeaderRule::overwrite(name, value))
    }

    /// Adds `value` to `name`. See [`HeaderRule::append`].
    pub fn append(self, name: HeaderName, value: HeaderValue) -> Self {
        self.rule(HeaderRule::append(name, value))
    }

    /// Sets `name` when the client sent none. See [`HeaderRule::if_absent`].
    pub fn if_absent(self, name: HeaderName, value: HeaderValue) -> Self {
        self.rule(HeaderRule::if_absent(name, value))
    }

    /// Removes `name`. See [`HeaderRule::remove`].
    pub fn remove(self, name: HeaderName) -> Self {
        self.rule(HeaderRule::remove(name))
    }

    /// Gives every request an id, as `ids` says.
    pub fn request_id(mut self, ids: RequestId) -> Self {
        self.config_mut().request_id = Some(ids);
        self
    }

    /// Anthropic's headers: `anthropic-version: version` when the client sent none, and the
    /// `beta` features added to the client's `anthropic-beta` list.
    pub fn anthropic(self, version: HeaderValue, beta: Option<HeaderValue>) -> Self {
        self.rules(anthropic_rules(version, beta))
    }

    /// OpenAI's `OpenAI-Organization` and `OpenAI-Project`, each set (replacing the client's)
    /// when given.
    pub fn openai(self, organization: Option<HeaderValue>, project: Option<HeaderValue>) -> Self {
        self.rules(openai_rules(organization, project))
    }
}

impl fmt::Debug for HeaderInjectLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderInjectLayer")
            .field("rules", &self.config.rules)
            .field("request_id", &self.config.request_id)
            .finish()
    }
}

impl<S> Layer<S> for HeaderInjectLayer {
    type Service = HeaderInject<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HeaderInject {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service [`HeaderInjectLayer`] wraps around an inner service.
#[derive(Clone)]
pub struct HeaderInject<S> {
    inner: S,
    config: Arc<InjectConfig>,
}

impl<S> HeaderInject<S> {
    define_inner_service_accessors!();
}

impl<S: fmt::Debug> fmt::Debug for HeaderInject<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderInject")
            .field("inner", &self.inner)
            .field("rules", &self.config.rules)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HeaderInject<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let echo = self.config.request_id.as_ref().and_then(|ids| {
            let id = ids.assign(req.headers_mut());
            let echo = ids
                .echoes()
                .then(|| (ids.header.clone(), id.to_header_value()));
            req.extensions_mut().insert(id);
            echo
        });
        for rule in &self.config.rules {
            rule.apply(&mut req);
        }
        ResponseFuture {
            inner: self.inner.call(req),
            echo,
        }
    }
}

pin_project! {
    /// The response future of [`HeaderInject`]: the inner future, with the request id in
    /// its response's headers when echoing.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        echo: Option<(HeaderName, HeaderValue)>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some((name, id)) = this.echo.take() {
            response.headers_mut().insert(name, id);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::request_id::{MAX_CLIENT_ID_LEN, new_request_id};
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder();
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap()
    }

    fn values(req: &Request<()>, name: &str) -> Vec<String> {
        req.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn each_mode_does_what_it_says() {
        let n = HeaderName::from_static("x-n");
        let v = HeaderValue::from_static("gw");
        let cases: [(HeaderRule, &[&str]); 4] = [
            (HeaderRule::overwrite(n.clone(), v.clone()), &["gw"]),
            (HeaderRule::append(n.clone(), v.clone()), &["a", "b", "gw"]),
            (HeaderRule::if_absent(n.clone(), v.clone()), &["a", "b"]),
            (HeaderRule::remove(n.clone()), &[]),
        ];
        for (rule, expected) in cases {
            let mut p = parts(&[("x-n", "a"), ("x-n", "b"), ("x-other", "1")]);
            rule.apply(&mut p);
            assert_eq!(values(&p, "x-n"), expected, "{rule:?}");
            assert_eq!(values(&p, "x-other"), ["1"]);
        }
        let mut p = parts(&[]);
        HeaderRule::if_absent(n.clone(), v).apply(&mut p);
        assert_eq!(values(&p, "x-n"), ["gw"]);
    }

    #[test]
    fn makers_see_the_request_and_none_changes_nothing() {
        let rule = HeaderRule::overwrite_with(HeaderName::from_static("x-path"), |req| {
            (req.uri.path() != "/skip").then(|| HeaderValue::try_from(req.uri.path()).unwrap())
        });
        let mut p = Request::get("/v1/chat").body(()).unwrap();
        rule.apply(&mut p);
        assert_eq!(values(&p, "x-path"), ["/v1/chat"]);
        let mut p = Request::get("/skip")
            .header("x-path", "client")
            .body(())
            .unwrap();
        rule.apply(&mut p);
        assert_eq!(values(&p, "x-path"), ["client"]);

        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let lazy = HeaderRule::if_absent_with(HeaderName::from_static("x-n"), move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Some(HeaderValue::from_static("made"))
        });
        let mut p = parts(&[("x-n", "client")]);
        lazy.apply(&mut p);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn anthropic_beta_list_is_merged_not_replaced() {
        use crate::upstream::provider::{DEFAULT_ANTHROPIC_VERSION, anthropic_rules};
        let rules = anthropic_rules(
            HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION),
            Some(HeaderValue::from_static("b2, b3")),
        );
        let mut p = parts(&[("anthropic-beta", "b1,b2"), ("anthropic-beta", " b4 ")]);
        for rule in &rules {
            rule.apply(&mut p);
        }
        assert_eq!(values(&p, "anthropic-beta"), ["b1,b2,b4,b3"]);
        assert_eq!(values(&p, "anthropic-version"), ["2023-06-01"]);

        let mut p = parts(&[("anthropic-version", "2024-01-01")]);
        for rule in &rules {
            rule.apply(&mut p);
        }
        assert_eq!(values(&p, "anthropic-beta"), ["b2,b3"]);
        assert_eq!(values(&p, "anthropic-version"), ["2024-01-01"]);
    }

    #[test]
    fn request_ids_are_uuid_v4_and_client_ids_are_checked() {
        let id = new_request_id();
        let text = std::str::from_utf8(&id).unwrap();
        assert_eq!(text.len(), 36);
        assert_eq!(text.as_bytes()[14], b'4');
        assert!(matches!(text.as_bytes()[19], b'8' | b'9' | b'a' | b'b'));
        assert!(text.split('-').map(str::len).eq([8, 4, 4, 4, 12]));
        assert!(text.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
        let many: std::collections::HashSet<[u8; 36]> =
            (0..1000).map(|_| new_request_id()).collect();
        assert_eq!(many.len(), 1000, "ids repeat");

        let keep = RequestId::new().keep_client_id(true).echo(true);
        let mut p = parts(&[("x-request-id", "client-1")]);
        assert_eq!(keep.assign(p.headers_mut()).as_str(), "client-1");
        for bad in [
            &[("x-request-id", "a b")][..],
            &[("x-request-id", "a"), ("x-request-id", "b")],
        ] {
            let mut p = parts(bad);
            let id = keep.assign(p.headers_mut());
            assert_eq!(id.as_str().len(), 36);
            assert_eq!(values(&p, "x-request-id"), [id.as_str()]);
        }
        let long = "x".repeat(MAX_CLIENT_ID_LEN + 1);
        let mut p = parts(&[("x-request-id", &long)]);
        assert_eq!(keep.assign(p.headers_mut()).as_str().len(), 36);

        let replace = RequestId::new();
        let mut p = parts(&[("x-request-id", "client-1")]);
        assert!(!replace.echoes());
        assert_ne!(replace.assign(p.headers_mut()).as_str(), "client-1");
        assert_ne!(values(&p, "x-request-id"), ["client-1"]);
        assert_eq!(values(&p, "x-request-id")[0].len(), 36);
    }

    #[test]
    fn debug_names_headers_but_never_values() {
        let layer = HeaderInjectLayer::new()
            .overwrite(
                HeaderName::from_static("x-secret"),
                HeaderValue::from_static("s3cr3t"),
            )
            .openai(Some(HeaderValue::from_static("org-hidden")), None);
        let text = format!("{layer:?}");
        assert!(text.contains("overwrite(x-secret)"), "{text}");
        assert!(text.contains("overwrite(openai-organization)"), "{text}");
        assert!(
            !text.contains("s3cr3t") && !text.contains("org-hidden"),
            "{text}"
        );
    }
}
