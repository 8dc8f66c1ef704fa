//! [`UsageBody`]: a response body that reads its token usage as it streams through.

use std::collections::VecDeque;
use std::fmt;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::scan::{Framing, MAX_EVENT, UsageScanner, first_event_end, last_event_end};
use super::usage::TokenUsage;

/// Where a [`UsageBody`] reports the usage it read, once, when the body ends, fails or is
/// dropped.
///
/// Any `FnOnce(Option<TokenUsage>)` is one; a type of your own (a limiter handle and a key
/// id, say) can implement it so that the body's type can be named.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use tower_gateway_auth::tokens::{TokenUsage, UsageSink};
///
/// /// Adds each response's tokens to a key's running total.
/// struct Charge(Arc<AtomicU64>);
///
/// impl UsageSink for Charge {
///     fn report(self, usage: Option<TokenUsage>) {
///         self.0.fetch_add(usage.map_or(0, |u| u.total()), Ordering::Relaxed);
///     }
/// }
///
/// let spent = Arc::new(AtomicU64::new(0));
/// Charge(spent.clone()).report(Some(TokenUsage::new(10, 5)));
/// assert_eq!(spent.load(Ordering::Relaxed), 15);
/// ```
pub trait UsageSink {
    /// The usage the response reported (`None`: it reported none), as far as the body was
    /// read.
    fn report(self, usage: Option<TokenUsage>);
}

impl<F: FnOnce(Option<TokenUsage>)> UsageSink for F {
    fn report(self, usage: Option<TokenUsage>) {
        self(usage)
    }
}

pin_project! {
    /// A response body passed on frame by frame, unchanged, while its token usage is read
    /// from the data going past ([module docs](super)); the usage is handed to a
    /// [`UsageSink`] exactly once: when the body ends, when it fails, or when it is dropped
    /// before its end (a client that went away), as far as it was read.
    ///
    /// Every frame reaches the consumer as the inner body produced it: the same bytes, the
    /// same trailers, the same size hints. The one exception is asked for with
    /// [`hide_usage_chunk`](Self::hide_usage_chunk).
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use bytes::Bytes;
    /// use http_body_util::{BodyExt, Full};
    /// use tower_gateway_auth::tokens::{Framing, TokenUsage, UsageBody};
    ///
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// let upstream = Full::new(Bytes::from_static(
    ///     b"event: message_start\n\
    ///       data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
    ///       event: message_delta\n\
    ///       data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
    /// ));
    /// let seen = Arc::new(Mutex::new(None));
    /// let sink = {
    ///     let seen = seen.clone();
    ///     move |usage: Option<TokenUsage>| *seen.lock().unwrap() = usage
    /// };
    /// let body = UsageBody::new(upstream, Framing::Sse, sink);
    /// let bytes = body.collect().await.unwrap().to_bytes();
    /// assert!(bytes.starts_with(b"event: message_start\n")); // passed on unchanged
    /// let usage = seen.lock().unwrap().expect("the stream reported usage");
    /// assert_eq!((usage.prompt(), usage.completion(), usage.total()), (25, 15, 40));
    /// # });
    /// ```
    pub struct UsageBody<B, S>
    where
        B: Body,
        S: UsageSink,
    {
        #[pin]
        body: B,
        scanner: Box<UsageScanner>,
        sink: Option<S>,
        hide: Option<Box<Hide<B::Error>>>,
        framing: Framing,
        done: bool,
    }

    impl<B, S> PinnedDrop for UsageBody<B, S>
    where
        B: Body,
        S: UsageSink,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(hide) = this.hide.as_deref_mut() {
                let held = std::mem::take(&mut hide.held);
                this.scanner.feed(&held);
            }
            report(this.scanner, this.sink);
        }
    }
}

fn report<S: UsageSink>(scanner: &mut UsageScanner, sink: &mut Option<S>) {
    if let Some(sink) = sink.take() {
        scanner.finish();
        sink.report(scanner.usage());
    }
}

impl<B, S> UsageBody<B, S>
where
    B: Body,
    S: UsageSink,
{
    /// Wraps `body`, read as `framing` ([`Framing::from_headers`] of the response), reporting
    /// to `sink`.
    pub fn new(body: B, framing: Framing, sink: S) -> Self {
        UsageBody {
            body,
            scanner: Box::new(UsageScanner::new(framing)),
            sink: Some(sink),
            hide: None,
            framing,
            done: false,
        }
    }

    /// Whether to keep the OpenAI usage-only chunk from the client (default: no), for a
    /// `text/event-stream` body ([`Framing::Sse`]; with any other framing this does
    /// nothing).
    ///
    /// That chunk (an event whose data is a chat completion chunk with `"choices":[]` and a
    /// `usage` object) is what OpenAI sends last, before `data: [DONE]`, when the request
    /// asked for `stream_options.include_usage`. A gateway that adds that option to count a
    /// stream should hide the chunk from a client that did not ask for it. The chunk is
    /// still counted; every other byte reaches the client unchanged, in order.
    ///
    /// To find the chunk's end, the body holds back the bytes of each event until the event
    /// is complete (up to 64 KiB; a longer one is passed on as it comes, and is never
    /// hidden). An SSE client acts only on complete events, so it sees no delay. Because
    /// the body may then be shorter than the inner one, its size hint is no longer exact:
    /// remove any `Content-Length` from the response.
    pub fn hide_usage_chunk(mut self, hide: bool) -> Self {
        self.hide = (hide && self.framing == Framing::Sse).then(Box::default);
        self
    }

    /// The usage read so far (complete once the body has ended).
    pub fn usage(&self) -> Option<TokenUsage> {
        self.scanner.usage()
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.body
    }
}

/// What hiding the usage-only chunk needs: the incomplete event held back, and what is
/// ready to go out.
struct Hide<E> {
    /// The start of an event not complete yet (never more than [`MAX_EVENT`] bytes; never
    /// starts with a line end).
    held: Vec<u8>,
    /// The current event outgrew `held`: it is passed on as it comes, with the line ends
    /// that ended what was passed so far (for [`first_event_end`]) after a stand-in byte.
    passing: Option<Vec<u8>>,
    out: VecDeque<Bytes>,
    /// A frame or error that came while data was still to go out before it.
    stashed: Option<Result<Frame<Bytes>, E>>,
    marks: Vec<Range<usize>>,
}

impl<E> Default for Hide<E> {
    fn default() -> Self {
        Hide {
            held: Vec::new(),
            passing: None,
            out: VecDeque::new(),
            stashed: None,
            marks: Vec::new(),
        }
    }
}

/// The line ends that end `prev` followed by `bytes` (two at most matter), after a stand-in
/// for the content before them: what [`first_event_end`] needs of bytes passed on.
fn tail_of(prev: &[u8], bytes: &[u8]) -> Vec<u8> {
    let mut last: Vec<u8> = prev[prev.len().saturating_sub(2)..].to_vec();
    last.extend_from_slice(&bytes[bytes.len().saturating_sub(2)..]);
    let last = &last[last.len().saturating_sub(2)..];
    let eols = last
        .iter()
        .rev()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let mut tail = vec![b'x'];
    tail.extend_from_slice(&last[last.len() - eols..]);
    tail
}

impl<E> Hide<E> {
    /// Complete events, starting at a boundary: out they go, less the usage-only chunks.
    fn emit_events(&mut self, events: Bytes, scanner: &mut UsageScanner) {
        if events.is_empty() {
            return;
        }
        self.marks.clear();
        scanner.feed_events(&events, &mut self.marks);
        let mut at = 0;
        for m in &self.marks {
            if m.start > at {
                self.out.push_back(events.slice(at..m.start));
            }
            at = m.end;
        }
        if at < events.len() {
            self.out.push_back(events.slice(at..));
        }
    }

    /// Passes `bytes` on as they are.
    fn pass(&mut self, bytes: Bytes, scanner: &mut UsageScanner) {
        if !bytes.is_empty() {
            scanner.feed(&bytes);
            self.out.push_back(bytes);
        }
    }

    /// The next data of the body.
    fn push(&mut self, mut data: Bytes, scanner: &mut UsageScanner) {
        // An empty read says nothing: taken as a read, it would settle an event held on a
        // final `\r` before the `\n` that may belong to it (see `complete`).
        if data.is_empty() {
            return;
        }
        if let Some(tail) = &self.passing {
            match first_event_end(tail, &data) {
                None => {
                    self.passing = Some(tail_of(tail, &data));
                    self.pass(data, scanner);
                    return;
                }
                Some(k) => {
                    self.passing = None;
                    let head = data.split_to(k);
                    self.pass(head, scanner);
                }
            }
        }
        if !self.held.is_empty() {
            match complete(first_event_end(&self.held, &data), &data, |d| {
                first_event_end(&self.held, d)
            }) {
                Some(k) => {
                    self.held.extend_from_slice(&data[..k]);
                    let events = Bytes::from(std::mem::take(&mut self.held));
                    self.emit_events(events, scanner);
                    data.advance(k);
                }
                None if self.held.len() + data.len() <= MAX_EVENT => {
                    self.held.extend_from_slice(&data);
                    return;
                }
                None => {
                    // Too long to be the usage-only chunk: passed on from here.
                    let held = Bytes::from(std::mem::take(&mut self.held));
                    self.passing = Some(tail_of(&held, &data));
                    self.pass(held, scanner);
                    self.pass(data, scanner);
                    return;
                }
            }
        }
        let split = complete(Some(last_event_end(&data)), &data, |d| {
            Some(last_event_end(d))
        })
        .unwrap_or(0);
        let tail = data.split_off(split);
        self.emit_events(data, scanner);
        if tail.len() <= MAX_EVENT {
            self.held.extend_from_slice(&tail);
        } else {
            self.passing = Some(tail_of(b"", &tail));
            self.pass(tail, scanner);
        }
    }

    /// The body ended (or failed): whatever is held goes out.
    fn flush(&mut self, scanner: &mut UsageScanner) {
        let held = Bytes::from(std::mem::take(&mut self.held));
        let k = last_event_end(&held);
        self.emit_events(held.slice(..k), scanner);
        self.pass(held.slice(k..), scanner);
        self.passing = None;
    }
}

/// An event end `found` in `data` stands unless it is the very end of `data` and that is a
/// `\r` the event needs: a `\n` may follow that belongs to it (and must go if the event is
/// hidden). Then the end is looked for again without that `\r`.
fn complete(
    found: Option<usize>,
    data: &[u8],
    again: impl FnOnce(&[u8]) -> Option<usize>,
) -> Option<usize> {
    match found {
        Some(k) if k == data.len() && data.ends_with(b"\r") => {
            let cut = &data[..data.len() - 1];
            match again(cut) {
                // Complete without the `\r`, which is then an empty line of its own.
                Some(j) if j == cut.len() => Some(k),
                other => other,
            }
        }
        other => other,
    }
}

impl<B, S> Body for UsageBody<B, S>
where
    B: Body<Data = Bytes>,
    S: UsageSink,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        loop {
            if let Some(hide) = this.hide.as_deref_mut() {
                if let Some(data) = hide.out.pop_front() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if let Some(stashed) = hide.stashed.take() {
                    return Poll::Ready(Some(stashed));
                }
            }
            if *this.done {
                return Poll::Ready(None);
            }
            let frame = ready!(this.body.as_mut().poll_frame(cx));
            let end = match &frame {
                None | Some(Err(_)) => true,
                Some(Ok(_)) => this.body.is_end_stream(),
            };
            let passed = match (this.hide.as_deref_mut(), frame) {
                (_, None) => None,
                (None, Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        this.scanner.feed(data);
                    }
                    Some(Ok(frame))
                }
                (None, Some(Err(e))) => Some(Err(e)),
                (Some(hide), Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        hide.push(data, this.scanner);
                        None
                    }
                    Err(frame) => {
                        hide.flush(this.scanner);
                        hide.stashed = Some(Ok(frame));
                        None
                    }
                },
                (Some(hide), Some(Err(e))) => {
                    hide.flush(this.scanner);
                    hide.stashed = Some(Err(e));
                    None
                }
            };
            if end {
                if let Some(hide) = this.hide.as_deref_mut() {
                    hide.flush(this.scanner);
                }
                *this.done = true;
                report(this.scanner, this.sink);
            }
            if let Some(passed) = passed {
                return Poll::Ready(Some(passed));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.hide {
            None => self.body.is_end_stream(),
            Some(hide) => {
                hide.out.is_empty()
                    && hide.stashed.is_none()
                    && (self.done || (hide.held.is_empty() && self.body.is_end_stream()))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.body.size_hint();
        let Some(hide) = &self.hide else {
            return inner;
        };
        // Up to what is queued, held and still to come; as little as nothing, since any
        // of it may be a hidden chunk.
        let mut hint = SizeHint::new();
        let ready = hide.out.iter().map(Bytes::len).sum::<usize>() + hide.held.len();
        let inner_upper = if self.done { Some(0) } else { inner.upper() };
        if let Some(upper) = inner_upper {
            hint.set_upper(upper.saturating_add(ready as u64));
        }
        hint
    }
}

impl<B, S> fmt::Debug for UsageBody<B, S>
where
    B: Body,
    S: UsageSink,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageBody")
            .field("framing", &self.framing)
            .field("hide_usage_chunk", &self.hide.is_some())
            .field("usage", &self.scanner.usage())
            .field("reported", &self.sink.is_none())
            .finish_non_exhaustive()
    }
}
