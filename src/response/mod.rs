//! What every layer here answers with: the inner service's response, or a rejection the
//! layer wrote itself, in one body type ([`ResponseBody`]) and, for the layers that decide
//! before calling the inner service, one future ([`ResponseFuture`]).

pub(crate) mod body;
pub(crate) mod future;

pub use body::ResponseBody;
pub use future::ResponseFuture;
