//! The token-usage reader against the floor of its job: `cargo bench --bench usage_scan`.
//!
//! Each group is one typical streamed response, a few hundred SSE events as the provider
//! sends them (text deltas of a few words): `openai_sse` (chat completions with
//! `stream_options.include_usage`, so every chunk carries `"usage":null` and the last one
//! the usage) and `anthropic_sse` (`message_start`, text deltas, `message_delta`), with
//! `responses_sse` (the Responses API: its last event repeats the whole answer beside the
//! usage), `gemini_sse` (`usageMetadata` on every chunk) and `openai_json` (one
//! non-streamed body) for reference. Throughput is in bytes.
//!
//! - `memmem_floor`: `memchr::memmem` (a `Finder` built once) counting `"usage"` in the
//!   bytes: the least any reader must do to look at every byte for the key.
//! - `scanner`: a [`UsageBody`] over the same bytes in one frame, polled to its end, usage
//!   reported: the reader as the layer will run it.
//! - `memmem_floor_frames`, `scanner_frames`: the same with one frame per event, as an
//!   upstream that flushes each event delivers them (the floor searches each frame).
//!   `memmem_body_frames` is that floor as a pass-through body over the same frames: what
//!   any body wrapper pays per frame (polling, `Bytes` refcounts) on top of the search.
//! - `scanner_hide` (OpenAI): `scanner_frames` hiding the usage-only chunk.
//!
//! The issue's bar is `scanner` at most 2× `memmem_floor` per byte on the OpenAI and
//! Anthropic streams; compare the ratio, not the absolute times.

use std::collections::VecDeque;
use std::hint::black_box;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use http_body::{Body, Frame};
use memchr::memmem;
use tower_gateway_auth::tokens::{Framing, TokenUsage, UsageBody};

const WORDS: &[&str] = &[
    "The",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " the",
    " lazy",
    " dog",
    ".",
    " It",
    "'s",
    " a",
    " sentence",
    " that",
    " uses",
    " every",
    " letter",
    ",",
    " which",
    " makes",
    " it",
    " useful",
    " for",
    " testing",
    " fonts",
    " and",
    " keyboards",
    "\\n\\n",
    "**",
    "Note",
    ":**",
    " \\\"",
    "quoted",
    "\\\"",
    " text",
    " and",
    " caf\u{e9}",
    " \u{1f600}",
];

const EVENTS: usize = 300;

fn openai_sse() -> Vec<Bytes> {
    let head = r#"{"id":"chatcmpl-BxQ7kZf1YtnbnK0aO2KxgGg9p3Xyz","object":"chat.completion.chunk","created":1753380001,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_34a54ae93c","choices":"#;
    let mut events = vec![format!(
        "data: {head}[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null,\"obfuscation\":\"Wq3\"}}\n\n"
    )];
    for i in 0..EVENTS {
        let word = WORDS[i % WORDS.len()];
        events.push(format!(
            "data: {head}[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null,\"obfuscation\":\"x7Qp\"}}\n\n"
        ));
    }
    events.push(format!(
        "data: {head}[{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":null,\"obfuscation\":\"k\"}}\n\n"
    ));
    events.push(format!(
        "data: {head}[],\"usage\":{{\"prompt_tokens\":1024,\"completion_tokens\":{EVENTS},\"total_tokens\":{},\"prompt_tokens_details\":{{\"cached_tokens\":512,\"audio_tokens\":0}},\"completion_tokens_details\":{{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}},\"obfuscation\":\"Zb\"}}\n\n",
        1024 + EVENTS
    ));
    events.push("data: [DONE]\n\n".to_owned());
    events.into_iter().map(Bytes::from).collect()
}

fn anthropic_sse() -> Vec<Bytes> {
    let mut events = vec![
        r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-20250514","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":1024,"cache_creation_input_tokens":0,"cache_read_input_tokens":512,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}}

"#
        .to_owned(),
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n".to_owned(),
        "event: ping\ndata: {\"type\": \"ping\"}\n\n".to_owned(),
    ];
    for i in 0..EVENTS {
        let word = WORDS[i % WORDS.len()];
        events.push(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{word}\"}}}}\n\n"
        ));
    }
    events.push(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n"
            .to_owned(),
    );
    events.push(format!(
        "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{EVENTS}}}}}\n\n"
    ));
    events.push("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_owned());
    events.into_iter().map(Bytes::from).collect()
}

fn openai_responses_sse() -> Vec<Bytes> {
    let text: String = (0..EVENTS).map(|i| WORDS[i % WORDS.len()]).collect();
    let response = |status: &str, output: &str, usage: &str| {
        format!(
            r#"{{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"{status}","error":null,"incomplete_details":null,"instructions":"You are a helpful assistant.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[{output}],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{{"effort":null,"summary":null}},"store":true,"temperature":1.0,"text":{{"format":{{"type":"text"}}}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{usage},"user":null,"metadata":{{}}}}"#
        )
    };
    let item = format!(
        r#"{{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","type":"message","status":"completed","content":[{{"type":"output_text","annotations":[],"text":"{text}"}}],"role":"assistant"}}"#
    );
    let mut n = 0;
    let mut event = |kind: &str, body: String| {
        n += 1;
        format!("event: {kind}\ndata: {{\"type\":\"{kind}\",\"sequence_number\":{n},{body}}}\n\n")
    };
    let mut events = vec![
        event(
            "response.created",
            format!("\"response\":{}", response("in_progress", "", "null")),
        ),
        event(
            "response.in_progress",
            format!("\"response\":{}", response("in_progress", "", "null")),
        ),
    ];
    for i in 0..EVENTS {
        let word = WORDS[i % WORDS.len()];
        events.push(event(
            "response.output_text.delta",
            format!("\"item_id\":\"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654\",\"output_index\":0,\"content_index\":0,\"delta\":\"{word}\",\"logprobs\":[]"),
        ));
    }
    events.push(event(
        "response.output_text.done",
        format!("\"item_id\":\"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654\",\"output_index\":0,\"content_index\":0,\"text\":\"{text}\""),
    ));
    events.push(event(
        "response.output_item.done",
        format!("\"output_index\":0,\"item\":{item}"),
    ));
    let usage = format!(
        r#"{{"input_tokens":1024,"input_tokens_details":{{"cached_tokens":512}},"output_tokens":{EVENTS},"output_tokens_details":{{"reasoning_tokens":0}},"total_tokens":{}}}"#,
        1024 + EVENTS
    );
    events.push(event(
        "response.completed",
        format!("\"response\":{}", response("completed", &item, &usage)),
    ));
    events.into_iter().map(Bytes::from).collect()
}

fn gemini_sse() -> Vec<Bytes> {
    (0..EVENTS)
        .map(|i| {
            let word = WORDS[i % WORDS.len()];
            Bytes::from(format!(
                "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": \"{word}\"}}],\"role\": \"model\"}},\"index\": 0}}],\"usageMetadata\": {{\"promptTokenCount\": 1024,\"candidatesTokenCount\": {},\"totalTokenCount\": {},\"promptTokensDetails\": [{{\"modality\": \"TEXT\",\"tokenCount\": 1024}}]}},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"mKiCaMWmB-rBqtsPo9KS2Qk\"}}\r\n\r\n",
                i + 1,
                1025 + i
            ))
        })
        .collect()
}

fn openai_json() -> Vec<Bytes> {
    let content: String = (0..EVENTS).map(|i| WORDS[i % WORDS.len()]).collect();
    vec![Bytes::from(format!(
        r#"{{
  "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
  "object": "chat.completion",
  "created": 1741570283,
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {{
      "index": 0,
      "message": {{
        "role": "assistant",
        "content": "{content}",
        "refusal": null,
        "annotations": []
      }},
      "logprobs": null,
      "finish_reason": "stop"
    }}
  ],
  "usage": {{
    "prompt_tokens": 1024,
    "completion_tokens": {EVENTS},
    "total_tokens": {},
    "prompt_tokens_details": {{"cached_tokens": 512, "audio_tokens": 0}},
    "completion_tokens_details": {{"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
  }},
  "service_tier": "default",
  "system_fingerprint": "fp_fc9f1d7035"
}}
"#,
        1024 + EVENTS
    ))]
}

/// A body that yields its frames, all ready.
struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// The floor as a body: passes the frames of `Frames` on, counting `"usage"` in each, so that
/// it pays what any pass-through body pays per frame.
struct Floor<'f> {
    inner: Frames,
    finder: &'f memmem::Finder<'static>,
    hits: usize,
}

impl Body for Floor<'_> {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &frame
            && let Some(data) = frame.data_ref()
        {
            self.hits += self.finder.find_iter(data).count();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

fn floor(frames: VecDeque<Bytes>, finder: &memmem::Finder<'static>) -> usize {
    let mut body = Floor {
        inner: Frames(frames),
        finder,
        hits: 0,
    };
    let mut cx = Context::from_waker(Waker::noop());
    while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
        black_box(frame.ok());
    }
    body.hits
}

/// Polls a [`UsageBody`] over `frames` to its end; the usage it reported.
fn read(frames: VecDeque<Bytes>, framing: Framing, hide: bool) -> Option<TokenUsage> {
    let mut usage = None;
    {
        let body = UsageBody::new(Frames(frames), framing, |u| usage = u).hide_usage_chunk(hide);
        let mut body = std::pin::pin!(body);
        let mut cx = Context::from_waker(Waker::noop());
        while let Poll::Ready(Some(frame)) = body.as_mut().poll_frame(&mut cx) {
            black_box(frame.ok());
        }
    }
    usage
}

fn stream(c: &mut Criterion, name: &str, events: Vec<Bytes>, framing: Framing, hide: bool) {
    let whole = Bytes::from(events.concat());
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(whole.len() as u64));
    let finder: memmem::Finder<'static> = memmem::Finder::new(b"\"usage\"");
    assert!(read(VecDeque::from([whole.clone()]), framing, false).is_some());

    group.bench_function("memmem_floor", |b| {
        b.iter(|| black_box(finder.find_iter(black_box(&whole)).count()))
    });
    group.bench_function("scanner", |b| {
        b.iter_batched(
            || VecDeque::from([whole.clone()]),
            |frames| black_box(read(frames, framing, false)),
            BatchSize::SmallInput,
        )
    });
    if events.len() > 1 {
        group.bench_function("memmem_floor_frames", |b| {
            b.iter(|| {
                black_box(&events)
                    .iter()
                    .map(|e| finder.find_iter(e).count())
                    .sum::<usize>()
            })
        });
        group.bench_function("memmem_body_frames", |b| {
            b.iter_batched(
                || VecDeque::from(events.clone()),
                |frames| black_box(floor(frames, &finder)),
                BatchSize::SmallInput,
            )
        });
        group.bench_function("scanner_frames", |b| {
            b.iter_batched(
                || VecDeque::from(events.clone()),
                |frames| black_box(read(frames, framing, false)),
                BatchSize::SmallInput,
            )
        });
    }
    if hide {
        group.bench_function("scanner_hide", |b| {
            b.iter_batched(
                || VecDeque::from(events.clone()),
                |frames| black_box(read(frames, framing, true)),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn usage_scan(c: &mut Criterion) {
    stream(c, "openai_sse", openai_sse(), Framing::Sse, true);
    stream(c, "anthropic_sse", anthropic_sse(), Framing::Sse, false);
    stream(
        c,
        "responses_sse",
        openai_responses_sse(),
        Framing::Sse,
        false,
    );
    stream(c, "gemini_sse", gemini_sse(), Framing::Sse, false);
    stream(c, "openai_json", openai_json(), Framing::Json, false);
}

criterion_group!(benches, usage_scan);
criterion_main!(benches);
