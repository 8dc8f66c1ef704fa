//! [`UsageScanner`]: reads a response's token usage from its bytes as they stream past.
//!
//! Two layers, both fed arbitrary chunks and keeping a constant amount of state:
//!
//! - [`Doc`], an incremental JSON scanner in the manner of `limit::scan`: it tracks nesting
//!   depth, reads keys only in the few objects that matter (the document root, `message`,
//!   `response`, the usage objects and their `*_details`), decodes only the integers at the
//!   usage paths and skips everything else (strings with `memchr2` on `"` and `\`). A
//!   document is a JSON object, or each object element of a top-level array (Gemini's
//!   `streamGenerateContent` without `alt=sse`).
//! - SSE framing, WHATWG rules: `\n`, `\r\n` and `\r` line ends, `data:` with one optional
//!   space, data lines joined by `\n`, comments and other fields ignored, one document per
//!   event. The fast path never looks at most events: `memchr::memmem` finds `"usage` in
//!   the bytes, and only an event in which that key is followed by `:` and `{` (the usage
//!   object, not OpenAI's `"usage":null` on every chunk) is framed (line ends found around
//!   the hit) and parsed. An event split across chunks is kept until it is complete, up to
//!   [`MAX_EVENT`] bytes; a longer one (a Responses API `response.completed` repeating a
//!   long answer) is read from there on incrementally, line by line, without keeping it.
//!
//! What counts, in every document: the objects at `usage`, `usageMetadata`,
//! `message.usage` and `response.usage`, each field a non-negative integer that fits a
//! `u64` (anything else, such as a negative number, a fraction, an exponent, a number past
//! `u64::MAX`, `null` or a string, leaves that field unset, as `serde_json`'s `as_u64`
//! reads it). Within one document a key that appears twice counts once, the last (as
//! `serde_json` keeps it); across documents (SSE events, array elements) each field takes
//! the last valid value sent, so Anthropic's `message_delta` output count (cumulative) replaces
//! the one in `message_start` while the input counts stay. Bytes read before a syntax
//! error count; what follows it in the same document does not.
//!
//! Keys are compared after unescaping (`"us\u0061ge"` is `usage`), except that the SSE
//! fast path looks for the literal `"usage`: an event whose `usage`/`usageMetadata` key is
//! written with escapes is not read. No provider writes them so; the JSON body path reads
//! them.

use std::ops::Range;
use std::sync::LazyLock;

use memchr::{memchr2, memmem, memrchr2};

use super::usage::TokenUsage;
use crate::json_escape::{Escape, Unescaped};

/// The most bytes of one SSE event kept while it is incomplete: 64 KiB. A longer event is
/// read incrementally from then on, not kept.
pub(crate) const MAX_EVENT: usize = 64 * 1024;

/// How a response body is framed, which decides how [`UsageBody`](super::UsageBody) reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Framing {
    /// Decided by the first byte that is not whitespace (after an optional UTF-8 BOM): `{`
    /// or `[` is JSON, anything else SSE.
    #[default]
    Auto,
    /// One JSON value: an object, or an array of objects (Gemini's stream without `alt=sse`).
    Json,
    /// `text/event-stream`: each event's data is a JSON document.
    Sse,
}

impl Framing {
    /// From a response's `Content-Type`: `text/event-stream` is [`Sse`](Self::Sse),
    /// `application/json` and any `…+json` are [`Json`](Self::Json), anything else (or none)
    /// [`Auto`](Self::Auto).
    ///
    /// ```
    /// use tower_gateway_auth::tokens::Framing;
    ///
    /// let mut headers = http::HeaderMap::new();
    /// headers.insert("content-type", "text/event-stream; charset=utf-8".parse().unwrap());
    /// assert_eq!(Framing::from_headers(&headers), Framing::Sse);
    /// ```
    pub fn from_headers(headers: &http::HeaderMap) -> Framing {
        let Some(value) = headers.get(http::header::CONTENT_TYPE) else {
            return Framing::Auto;
        };
        let essence = value
            .as_bytes()
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        let json_suffix =
            essence.len() >= 5 && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json");
        if essence.eq_ignore_ascii_case(b"text/event-stream") {
            Framing::Sse
        } else if essence.eq_ignore_ascii_case(b"application/json") || json_suffix {
            Framing::Json
        } else {
            Framing::Auto
        }
    }
}

// ---------------------------------------------------------------------------------------
// The fields read, by their names in the providers' usage objects

const PROMPT_TOKENS: u8 = 0;
const COMPLETION_TOKENS: u8 = 1;
const TOTAL_TOKENS: u8 = 2;
const INPUT_TOKENS: u8 = 3;
const OUTPUT_TOKENS: u8 = 4;
const CACHE_CREATION: u8 = 5;
const CACHE_READ: u8 = 6;
const PROMPT_TOKEN_COUNT: u8 = 7;
const CANDIDATES_TOKEN_COUNT: u8 = 8;
const TOTAL_TOKEN_COUNT: u8 = 9;
const CACHED_CONTENT_TOKEN_COUNT: u8 = 10;
const THOUGHTS_TOKEN_COUNT: u8 = 11;
const TOOL_USE_PROMPT_TOKEN_COUNT: u8 = 12;
/// `prompt_tokens_details.cached_tokens`
const PROMPT_CACHED: u8 = 13;
/// `input_tokens_details.cached_tokens`
const INPUT_CACHED: u8 = 14;
/// `completion_tokens_details.reasoning_tokens`
const COMPLETION_REASONING: u8 = 15;
/// `output_tokens_details.reasoning_tokens`
const OUTPUT_REASONING: u8 = 16;
const FIELDS: usize = 17;

/// What a key inside a usage object stands for.
enum UsageKey {
    Number(u8),
    /// A `*_details` object, holding the field and named as the key of it.
    Details(u8),
}

fn usage_key(key: &[u8]) -> Option<UsageKey> {
    use UsageKey::{Details, Number};
    Some(match key {
        b"prompt_tokens" => Number(PROMPT_TOKENS),
        b"completion_tokens" => Number(COMPLETION_TOKENS),
        b"total_tokens" => Number(TOTAL_TOKENS),
        b"input_tokens" => Number(INPUT_TOKENS),
        b"output_tokens" => Number(OUTPUT_TOKENS),
        b"cache_creation_input_tokens" => Number(CACHE_CREATION),
        b"cache_read_input_tokens" => Number(CACHE_READ),
        b"promptTokenCount" => Number(PROMPT_TOKEN_COUNT),
        b"candidatesTokenCount" => Number(CANDIDATES_TOKEN_COUNT),
        b"totalTokenCount" => Number(TOTAL_TOKEN_COUNT),
        b"cachedContentTokenCount" => Number(CACHED_CONTENT_TOKEN_COUNT),
        b"thoughtsTokenCount" => Number(THOUGHTS_TOKEN_COUNT),
        b"toolUsePromptTokenCount" => Number(TOOL_USE_PROMPT_TOKEN_COUNT),
        b"prompt_tokens_details" => Details(PROMPT_CACHED),
        b"input_tokens_details" => Details(INPUT_CACHED),
        b"completion_tokens_details" => Details(COMPLETION_REASONING),
        b"output_tokens_details" => Details(OUTPUT_REASONING),
        _ => return None,
    })
}

/// The key inside a `*_details` object that holds `field`.
fn details_key(field: u8) -> &'static [u8] {
    match field {
        PROMPT_CACHED | INPUT_CACHED => b"cached_tokens",
        _ => b"reasoning_tokens",
    }
}

/// The longest key that can matter (`cache_creation_input_tokens` is 27 bytes).
const KEY_CAP: usize = 32;

/// The usage objects of a document, in the order they are merged when it ends.
const PATHS: usize = 4;
const P_USAGE: u8 = 0;
const P_USAGE_METADATA: u8 = 1;
const P_MESSAGE: u8 = 2;
const P_RESPONSE: u8 = 3;

/// The fields one usage object (or a merge of several) set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Raw {
    /// A usage object was there (even an empty one).
    seen: bool,
    set: u32,
    values: [u64; FIELDS],
}

impl Raw {
    fn seen() -> Self {
        Raw {
            seen: true,
            ..Raw::default()
        }
    }

    fn set(&mut self, field: u8, value: Option<u64>) {
        match value {
            Some(v) => {
                self.set |= 1 << field;
                self.values[usize::from(field)] = v;
            }
            None => self.set &= !(1 << field),
        }
    }

    fn get(&self, field: u8) -> Option<u64> {
        (self.set & (1 << field) != 0).then(|| self.values[usize::from(field)])
    }

    /// Each field `other` set replaces this one's.
    fn merge(&mut self, other: &Raw) {
        if !other.seen {
            return;
        }
        self.seen = true;
        let mut bits = other.set;
        while bits != 0 {
            let field = bits.trailing_zeros() as u8;
            self.set(field, other.get(field));
            bits &= bits - 1;
        }
    }

    /// The normalized usage (see [`TokenUsage`]'s table), if any usage object was seen.
    pub(crate) fn usage(&self) -> Option<TokenUsage> {
        if !self.seen {
            return None;
        }
        let get = |f| self.get(f);
        let any = |fs: &[u8]| fs.iter().any(|&f| get(f).is_some());
        let sum = |fs: &[u8]| {
            fs.iter()
                .filter_map(|&f| get(f))
                .fold(0u64, u64::saturating_add)
        };
        let anthropic_input = [INPUT_TOKENS, CACHE_CREATION, CACHE_READ];
        let prompt = match get(PROMPT_TOKENS) {
            Some(p) => p,
            None if any(&anthropic_input) => sum(&anthropic_input),
            None => sum(&[PROMPT_TOKEN_COUNT, TOOL_USE_PROMPT_TOKEN_COUNT]),
        };
        let completion = get(COMPLETION_TOKENS)
            .or(get(OUTPUT_TOKENS))
            .unwrap_or_else(|| sum(&[CANDIDATES_TOKEN_COUNT, THOUGHTS_TOKEN_COUNT]));
        let mut usage = TokenUsage::new(prompt, completion)
            .with_cached(
                get(PROMPT_CACHED)
                    .or(get(INPUT_CACHED))
                    .or(get(CACHE_READ))
                    .or(get(CACHED_CONTENT_TOKEN_COUNT))
                    .unwrap_or(0),
            )
            .with_reasoning(
                get(COMPLETION_REASONING)
                    .or(get(OUTPUT_REASONING))
                    .or(get(THOUGHTS_TOKEN_COUNT))
                    .unwrap_or(0),
            )
            .with_cache_creation(get(CACHE_CREATION).unwrap_or(0));
        if let Some(total) = get(TOTAL_TOKENS).or(get(TOTAL_TOKEN_COUNT)) {
            usage = usage.with_total(total);
        }
        Some(usage)
    }
}

// ---------------------------------------------------------------------------------------
// Doc: the incremental JSON scanner

/// An object whose keys are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Root,
    /// `message` or `response` at the root: its `usage` is the path's.
    Container(u8),
    Usage(u8),
    /// A `*_details` object in a usage object: the path and the field it holds.
    Details(u8, u8),
}

/// What the value after the key just read is to the scanner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Skip,
    Usage(u8),
    Container(u8),
    Details(u8, u8),
    Number(u8, u8),
    Choices,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Before the root value.
    Start,
    /// After the `[` of a root array.
    ArrayFirst,
    /// After a `,` in a root array.
    ArrayElem,
    KeyOrEnd,
    Key,
    InKey,
    Colon,
    Value,
    Number,
    /// After the `[` of the root's `choices`: is it empty?
    ChoicesOpen,
    SkipString,
    SkipNested,
    SkipLiteral,
    AfterValue,
    /// The root value ended; the rest is ignored.
    Done,
    Failed,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The bytes a skipped nested value is tracked by.
static STRUCTURAL: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'{' as usize] = true;
    t[b'}' as usize] = true;
    t[b'[' as usize] = true;
    t[b']' as usize] = true;
    t
};

/// The first `"` or `\` in `s`: most JSON strings are short, so the first bytes are looked
/// at one by one before `memchr2` takes over.
#[inline]
fn quote_or_backslash(s: &[u8]) -> Option<usize> {
    let head = s.len().min(16);
    match s[..head].iter().position(|&b| b == b'"' || b == b'\\') {
        Some(j) => Some(j),
        None => memchr2(b'"', b'\\', &s[head..]).map(|j| head + j),
    }
}

/// Finds the usage objects of JSON documents fed in chunks; see the module docs.
#[derive(Debug, Clone)]
struct Doc {
    st: St,
    levels: [Level; 4],
    depth: u8,
    in_array: bool,
    key: [u8; KEY_CAP],
    key_len: u8,
    key_over: bool,
    esc: Escape,
    want: Want,
    num: Option<u64>,
    num_ok: bool,
    num_at: (u8, u8),
    skip_depth: u64,
    skip_in_string: bool,
    skip_escape: bool,
    /// A root object is open: `pending` may hold what it set so far.
    open: bool,
    pending: [Raw; PATHS],
    choices_empty: bool,
    /// The last root object closed was an OpenAI usage-only chunk (`"choices":[]` and a
    /// `usage` object).
    closed_usage_only: bool,
    /// Every document's usage, merged.
    acc: Raw,
}

impl Default for Doc {
    fn default() -> Self {
        Doc {
            st: St::Start,
            levels: [Level::Root; 4],
            depth: 0,
            in_array: false,
            key: [0; KEY_CAP],
            key_len: 0,
            key_over: false,
            esc: Escape::None,
            want: Want::Skip,
            num: None,
            num_ok: false,
            num_at: (0, 0),
            skip_depth: 0,
            skip_in_string: false,
            skip_escape: false,
            open: false,
            pending: [Raw::default(); PATHS],
            choices_empty: false,
            closed_usage_only: false,
            acc: Raw::default(),
        }
    }
}

impl Doc {
    /// Ready for the next document (the next SSE event); what was found is kept.
    fn reset_doc(&mut self) {
        self.st = St::Start;
        self.depth = 0;
        self.in_array = false;
        self.open = false;
        self.closed_usage_only = false;
        self.esc = Escape::None;
    }

    /// Everything found so far, the open document's captures included.
    fn raw(&self) -> Raw {
        let mut raw = self.acc;
        if self.open {
            for p in &self.pending {
                raw.merge(p);
            }
        }
        raw
    }

    /// The end of an SSE event's data: the document ends too. `delimited`: the event really
    /// ended (a number being read is complete), rather than the input being cut. Returns
    /// whether the event was a usage-only chunk.
    fn end_event(&mut self, delimited: bool) -> bool {
        if self.st == St::Number && delimited {
            self.commit_number();
        }
        let usage_only = if self.open {
            self.commit_doc();
            false
        } else {
            self.closed_usage_only
        };
        self.reset_doc();
        usage_only
    }

    /// The end of the input: an open document counts as far as it went.
    fn finish(&mut self) {
        if self.open {
            self.commit_doc();
        }
        self.st = St::Done;
    }

    fn commit_doc(&mut self) {
        for p in &self.pending {
            self.acc.merge(p);
        }
        self.open = false;
    }

    fn commit_number(&mut self) {
        let (path, field) = self.num_at;
        let value = if self.num_ok { self.num } else { None };
        self.pending[usize::from(path)].set(field, value);
    }

    fn open_root(&mut self) {
        self.pending = [Raw::default(); PATHS];
        self.choices_empty = false;
        self.open = true;
        self.levels[0] = Level::Root;
        self.depth = 1;
        self.st = St::KeyOrEnd;
    }

    fn push(&mut self, level: Level) {
        self.levels[usize::from(self.depth)] = level;
        self.depth += 1;
        self.st = St::KeyOrEnd;
    }

    fn close_object(&mut self) {
        self.depth -= 1;
        if self.depth > 0 {
            self.st = St::AfterValue;
            return;
        }
        self.closed_usage_only =
            !self.in_array && self.choices_empty && self.pending[usize::from(P_USAGE)].seen;
        self.commit_doc();
        self.st = if self.in_array {
            St::AfterValue
        } else {
            St::Done
        };
    }

    fn begin_key(&mut self) {
        self.key_len = 0;
        self.key_over = false;
        self.esc = Escape::None;
        self.st = St::InKey;
    }

    fn push_key(&mut self, bytes: &[u8]) {
        let len = usize::from(self.key_len);
        if self.key_over || len + bytes.len() > KEY_CAP {
            self.key_over = true;
        } else {
            self.key[len..len + bytes.len()].copy_from_slice(bytes);
            self.key_len += bytes.len() as u8;
        }
    }

    fn classify_key(&self) -> Want {
        if self.key_over {
            return Want::Skip;
        }
        self.classify(&self.key[..usize::from(self.key_len)])
    }

    /// What the value of `key`, a key of the current object, is to the scanner.
    fn classify(&self, key: &[u8]) -> Want {
        match self.levels[usize::from(self.depth - 1)] {
            Level::Root => match key {
                b"usage" => Want::Usage(P_USAGE),
                b"usageMetadata" => Want::Usage(P_USAGE_METADATA),
                b"message" => Want::Container(P_MESSAGE),
                b"response" => Want::Container(P_RESPONSE),
                b"choices" => Want::Choices,
                _ => Want::Skip,
            },
            Level::Container(p) if key == b"usage" => Want::Usage(p),
            Level::Container(_) => Want::Skip,
            Level::Usage(p) => match usage_key(key) {
                Some(UsageKey::Number(f)) => Want::Number(p, f),
                Some(UsageKey::Details(f)) => Want::Details(p, f),
                None => Want::Skip,
            },
            Level::Details(p, f) if key == details_key(f) => Want::Number(p, f),
            Level::Details(..) => Want::Skip,
        }
    }

    /// The fast path of a member: its key (unescaped), the colon and the first byte of its
    /// value all in `s[i..]` (`i` just past the key's opening quote) are read at once.
    /// `None` (nothing changed) leaves the rest to the state machine.
    #[inline]
    fn fast_key(&mut self, s: &[u8], i: usize) -> Option<usize> {
        let j = i + quote_or_backslash(&s[i..])?;
        if s[j] != b'"' {
            return None;
        }
        let want = self.classify(&s[i..j]);
        let mut k = j + 1;
        while k < s.len() && is_ws(s[k]) {
            k += 1;
        }
        if s.get(k) != Some(&b':') {
            return None;
        }
        k += 1;
        while k < s.len() && is_ws(s[k]) {
            k += 1;
        }
        let &b = s.get(k)?;
        self.want = want;
        self.value(b);
        Some(k + 1)
    }

    /// Just past a value, with `s[i]` (if any) the next byte: a `,` or `}` that follows at
    /// once is taken here rather than by another turn of the state machine.
    #[inline]
    fn after_value(&mut self, s: &[u8], i: usize) -> usize {
        self.st = St::AfterValue;
        match s.get(i) {
            Some(b',') if self.depth > 0 => {
                self.st = St::Key;
                i + 1
            }
            Some(b'}') if self.depth > 0 => {
                self.close_object();
                i + 1
            }
            _ => i,
        }
    }

    /// The first byte `b` of a value (consumed).
    fn value(&mut self, b: u8) {
        match (self.want, b) {
            (Want::Usage(p), _) => {
                let obj = b == b'{';
                self.pending[usize::from(p)] = if obj { Raw::seen() } else { Raw::default() };
                if obj {
                    self.push(Level::Usage(p));
                } else {
                    self.skip_value(b);
                }
            }
            (Want::Container(p), _) => {
                self.pending[usize::from(p)] = Raw::default();
                if b == b'{' {
                    self.push(Level::Container(p));
                } else {
                    self.skip_value(b);
                }
            }
            (Want::Details(p, f), _) => {
                self.pending[usize::from(p)].set(f, None);
                if b == b'{' {
                    self.push(Level::Details(p, f));
                } else {
                    self.skip_value(b);
                }
            }
            (Want::Number(p, f), b'0'..=b'9' | b'-') => {
                self.pending[usize::from(p)].set(f, None);
                self.num_at = (p, f);
                self.num = Some(u64::from(b.wrapping_sub(b'0')));
                self.num_ok = b != b'-';
                self.st = St::Number;
            }
            (Want::Number(p, f), _) => {
                self.pending[usize::from(p)].set(f, None);
                self.skip_value(b);
            }
            (Want::Choices, _) => {
                self.choices_empty = false;
                if b == b'[' {
                    self.st = St::ChoicesOpen;
                } else {
                    self.skip_value(b);
                }
            }
            (Want::Skip, _) => self.skip_value(b),
        }
    }

    /// Skips a value whose first byte `b` was consumed.
    fn skip_value(&mut self, b: u8) {
        self.st = match b {
            b'"' => {
                self.skip_escape = false;
                St::SkipString
            }
            b'{' | b'[' => {
                self.skip_depth = 1;
                self.skip_in_string = false;
                self.skip_escape = false;
                St::SkipNested
            }
            b'}' | b']' | b',' | b':' => St::Failed,
            _ => St::SkipLiteral,
        };
    }

    /// An element of a root array begins with `b` (consumed).
    fn element(&mut self, b: u8) {
        if b == b'{' {
            self.open_root();
        } else {
            self.want = Want::Skip;
            self.skip_value(b);
        }
    }

    /// Reads the next bytes of the current document.
    fn feed(&mut self, s: &[u8]) {
        let n = s.len();
        let mut i = 0;
        while i < n {
            match self.st {
                St::Done => {
                    // Anything but whitespace after the root: not a usage-only chunk to hide.
                    if self.closed_usage_only && !s[i..].iter().all(|&b| is_ws(b)) {
                        self.closed_usage_only = false;
                    }
                    return;
                }
                St::Failed => return,
                St::InKey => i = self.read_key(s, i),
                St::SkipString => {
                    if self.skip_escape {
                        self.skip_escape = false;
                        i += 1;
                        continue;
                    }
                    match quote_or_backslash(&s[i..]) {
                        None => return,
                        Some(j) => {
                            i += j + 1;
                            if s[i - 1] == b'"' {
                                i = self.after_value(s, i);
                            } else if i < n {
                                i += 1;
                            } else {
                                self.skip_escape = true;
                            }
                        }
                    }
                }
                St::SkipNested => {
                    i = self.skip_nested(s, i);
                    if self.st == St::AfterValue {
                        i = self.after_value(s, i);
                    }
                }
                St::SkipLiteral => {
                    while i < n
                        && !matches!(s[i], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                    {
                        i += 1;
                    }
                    if i < n {
                        i = self.after_value(s, i);
                    }
                }
                St::Number => {
                    let b = s[i];
                    match b {
                        b'0'..=b'9' => {
                            self.num = self
                                .num
                                .and_then(|v| v.checked_mul(10))
                                .and_then(|v| v.checked_add(u64::from(b - b'0')));
                            i += 1;
                        }
                        b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r' => {
                            self.commit_number();
                            i = self.after_value(s, i);
                        }
                        _ => {
                            self.num_ok = false;
                            i += 1;
                        }
                    }
                }
                st => {
                    while i < n && is_ws(s[i]) {
                        i += 1;
                    }
                    let Some(&b) = s.get(i) else {
                        return;
                    };
                    i += 1;
                    match st {
                        St::Start => match b {
                            b'{' => self.open_root(),
                            b'[' => {
                                self.in_array = true;
                                self.st = St::ArrayFirst;
                            }
                            _ => self.st = St::Failed,
                        },
                        St::ArrayFirst if b == b']' => self.st = St::Done,
                        St::ArrayFirst | St::ArrayElem => self.element(b),
                        St::KeyOrEnd if b == b'}' => self.close_object(),
                        St::KeyOrEnd | St::Key if b == b'"' => match self.fast_key(s, i) {
                            Some(k) => i = k,
                            None => self.begin_key(),
                        },
                        St::Colon if b == b':' => self.st = St::Value,
                        St::Value => self.value(b),
                        St::ChoicesOpen if b == b']' => {
                            self.choices_empty = true;
                            self.st = St::AfterValue;
                        }
                        St::ChoicesOpen => {
                            // A non-empty array: skip it, this byte included.
                            self.skip_depth = 1;
                            self.skip_in_string = false;
                            self.skip_escape = false;
                            self.st = St::SkipNested;
                            i -= 1;
                        }
                        St::AfterValue => match b {
                            b',' if self.depth == 0 => self.st = St::ArrayElem,
                            b',' => self.st = St::Key,
                            b'}' if self.depth > 0 => self.close_object(),
                            b']' if self.depth == 0 && self.in_array => self.st = St::Done,
                            _ => self.st = St::Failed,
                        },
                        _ => self.st = St::Failed,
                    }
                }
            }
        }
    }

    /// Reads key bytes from `s[i..]`; returns where it stopped.
    fn read_key(&mut self, s: &[u8], mut i: usize) -> usize {
        let n = s.len();
        while i < n {
            match self.esc {
                Escape::None => match quote_or_backslash(&s[i..]) {
                    None => {
                        self.push_key(&s[i..]);
                        return n;
                    }
                    Some(j) => {
                        self.push_key(&s[i..i + j]);
                        i += j + 1;
                        if s[i - 1] == b'"' {
                            self.want = self.classify_key();
                            self.st = St::Colon;
                            return i;
                        }
                        self.esc = Escape::Backslash;
                    }
                },
                Escape::Backslash | Escape::Hex(..) => {
                    let step = self.esc.step(s[i]);
                    i += 1;
                    match step {
                        Unescaped::More => {}
                        Unescaped::Byte(plain) => self.push_key(&[plain]),
                        // Only ASCII keys matter: anything else stands as a byte that
                        // matches none.
                        Unescaped::Unit(u) => {
                            self.push_key(&[u8::try_from(u)
                                .ok()
                                .filter(u8::is_ascii)
                                .unwrap_or(0xFF)]);
                        }
                        Unescaped::Bad => {
                            self.st = St::Failed;
                            return n;
                        }
                    }
                }
            }
        }
        n
    }

    /// Skips inside a nested value from `s[i..]`; returns where it stopped.
    fn skip_nested(&mut self, s: &[u8], mut i: usize) -> usize {
        let n = s.len();
        while i < n {
            if self.skip_in_string {
                if self.skip_escape {
                    self.skip_escape = false;
                    i += 1;
                    continue;
                }
                match quote_or_backslash(&s[i..]) {
                    None => return n,
                    Some(j) => {
                        i += j + 1;
                        if s[i - 1] == b'"' {
                            self.skip_in_string = false;
                        } else if i < n {
                            i += 1;
                        } else {
                            self.skip_escape = true;
                        }
                    }
                }
                continue;
            }
            // Bytes that neither open nor close anything, quickly.
            while i < n && !STRUCTURAL[usize::from(s[i])] {
                i += 1;
            }
            let Some(&b) = s.get(i) else {
                return n;
            };
            i += 1;
            match b {
                b'"' => self.skip_in_string = true,
                b'{' | b'[' => self.skip_depth += 1,
                b'}' | b']' => {
                    self.skip_depth -= 1;
                    if self.skip_depth == 0 {
                        self.st = St::AfterValue;
                        return i;
                    }
                }
                _ => {}
            }
        }
        n
    }
}

// ---------------------------------------------------------------------------------------
// SSE framing

fn is_eol(b: u8) -> bool {
    b == b'\r' || b == b'\n'
}

/// The length of the line terminator at the start of `run` (`\r\n` is one).
fn terminator_len(run: &[u8]) -> usize {
    if run.starts_with(b"\r\n") { 2 } else { 1 }
}

/// In a run of line-end bytes that ends a line with content, the offset just after the
/// terminator that ends the empty line following it (which dispatches the event): `None`
/// when the run holds one terminator only.
fn dispatch_in_run(run: &[u8]) -> Option<usize> {
    let first = terminator_len(run);
    (first < run.len()).then(|| first + terminator_len(&run[first..]))
}

/// Whether a run of line-end bytes, at a line start (`at_start`) or after content, holds
/// an empty line.
fn holds_blank(run: &[u8], at_start: bool) -> bool {
    !run.is_empty() && (at_start || dispatch_in_run(run).is_some())
}

/// The end of the last complete event in `s`, which starts at an event boundary: just past
/// the run of line ends that holds its empty line. 0 when there is none.
pub(crate) fn last_event_end(s: &[u8]) -> usize {
    // The common case, a read that ends with an event.
    if s.ends_with(b"\n\n") && s.len() > 2 && !is_eol(s[s.len() - 3]) {
        return s.len();
    }
    let mut i = s.len();
    while let Some(j) = memrchr2(b'\r', b'\n', &s[..i]) {
        let mut a = j;
        while a > 0 && is_eol(s[a - 1]) {
            a -= 1;
        }
        if holds_blank(&s[a..=j], a == 0) {
            return j + 1;
        }
        i = a;
    }
    0
}

/// Where the event that `prev` began ends in `rest`: just past the run of line ends that
/// holds its empty line. `prev` holds the start of one event and no complete one (it does
/// not start with a line end); empty, `rest` starts at an event boundary.
pub(crate) fn first_event_end(prev: &[u8], rest: &[u8]) -> Option<usize> {
    let lead = rest.iter().take_while(|&&b| is_eol(b)).count();
    // The run that spans the join: `prev`'s trailing line ends (two at most matter) and
    // `rest`'s leading ones. `prev` may end with an empty line already (a body holding back
    // a final `\r` to see whether a `\n` follows): then the event ends where `rest` starts.
    let tail = prev.iter().rev().take_while(|&&b| is_eol(b)).count().min(2);
    if lead > 0 || tail > 0 {
        let mut run = [0u8; 5];
        let t = &prev[prev.len() - tail..];
        let l = &rest[..lead.min(3)];
        run[..t.len()].copy_from_slice(t);
        run[t.len()..t.len() + l.len()].copy_from_slice(l);
        if holds_blank(&run[..t.len() + l.len()], prev.is_empty()) {
            return Some(lead);
        }
    }
    event_end(rest, lead).map(|(end, _)| end)
}

/// From `from` (inside a line with content), the first run of line ends that holds an
/// empty line: (the end of the run, the end of the terminator that dispatches).
fn event_end(s: &[u8], mut from: usize) -> Option<(usize, usize)> {
    while let Some(j) = memchr2(b'\r', b'\n', &s[from..]) {
        let j = from + j;
        let mut k = j + 1;
        while k < s.len() && is_eol(s[k]) {
            k += 1;
        }
        if let Some(d) = dispatch_in_run(&s[j..k]) {
            return Some((k, j + d));
        }
        from = k;
    }
    None
}

/// The start of the event holding `h`: just past the last run of line ends before it that
/// holds an empty line, or `floor` (an event boundary).
fn event_start(s: &[u8], floor: usize, h: usize) -> usize {
    let mut i = h;
    while let Some(j) = memrchr2(b'\r', b'\n', &s[floor..i]) {
        let j = floor + j;
        let mut a = j;
        while a > floor && is_eol(s[a - 1]) {
            a -= 1;
        }
        if holds_blank(&s[a..=j], a == floor) {
            return j + 1;
        }
        i = a;
    }
    floor
}

/// Whether the `"usage` at `h` may open a usage object: `"usage"` or `"usageMetadata"`,
/// then `:` and `{` (spaces allowed). `null`, a string value or anything else is not; a
/// line end before the answer (data split over lines) may be.
fn candidate(s: &[u8], h: usize) -> bool {
    let mut i = h + 6;
    match s.get(i) {
        Some(b'"') => i += 1,
        Some(b'M') if s[i..].starts_with(b"Metadata\"") => i += 9,
        Some(_) => return false,
        None => return true,
    }
    let mut colon = false;
    loop {
        match s.get(i) {
            Some(b' ' | b'\t') => i += 1,
            Some(b':') if !colon => {
                colon = true;
                i += 1;
            }
            Some(b'{') => return colon,
            None | Some(b'\r' | b'\n') => return true,
            Some(_) => return false,
        }
    }
}

static USAGE: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\"usage"));

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    Start,
    Name,
    /// After `data:`: one space may follow.
    Space,
    Data,
    Ignore,
}

/// SSE lines, exactly, fed in chunks: the slow path, for the events the fast path picks
/// and those too long to keep.
#[derive(Debug, Clone)]
struct Lines {
    line: Line,
    after_cr: bool,
    /// The event has a data line.
    data: bool,
    name_len: u8,
    name_ok: bool,
    last_usage_only: bool,
}

impl Default for Lines {
    fn default() -> Self {
        Lines {
            line: Line::Start,
            after_cr: false,
            data: false,
            name_len: 0,
            name_ok: true,
            last_usage_only: false,
        }
    }
}

impl Lines {
    fn reset(&mut self) {
        *self = Lines::default();
    }

    fn begin_data(&mut self, doc: &mut Doc) {
        if self.data {
            doc.feed(b"\n");
        }
        self.data = true;
    }

    fn end_line(&mut self, eol: u8) {
        self.after_cr = eol == b'\r';
        self.line = Line::Start;
    }

    /// Reads `s` until an empty line ends the event: returns the offset just past it.
    fn feed(&mut self, doc: &mut Doc, s: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < s.len() {
            let b = s[i];
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    i += 1;
                    continue;
                }
            }
            match self.line {
                Line::Start => match b {
                    b'\r' | b'\n' => {
                        i += 1;
                        self.end_line(b);
                        self.last_usage_only = self.data && doc.end_event(true);
                        if !self.data {
                            doc.reset_doc();
                        }
                        self.data = false;
                        return Some(i);
                    }
                    b':' => {
                        i += 1;
                        self.line = Line::Ignore;
                    }
                    _ => {
                        self.line = Line::Name;
                        self.name_len = 0;
                        self.name_ok = true;
                    }
                },
                Line::Name => {
                    let is_data = self.name_ok && self.name_len == 4;
                    match b {
                        b':' => {
                            i += 1;
                            if is_data {
                                self.begin_data(doc);
                                self.line = Line::Space;
                            } else {
                                self.line = Line::Ignore;
                            }
                        }
                        b'\r' | b'\n' => {
                            // A field with no colon: its value is empty.
                            if is_data {
                                self.begin_data(doc);
                            }
                            i += 1;
                            self.end_line(b);
                        }
                        _ => {
                            let at = usize::from(self.name_len);
                            self.name_ok &= at < 4 && b == b"data"[at];
                            self.name_len = self.name_len.saturating_add(1);
                            i += 1;
                        }
                    }
                }
                Line::Space => {
                    if b == b' ' {
                        i += 1;
                    }
                    self.line = Line::Data;
                }
                Line::Data | Line::Ignore => match memchr2(b'\r', b'\n', &s[i..]) {
                    Some(j) => {
                        if self.line == Line::Data {
                            doc.feed(&s[i..i + j]);
                        }
                        i += j;
                        self.end_line(s[i]);
                        i += 1;
                    }
                    None => {
                        if self.line == Line::Data {
                            doc.feed(&s[i..]);
                        }
                        i = s.len();
                    }
                },
            }
        }
        None
    }

    /// The input ended inside an event: what its data held counts.
    fn finish(&mut self, doc: &mut Doc) {
        if self.data {
            doc.end_event(false);
        }
        self.data = false;
    }
}

// ---------------------------------------------------------------------------------------
// UsageScanner

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the first bytes: an optional UTF-8 BOM, `bom` bytes of it seen.
    Start {
        framing: Framing,
        bom: u8,
    },
    /// `Auto` framing, only whitespace seen; `space`: a space or tab since the last line end.
    Detect {
        space: bool,
    },
    Json,
    Sse,
}

const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// Reads the token usage of a response body fed in any chunks; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct UsageScanner {
    mode: Mode,
    doc: Doc,
    lines: Lines,
    /// The start of an SSE event not complete yet (never more than [`MAX_EVENT`] bytes).
    carry: Vec<u8>,
    /// The current SSE event outgrew the carry: `lines` reads it as it comes.
    streaming: bool,
}

impl UsageScanner {
    /// A scanner for a body framed as `framing`.
    pub(crate) fn new(framing: Framing) -> Self {
        UsageScanner {
            mode: Mode::Start { framing, bom: 0 },
            doc: Doc::default(),
            lines: Lines::default(),
            carry: Vec::new(),
            streaming: false,
        }
    }

    /// Whether the body is read as SSE (once its first bytes decided it).
    #[cfg(test)]
    pub(crate) fn is_sse(&self) -> bool {
        self.mode == Mode::Sse
    }

    /// The bytes kept between calls (the incomplete SSE event).
    #[cfg(test)]
    pub(crate) fn retained(&self) -> usize {
        self.carry.len()
    }

    /// Reads `chunk`, the next bytes of the body.
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        let rest = self.prelude(chunk);
        self.feed_main(rest);
    }

    /// Reads `events`, the next bytes of an SSE body, which start at an event boundary and
    /// end at one (just past an empty line), as [`first_event_end`] and [`last_event_end`]
    /// find them; pushes the ranges (in `events`) of the OpenAI usage-only chunks among them
    /// (a chunk with `"choices":[]` and a `usage` object), from the start of the event to
    /// the end of the empty line that ends it.
    pub(crate) fn feed_events(&mut self, events: &[u8], dropped: &mut Vec<Range<usize>>) {
        let rest = self.prelude(events);
        if self.mode == Mode::Sse && self.carry.is_empty() && !self.streaming {
            let base = events.len() - rest.len();
            self.region(rest, base, Some(dropped));
        } else {
            self.feed_main(rest);
        }
    }

    /// The body ended (or was cut): what its last, unterminated part holds counts too.
    pub(crate) fn finish(&mut self) {
        if let Mode::Start { framing, bom } = self.mode {
            // A body shorter than a BOM, all of it a BOM's first bytes.
            self.mode = self.main_mode(framing);
            self.feed_main(&BOM[..usize::from(bom)]);
        }
        match self.mode {
            Mode::Json => self.doc.finish(),
            Mode::Sse if self.streaming => {
                self.lines.finish(&mut self.doc);
                self.streaming = false;
            }
            Mode::Sse if !self.carry.is_empty() => {
                let carry = std::mem::take(&mut self.carry);
                self.lines.reset();
                self.doc.reset_doc();
                if self.lines.feed(&mut self.doc, &carry).is_none() {
                    self.lines.finish(&mut self.doc);
                }
            }
            _ => {}
        }
    }

    /// The usage found so far, `None` if no usage object was seen. Complete once the body
    /// has ended and [`finish`](Self::finish) was called.
    pub(crate) fn usage(&self) -> Option<TokenUsage> {
        self.doc.raw().usage()
    }

    fn main_mode(&self, framing: Framing) -> Mode {
        match framing {
            Framing::Json => Mode::Json,
            Framing::Sse => Mode::Sse,
            Framing::Auto => Mode::Detect { space: false },
        }
    }

    /// Settles the BOM and, for `Auto`, the framing; returns the bytes left for the body's
    /// framing.
    fn prelude<'a>(&mut self, mut s: &'a [u8]) -> &'a [u8] {
        if let Mode::Start { framing, mut bom } = self.mode {
            let (earlier, whole) = (bom, s);
            while usize::from(bom) < BOM.len() && !s.is_empty() && s[0] == BOM[usize::from(bom)] {
                bom += 1;
                s = &s[1..];
            }
            if usize::from(bom) < BOM.len() && s.is_empty() {
                self.mode = Mode::Start { framing, bom };
                return s;
            }
            self.mode = self.main_mode(framing);
            if usize::from(bom) < BOM.len() {
                // Not a BOM: those bytes are the body's. The ones in this chunk are read
                // from it (so that offsets in it stay right), earlier ones replayed.
                s = whole;
                if earlier > 0 {
                    self.feed_main(&BOM[..usize::from(earlier)]);
                }
            }
        }
        if let Mode::Detect { mut space } = self.mode {
            for (i, &b) in s.iter().enumerate() {
                match b {
                    b' ' | b'\t' => space = true,
                    b'\r' | b'\n' => space = false,
                    b'{' | b'[' => {
                        self.mode = Mode::Json;
                        return &s[i..];
                    }
                    _ => {
                        self.mode = Mode::Sse;
                        if space {
                            // The line began with whitespace: its field name is not one
                            // SSE knows, as it would not be with the space kept.
                            self.sse_feed(b" ");
                        }
                        return &s[i..];
                    }
                }
            }
            self.mode = Mode::Detect { space };
            return &[];
        }
        s
    }

    fn feed_main(&mut self, s: &[u8]) {
        match self.mode {
            Mode::Json => self.doc.feed(s),
            Mode::Sse => self.sse_feed(s),
            Mode::Start { .. } | Mode::Detect { .. } => {
                let rest = self.prelude(s);
                if !rest.is_empty() {
                    self.feed_main(rest);
                }
            }
        }
    }

    fn begin_streaming(&mut self) {
        self.lines.reset();
        self.doc.reset_doc();
        self.streaming = true;
    }

    fn sse_feed(&mut self, mut s: &[u8]) {
        loop {
            if self.streaming {
                match self.lines.feed(&mut self.doc, s) {
                    Some(k) => {
                        self.streaming = false;
                        s = &s[k..];
                    }
                    None => return,
                }
            }
            if !self.carry.is_empty() {
                match first_event_end(&self.carry, s) {
                    Some(k) => {
                        let mut carry = std::mem::take(&mut self.carry);
                        carry.extend_from_slice(&s[..k]);
                        self.region(&carry, 0, None);
                        carry.clear();
                        self.carry = carry;
                        s = &s[k..];
                    }
                    None if self.carry.len() + s.len() <= MAX_EVENT => {
                        self.carry.extend_from_slice(s);
                        return;
                    }
                    None => {
                        // Too long to keep: read the rest of this event as it comes.
                        let mut carry = std::mem::take(&mut self.carry);
                        self.begin_streaming();
                        let done = self.lines.feed(&mut self.doc, &carry);
                        debug_assert!(done.is_none(), "the carry holds no complete event");
                        carry.clear();
                        self.carry = carry;
                        continue;
                    }
                }
            }
            let split = last_event_end(s);
            self.region(&s[..split], 0, None);
            let tail = &s[split..];
            // A tail never starts with a line end: a run of them is taken whole.
            if tail.len() <= MAX_EVENT {
                self.carry.extend_from_slice(tail);
                return;
            }
            self.begin_streaming();
            s = tail;
        }
    }

    /// Reads complete events: only those that may hold a usage object are parsed.
    fn region(&mut self, r: &[u8], base: usize, mut dropped: Option<&mut Vec<Range<usize>>>) {
        let finder = &*USAGE;
        let mut pos = 0;
        let mut floor = 0;
        while let Some(h) = finder.find(&r[pos..]) {
            let h = pos + h;
            if !candidate(r, h) {
                pos = h + 6;
                continue;
            }
            let start = event_start(r, floor, h);
            let (end, dispatched) = event_end(r, h).unwrap_or((r.len(), r.len()));
            self.lines.reset();
            self.doc.reset_doc();
            if self.lines.feed(&mut self.doc, &r[start..end]).is_some() {
                if self.lines.last_usage_only
                    && let Some(dropped) = dropped.as_deref_mut()
                {
                    dropped.push(base + start..base + dispatched);
                }
            } else {
                self.lines.finish(&mut self.doc);
            }
            pos = end;
            floor = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(framing: Framing, body: &[u8]) -> Option<TokenUsage> {
        let mut s = UsageScanner::new(framing);
        s.feed(body);
        s.finish();
        s.usage()
    }

    #[test]
    fn framing_from_content_type() {
        let framing = |ct: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            Framing::from_headers(&h)
        };
        assert_eq!(framing("text/event-stream"), Framing::Sse);
        assert_eq!(framing("Text/Event-Stream ; charset=utf-8"), Framing::Sse);
        assert_eq!(framing("application/json"), Framing::Json);
        assert_eq!(framing("application/problem+json"), Framing::Json);
        assert_eq!(framing("text/plain"), Framing::Auto);
        assert_eq!(
            Framing::from_headers(&http::HeaderMap::new()),
            Framing::Auto
        );
    }

    #[test]
    fn runs_of_line_ends() {
        assert_eq!(dispatch_in_run(b"\n"), None);
        assert_eq!(dispatch_in_run(b"\r\n"), None);
        assert_eq!(dispatch_in_run(b"\r"), None);
        assert_eq!(dispatch_in_run(b"\n\n"), Some(2));
        assert_eq!(dispatch_in_run(b"\r\r"), Some(2));
        assert_eq!(dispatch_in_run(b"\n\r"), Some(2));
        assert_eq!(dispatch_in_run(b"\r\n\r\n"), Some(4));
        assert_eq!(dispatch_in_run(b"\r\n\n\n"), Some(3));
        assert_eq!(dispatch_in_run(b"\r\r\n"), Some(3));
        assert_eq!(last_event_end(b"data: a\n\ndata: b\n"), 9);
        assert_eq!(last_event_end(b"data: a\r\n\r\ndata: b\r\n\r\n"), 22);
        assert_eq!(last_event_end(b"data: a\r\n"), 0);
        assert_eq!(last_event_end(b"\ndata: a"), 1);
        assert_eq!(first_event_end(b"data: a\r", b"\ndata: b\n\n"), Some(10));
        assert_eq!(first_event_end(b"data: a\r", b"\r\ndata: b"), Some(2));
        assert_eq!(first_event_end(b"data: a\n", b"\n"), Some(1));
        assert_eq!(first_event_end(b"data: a", b"\n"), None);
        assert_eq!(first_event_end(b"", b"\ndata"), Some(1));
        assert_eq!(event_start(b"x\n\ndata: \"usage\"", 0, 10), 3);
    }

    #[test]
    fn candidates() {
        let c = |s: &[u8]| candidate(s, 0);
        assert!(c(br#""usage":{"#));
        assert!(c(br#""usage" :  {"#));
        assert!(c(br#""usageMetadata": {"#));
        assert!(c(br#""usage":"#));
        assert!(c(b"\"usage\"\n:{"));
        assert!(!c(br#""usage":null"#));
        assert!(!c(br#""usage"}"#));
        assert!(!c(br#""usage\":{"#));
        assert!(!c(br#""usages":{"#));
        assert!(!c(br#""usage"::{"#));
    }

    #[test]
    fn json_bodies() {
        let u = scan(
            Framing::Json,
            br#"{"choices":[{"message":{"usage":{"prompt_tokens":99}}}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#,
        );
        assert_eq!(u, Some(TokenUsage::new(5, 7).with_total(12)));
        assert_eq!(scan(Framing::Json, br#"{"usage":null}"#), None);
        assert_eq!(
            scan(Framing::Json, br#"{"usage":{}}"#),
            Some(TokenUsage::default())
        );
        assert_eq!(scan(Framing::Json, b"not json"), None);
        assert_eq!(scan(Framing::Auto, b""), None);
    }

    #[test]
    fn numbers_that_are_not_counts_leave_the_field_unset() {
        let u = |v: &str| {
            scan(
                Framing::Json,
                format!(r#"{{"usage":{{"prompt_tokens":{v},"completion_tokens":1}}}}"#).as_bytes(),
            )
            .map(|u| u.prompt())
        };
        assert_eq!(u("18446744073709551615"), Some(u64::MAX));
        assert_eq!(u("18446744073709551616"), Some(0));
        assert_eq!(u("-5"), Some(0));
        assert_eq!(u("5.0"), Some(0));
        assert_eq!(u("5e2"), Some(0));
        assert_eq!(u("null"), Some(0));
        assert_eq!(u(r#""5""#), Some(0));
        assert_eq!(u("0"), Some(0));
        assert_eq!(u("42"), Some(42));
    }

    #[test]
    fn escaped_keys_in_json_bodies() {
        let u = scan(
            Framing::Json,
            br#"{"us\u0061ge":{"prompt\u005ftokens":3,"completion_tokens":4}}"#,
        );
        assert_eq!(u, Some(TokenUsage::new(3, 4)));
        // Not `usage`: a NUL, a non-ASCII letter.
        assert_eq!(
            scan(Framing::Json, br#"{"usage\u0000":{"prompt_tokens":3}}"#),
            None
        );
        assert_eq!(
            scan(Framing::Json, br#"{"us\u00e1ge":{"prompt_tokens":3}}"#),
            None
        );
    }
}
