//! A minimal incremental JSON scanner that finds the top-level `"model"` of a request body.
//!
//! Hand-written rather than a streaming tokenizer crate: it needs to know one thing (the
//! string value of one top-level key, with keys compared after unescaping, so that
//! `"mod\u0065l"` counts), take bytes in any chunks, never allocate beyond two small
//! bounded buffers, and keep watching the rest of a body cheaply for a second `"model"` key
//! (parsers differ on which duplicate wins, so one is refused). Values it does not care
//! about are skipped without validation: the upstream's parser judges those. It is
//! checked against `serde_json` by property tests.

use crate::json_escape::{Escape, Unescaped};

/// The longest model name kept; a longer one is unreadable.
pub(crate) const MAX_MODEL_LEN: usize = 1024;

/// Keys are kept only as far as needed to tell whether they are `model`.
const MAX_KEY_LEN: usize = 8;

/// What the scanner has found so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found {
    /// Not decided yet: feed more.
    Undecided,
    /// The first top-level `"model"` is this string.
    Model(String),
    /// The top-level object ended without a `"model"`.
    NoModel,
    /// Not a JSON object, or `"model"` is not a readable string (not a string, too long,
    /// not UTF-8).
    Unreadable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Start,
    KeyOrEnd,
    Key,
    InKey,
    Colon,
    Value,
    InModel,
    SkipString { escape: bool },
    Nested { in_string: bool, escape: bool },
    Literal,
    AfterValue,
    End,
    Failed,
}

/// An unescaping string reader with a bound on what it keeps.
#[derive(Debug)]
struct StrDec {
    buf: Vec<u8>,
    cap: usize,
    overflow: bool,
    esc: Escape,
    high: Option<u16>,
}

enum Step {
    More,
    Done,
    Bad,
}

impl StrDec {
    fn new(cap: usize) -> Self {
        StrDec {
            buf: Vec::new(),
            cap,
            overflow: false,
            esc: Escape::None,
            high: None,
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.overflow = false;
        self.esc = Escape::None;
        self.high = None;
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        if self.buf.len() + bytes.len() > self.cap {
            self.overflow = true;
        } else {
            self.buf.extend_from_slice(bytes);
        }
    }

    fn push_char(&mut self, c: char) {
        let mut utf8 = [0; 4];
        self.push_bytes(c.encode_utf8(&mut utf8).as_bytes());
    }

    /// A high surrogate not followed by a low one stands for U+FFFD, as lenient parsers read
    /// it (a strict one refuses the body anyway).
    fn flush_high(&mut self) {
        if self.high.take().is_some() {
            self.push_char(char::REPLACEMENT_CHARACTER);
        }
    }

    fn unit(&mut self, u: u16) {
        if let Some(high) = self.high.take() {
            if (0xDC00..=0xDFFF).contains(&u) {
                let c = 0x10000 + ((u32::from(high) - 0xD800) << 10) + (u32::from(u) - 0xDC00);
                self.push_char(char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER));
                return;
            }
            self.push_char(char::REPLACEMENT_CHARACTER);
        }
        match u {
            0xD800..=0xDBFF => self.high = Some(u),
            0xDC00..=0xDFFF => self.push_char(char::REPLACEMENT_CHARACTER),
            _ => self.push_char(char::from_u32(u.into()).unwrap_or(char::REPLACEMENT_CHARACTER)),
        }
    }

    fn step(&mut self, b: u8) -> Step {
        match self.esc {
            Escape::None => match b {
                b'"' => {
                    self.flush_high();
                    return Step::Done;
                }
                b'\\' => self.esc = Escape::Backslash,
                _ => {
                    self.flush_high();
                    self.push_bytes(&[b]);
                }
            },
            Escape::Backslash | Escape::Hex(..) => match self.esc.step(b) {
                Unescaped::More => {}
                Unescaped::Byte(plain) => {
                    self.flush_high();
                    self.push_bytes(&[plain]);
                }
                Unescaped::Unit(u) => self.unit(u),
                Unescaped::Bad => return Step::Bad,
            },
        }
        Step::More
    }
}

/// Finds the top-level `"model"` of a JSON object fed in chunks.
#[derive(Debug)]
pub(crate) struct Scanner {
    st: St,
    depth: u32,
    key: StrDec,
    model: StrDec,
    model_keys: u32,
    first: Option<Result<String, ()>>,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            st: St::Start,
            depth: 0,
            key: StrDec::new(MAX_KEY_LEN),
            model: StrDec::new(MAX_MODEL_LEN),
            model_keys: 0,
            first: None,
        }
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Scanner {
    /// Reads `chunk`, the next bytes of the body.
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if matches!(self.st, St::End | St::Failed) {
                return;
            }
            self.st = self.byte(b);
        }
    }

    /// How many top-level `"model"` keys have been seen.
    pub(crate) fn model_keys(&self) -> u32 {
        self.model_keys
    }

    /// What is known so far; `at_end` when the body has no more bytes.
    pub(crate) fn found(&self, at_end: bool) -> Found {
        match &self.first {
            Some(Ok(model)) => return Found::Model(model.clone()),
            Some(Err(())) => return Found::Unreadable,
            None => {}
        }
        match self.st {
            St::End => Found::NoModel,
            St::Failed => Found::Unreadable,
            _ if at_end => Found::Unreadable,
            _ => Found::Undecided,
        }
    }

    fn byte(&mut self, b: u8) -> St {
        match self.st {
            St::Start if is_ws(b) => St::Start,
            St::Start if b == b'{' => St::KeyOrEnd,
            St::KeyOrEnd | St::Key | St::Colon | St::Value | St::AfterValue | St::End
                if is_ws(b) =>
            {
                self.st
            }
            St::KeyOrEnd if b == b'}' => St::End,
            St::KeyOrEnd | St::Key if b == b'"' => {
                self.key.reset();
                St::InKey
            }
            St::InKey => match self.key.step(b) {
                Step::More => St::InKey,
                Step::Bad => St::Failed,
                Step::Done => St::Colon,
            },
            St::Colon if b == b':' => St::Value,
            St::Value => {
                let is_model = !self.key.overflow && self.key.buf == b"model";
                if is_model {
                    self.model_keys += 1;
                }
                let first_model = is_model && self.first.is_none();
                match b {
                    b'"' if first_model => {
                        self.model.reset();
                        St::InModel
                    }
                    _ if first_model => {
                        // A model that is not a string: still skipped, to find the rest.
                        self.first = Some(Err(()));
                        self.skip_value(b)
                    }
                    _ => self.skip_value(b),
                }
            }
            St::InModel => match self.model.step(b) {
                Step::More => St::InModel,
                Step::Bad => St::Failed,
                Step::Done => {
                    let value = (!self.model.overflow)
                        .then(|| String::from_utf8(std::mem::take(&mut self.model.buf)).ok())
                        .flatten();
                    self.first = Some(value.ok_or(()));
                    St::AfterValue
                }
            },
            St::SkipString { escape: true } => St::SkipString { escape: false },
            St::SkipString { escape: false } => match b {
                b'\\' => St::SkipString { escape: true },
                b'"' => St::AfterValue,
                _ => self.st,
            },
            St::Nested {
                in_string: true,
                escape,
            } => match b {
                _ if escape => St::Nested {
                    in_string: true,
                    escape: false,
                },
                b'\\' => St::Nested {
                    in_string: true,
                    escape: true,
                },
                b'"' => St::Nested {
                    in_string: false,
                    escape: false,
                },
                _ => self.st,
            },
            St::Nested {
                in_string: false, ..
            } => match b {
                b'"' => St::Nested {
                    in_string: true,
                    escape: false,
                },
                b'{' | b'[' => {
                    self.depth += 1;
                    self.st
                }
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        St::AfterValue
                    } else {
                        self.st
                    }
                }
                _ => self.st,
            },
            St::Literal => match b {
                b',' => St::Key,
                b'}' => St::End,
                _ if is_ws(b) => St::AfterValue,
                b'"' | b'{' | b'[' | b':' | b']' => St::Failed,
                _ => St::Literal,
            },
            St::AfterValue if b == b',' => St::Key,
            St::AfterValue if b == b'}' => St::End,
            _ => St::Failed,
        }
    }

    fn skip_value(&mut self, b: u8) -> St {
        match b {
            b'"' => St::SkipString { escape: false },
            b'{' | b'[' => {
                self.depth = 1;
                St::Nested {
                    in_string: false,
                    escape: false,
                }
            }
            b'}' | b']' | b',' | b':' => St::Failed,
            _ if is_ws(b) => St::Value,
            _ => St::Literal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(text: &str) -> Found {
        let mut s = Scanner::default();
        s.feed(text.as_bytes());
        s.found(true)
    }

    #[test]
    fn finds_the_top_level_model_only() {
        let m = |s: &str| Found::Model(s.to_owned());
        assert_eq!(scan(r#"{"model":"gpt-4o"}"#), m("gpt-4o"));
        assert_eq!(
            scan(r#" { "a" : [1,{"model":"x"}], "model" : "y" } "#),
            m("y")
        );
        assert_eq!(scan(r#"{"a":{"model":"x"},"b":"model"}"#), Found::NoModel);
        assert_eq!(scan(r#"{"mod\u0065l":"g\u00e9\ud83d\ude00"}"#), m("gé😀"));
        assert_eq!(scan(r#"{"model\u0000":"x"}"#), Found::NoModel);
        assert_eq!(scan(r#"{"n":-1.5e3,"t":true,"model":"a\"b"}"#), m("a\"b"));
        assert_eq!(scan(r#"{"model":42}"#), Found::Unreadable);
        assert_eq!(scan(r#"["model","x"]"#), Found::Unreadable);
        assert_eq!(scan("model=x"), Found::Unreadable);
        assert_eq!(scan(""), Found::Unreadable);
        assert_eq!(scan(r#"{"a":1"#), Found::Unreadable);
        assert_eq!(scan("{}"), Found::NoModel);
        assert_eq!(scan(r#"{"model":"\x"}"#), Found::Unreadable);
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_MODEL_LEN + 1));
        assert_eq!(scan(&long), Found::Unreadable);
    }

    #[test]
    fn counts_duplicate_model_keys() {
        let mut s = Scanner::default();
        s.feed(br#"{"model":"a","x":{"model":"n"},"mo"#);
        assert_eq!(s.model_keys(), 1);
        s.feed(br#"del":"b"}"#);
        assert_eq!(s.model_keys(), 2);
        assert_eq!(s.found(true), Found::Model("a".into()));
    }

    #[test]
    fn decides_before_the_end() {
        let mut s = Scanner::default();
        s.feed(br#"{"model":"gpt-4o","messages":[{"role":"us"#);
        assert_eq!(s.found(false), Found::Model("gpt-4o".into()));
        let mut s = Scanner::default();
        s.feed(br#"{"messages":[{"role":"us"#);
        assert_eq!(s.found(false), Found::Undecided);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use serde_json::Value;

        fn text() -> impl Strategy<Value = String> {
            let c = prop_oneof![
                any::<char>(),
                Just('"'),
                Just('\\'),
                Just('\n'),
                Just('\u{1}'),
                Just('{'),
                Just('}'),
                Just('😀'),
            ];
            proptest::collection::vec(c, 0..12).prop_map(String::from_iter)
        }

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("model".to_owned()),
                Just("Model".to_owned()),
                Just("models".to_owned()),
                text()
            ]
        }

        /// Any JSON value, with `model` keys likely in nested objects.
        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                (-1e9f64..1e9).prop_map(Value::from),
                text().prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    proptest::collection::btree_map(key(), inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// How the top-level `model` key is written: escapes that mean the same key.
        const MODEL_KEYS: [&str; 4] = [
            r#""model""#,
            r#""\u006dodel""#,
            r#""mod\u0065l""#,
            r#""m\u006Fdel""#,
        ];

        proptest! {
            #[test]
            fn agrees_with_serde_json_in_any_chunks(
                entries in proptest::collection::btree_map(key(), value(), 0..6),
                model in proptest::option::of((0usize..7, prop_oneof![
                    3 => text().prop_map(Value::from),
                    1 => value(),
                ], 0usize..4)),
                pretty in any::<bool>(),
                cuts in proptest::collection::vec(any::<usize>(), 0..6),
            ) {
                let ws = if pretty { "\n  " } else { "" };
                let mut parts: Vec<String> = entries
                    .iter()
                    .filter(|(k, _)| k.as_str() != "model")
                    .map(|(k, v)| format!("{ws}{}{ws}:{ws}{}", serde_json::to_string(k).unwrap(),
                        if pretty { serde_json::to_string_pretty(v).unwrap() } else { v.to_string() }))
                    .collect();
                if let Some((at, v, spelling)) = &model {
                    let at = (*at).min(parts.len());
                    parts.insert(at, format!("{ws}{}:{ws}{v}", MODEL_KEYS[*spelling]));
                }
                let text = format!("{{{}{ws}}}", parts.join(","));
                // What a real parser makes of it.
                let parsed: Value = serde_json::from_str(&text).unwrap();
                let expected = match parsed.get("model") {
                    None => Found::NoModel,
                    Some(Value::String(m)) if m.len() <= MAX_MODEL_LEN => Found::Model(m.clone()),
                    Some(_) => Found::Unreadable,
                };
                let bytes = text.as_bytes();
                let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
                points.sort_unstable();
                let mut scanner = Scanner::default();
                let mut from = 0;
                for p in points.into_iter().chain([bytes.len()]) {
                    scanner.feed(&bytes[from..p]);
                    from = p;
                }
                prop_assert_eq!(scanner.found(true), expected, "{}", text);
                prop_assert_eq!(scanner.model_keys(), u32::from(model.is_some()));
            }

            #[test]
            fn any_bytes_are_scanned_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let mut scanner = Scanner::default();
                scanner.feed(&bytes);
                let _ = scanner.found(true);
            }
        }
    }
}
