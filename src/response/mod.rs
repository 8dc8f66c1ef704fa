//! What every layer here answers with: the inner service's response, or a rejection the
//! layer wrote itself, in one body type ([`ResponseBody`]) and, for the layers that decide
//! before calling the inner service, one future ([`ResponseFuture`]); and what an upstream
//! answered ([`UpstreamOutcome`]), for the layers outside.

pub(crate) mod body;
pub(crate) mod future;
mod upstream;

pub use body::ResponseBody;
pub use future::ResponseFuture;
pub use upstream::UpstreamOutcome;
