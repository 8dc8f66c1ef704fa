//! Token accounting: the usage each response reports, read as its bytes stream through.
//!
//! [`UsageBody`] wraps a response body, passes every frame on unchanged and reads the
//! provider's usage report from the data going past, without buffering the body; when the
//! body ends, fails or is dropped it hands one [`TokenUsage`] (or `None`, when the
//! response carried no usage) to a [`UsageSink`]. What it reads:
//!
//! | provider | JSON body | stream |
//! |---|---|---|
//! | OpenAI chat completions | `usage` | SSE: the last chunk's `usage` (sent when the request has `stream_options.include_usage`), before `data: [DONE]` |
//! | OpenAI Responses | `usage` | SSE: `response.usage` of `response.completed` (or `response.incomplete`, `response.failed`) |
//! | Anthropic Messages | `usage` | SSE: `message.usage` of `message_start` (input and cache counts), then `usage` of each `message_delta` (the output count, cumulative: the last counts) |
//! | Gemini | `usageMetadata` | SSE (`alt=sse`): each chunk's `usageMetadata`, the last one counting; without `alt=sse`, a JSON array of the same chunks |
//!
//! The fields are normalized (cached and reasoning tokens included in the input and output
//! counts whoever sent them) as [`TokenUsage`] shows. The framing comes from the response's
//! `Content-Type` ([`Framing::from_headers`]). The body must not be compressed: ask the
//! upstream for `Accept-Encoding: identity` (a compressed body reads as no usage).
//!
//! # What counts
//!
//! In each document (a JSON body, each element of a JSON array, each SSE event's data) the
//! objects at `usage`, `usageMetadata`, `message.usage` and `response.usage`; nothing
//! deeper (a `usage` inside `choices` is content, not a report). A field counts when it is
//! a non-negative integer that fits a `u64`: a negative number, a fraction, an exponent, a
//! number past `u64::MAX`, `null` or a string leave it unset, as `serde_json`'s `as_u64`
//! reads them. A key given twice in one object counts once, the last (as `serde_json`
//! keeps it); across documents each field takes the last valid value sent. Fields read
//! before a syntax error count, nothing after it in that document; a body that is not
//! JSON reports no usage. The reader agrees with `serde_json` on every well-formed body
//! (property tests and a fuzz target check it), with one documented gap: in an SSE stream
//! an event whose `usage` key is spelled with `\u` escapes is not read (the fast path looks
//! for the literal key; no provider escapes it).
//!
//! # Cost
//!
//! Memory per response is constant: an SSE event split across reads is kept until it is
//! complete, up to 64 KiB, and a longer one is read on line by line; a JSON body is
//! scanned incrementally, keeping only nesting depth and the few keys and numbers of the
//! usage objects. Time is close to that of finding the string `"usage"` in the bytes: in an
//! SSE stream only the events where `"usage"` opens an object are parsed, the others are
//! skipped at `memchr` speed (`cargo bench --bench usage_scan`).
//!
//! # A response cut short
//!
//! A stream that ends early, fails or is dropped by a client that went away is charged what
//! was seen of it: Anthropic's input count from `message_start` and the last output count
//! seen, the fields of a usage object read before the cut (a number cut in its middle does
//! not count), an unterminated last SSE event as far as it went. An OpenAI chat stream cut
//! before its usage chunk reports no usage (`None`): the sink decides what to charge then.
//!
//! # How far a limit can be overshot
//!
//! A token limit built on this can refuse a request only before the request starts: its
//! usage is known only once its response has streamed. So one request can overshoot a
//! key's remaining allowance by at most its own usage, and requests running at the same
//! time each by theirs: with N requests in flight when the allowance runs out, the key goes
//! past it by at most the sum of those N requests' usage. Bound that with a concurrency
//! limit and the request's own `max_tokens`.
//!
//! # Asking OpenAI for a stream's usage
//!
//! A streamed OpenAI chat completion reports usage only when the request asked for it
//! (`"stream_options":{"include_usage":true}`). A gateway that counts tokens adds the
//! option to requests without it and hides the extra chunk from the client that did not
//! ask ([`UsageBody::hide_usage_chunk`]), so the client sees the stream it asked for.

mod body;
mod request;
mod scan;
mod usage;

#[cfg(test)]
mod tests;

pub use body::{UsageBody, UsageSink};
pub(crate) use request::include_usage;
pub use scan::Framing;
pub use usage::TokenUsage;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Put in a request's extensions by [`RateLimitLayer`](crate::RateLimitLayer) when the
/// key's tokens count, so that the layer inside that reads request bodies
/// ([`ModelAccessLayer`](crate::limit::ModelAccessLayer)) may ask a stream for its usage;
/// it says here that it did, and the usage-only chunk is then kept from the client.
#[derive(Debug, Clone, Default)]
pub(crate) struct CountsTokens(Arc<AtomicBool>);

impl CountsTokens {
    /// The request now asks for the usage chunk the client did not ask for.
    pub(crate) fn mark_usage_added(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether it does.
    pub(crate) fn usage_added(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}
