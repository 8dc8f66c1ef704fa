//! Where a client's key is looked for, and how it is read out of the request.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use http::{HeaderMap, HeaderName, Uri};

use crate::query_string;
use crate::rejection::{Rejection, RejectionKind};

/// One place a client may put its key.
///
/// Sources parse from strings, as a configuration file would name them:
///
/// ```
/// use tower_gateway_auth::inbound::KeySource;
///
/// let sources: Vec<KeySource> = ["header:x-api-key", "bearer", "query:key"]
///     .iter()
///     .map(|s| s.parse().unwrap())
///     .collect();
/// assert_eq!(sources[1], KeySource::Bearer);
/// assert!("cookie:key".parse::<KeySource>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySource {
    /// A header whose whole value is the key, e.g. `X-API-Key`.
    Header(HeaderName),
    /// `Authorization: Bearer <key>`; the scheme is matched case-insensitively (RFC 9110).
    Bearer,
    /// A query parameter, percent-decoded.
    Query(Arc<str>),
    /// An entry of `Sec-WebSocket-Protocol` made of this prefix and the key, e.g.
    /// `openai-insecure-api-key.<key>` ([`DEFAULT_SUBPROTOCOL_PREFIX`]), as a browser's
    /// `new WebSocket(url, ["realtime", "openai-insecure-api-key." + key])` sends it. Only
    /// that entry is removed from the header; the other subprotocols go on. See [the module
    /// docs](super#which-sources-are-weaker) for why it is weaker than a header.
    Subprotocol(Arc<str>),
}

/// The prefix of [`KeySource::Subprotocol`] by default: OpenAI's, for browser clients of
/// its realtime API.
pub const DEFAULT_SUBPROTOCOL_PREFIX: &str = "openai-insecure-api-key.";

impl KeySource {
    /// A header source.
    pub fn header(name: HeaderName) -> Self {
        KeySource::Header(name)
    }

    /// A query-parameter source.
    pub fn query(name: impl Into<Arc<str>>) -> Self {
        KeySource::Query(name.into())
    }

    /// A `Sec-WebSocket-Protocol` source with entries `prefix<key>`.
    ///
    /// # Panics
    /// When `prefix` is empty or holds a character a subprotocol token cannot have.
    pub fn subprotocol(prefix: impl Into<Arc<str>>) -> Self {
        let prefix = prefix.into();
        assert!(
            is_token(prefix.as_bytes()),
            "a subprotocol prefix is a non-empty token"
        );
        KeySource::Subprotocol(prefix)
    }

    /// The header this source reads its whole value of, if it reads one (not the
    /// subprotocol source: it reads one entry of its header).
    pub fn header_name(&self) -> Option<&HeaderName> {
        match self {
            KeySource::Header(name) => Some(name),
            KeySource::Bearer => Some(&AUTHORIZATION),
            KeySource::Query(_) | KeySource::Subprotocol(_) => None,
        }
    }

    /// The prefix of this source's `Sec-WebSocket-Protocol` entries, if it is a subprotocol
    /// source.
    pub fn subprotocol_prefix(&self) -> Option<&str> {
        match self {
            KeySource::Subprotocol(prefix) => Some(prefix),
            _ => None,
        }
    }

    /// The query parameter this source reads, if it reads one.
    pub fn query_name(&self) -> Option<&str> {
        match self {
            KeySource::Query(name) => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Header(name) => write!(f, "the {name} header"),
            KeySource::Bearer => f.write_str("an Authorization: Bearer token"),
            KeySource::Query(name) => write!(f, "the `{name}` query parameter"),
            KeySource::Subprotocol(prefix) => {
                write!(f, "a `{prefix}` entry of Sec-WebSocket-Protocol")
            }
        }
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Header(name) => write!(f, "header:{name}"),
            KeySource::Bearer => f.write_str("bearer"),
            KeySource::Query(name) => write!(f, "query:{name}"),
            KeySource::Subprotocol(prefix) => write!(f, "subprotocol:{prefix}"),
        }
    }
}

/// The error when a string names no [`KeySource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseKeySourceError(String);

impl fmt::Display for ParseKeySourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown key source `{}`: expected `header:NAME`, `bearer`, `query:NAME`, \
             `subprotocol` or `subprotocol:PREFIX`",
            self.0
        )
    }
}

impl std::error::Error for ParseKeySourceError {}

impl FromStr for KeySource {
    type Err = ParseKeySourceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseKeySourceError(s.to_owned());
        if s.eq_ignore_ascii_case("bearer") {
            return Ok(KeySource::Bearer);
        }
        if s == "subprotocol" {
            return Ok(KeySource::subprotocol(DEFAULT_SUBPROTOCOL_PREFIX));
        }
        match s.split_once(':') {
            Some(("subprotocol", prefix)) if is_token(prefix.as_bytes()) => {
                Ok(KeySource::subprotocol(prefix))
            }
            Some(("header", name)) => HeaderName::try_from(name)
                .map(KeySource::Header)
                .map_err(|_| err()),
            Some(("query", name)) if !name.is_empty() => Ok(KeySource::query(name)),
            _ => Err(err()),
        }
    }
}

/// A key found in a request, and which sources carried it (bit `i` for source `i`).
pub(crate) struct Presented<'r> {
    /// Visible ASCII only (`check_key`): text, kept as bytes until text is asked for.
    pub(crate) key: Cow<'r, [u8]>,
    pub(crate) carriers: u32,
}

impl Presented<'_> {
    /// The key as text: the lookup needs only its bytes, a checksum or a token its text.
    pub(crate) fn text(&self) -> &str {
        std::str::from_utf8(&self.key).expect("check_key lets visible ASCII only through")
    }
}

/// The most sources a layer takes: `carriers` is a 32-bit set.
pub(crate) const MAX_SOURCES: usize = 32;

/// Reads the key out of the request: `Ok(None)` when no source carries one, an error when a
/// credential is malformed, too long, or when sources disagree.
///
/// The helpers on the way return small values (a slice, a one-byte [`Fault`]) and build a
/// [`Rejection`] only when one is due: a `Result` carrying a `Rejection` is returned through
/// memory, and on the accepting path those round trips cost more than reading the key.
pub(crate) fn find<'r>(
    headers: &'r HeaderMap,
    uri: &'r Uri,
    sources: &[KeySource],
    max_len: usize,
) -> Result<Option<Presented<'r>>, Rejection> {
    let mut found: Option<(Presented<'r>, usize)> = None;
    for (i, source) in sources.iter().enumerate() {
        // `Err(first)`: the key differs from the one source `first` carried.
        let mut offer = |candidate: Cow<'r, [u8]>| -> Result<(), usize> {
            match &mut found {
                None => {
                    found = Some((
                        Presented {
                            key: candidate,
                            carriers: 1 << i,
                        },
                        i,
                    ));
                }
                Some((presented, _)) if presented.key == candidate => presented.carriers |= 1 << i,
                Some((_, first)) => return Err(*first),
            }
            Ok(())
        };
        let fault = |fault: Fault| fault.rejection(source, max_len);
        let disagree = |first: usize| ambiguous(&sources[first], source);
        match source {
            KeySource::Header(name) => {
                for value in headers.get_all(name) {
                    if let Some(key) = header_key(value.as_bytes(), max_len).map_err(fault)? {
                        offer(Cow::Borrowed(key)).map_err(disagree)?;
                    }
                }
            }
            KeySource::Bearer => {
                for value in headers.get_all(AUTHORIZATION) {
                    if let Some(token) = bearer_token(value.as_bytes()) {
                        let token = token.ok_or(Fault::EmptyBearer).map_err(fault)?;
                        if let Some(key) = header_key(token, max_len).map_err(fault)? {
                            offer(Cow::Borrowed(key)).map_err(disagree)?;
                        }
                    }
                }
            }
            KeySource::Subprotocol(prefix) => {
                for entry in subprotocols(headers) {
                    if let Some(key) = entry.strip_prefix(prefix.as_bytes()) {
                        if key.is_empty() {
                            return Err(malformed(format!(
                                "The `{prefix}` entry of Sec-WebSocket-Protocol carries no key."
                            )));
                        }
                        if let Some(key) = header_key(key, max_len).map_err(fault)? {
                            offer(Cow::Borrowed(key)).map_err(disagree)?;
                        }
                    }
                }
            }
            KeySource::Query(name) => {
                let Some(q) = uri.query() else { continue };
                for raw in query_string::raw_values(q, name) {
                    // Encoded, a key is at most three times its length: a cheap early bound.
                    if raw.len() > max_len.saturating_mul(3) {
                        return Err(fault(Fault::TooLong));
                    }
                    let decoded = query_string::decode(raw);
                    if decoded.is_empty() {
                        continue;
                    }
                    check_key(&decoded, max_len).map_err(fault)?;
                    offer(decoded).map_err(disagree)?;
                }
            }
        }
    }
    Ok(found.map(|(presented, _)| presented))
}

/// Every entry of every `Sec-WebSocket-Protocol` value (a comma-separated list of tokens),
/// trimmed; empty entries skipped.
fn subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|entry| !entry.is_empty())
}

/// Whether `s` is an RFC 9110 token (what a subprotocol is, RFC 6455 §4.1).
fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Removes the entries starting with one of `prefixes` from `Sec-WebSocket-Protocol`,
/// keeping the others in order (joined into one value); removes the header when none is
/// left. Values that are not visible ASCII are left as they are.
pub(crate) fn strip_subprotocols<P: AsRef<str>>(headers: &mut HeaderMap, prefixes: &[P]) {
    if prefixes.is_empty() || !headers.contains_key(SEC_WEBSOCKET_PROTOCOL) {
        return;
    }
    let ours = |entry: &[u8]| {
        prefixes
            .iter()
            .any(|p| entry.starts_with(p.as_ref().as_bytes()))
    };
    if !subprotocols(headers).any(ours) {
        return;
    }
    let kept: Vec<&[u8]> = subprotocols(headers).filter(|e| !ours(e)).collect();
    let joined = kept.join(&b", "[..]);
    if joined.is_empty() {
        headers.remove(SEC_WEBSOCKET_PROTOCOL);
    } else {
        let value = http::HeaderValue::from_bytes(&joined)
            .expect("entries of a valid header value joined by \", \" are valid");
        headers.insert(SEC_WEBSOCKET_PROTOCOL, value);
    }
}

/// A header value as a key: surrounding whitespace trimmed, `None` when empty.
fn header_key(value: &[u8], max_len: usize) -> Result<Option<&[u8]>, Fault> {
    let value = value.trim_ascii();
    if value.is_empty() {
        return Ok(None);
    }
    check_key(value, max_len).map(|()| Some(value))
}

/// What is wrong with a credential as read, before any source is named in a message.
#[derive(Debug, Clone, Copy)]
enum Fault {
    TooLong,
    Malformed,
    EmptyBearer,
}

impl Fault {
    /// The rejection for this fault of a credential in `source`.
    #[cold]
    fn rejection(self, source: &KeySource, max_len: usize) -> Rejection {
        match self {
            Fault::TooLong => too_long(source, max_len),
            Fault::Malformed => malformed(format!(
                "The API key in {source} holds characters an API key cannot have (spaces, control or non-ASCII characters)."
            )),
            Fault::EmptyBearer => {
                malformed("The Authorization header uses the Bearer scheme but carries no token.")
            }
        }
    }
}

/// The bound and the alphabet every key must meet: at most `max_len` bytes of visible ASCII.
/// The length is checked first, so an oversized credential costs nothing more.
#[inline]
fn check_key(key: &[u8], max_len: usize) -> Result<(), Fault> {
    if key.len() > max_len {
        return Err(Fault::TooLong);
    }
    if !all_visible_ascii(key) {
        return Err(Fault::Malformed);
    }
    Ok(())
}

/// Whether every byte is visible ASCII (`!` to `~`). A fold without an early exit, so the
/// compiler checks 16 bytes at a time: a key is read once here and once by `from_utf8`.
fn all_visible_ascii(bytes: &[u8]) -> bool {
    !bytes
        .iter()
        .fold(false, |bad, &b| bad | (b.wrapping_sub(b'!') > b'~' - b'!'))
}

/// Splits an `Authorization` value: `None` when the scheme is not Bearer (another scheme is
/// not ours to judge), `Some(None)` for a Bearer with no token, else the token.
fn bearer_token(value: &[u8]) -> Option<Option<&[u8]>> {
    let value = value.trim_ascii();
    let (scheme, rest) = match value.iter().position(|&b| b == b' ' || b == b'\t') {
        Some(at) => (&value[..at], value[at..].trim_ascii_start()),
        None => (value, &b""[..]),
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    Some((!rest.is_empty()).then_some(rest))
}

fn malformed(message: impl Into<Cow<'static, str>>) -> Rejection {
    Rejection::new(RejectionKind::MalformedKey, message)
}

fn too_long(source: &KeySource, max_len: usize) -> Rejection {
    Rejection::new(
        RejectionKind::KeyTooLong,
        format!("The API key in {source} is longer than {max_len} bytes."),
    )
}

#[cold]
fn ambiguous(first: &KeySource, second: &KeySource) -> Rejection {
    let message = if first == second {
        format!("More than one different API key was sent in {first}; send exactly one.")
    } else {
        format!("Different API keys were sent in {first} and {second}; send exactly one.")
    };
    Rejection::new(RejectionKind::AmbiguousKey, message)
}

/// Removes the credentials named by `carriers` from the request, so the inner service never
/// sees them. Other query parameters are kept byte for byte.
pub(crate) fn hide<B>(req: &mut http::Request<B>, sources: &[KeySource], carriers: u32) {
    let headers = req.headers_mut();
    let mut query_names: Vec<&str> = Vec::new();
    let mut prefixes: Vec<&str> = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        if carriers & (1 << i) == 0 {
            continue;
        }
        match source {
            KeySource::Header(name) => {
                headers.remove(name);
            }
            KeySource::Bearer => {
                headers.remove(AUTHORIZATION);
            }
            KeySource::Query(name) => query_names.push(name),
            KeySource::Subprotocol(prefix) => prefixes.push(prefix),
        }
    }
    strip_subprotocols(headers, &prefixes);
    if query_names.is_empty() {
        return;
    }
    if let Some(rest) = req
        .uri()
        .query()
        .and_then(|q| query_string::without(q, &query_names))
    {
        *req.uri_mut() = query_string::set_query(req.uri(), &rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn sources() -> Vec<KeySource> {
        vec![
            KeySource::Header(HeaderName::from_static("x-api-key")),
            KeySource::Bearer,
            KeySource::query("key"),
            KeySource::subprotocol(DEFAULT_SUBPROTOCOL_PREFIX),
        ]
    }

    #[test]
    fn the_key_alphabet_is_visible_ascii_exactly() {
        for b in 0..=u8::MAX {
            assert_eq!(
                all_visible_ascii(&[b]),
                b.is_ascii_graphic(),
                "byte {b:#04x}"
            );
            // At every position of a run longer than the 16 bytes checked at once.
            for at in [0, 15, 16, 39] {
                let mut key = [b'a'; 40];
                key[at] = b;
                assert_eq!(
                    all_visible_ascii(&key),
                    b.is_ascii_graphic(),
                    "byte {b:#04x} at {at}"
                );
            }
        }
        assert!(all_visible_ascii(b""));
    }

    fn run(headers: &[(&str, &str)], uri: &str) -> Result<Option<(String, u32)>, RejectionKind> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::try_from(*k).unwrap(),
                HeaderValue::from_bytes(v.as_bytes()).unwrap(),
            );
        }
        let uri: Uri = uri.parse().unwrap();
        find(&map, &uri, &sources(), 64)
            .map(|p| p.map(|p| (p.text().to_owned(), p.carriers)))
            .map_err(|r| r.kind())
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_whitespace_tolerant() {
        for v in [
            "Bearer k1",
            "bearer k1",
            "BEARER   k1  ",
            "  Bearer\tk1",
            "bEaReR k1",
        ] {
            assert_eq!(
                run(&[("authorization", v)], "/"),
                Ok(Some(("k1".into(), 2))),
                "{v}"
            );
        }
        assert_eq!(run(&[("authorization", "Basic abc")], "/"), Ok(None));
        assert_eq!(
            run(&[("authorization", "Bearer")], "/"),
            Err(RejectionKind::MalformedKey)
        );
        assert_eq!(
            run(&[("authorization", "Bearer a b")], "/"),
            Err(RejectionKind::MalformedKey)
        );
        assert_eq!(run(&[("authorization", "Bearerk1")], "/"), Ok(None));
    }

    #[test]
    fn ambiguity_is_rejected_but_the_same_key_twice_is_fine() {
        assert_eq!(
            run(&[("x-api-key", "a"), ("x-api-key", "b")], "/"),
            Err(RejectionKind::AmbiguousKey)
        );
        assert_eq!(run(&[], "/?key=a&key=b"), Err(RejectionKind::AmbiguousKey));
        assert_eq!(
            run(&[("x-api-key", "a"), ("authorization", "Bearer b")], "/"),
            Err(RejectionKind::AmbiguousKey)
        );
        assert_eq!(
            run(
                &[("x-api-key", "a"), ("authorization", "Bearer a")],
                "/?key=a"
            ),
            Ok(Some(("a".into(), 0b111)))
        );
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(run(&[], "/?x=1&key=a%2Bb+c"), Ok(Some(("a+b+c".into(), 4))));
        assert_eq!(run(&[], "/?key=a%20b"), Err(RejectionKind::MalformedKey));
        assert_eq!(run(&[], "/?key=%FF"), Err(RejectionKind::MalformedKey));
        assert_eq!(run(&[], "/?key="), Ok(None));
    }

    #[test]
    fn oversized_and_empty() {
        let long = "k".repeat(65);
        assert_eq!(
            run(&[("x-api-key", &long)], "/"),
            Err(RejectionKind::KeyTooLong)
        );
        assert_eq!(
            run(&[], &format!("/?key={long}")),
            Err(RejectionKind::KeyTooLong)
        );
        assert_eq!(run(&[("x-api-key", "  ")], "/"), Ok(None));
    }

    #[test]
    fn subprotocol_entries_carry_keys() {
        let p = |v: &str| vec![("sec-websocket-protocol", v.to_owned())];
        let run_owned = |h: Vec<(&str, String)>| {
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
            run(&h, "/")
        };
        assert_eq!(
            run_owned(p("realtime, openai-insecure-api-key.k1")),
            Ok(Some(("k1".into(), 8)))
        );
        assert_eq!(
            run_owned(p("openai-insecure-api-key.k1,realtime")),
            Ok(Some(("k1".into(), 8)))
        );
        assert_eq!(run_owned(p("realtime, openai-beta.realtime-v1")), Ok(None));
        assert_eq!(
            run_owned(p("realtime, openai-insecure-api-key.")),
            Err(RejectionKind::MalformedKey)
        );
        assert_eq!(
            run_owned(p("openai-insecure-api-key.a, openai-insecure-api-key.b")),
            Err(RejectionKind::AmbiguousKey)
        );
        assert_eq!(
            run(
                &[
                    ("sec-websocket-protocol", "openai-insecure-api-key.a"),
                    ("x-api-key", "a")
                ],
                "/"
            ),
            Ok(Some(("a".into(), 0b1001)))
        );
        let long = format!("openai-insecure-api-key.{}", "k".repeat(65));
        assert_eq!(run_owned(p(&long)), Err(RejectionKind::KeyTooLong));
    }

    #[test]
    fn only_our_subprotocol_entries_are_stripped() {
        let strip = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_str(v).unwrap());
            }
            strip_subprotocols(&mut h, &[DEFAULT_SUBPROTOCOL_PREFIX]);
            h.get_all(SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            strip(&["realtime, openai-insecure-api-key.k1, openai-beta.realtime-v1"]),
            ["realtime, openai-beta.realtime-v1"]
        );
        assert_eq!(
            strip(&["openai-insecure-api-key.k1", "realtime"]),
            ["realtime"]
        );
        assert!(strip(&["openai-insecure-api-key.k1"]).is_empty());
        // Nothing of ours: left exactly as sent.
        assert_eq!(strip(&["a,b", "c"]), ["a,b", "c"]);
    }

    #[test]
    fn subprotocol_sources_parse() {
        assert_eq!(
            "subprotocol".parse::<KeySource>().unwrap(),
            KeySource::subprotocol(DEFAULT_SUBPROTOCOL_PREFIX)
        );
        assert_eq!(
            "subprotocol:gw-key.".parse::<KeySource>().unwrap(),
            KeySource::subprotocol("gw-key.")
        );
        for bad in ["subprotocol:", "subprotocol:a b", "subprotocol:a,b"] {
            assert!(bad.parse::<KeySource>().is_err(), "{bad}");
        }
        assert_eq!(
            format!("{:?}", KeySource::subprotocol("p.")),
            "subprotocol:p."
        );
    }

    #[test]
    fn hide_removes_only_the_carriers() {
        let mut req = http::Request::builder()
            .uri("/p?z=%2F&key=a&y")
            .header("x-api-key", "a")
            .header("authorization", "Bearer a")
            .header("x-other", "1")
            .body(())
            .unwrap();
        hide(&mut req, &sources(), 0b101);
        let (headers, uri) = (req.headers(), req.uri());
        assert!(headers.get("x-api-key").is_none());
        assert!(headers.get("authorization").is_some());
        assert_eq!(uri, "/p?z=%2F&y");
    }
}
