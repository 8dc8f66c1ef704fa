//! Header-map helpers shared by the layers and the proxy.

use http::{HeaderMap, HeaderName};

/// Maps with more distinct names than this are not scanned first: see [`remove_all`].
const SCAN_LIMIT: usize = 16;

/// Removes every header in `names` from `headers`.
///
/// A message usually carries a handful of headers and none of the names being removed. One
/// pass comparing names (a byte or a length apart, most of them) tells whether there is
/// anything to remove for less than hashing every name for a lookup, which `remove` does.
pub(crate) fn remove_all<'a, I>(headers: &mut HeaderMap, names: I)
where
    I: IntoIterator<Item = &'a HeaderName>,
    I::IntoIter: Clone,
{
    let names = names.into_iter();
    if headers.keys_len() <= SCAN_LIMIT
        && !headers
            .keys()
            .any(|present| names.clone().any(|name| name == present))
    {
        return;
    }
    for name in names {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_every_named_header_from_small_and_large_maps() {
        let names = [
            HeaderName::from_static("x-api-key"),
            http::header::AUTHORIZATION,
            HeaderName::from_static("api-key"),
        ];
        for filler in [0, 3, SCAN_LIMIT + 5] {
            let mut headers = HeaderMap::new();
            for i in 0..filler {
                headers.insert(
                    HeaderName::try_from(format!("x-filler-{i}")).unwrap(),
                    "1".parse().unwrap(),
                );
            }
            headers.append("x-api-key", "a".parse().unwrap());
            headers.append("x-api-key", "b".parse().unwrap());
            headers.insert("authorization", "Bearer c".parse().unwrap());
            headers.insert("content-type", "text/plain".parse().unwrap());
            remove_all(&mut headers, &names);
            assert_eq!(headers.len(), filler + 1, "with {filler} other headers");
            assert!(headers.contains_key("content-type"));
            assert!(names.iter().all(|n| !headers.contains_key(n)));

            let before = headers.clone();
            remove_all(&mut headers, &names);
            assert_eq!(headers, before, "nothing to remove: nothing removed");
        }
    }
}
