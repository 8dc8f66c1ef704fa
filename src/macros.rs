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
