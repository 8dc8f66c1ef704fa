//! Which models a key may use: [`ModelList`] and its `*` globs.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The models a key may use: exact names and `*` globs (`gpt-4o*`, `claude-*-sonnet*`).
///
/// An empty list allows no model at all; a key with no list (`None` on its record) may use
/// any model. Names are compared as given, case-sensitively, as providers compare them.
///
/// ```
/// use tower_gateway_auth::limit::ModelList;
///
/// let models = ModelList::new(["gpt-4o*", "claude-3-5-haiku-latest"]);
/// assert!(models.allows("gpt-4o-mini"));
/// assert!(models.allows("claude-3-5-haiku-latest"));
/// assert!(!models.allows("gpt-4"));
/// assert!(!ModelList::new(Vec::<String>::new()).allows("gpt-4o"));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ModelList(Arc<[Box<str>]>);

impl ModelList {
    /// The given names and globs.
    pub fn new<I, S>(models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ModelList(models.into_iter().map(|m| m.into().into()).collect())
    }

    /// Whether `model` is named or matched by a glob.
    pub fn allows(&self, model: &str) -> bool {
        self.0.iter().any(|pattern| glob_matches(pattern, model))
    }

    /// Whether every model `pattern` (a name or a glob) matches is allowed by this list:
    /// one of its entries matches `pattern`'s text, reading `pattern`'s `*` as a plain
    /// character. That is sound: an entry's literal characters can then only have met
    /// `pattern`'s literal characters, so whatever `pattern`'s stars stand for falls under
    /// the entry's stars. (`gpt-4*` covers `gpt-4o*` and `gpt-4o-mini`; `gpt-4o*` does not
    /// cover `gpt-4*`.)
    ///
    /// ```
    /// use tower_gateway_auth::limit::ModelList;
    ///
    /// let parent = ModelList::new(["gpt-4*", "claude-3-5-haiku-latest"]);
    /// assert!(parent.covers("gpt-4o*"));
    /// assert!(parent.covers("claude-3-5-haiku-latest"));
    /// assert!(!parent.covers("gpt-*"));
    /// assert!(!parent.covers("claude-*"));
    /// ```
    pub fn covers(&self, pattern: &str) -> bool {
        self.allows(pattern)
    }

    /// The names and globs, as given.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.0.iter().map(|m| &**m)
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the list is empty (allows nothing).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for ModelList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for ModelList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for ModelList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(ModelList::new(Vec::<String>::deserialize(d)?))
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters (bytes:
/// both are UTF-8, and `*` is ASCII, so a byte match is a character match).
fn glob_matches(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and where in `text` its run currently ends.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, t, ok) in [
            ("gpt-4o*", "gpt-4o", true),
            ("gpt-4o*", "gpt-4o-mini", true),
            ("gpt-4o*", "gpt-4", false),
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("claude-*-sonnet*", "claude-3-5-sonnet-latest", true),
            ("claude-*-sonnet*", "claude-3-5-haiku", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("gpt-4o", "gpt-4o-mini", false),
            ("*mini", "gpt-4o-mini", true),
        ] {
            assert_eq!(glob_matches(p, t), ok, "{p} {t}");
        }
    }
}
