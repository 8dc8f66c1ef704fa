//! Query-string surgery shared by the layers: find and remove parameters while every
//! other byte of the query stays exactly as the client sent it.

use std::borrow::Cow;

use http::Uri;
use http::uri::PathAndQuery;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, percent_encode};

/// What stays unencoded in a parameter the layers write: RFC 3986's unreserved characters.
/// Everything else, reserved characters (`&`, `=`, `+`, `#` …) included, is percent-encoded,
/// so a written value never changes how the rest of the query parses.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// One `&`-separated segment of a raw query: its raw name and raw value.
fn split(segment: &str) -> (&str, &str) {
    segment.split_once('=').unwrap_or((segment, ""))
}

/// Whether the segment's name, percent-decoded, is `name`.
fn name_is(raw_name: &str, name: &str) -> bool {
    if raw_name.contains('%') {
        percent_decode_str(raw_name).eq(name.bytes())
    } else {
        raw_name == name
    }
}

/// The raw (still percent-encoded) values of every parameter called `name`.
pub(crate) fn raw_values<'q>(query: &'q str, name: &str) -> impl Iterator<Item = &'q str> {
    query.split('&').filter_map(move |segment| {
        let (raw_name, raw_value) = split(segment);
        name_is(raw_name, name).then_some(raw_value)
    })
}

/// A raw value, percent-decoded. `+` stays `+`: keys never hold spaces, and base64 keys do
/// hold plus signs.
pub(crate) fn decode(raw: &str) -> Cow<'_, [u8]> {
    percent_decode_str(raw).into()
}

/// The query with every parameter in `names` removed, or `None` when none was there.
/// The remaining segments, and their order, are kept byte for byte.
pub(crate) fn without<N: AsRef<str>>(query: &str, names: &[N]) -> Option<String> {
    let is_named = |segment: &str| names.iter().any(|n| name_is(split(segment).0, n.as_ref()));
    if !query.split('&').any(is_named) {
        return None;
    }
    let kept: Vec<&str> = query.split('&').filter(|s| !is_named(s)).collect();
    Some(kept.join("&"))
}

/// The query with every parameter called `name` removed and one `name=value` appended, the
/// value percent-encoded (RFC 3986 unreserved characters stay). Every other segment is kept
/// byte for byte, in order.
pub(crate) fn with_param(query: &str, name: &str, value: &[u8]) -> String {
    let kept = without(query, &[name]);
    let rest = kept.as_deref().unwrap_or(query);
    let mut out = String::with_capacity(rest.len() + name.len() + 3 * value.len() + 2);
    out.push_str(rest);
    if !out.is_empty() {
        out.push('&');
    }
    out.extend(percent_encode(name.as_bytes(), UNRESERVED));
    out.push('=');
    out.extend(percent_encode(value, UNRESERVED));
    out
}

/// `uri` with its query replaced by `query` (`""` drops the `?`), everything else kept.
pub(crate) fn set_query(uri: &Uri, query: &str) -> Uri {
    let path = uri.path();
    let path_and_query = if query.is_empty() {
        PathAndQuery::try_from(path)
    } else {
        PathAndQuery::try_from(format!("{path}?{query}"))
    }
    .expect("segments of a valid query with a valid path form a valid path-and-query");
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).expect("only the path-and-query changed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_values_by_decoded_name() {
        let q = "a=1&key=x%2By&k%65y=z&keys=no";
        assert_eq!(raw_values(q, "key").collect::<Vec<_>>(), ["x%2By", "z"]);
        assert_eq!(&*decode("x%2By+"), b"x+y+");
    }

    #[test]
    fn removal_keeps_everything_else_byte_for_byte() {
        assert_eq!(
            without("a=%20&key=x&b=2&&c", &["key"]).as_deref(),
            Some("a=%20&b=2&&c")
        );
        assert_eq!(without("key=x", &["key"]).as_deref(), Some(""));
        assert_eq!(without("key=x&key=y&z", &["key"]).as_deref(), Some("z"));
        assert_eq!(without("a=1", &["key"]), None);
    }

    #[test]
    fn with_param_replaces_every_copy_and_encodes_reserved_characters() {
        assert_eq!(with_param("", "key", b"a b"), "key=a%20b");
        assert_eq!(
            with_param("alt=sse&key=old&x=%2F&key=older", "key", b"k&=+/?#%~._-"),
            "alt=sse&x=%2F&key=k%26%3D%2B%2F%3F%23%25~._-"
        );
        assert_eq!(with_param("key=old", "key", b"new"), "key=new");
        assert_eq!(
            with_param("a=1&a=2", "api-version", b"2024-10-21"),
            "a=1&a=2&api-version=2024-10-21"
        );
        assert_eq!(with_param("k%65y=old&b", "key", b"v"), "b&key=v");
    }

    #[test]
    fn set_query_keeps_scheme_and_authority() {
        let uri: Uri = "http://h:1/p/q?key=1".parse().unwrap();
        assert_eq!(set_query(&uri, ""), "http://h:1/p/q");
        assert_eq!(set_query(&uri, "a=1"), "http://h:1/p/q?a=1");
        let uri: Uri = "/p".parse().unwrap();
        assert_eq!(set_query(&uri, "a=1"), "/p?a=1");
    }
}
