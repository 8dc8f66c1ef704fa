//! How a layer that must wait on an answer (a key lookup, an upstream credential) before it
//! can decide finishes the request: [`Resume`] says what the answer means, [`Resumable`] is
//! the future that waits, decides and then calls the inner service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::response::ResponseBody;
use crate::response::future::ResponseFuture;

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
