//! Calling a service that is ready now without a `Oneshot`.
//!
//! A request passes three shared services (the connection's, the route's stack, the
//! router). Driving each with `clone().oneshot(req)` moved the request and then the whole
//! response future into the `Oneshot`'s state. Every service in the gateway is ready at
//! once (its `poll_ready` returns `Ready` without waiting), so [`call_now`] asks once, with
//! a waker that is never woken, and calls in place; a service that is not ready yet is
//! still waited for, through a clone and a `Oneshot`. The gateway's services cannot fail,
//! so neither can a readiness check here.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use pin_project_lite::pin_project;
use tower::Service;
use tower::ServiceExt;
use tower::util::Oneshot;

/// `service` called with `req` now if it is ready now, else a clone of it once it is.
pub fn call_now<S, R>(service: &mut S, req: R) -> CallNow<S, R>
where
    S: Service<R, Error = Infallible> + Clone,
{
    match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(())) => CallNow::Called {
            future: service.call(req),
        },
        Poll::Ready(Err(never)) => match never {},
        // Waited for with the task's own waker.
        Poll::Pending => CallNow::Waiting {
            future: service.clone().oneshot(req),
        },
    }
}

pin_project! {
    /// The response future of [`call_now`].
    #[project = CallNowProj]
    pub enum CallNow<S, R>
    where
        S: Service<R>,
    {
        Called { #[pin] future: S::Future },
        Waiting { #[pin] future: Oneshot<S, R> },
    }
}

impl<S, R> Future for CallNow<S, R>
where
    S: Service<R>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CallNowProj::Called { future } => future.poll(cx),
            CallNowProj::Waiting { future } => future.poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Ready only from its `ready_after`-th `poll_ready` on (counted over all clones),
    /// waking the task each time it says `Pending`; answers with how many polls it took.
    #[derive(Clone)]
    struct Slow {
        polls: Arc<AtomicUsize>,
        ready_after: usize,
    }

    fn ready_after(polls: usize) -> Slow {
        Slow {
            polls: Arc::default(),
            ready_after: polls,
        }
    }

    impl Service<&'static str> for Slow {
        type Response = (usize, &'static str);
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            let polls = self.polls.fetch_add(1, Ordering::SeqCst) + 1;
            if polls >= self.ready_after {
                Poll::Ready(Ok(()))
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }

        fn call(&mut self, req: &'static str) -> Self::Future {
            std::future::ready(Ok((self.polls.load(Ordering::SeqCst), req)))
        }
    }

    #[tokio::test]
    async fn a_ready_service_is_called_at_once_and_a_pending_one_is_waited_for() {
        let call = call_now(&mut ready_after(1), "now");
        assert!(matches!(call, CallNow::Called { .. }));
        assert_eq!(call.await.unwrap(), (1, "now"));

        let call = call_now(&mut ready_after(3), "later");
        assert!(matches!(call, CallNow::Waiting { .. }));
        // Called only once ready: on the third poll, the first being `call_now`'s own.
        assert_eq!(call.await.unwrap(), (3, "later"));
    }
}
