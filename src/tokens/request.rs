//! Asking a streamed OpenAI chat completion for its usage: `stream_options.include_usage`.

use bytes::Bytes;
use serde_json::Value;

/// For a JSON chat request body with `"stream":true` whose `stream_options.include_usage`
/// is not `true`, the body with it set: `"stream_options":{"include_usage":true}` added
/// after the last member, or `"include_usage":true` put into an existing `stream_options`
/// object (replacing a `false` or `null` one: a client must not be able to opt out of
/// being counted). `None` when nothing was changed: not a JSON object, not a stream,
/// already asked for, or not safely rewritable (`stream_options` not an object, a key that
/// appears twice).
///
/// Every other byte stays as it was. When this returns a body, the client did not ask for
/// the usage-only chunk: hide it ([`UsageBody::hide_usage_chunk`](super::UsageBody::hide_usage_chunk)).
pub(crate) fn include_usage(body: &[u8]) -> Option<Bytes> {
    let value: Value = serde_json::from_slice(body).ok()?;
    if value.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    let root = members(body, first_non_ws(body, 0)?)?;
    let options: Vec<_> = root
        .members
        .iter()
        .filter(|m| m.key == "stream_options")
        .collect();
    let (at, insert, cut) = match options.as_slice() {
        [] => {
            let last = root.members.last()?;
            (
                last.value.end,
                &br#","stream_options":{"include_usage":true}"#[..],
                0,
            )
        }
        [options] => match body[options.value.start] {
            b'n' => (
                options.value.start,
                &br#"{"include_usage":true}"#[..],
                options.value.len(),
            ),
            b'{' => {
                let inner = members(body, options.value.start)?;
                let flags: Vec<_> = inner
                    .members
                    .iter()
                    .filter(|m| m.key == "include_usage")
                    .collect();
                match flags.as_slice() {
                    [] if inner.members.is_empty() => {
                        (options.value.start + 1, &br#""include_usage":true"#[..], 0)
                    }
                    [] => (options.value.start + 1, &br#""include_usage":true,"#[..], 0),
                    [flag] if &body[flag.value.clone()] == b"true" => return None,
                    [flag] => (flag.value.start, &b"true"[..], flag.value.len()),
                    _ => return None,
                }
            }
            _ => return None,
        },
        _ => return None,
    };
    let mut out = Vec::with_capacity(body.len() + insert.len());
    out.extend_from_slice(&body[..at]);
    out.extend_from_slice(insert);
    out.extend_from_slice(&body[at + cut..]);
    Some(Bytes::from(out))
}

struct Member {
    key: String,
    value: std::ops::Range<usize>,
}

struct Object {
    members: Vec<Member>,
}

fn first_non_ws(s: &[u8], from: usize) -> Option<usize> {
    (from..s.len()).find(|&i| !matches!(s[i], b' ' | b'\t' | b'\n' | b'\r'))
}

/// The members of the object whose `{` is at `at`, in `s` (valid JSON, checked before).
fn members(s: &[u8], at: usize) -> Option<Object> {
    if s.get(at) != Some(&b'{') {
        return None;
    }
    let mut members = Vec::new();
    let mut i = first_non_ws(s, at + 1)?;
    if s[i] == b'}' {
        return Some(Object { members });
    }
    loop {
        let key_end = skip_value(s, i)?;
        let key: String = serde_json::from_slice(&s[i..key_end]).ok()?;
        i = first_non_ws(s, key_end)?;
        if s[i] != b':' {
            return None;
        }
        let start = first_non_ws(s, i + 1)?;
        let end = skip_value(s, start)?;
        members.push(Member {
            key,
            value: start..end,
        });
        i = first_non_ws(s, end)?;
        match s[i] {
            b',' => i = first_non_ws(s, i + 1)?,
            b'}' => return Some(Object { members }),
            _ => return None,
        }
    }
}

/// The end of the (valid) JSON value starting at `at`.
fn skip_value(s: &[u8], at: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = at;
    loop {
        match *s.get(i)? {
            b'"' => {
                i += 1;
                loop {
                    match *s.get(i)? {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
                i += 1;
            }
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                i += 1;
            }
            _ if depth == 0 => {
                while i < s.len()
                    && !matches!(s[i], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                {
                    i += 1;
                }
                return Some(i);
            }
            _ => i += 1,
        }
        if depth == 0 {
            return Some(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(body: &str) -> Option<String> {
        include_usage(body.as_bytes()).map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn adds_the_option_to_a_stream() {
        assert_eq!(
            rewrite(r#"{"model":"gpt-4o","stream":true,"messages":[]}"#).as_deref(),
            Some(
                r#"{"model":"gpt-4o","stream":true,"messages":[],"stream_options":{"include_usage":true}}"#
            )
        );
        assert_eq!(
            rewrite("{\n  \"stream\" : true\n}\n").as_deref(),
            Some("{\n  \"stream\" : true,\"stream_options\":{\"include_usage\":true}\n}\n")
        );
        assert_eq!(
            rewrite(r#"{"stream":true,"stream_options":{}}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#)
        );
        assert_eq!(
            rewrite(r#"{"stream_options":{"include_obfuscation":false},"stream":true}"#).as_deref(),
            Some(
                r#"{"stream_options":{"include_usage":true,"include_obfuscation":false},"stream":true}"#
            )
        );
        assert_eq!(
            rewrite(r#"{"stream":true,"stream_options":{"include_usage":false}}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#)
        );
        assert_eq!(
            rewrite(r#"{"stream":true,"stream_options":null}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#)
        );
    }

    #[test]
    fn leaves_everything_else() {
        for body in [
            r#"{"model":"gpt-4o","messages":[]}"#,
            r#"{"stream":false}"#,
            r#"{"stream":"true"}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"stream":true,"stream_options":"x"}"#,
            r#"{"stream":true,"stream_options":{},"stream_options":{}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":false,"include_usage":false}}"#,
            r#"[{"stream":true}]"#,
            "not json",
            "",
        ] {
            assert_eq!(rewrite(body), None, "{body}");
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                ".{0,8}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 16, 4, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    proptest::collection::btree_map(".{0,6}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            /// Whatever else the body holds, the rewrite is the same body with the option
            /// set, and only when the stream did not already ask for it.
            #[test]
            fn the_rewrite_sets_the_option_and_keeps_the_rest(
                mut body in proptest::collection::btree_map("[a-z_]{1,8}", value(), 0..5),
                stream in any::<bool>(),
                options in proptest::option::of(prop_oneof![
                    Just(Value::Null),
                    Just(serde_json::json!({})),
                    Just(serde_json::json!({"include_usage": true})),
                    Just(serde_json::json!({"include_usage": false, "x": 1})),
                ]),
                pretty in any::<bool>(),
            ) {
                body.insert("stream".into(), Value::Bool(stream));
                body.remove("stream_options");
                if let Some(o) = &options {
                    body.insert("stream_options".into(), o.clone());
                }
                let value = Value::Object(body.into_iter().collect());
                let text = if pretty { serde_json::to_string_pretty(&value).unwrap() } else { value.to_string() };
                let asked = value["stream_options"]["include_usage"] == Value::Bool(true);
                match include_usage(text.as_bytes()) {
                    Some(rewritten) => {
                        prop_assert!(stream && !asked);
                        let mut got: Value = serde_json::from_slice(&rewritten).unwrap();
                        prop_assert_eq!(&got["stream_options"]["include_usage"], &Value::Bool(true));
                        // Take the option out again: the rest is what was sent.
                        let mut want = value.clone();
                        let strip = |v: &mut Value| {
                            if let Some(o) = v.get_mut("stream_options").and_then(Value::as_object_mut) {
                                o.remove("include_usage");
                            }
                        };
                        strip(&mut got);
                        strip(&mut want);
                        if want["stream_options"].is_null() {
                            want.as_object_mut().unwrap().insert("stream_options".into(), serde_json::json!({}));
                        }
                        prop_assert_eq!(got, want);
                    }
                    None => prop_assert!(!stream || asked),
                }
            }
        }
    }
}
