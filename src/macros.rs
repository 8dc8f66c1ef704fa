//! Macros for what every layer's service has, as tower-http writes it once.

/// `get_ref`, `get_mut` and `into_inner` for a service whose wrapped service is its `inner`
/// field of type `S`; goes inside that service's `impl` block.
macro_rules! define_inner_service_accessors {
    () => {
        /// The inner service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The inner service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// The inner service, unwrapped.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}

/// A named, opaque future over a [`ReadyOrBoxed`](crate::ready_or_boxed::ReadyOrBoxed), so
/// that a public associated type does not expose how it is made.
macro_rules! opaque_ready_or_boxed {
    ($(#[$meta:meta])* pub struct $name:ident => $output:ty;) => {
        $(#[$meta])*
        pub struct $name(crate::ready_or_boxed::ReadyOrBoxed<$output>);

        impl std::future::Future for $name {
            type Output = $output;

            #[inline]
            fn poll(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<$output> {
                std::pin::Pin::new(&mut self.0).poll(cx)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_tuple(stringify!($name)).field(&self.0).finish()
            }
        }
    };
}

/// `is_end_stream` and `size_hint` of a body that wraps another in its `body` field and
/// ends when it does; goes inside that body's `impl Body` block.
macro_rules! delegate_body_hints {
    () => {
        fn is_end_stream(&self) -> bool {
            self.body.is_end_stream()
        }

        fn size_hint(&self) -> http_body::SizeHint {
            self.body.size_hint()
        }
    };
}
