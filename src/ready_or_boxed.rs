//! A future that is usually ready at once (an answer from memory) and boxed otherwise.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The future of a source that usually answers from memory: ready at once, or boxed while
/// it waits on something (a store call, a token fetch).
pub(crate) struct ReadyOrBoxed<T>(Answer<T>);

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
