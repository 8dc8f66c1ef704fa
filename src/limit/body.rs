//! [`LimitBody`]: a response body that holds a concurrency permit until it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use pin_project_lite::pin_project;

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
