//! [`LimitBody`]: a response body that holds a concurrency permit until it ends, and
//! [`Metered`], one read for its token usage.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use pin_project_lite::pin_project;

use crate::tokens::{UsageBody, UsageSink};

pin_project! {
    /// The inner service's response body, holding the request's concurrency permit (if any)
    /// until the body has ended, failed or been dropped: a stream counts as in flight until
    /// it finishes or the client goes away.
    pub struct LimitBody<B, P> {
        #[pin]
        body: B,
        permit: Option<P>,
    }
}

impl<B, P> LimitBody<B, P> {
    pub(crate) fn new(body: B, permit: Option<P>) -> Self {
        LimitBody { body, permit }
    }

    /// Whether the body still holds a permit.
    pub fn holds_permit(&self) -> bool {
        self.permit.is_some()
    }
}

impl<B: Body<Data = Bytes>, P> Body for LimitBody<B, P> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let frame = this.body.as_mut().poll_frame(cx);
        match &frame {
            Poll::Ready(None | Some(Err(_))) => *this.permit = None,
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => *this.permit = None,
            _ => {}
        }
        frame
    }

    delegate_body_hints!();
}

impl<B, P> std::fmt::Debug for LimitBody<B, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitBody")
            .field("holds_permit", &self.permit.is_some())
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// A response body, read for its token usage ([`UsageBody`]) when the key's tokens are
    /// limited, passed on untouched otherwise.
    pub struct Metered<B, S>
    where
        B: Body,
        S: UsageSink,
    {
        #[pin]
        inner: Inner<B, S>,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<B, S>
    where
        B: Body,
        S: UsageSink,
    {
        Plain {
            #[pin]
            body: B,
        },
        Read {
            #[pin]
            body: UsageBody<B, S>,
        },
    }
}

impl<B: Body, S: UsageSink> Metered<B, S> {
    pub(crate) fn plain(body: B) -> Self {
        Metered {
            inner: Inner::Plain { body },
        }
    }

    pub(crate) fn read(body: UsageBody<B, S>) -> Self {
        Metered {
            inner: Inner::Read { body },
        }
    }

    /// Whether the body is read for its usage.
    pub fn is_read(&self) -> bool {
        matches!(self.inner, Inner::Read { .. })
    }
}

impl<B: Body<Data = Bytes>, S: UsageSink> Body for Metered<B, S> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().inner.project() {
            InnerProj::Plain { body } => body.poll_frame(cx),
            InnerProj::Read { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Plain { body } => body.is_end_stream(),
            Inner::Read { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            Inner::Plain { body } => body.size_hint(),
            Inner::Read { body } => body.size_hint(),
        }
    }
}

impl<B: Body, S: UsageSink> std::fmt::Debug for Metered<B, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered")
            .field("read", &self.is_read())
            .finish_non_exhaustive()
    }
}
