//! Dot segments: the path pieces (`.`, `..`) that would move a request out of the base path
//! it was routed to, once an upstream resolves them.

/// Whether `path` has a dot segment an upstream could resolve: a segment that is `.` or `..`,
/// written raw or percent-encoded (`%2e`, in any case, alone or mixed with `.`).
///
/// The segment boundaries are the ones some upstream might honor, not only `/`: a backslash
/// and the encoded slashes `%2F` and `%5C` (servers that decode them before resolving, or
/// treat `\` as `/`), and a segment's `;parameters` are ignored (`..;/` is `..` to servers
/// that strip path parameters). Dots inside a name (`a..b`, `.well-known`) are not dot
/// segments.
///
/// [`Forward`](super::Forward) refuses such paths with 400; a router in front of it should
/// refuse them too, before choosing the route, so that a path cannot select one route and
/// then reach another.
///
/// ```
/// use tower_gateway_auth::proxy::has_dot_segment;
///
/// assert!(has_dot_segment("/azure/../other/chat"));
/// assert!(has_dot_segment("/v1/%2E%2e/x"));
/// assert!(has_dot_segment("/v1/.%2e%2fx"));
/// assert!(has_dot_segment("/v1/..;/x"));
/// assert!(!has_dot_segment("/v1/files/a..b/.well-known"));
/// ```
pub fn has_dot_segment(path: &str) -> bool {
    // Most paths have no `.` at all, nor a `%2e` (which needs a `%`).
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return false;
    }
    segments(path.as_bytes()).any(is_dot_segment)
}

/// `path` cut at `/`, `\`, `%2F` and `%5C` (any case).
fn segments(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = path;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut i = 0;
        while i < rest.len() {
            let separator = match rest[i] {
                b'/' | b'\\' => 1,
                b'%' if rest.len() >= i + 3
                    && (rest[i + 1] == b'2' && rest[i + 2].eq_ignore_ascii_case(&b'f')
                        || rest[i + 1] == b'5' && rest[i + 2].eq_ignore_ascii_case(&b'c')) =>
                {
                    3
                }
                _ => 0,
            };
            if separator > 0 {
                let segment = &rest[..i];
                rest = &rest[i + separator..];
                return Some(segment);
            }
            i += 1;
        }
        done = true;
        Some(rest)
    })
}

/// `.` or `..`, each dot raw or as `%2e`, before any `;parameters`.
fn is_dot_segment(segment: &[u8]) -> bool {
    let segment = match segment.iter().position(|&b| b == b';') {
        Some(at) => &segment[..at],
        None => segment,
    };
    let mut dots = 0;
    let mut i = 0;
    while i < segment.len() {
        if segment[i] == b'.' {
            i += 1;
        } else if segment[i..].len() >= 3
            && segment[i + 1] == b'2'
            && segment[i + 2].eq_ignore_ascii_case(&b'e')
            && segment[i] == b'%'
        {
            i += 3;
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_in_every_spelling() {
        for path in [
            "/..",
            "/.",
            "/a/../b",
            "/a/./b",
            "..",
            "/a/..",
            "/%2e%2e/b",
            "/%2E%2E/b",
            "/%2e%2E/b",
            "/.%2e/b",
            "/%2e./b",
            "/%2e/b",
            "/..%2fb",
            "/..%2Fb",
            "/a%2f..%2fb",
            "/..%5cb",
            "/..%5Cb",
            "/..\\b",
            "/a\\..\\b",
            "/..;/b",
            "/%2e%2e;x=1/b",
            "/a/.;x",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "/",
            "",
            "/v1/chat/completions",
            "/a..b",
            "/...",
            "/.well-known/x",
            "/a/b.",
            "/%2e%2e%2e",
            "/%2",
            "/%",
            "/a%2fb",
            "/x;..",
            "/%252e%252e/b",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }
}
