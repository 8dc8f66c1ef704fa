//! The futures of the layers: one that either answers at once or passes the request on,
//! and one that first waits on an answer (a key lookup, an upstream credential).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::body::{ResponseBody, full_response};

pin_project! {
    /// Response future of the layers whose decision is made before the inner service is
    /// called: either the inner service's future, or a rejection ready at once.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner {
            #[pin]
            future: F,
        },
        Rejected {
            response: Option<Response<Bytes>>,
        },
    }
}

impl<F> ResponseFuture<F> {
    #[inline]
    pub(crate) fn inner(future: F) -> Self {
        ResponseFuture {
            kind: Kind::Inner { future },
        }
    }

    #[inline]
    pub(crate) fn rejected(response: Response<Bytes>) -> Self {
        ResponseFuture {
            kind: Kind::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            KindProj::Rejected { response } => Poll::Ready(Ok(full_response(
                response
                    .take()
                    .expect("ResponseFuture polled after completion"),
            ))),
        }
    }
}

/// What a layer does once an answer it waited for has come.
pub(crate) enum Next<W> {
    /// Call the inner service with the (prepared) request.
    Call,
    /// Answer the request itself.
    Respond(Response<Bytes>),
    /// Wait on one more answer first (the inbound layer checks a key's parent this way).
    Wait(W),
}

/// How a layer finishes a request once the answer it waited for (a key lookup, an upstream
/// credential) has come: prepare the request for the inner service, answer it, or wait on
/// a further answer.
pub(crate) trait Resume<B> {
    /// What is waited for.
    type Wait: Future + Unpin;

    /// What to do with `answer`.
    fn resume(
        &self,
        answer: <Self::Wait as Future>::Output,
        req: &mut Request<B>,
    ) -> Next<Self::Wait>;
}

/// Everything a request waiting on its answer holds; boxed so that the futures of the
/// common, synchronous path stay small (they are moved at every layer).
struct Parked<S, R, B> {
    inner: S,
    request: Request<B>,
    resume: Arc<R>,
}

pin_project! {
    /// The future of a layer that waits on an answer before calling the inner service.
    pub(crate) struct Resumable<W, S, R, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: ResumableState<W, S, R, B>,
    }
}

pin_project! {
    #[project = ResumableProj]
    enum ResumableState<W, S, R, B>
    where
        S: Service<Request<B>>,
    {
        Waiting {
            wait: W,
            parked: Option<Box<Parked<S, R, B>>>,
        },
        Decided {
            #[pin]
            future: ResponseFuture<S::Future>,
        },
    }
}

impl<W, S, R, B> Resumable<W, S, R, B>
where
    W: Future + Unpin,
    S: Service<Request<B>> + Clone,
    R: Resume<B, Wait = W>,
{
    /// Polls `wait` (and whatever it leads to) once. When the answers are ready (in-process
    /// stores, fixed credentials) the request is finished right here and the inner service
    /// called in place: no clone, no allocation. Otherwise the service that was polled ready
    /// is taken along (a clone is left to be readied for the next request) and the request
    /// waits.
    #[inline]
    pub(crate) fn start(mut wait: W, inner: &mut S, mut req: Request<B>, resume: &Arc<R>) -> Self {
        let mut cx = Context::from_waker(Waker::noop());
        while let Poll::Ready(answer) = Pin::new(&mut wait).poll(&mut cx) {
            match resume.resume(answer, &mut req) {
                Next::Call => return Self::decided(ResponseFuture::inner(inner.call(req))),
                Next::Respond(response) => {
                    return Self::decided(ResponseFuture::rejected(response));
                }
                Next::Wait(next) => wait = next,
            }
        }
        let clone = inner.clone();
        let inner = std::mem::replace(inner, clone);
        Resumable {
            state: ResumableState::Waiting {
                wait,
                parked: Some(Box::new(Parked {
                    inner,
                    request: req,
                    resume: resume.clone(),
                })),
            },
        }
    }
}

impl<W, S: Service<Request<B>>, R, B> Resumable<W, S, R, B> {
    /// A future already decided: the inner service's, or a rejection.
    #[inline]
    pub(crate) fn decided(future: ResponseFuture<S::Future>) -> Self {
        Resumable {
            state: ResumableState::Decided { future },
        }
    }
}

impl<W, S, R, B, ResBody> Future for Resumable<W, S, R, B>
where
    W: Future + Unpin,
    S: Service<Request<B>, Response = Response<ResBody>>,
    R: Resume<B, Wait = W>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                ResumableProj::Decided { future } => return future.poll(cx),
                ResumableProj::Waiting { wait, parked } => {
                    let answer = ready!(Pin::new(&mut *wait).poll(cx));
                    let held = parked.as_mut().expect("polled after completion");
                    match held.resume.resume(answer, &mut held.request) {
                        Next::Wait(next) => {
                            *wait = next;
                            continue;
                        }
                        Next::Respond(response) => ResponseFuture::rejected(response),
                        Next::Call => {
                            let Parked {
                                mut inner, request, ..
                            } = *parked.take().expect("polled after completion");
                            ResponseFuture::inner(inner.call(request))
                        }
                    }
                }
            };
            self.as_mut()
                .project()
                .state
                .set(ResumableState::Decided { future: next });
        }
    }
}

/// The future of a source that usually answers from memory: ready at once, or boxed while
/// it waits on something (a store call, a token fetch).
pub struct ReadyOrBoxed<T>(Answer<T>);

enum Answer<T> {
    Ready(Option<T>),
    Boxed(Pin<Box<dyn Future<Output = T> + Send>>),
}

impl<T> ReadyOrBoxed<T> {
    pub(crate) fn ready(value: T) -> Self {
        ReadyOrBoxed(Answer::Ready(Some(value)))
    }

    pub(crate) fn boxed(future: impl Future<Output = T> + Send + 'static) -> Self {
        ReadyOrBoxed(Answer::Boxed(Box::pin(future)))
    }
}

impl<T: Unpin> Future for ReadyOrBoxed<T> {
    type Output = T;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match &mut self.get_mut().0 {
            Answer::Ready(value) => Poll::Ready(value.take().expect("polled after completion")),
            Answer::Boxed(future) => future.as_mut().poll(cx),
        }
    }
}

impl<T> std::fmt::Debug for ReadyOrBoxed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Answer::Ready(_) => "ReadyOrBoxed::Ready",
            Answer::Boxed(_) => "ReadyOrBoxed::Boxed",
        })
    }
}
