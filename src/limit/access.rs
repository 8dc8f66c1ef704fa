//! [`ModelAccessLayer`]: the models a key may use, read from the path or the JSON body.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use percent_encoding::percent_decode_str;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::model::ModelList;
use super::scan::{Found, Scanner};
use crate::identity::Identity;
use crate::rejection::{Rejection, RejectionKind};
use crate::response::ResponseBody;
use crate::response::future::ResponseFuture;
use crate::tokens::{CountsTokens, include_usage};

/// The error of a [`ReplayBody`]: the inner body's, or a model the key may not use found
/// in the part of the body that streamed on unbuffered.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How much of a body is buffered at most by default to find its `"model"`: 64 KiB.
pub const DEFAULT_MAX_BUFFER: usize = 64 * 1024;

/// How much of a completion request is buffered at most by default to ask its stream for
/// usage: 4 MiB, far above the longest context windows' prompts.
pub const DEFAULT_USAGE_BUFFER: usize = 4 * 1024 * 1024;

/// What happens to a restricted key's request whose model cannot be read: a body that is
/// not a JSON object, has no top-level `"model"`, or names it past the buffer bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UnknownModel {
    /// Refused with 403 `model_not_allowed` (the default): a key restricted to some models
    /// uses only those.
    #[default]
    Refuse,
    /// Let through (routes whose bodies name no model, such as file uploads). A `"model"`
    /// that turns up later in the streamed rest is still checked: if the key may not use
    /// it, the body fails before its end reaches the upstream.
    Allow,
}

/// Refuses requests for models the key may not use with 403 `model_not_allowed` (a gRPC
/// request gets PERMISSION_DENIED), before anything reaches the inner service.
///
/// The models a key may use are its record's [`ModelList`], or the layer's
/// [`default_models`](Self::default_models); a key with neither passes untouched, body
/// and all. For a restricted key the model is read from
/// - the path, where a provider puts it: Gemini `…/models/{model}:generateContent` (and
///   any `…/models/{model}`), Azure OpenAI `…/openai/deployments/{deployment}/…`;
/// - otherwise the top-level `"model"` of a JSON body, buffering only until its value is
///   complete or [`max_buffer`](Self::max_buffer) bytes have come (64 KiB by default).
///   The buffered bytes are then replayed ahead of the rest, which streams on unbuffered:
///   the inner service receives the body byte for byte. A second top-level `"model"`
///   (parsers differ on which one counts) fails the body with 400 if found while buffering,
///   or breaks the stream if found later.
///
/// A body whose model cannot be read is judged by [`UnknownModel`]. Place the layer inside
/// the inbound layer, and inside [`RateLimitLayer`](crate::RateLimitLayer) so that a
/// client past its rate costs no buffering. The inner service must be `Clone` (it is
/// called once the body has been read) and request bodies `Unpin` (hyper's, axum's and
/// tonic's are).
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_gateway_auth::InboundApiKeyLayer;
/// use tower_gateway_auth::limit::{ModelAccessLayer, ModelList, UnknownModel};
/// use tower_gateway_auth::store::MemoryStore;
///
/// let app: Router = Router::new()
///     .route("/v1/chat/completions", post(|body: String| async move { body }))
///     .layer(
///         ModelAccessLayer::new()
///             .default_models(ModelList::new(["gpt-4o-mini"]))
///             .unknown_model(UnknownModel::Refuse),
///     )
///     .layer(InboundApiKeyLayer::new(MemoryStore::new()));
/// ```
#[derive(Debug, Clone, Default)]
pub struct ModelAccessLayer {
    config: Arc<Config>,
}

#[derive(Debug, Clone)]
struct Config {
    defaults: Option<ModelList>,
    unknown: UnknownModel,
    max_buffer: usize,
    from_path: bool,
    include_usage: bool,
    usage_buffer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            defaults: None,
            unknown: UnknownModel::Refuse,
            max_buffer: DEFAULT_MAX_BUFFER,
            from_path: true,
            include_usage: true,
            usage_buffer: DEFAULT_USAGE_BUFFER,
        }
    }
}

impl ModelAccessLayer {
    /// Keys' own model lists only; unreadable models refused; 64 KiB buffered at most.
    pub fn new() -> Self {
        Self::default()
    }

    /// The models of keys whose record names none (default: any model).
    pub fn default_models(mut self, models: ModelList) -> Self {
        Arc::make_mut(&mut self.config).defaults = Some(models);
        self
    }

    /// What to do when a restricted key's request names no readable model.
    pub fn unknown_model(mut self, rule: UnknownModel) -> Self {
        Arc::make_mut(&mut self.config).unknown = rule;
        self
    }

    /// Buffers at most `bytes` of a body to find its model (at least 64 bytes).
    pub fn max_buffer(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).max_buffer = bytes.max(64);
        self
    }

    /// Whether a model in the path (Gemini, Azure) counts (default: yes).
    pub fn model_from_path(mut self, enabled: bool) -> Self {
        Arc::make_mut(&mut self.config).from_path = enabled;
        self
    }

    /// Whether a streamed OpenAI chat completion whose key's tokens count (a
    /// [`RateLimitLayer`](crate::RateLimitLayer) outside says so) is asked for its usage
    /// (default: yes).
    ///
    /// OpenAI reports a stream's usage only to a request with
    /// `"stream_options":{"include_usage":true}`; without it the stream could not be
    /// charged. So a `POST …/chat/completions` (or `…/completions`) body is read whole (up
    /// to [`usage_buffer`](Self::usage_buffer), 4 MiB by default) and, when it has
    /// `"stream":true` without the option (or with it `false`), passed on with it added
    /// (its `Content-Length` set to match); the extra usage-only chunk is counted and kept
    /// from the client, which sees the stream it asked for. A completion body past the
    /// bound is refused (413 `request_too_large`): passed on unread, its stream could not be
    /// charged, and padding a request would be a way around the key's token limits.
    pub fn include_usage(mut self, enabled: bool) -> Self {
        Arc::make_mut(&mut self.config).include_usage = enabled;
        self
    }

    /// The most of a completion request read whole to ask for its usage (default 4 MiB,
    /// at least [`max_buffer`](Self::max_buffer)); see [`include_usage`](Self::include_usage).
    pub fn usage_buffer(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).usage_buffer = bytes;
        self
    }
}

/// Whether a request is an OpenAI (or Azure OpenAI) completion, whose stream reports usage
/// only when asked.
fn is_completion<B>(req: &Request<B>) -> bool {
    let path = req.uri().path();
    req.method() == http::Method::POST
        && (path.ends_with("/chat/completions") || path.ends_with("/completions"))
}

impl<S> Layer<S> for ModelAccessLayer {
    type Service = ModelAccess<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ModelAccess {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service [`ModelAccessLayer`] wraps around an inner service.
#[derive(Debug, Clone)]
pub struct ModelAccess<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> ModelAccess<S> {
    define_inner_service_accessors!();
}

/// The model named in the path, for the providers that put it there: `None` when the path
/// names none, `Some(None)` when it names one that is not UTF-8 once percent-decoded.
fn path_model(path: &str) -> Option<Option<String>> {
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    let mut previous = "";
    while let Some(segment) = segments.next() {
        let is_model_slot =
            segment == "models" || (segment == "deployments" && previous == "openai");
        if is_model_slot && let Some(next) = segments.clone().next() {
            let name = next.split(':').next().unwrap_or(next);
            return Some(
                percent_decode_str(name)
                    .decode_utf8()
                    .ok()
                    .map(String::from),
            );
        }
        previous = segment;
    }
    None
}

fn refusal(model: Option<&str>) -> Rejection {
    match model {
        Some(model) => {
            let shown: String = model.chars().take(128).collect();
            Rejection::new(
                RejectionKind::ModelNotAllowed,
                format!("This API key may not use the model `{shown}`."),
            )
        }
        None => Rejection::new(
            RejectionKind::ModelNotAllowed,
            "This API key may only use certain models, and the request names none that could be read.",
        ),
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ModelAccess<S>
where
    S: Service<Request<ReplayBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    ReqBody: Body<Data = Bytes> + Unpin,
    ReqBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ModelAccessFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let list = req
            .extensions()
            .get::<Identity>()
            .and_then(|who| who.models().cloned())
            .or_else(|| self.config.defaults.clone());
        let counts = match self.config.include_usage && is_completion(&req) {
            true => req.extensions().get::<CountsTokens>().cloned(),
            false => None,
        };
        if list.is_none() && counts.is_none() {
            let req = req.map(ReplayBody::passthrough);
            return ModelAccessFuture::decided(ResponseFuture::inner(self.inner.call(req)));
        }
        if let Some(list) = &list
            && self.config.from_path
            && let Some(model) = path_model(req.uri().path())
        {
            let future = match model {
                Some(model) if list.allows(&model) => {
                    ResponseFuture::inner(self.inner.call(req.map(ReplayBody::passthrough)))
                }
                model => {
                    log_refusal(&req);
                    ResponseFuture::rejected(refusal(model.as_deref()).to_response(req.headers()))
                }
            };
            return ModelAccessFuture::decided(future);
        }
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = req.into_parts();
        ModelAccessFuture {
            state: State::Reading {
                read: Some(Box::new(Reading {
                    inner,
                    parts,
                    body,
                    frames: VecDeque::new(),
                    buffered: 0,
                    scanner: Scanner::default(),
                    list,
                    counts,
                    config: self.config.clone(),
                    error: None,
                    ended: false,
                })),
            },
        }
    }
}

fn log_refusal<B>(req: &Request<B>) {
    let key_id = req.extensions().get::<Identity>().map(Identity::id);
    tracing::info!(target: "tower_gateway_auth::limit", key_id = ?key_id, reason = "model_not_allowed", "request refused");
}

/// A request whose body is being read up to its model.
struct Reading<S, B: Body> {
    inner: S,
    parts: Parts,
    body: B,
    frames: VecDeque<Frame<Bytes>>,
    buffered: usize,
    scanner: Scanner,
    /// The models the key may use; `None`: any (the body is read only to ask for usage).
    list: Option<ModelList>,
    /// Set when the body is to ask for its stream's usage (read whole, up to the bound).
    counts: Option<CountsTokens>,
    config: Arc<Config>,
    error: Option<B::Error>,
    ended: bool,
}

pin_project! {
    /// The response future of [`ModelAccess`].
    pub struct ModelAccessFuture<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
        B: Body,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
        B: Body,
    {
        Reading {
            read: Option<Box<Reading<S, B>>>,
        },
        Decided {
            #[pin]
            future: ResponseFuture<S::Future>,
        },
    }
}

impl<S, B> ModelAccessFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
    B: Body,
{
    fn decided(future: ResponseFuture<S::Future>) -> Self {
        ModelAccessFuture {
            state: State::Decided { future },
        }
    }
}

impl<S, B, ResBody> Future for ModelAccessFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                StateProj::Decided { future } => return future.poll(cx),
                StateProj::Reading { read } => {
                    let r = read.as_mut().expect("polled after completion");
                    ready!(r.poll_read(cx));
                    let r = *read.take().expect("polled after completion");
                    r.decide()
                }
            };
            self.as_mut()
                .project()
                .state
                .set(State::Decided { future: next });
        }
    }
}

impl<S, B> Reading<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
    B: Body<Data = Bytes> + Unpin,
{
    /// Reads frames until the model is known, the bound is reached or the body ends.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.error.is_some() || self.body.is_end_stream() {
                self.ended = true;
                return Poll::Ready(());
            }
            let bound = match self.counts {
                // Asking for usage needs the whole body.
                Some(_) => self.config.usage_buffer.max(self.config.max_buffer),
                None => self.config.max_buffer,
            };
            let more = self.buffered < bound;
            match self.scanner.found(false) {
                Found::Undecided if more => {}
                _ if more && self.counts.is_some() => {}
                _ => return Poll::Ready(()),
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    self.ended = true;
                    return Poll::Ready(());
                }
                Some(Err(e)) => self.error = Some(e),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.scanner.feed(data);
                        self.buffered += data.len();
                    }
                    self.frames.push_back(frame);
                }
            }
        }
    }

    fn decide(mut self) -> ResponseFuture<S::Future> {
        let ended = self.ended;
        if let Some(counts) = self.counts.take() {
            if !ended {
                let req = Request::from_parts(self.parts, ());
                tracing::info!(target: "tower_gateway_auth::limit", reason = "request_too_large", "request refused: too large to count its tokens");
                let rejection = Rejection::new(
                    RejectionKind::RequestTooLarge,
                    format!(
                        "This API key's tokens are counted, and a completion request of more than {} bytes cannot be.",
                        self.config.usage_buffer.max(self.config.max_buffer)
                    ),
                );
                return ResponseFuture::rejected(rejection.to_response(req.headers()));
            }
            if self.error.is_none() {
                self.ask_for_usage(&counts);
            }
        }
        let Some(list) = self.list.take() else {
            let body = ReplayBody {
                frames: self.frames,
                error: self.error,
                rest: (!ended).then_some(self.body),
                watch: None,
            };
            let mut inner = self.inner;
            return ResponseFuture::inner(inner.call(Request::from_parts(self.parts, body)));
        };
        let found = self.scanner.found(ended);
        let (allowed, model, watch) = match &found {
            _ if self.scanner.model_keys() > 1 => {
                let req = Request::from_parts(self.parts, ());
                log_refusal(&req);
                let rejection = Rejection::new(
                    RejectionKind::InvalidRequest,
                    "The request names its model more than once.",
                );
                return ResponseFuture::rejected(rejection.to_response(req.headers()));
            }
            Found::Model(model) => (list.allows(model), Some(model.as_str()), true),
            Found::NoModel | Found::Unreadable => {
                (self.config.unknown == UnknownModel::Allow, None, false)
            }
            // Past the bound: the rest is still watched for a model the key may not use.
            Found::Undecided => (self.config.unknown == UnknownModel::Allow, None, true),
        };
        if !allowed {
            let req = Request::from_parts(self.parts, ());
            log_refusal(&req);
            return ResponseFuture::rejected(refusal(model).to_response(req.headers()));
        }
        let watch = watch.then(|| {
            Box::new(Watch {
                scanner: self.scanner,
                list,
                checked: model.is_some(),
            })
        });
        let body = ReplayBody {
            frames: self.frames,
            error: self.error,
            // A body that has said it ended is not polled again.
            rest: (!ended).then_some(self.body),
            watch,
        };
        let mut inner = self.inner;
        ResponseFuture::inner(inner.call(Request::from_parts(self.parts, body)))
    }
}

impl<S, B: Body<Data = Bytes>> Reading<S, B> {
    /// Replaces the whole body read with one asking for its stream's usage, when it is a
    /// stream that did not ask (see [`ModelAccessLayer::include_usage`]).
    fn ask_for_usage(&mut self, counts: &CountsTokens) {
        // Trailers would be lost below; a JSON completion request has none.
        if self.frames.iter().any(|f| !f.is_data()) {
            return;
        }
        let mut whole = Vec::with_capacity(self.buffered);
        for frame in &self.frames {
            if let Some(data) = frame.data_ref() {
                whole.extend_from_slice(data);
            }
        }
        let Some(asking) = include_usage(&whole) else {
            return;
        };
        if self
            .parts
            .headers
            .contains_key(http::header::CONTENT_LENGTH)
        {
            self.parts
                .headers
                .insert(http::header::CONTENT_LENGTH, asking.len().into());
        }
        self.frames = VecDeque::from([Frame::data(asking)]);
        counts.mark_usage_added();
    }
}

/// What still watches the streamed rest of a body: a second `"model"`, or a first one
/// past the buffer bound that the key may not use.
struct Watch {
    scanner: Scanner,
    list: ModelList,
    checked: bool,
}

impl Watch {
    /// Reads `data`; an error when the body must not reach its end.
    fn feed(&mut self, data: &[u8]) -> Result<(), BoxError> {
        self.scanner.feed(data);
        if self.scanner.model_keys() > 1 {
            return Err("the request names its model more than once".into());
        }
        if !self.checked
            && let Found::Model(model) = self.scanner.found(false)
        {
            self.checked = true;
            if !self.list.allows(&model) {
                return Err("the request names a model this API key may not use".into());
            }
        }
        Ok(())
    }
}

pin_project! {
    /// A request body as the inner service receives it from [`ModelAccessLayer`]: the
    /// frames read to find the model, replayed as they came, then the rest of the original
    /// body, streamed.
    pub struct ReplayBody<B: Body> {
        frames: VecDeque<Frame<Bytes>>,
        error: Option<B::Error>,
        rest: Option<B>,
        watch: Option<Box<Watch>>,
    }
}

impl<B: Body> ReplayBody<B> {
    /// The body as it is, nothing read from it.
    pub fn passthrough(body: B) -> Self {
        ReplayBody {
            frames: VecDeque::new(),
            error: None,
            rest: Some(body),
            watch: None,
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(frame) = this.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(error) = this.error.take() {
            *this.rest = None;
            return Poll::Ready(Some(Err(error.into())));
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(rest).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => {
                if let (Some(watch), Some(data)) = (this.watch.as_mut(), frame.data_ref())
                    && let Err(e) = watch.feed(data)
                {
                    *this.rest = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                *this.rest = None;
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                *this.rest = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .frames
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + buffered);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + buffered);
        }
        hint
    }
}

impl<B: Body> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayBody")
            .field("buffered_frames", &self.frames.len())
            .field("watching", &self.watch.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, B> fmt::Debug for ModelAccessFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
    B: Body,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.state {
            State::Reading { .. } => "ModelAccessFuture::Reading",
            State::Decided { .. } => "ModelAccessFuture::Decided",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_in_paths() {
        let m = |p: &str| path_model(p).flatten();
        assert_eq!(
            m("/v1beta/models/gemini-1.5-pro:generateContent").as_deref(),
            Some("gemini-1.5-pro")
        );
        assert_eq!(
            m("/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent").as_deref(),
            Some("gemini-2.0-flash")
        );
        assert_eq!(
            m("/openai/deployments/my-gpt4o/chat/completions").as_deref(),
            Some("my-gpt4o")
        );
        assert_eq!(m("/v1/models/gpt%2D4o").as_deref(), Some("gpt-4o"));
        assert_eq!(path_model("/v1/chat/completions"), None);
        assert_eq!(
            path_model("/v1/models"),
            None,
            "the list of models names none"
        );
        assert_eq!(path_model("/deployments/x/chat"), None);
        assert_eq!(path_model("/v1/models/%FF"), Some(None));
    }
}
