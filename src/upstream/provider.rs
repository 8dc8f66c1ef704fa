//! Where each provider wants its credential, and the headers and query parameters that go
//! with it.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use crate::inject::HeaderRule;

/// `anthropic-version`, which Anthropic's API requires on every request.
pub const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
/// `anthropic-beta`: a comma-separated list of beta features to enable.
pub const ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");
/// `openai-organization`: which organization an OpenAI request is billed to.
pub const OPENAI_ORGANIZATION: HeaderName = HeaderName::from_static("openai-organization");
/// `openai-project`: which project an OpenAI request is billed to.
pub const OPENAI_PROJECT: HeaderName = HeaderName::from_static("openai-project");
/// The `anthropic-version` sent when the client sent none.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// Where the upstream credential goes in the request.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// `Authorization: Bearer <credential>`.
    Bearer,
    /// A header whose whole value is the credential, e.g. `x-api-key`.
    Header(HeaderName),
    /// A query parameter, percent-encoded; any parameter of that name the client sent is
    /// replaced.
    ///
    /// Prefer a header where the provider takes one: a credential in the URI shows up
    /// wherever a layer below logs or traces the URI (tower-http's `TraceLayer` does).
    Query(Arc<str>),
}

impl fmt::Debug for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Bearer => f.write_str("bearer"),
            Placement::Header(name) => write!(f, "header:{name}"),
            Placement::Query(name) => write!(f, "query:{name}"),
        }
    }
}

/// How one provider takes its credential: the [`Placement`], plus the headers and query
/// parameters its API expects.
///
/// | preset | credential | also |
/// |---|---|---|
/// | [`openai`](Self::openai) | `Authorization: Bearer` | the client's `OpenAI-Organization` / `OpenAI-Project` removed; set with [`organization`](Self::organization) / [`project`](Self::project) |
/// | [`anthropic`](Self::anthropic) | `x-api-key` | `anthropic-version: 2023-06-01` when the client sent none; `anthropic-beta` passes through |
/// | [`gemini`](Self::gemini) | `x-goog-api-key` | |
/// | [`gemini_query`](Self::gemini_query) | `?key=` | |
/// | [`azure`](Self::azure) | `api-key` | `api-version` set with [`api_version`](Self::api_version), replacing the client's |
/// | [`mistral`](Self::mistral), [`cohere`](Self::cohere), [`hugging_face`](Self::hugging_face), [`bearer`](Self::bearer) | `Authorization: Bearer` | |
/// | [`header`](Self::header) | a header of your choice | |
/// | [`query`](Self::query) | a query parameter of your choice | |
///
/// OpenAI's account headers are the gateway's to choose: they pick which organization and
/// project the gateway's key bills, so a client's copies are dropped.
///
/// Presets parse from the names a configuration file uses:
///
/// ```
/// use tower_gateway_auth::upstream::{Placement, Provider};
///
/// let anthropic: Provider = "anthropic".parse().unwrap();
/// assert_eq!(anthropic.placement(), &Placement::Header("x-api-key".parse().unwrap()));
/// let custom: Provider = "header:x-portkey-api-key".parse().unwrap();
/// assert_eq!(custom.name(), "custom");
/// let azure = "azure".parse::<Provider>().unwrap().api_version("2024-10-21");
/// # let _ = azure;
/// assert!("openia".parse::<Provider>().is_err());
/// ```
#[derive(Clone)]
pub struct Provider {
    name: Cow<'static, str>,
    placement: Placement,
    rules: Vec<HeaderRule>,
    query: Vec<(Arc<str>, Arc<str>)>,
}

impl Provider {
    fn preset(name: &'static str, placement: Placement) -> Self {
        Provider {
            name: Cow::Borrowed(name),
            placement,
            rules: Vec::new(),
            query: Vec::new(),
        }
    }

    fn header_preset(name: &'static str, header: &'static str) -> Self {
        Self::preset(name, Placement::Header(HeaderName::from_static(header)))
    }

    /// OpenAI: `Authorization: Bearer`; the client's `OpenAI-Organization` and
    /// `OpenAI-Project` are removed.
    pub fn openai() -> Self {
        Self::preset("openai", Placement::Bearer)
            .rule(HeaderRule::remove(OPENAI_ORGANIZATION))
            .rule(HeaderRule::remove(OPENAI_PROJECT))
    }

    /// Anthropic: `x-api-key`, and `anthropic-version: 2023-06-01` when the client sent none.
    pub fn anthropic() -> Self {
        Self::header_preset("anthropic", "x-api-key").rules(anthropic_rules(
            HeaderValue::from_static(DEFAULT_ANTHROPIC_VERSION),
            None,
        ))
    }

    /// Google Gemini: `x-goog-api-key`.
    pub fn gemini() -> Self {
        Self::header_preset("gemini", "x-goog-api-key")
    }

    /// Google Gemini with the key in the query: `?key=`. Prefer [`gemini`](Self::gemini)
    /// unless the client path needs it; see [`Placement::Query`].
    pub fn gemini_query() -> Self {
        Self::preset("gemini-query", Placement::Query("key".into()))
    }

    /// Azure OpenAI: `api-key`. Set the API version with [`api_version`](Self::api_version);
    /// without it the client's `api-version` passes through.
    pub fn azure() -> Self {
        Self::header_preset("azure", "api-key")
    }

    /// Mistral: `Authorization: Bearer`.
    pub fn mistral() -> Self {
        Self::preset("mistral", Placement::Bearer)
    }

    /// Cohere: `Authorization: Bearer`.
    pub fn cohere() -> Self {
        Self::preset("cohere", Placement::Bearer)
    }

    /// Hugging Face: `Authorization: Bearer`.
    pub fn hugging_face() -> Self {
        Self::preset("huggingface", Placement::Bearer)
    }

    /// Any provider taking `Authorization: Bearer`.
    pub fn bearer() -> Self {
        Self::preset("bearer", Placement::Bearer)
    }

    /// Any provider taking its credential as the whole value of header `name`.
    pub fn header(name: HeaderName) -> Self {
        Self::preset("custom", Placement::Header(name))
    }

    /// Any provider taking its credential in query parameter `name`.
    pub fn query(name: impl Into<Arc<str>>) -> Self {
        Self::preset("custom", Placement::Query(name.into()))
    }

    /// Sets `OpenAI-Organization` (OpenAI's organization id, e.g. `org-…`).
    pub fn organization(self, organization: HeaderValue) -> Self {
        self.rules(openai_rules(Some(organization), None))
    }

    /// Sets `OpenAI-Project` (OpenAI's project id, e.g. `proj_…`).
    pub fn project(self, project: HeaderValue) -> Self {
        self.rules(openai_rules(None, Some(project)))
    }

    /// Sets the `api-version` query parameter (Azure OpenAI), replacing the client's: the
    /// gateway's deployment decides which API version it speaks.
    pub fn api_version(self, version: &str) -> Self {
        self.query_param("api-version", version)
    }

    /// Sets query parameter `name` to `value` (percent-encoded), replacing the client's.
    pub fn query_param(mut self, name: impl Into<Arc<str>>, value: impl Into<Arc<str>>) -> Self {
        let name = name.into();
        self.query.retain(|(n, _)| *n != name);
        self.query.push((name, value.into()));
        self
    }

    /// Adds a header rule, applied after the client's credentials are stripped and before
    /// the provider's credential is placed.
    pub fn rule(mut self, rule: HeaderRule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Adds several header rules, in order.
    pub fn rules(mut self, rules: impl IntoIterator<Item = HeaderRule>) -> Self {
        self.rules.extend(rules);
        self
    }

    /// The preset's name (`custom` for [`header`](Self::header) and [`query`](Self::query)),
    /// used in logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the credential goes.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    pub(crate) fn header_rules(&self) -> &[HeaderRule] {
        &self.rules
    }

    pub(crate) fn query_params(&self) -> &[(Arc<str>, Arc<str>)] {
        &self.query
    }
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("placement", &self.placement)
            .field("rules", &self.rules)
            .field(
                "query",
                &self.query.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// A preset's configuration name, and the preset.
type Preset = (&'static str, fn() -> Provider);

/// The presets [`Provider`] parses from, besides `header:NAME` and `query:NAME`.
const PRESETS: [Preset; 9] = [
    ("openai", Provider::openai),
    ("anthropic", Provider::anthropic),
    ("gemini", Provider::gemini),
    ("gemini-query", Provider::gemini_query),
    ("azure", Provider::azure),
    ("mistral", Provider::mistral),
    ("cohere", Provider::cohere),
    ("huggingface", Provider::hugging_face),
    ("bearer", Provider::bearer),
];

/// The error when a string names no [`Provider`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseProviderError(String);

impl fmt::Display for ParseProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown upstream provider `{}`: expected ", self.0)?;
        for (name, _) in PRESETS {
            write!(f, "{name}, ")?;
        }
        f.write_str("header:NAME or query:NAME")
    }
}

impl std::error::Error for ParseProviderError {}

impl FromStr for Provider {
    type Err = ParseProviderError;

    /// Preset names are matched case-insensitively; header and query names as given.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseProviderError(s.to_owned());
        if let Some((kind, name)) = s.split_once(':') {
            return match kind {
                "header" => HeaderName::try_from(name)
                    .map(Provider::header)
                    .map_err(|_| err()),
                "query" if !name.is_empty() => Ok(Provider::query(name)),
                _ => Err(err()),
            };
        }
        PRESETS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(s))
            .map(|(_, make)| make())
            .ok_or_else(err)
    }
}

/// Anthropic's headers: `anthropic-version` when the client sent none, and `beta` features
/// added to the client's `anthropic-beta` list (never dropping the client's own).
pub(crate) fn anthropic_rules(version: HeaderValue, beta: Option<HeaderValue>) -> Vec<HeaderRule> {
    let mut rules = vec![HeaderRule::if_absent(ANTHROPIC_VERSION, version)];
    if let Some(beta) = beta {
        rules.push(HeaderRule::overwrite_with(ANTHROPIC_BETA, move |req| {
            merged_list(req.headers.get_all(ANTHROPIC_BETA), &beta)
        }));
    }
    rules
}

/// The items of every `values` line and of `extra`, comma-joined, each once, in order.
fn merged_list<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
    extra: &'a HeaderValue,
) -> Option<HeaderValue> {
    let mut items: Vec<&[u8]> = Vec::new();
    for line in values.into_iter().chain([extra]) {
        for item in line.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            if !item.is_empty() && !items.contains(&item) {
                items.push(item);
            }
        }
    }
    HeaderValue::from_bytes(&items.join(&b","[..])).ok()
}

/// OpenAI's account headers, each set (overwriting the client's) when given.
pub(crate) fn openai_rules(
    organization: Option<HeaderValue>,
    project: Option<HeaderValue>,
) -> Vec<HeaderRule> {
    [
        (OPENAI_ORGANIZATION, organization),
        (OPENAI_PROJECT, project),
    ]
    .into_iter()
    .filter_map(|(name, value)| Some(HeaderRule::overwrite(name, value?)))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_name() {
        let cases: [(&str, &str, Placement); 12] = [
            ("openai", "openai", Placement::Bearer),
            (
                "Anthropic",
                "anthropic",
                Placement::Header(HeaderName::from_static("x-api-key")),
            ),
            (
                "gemini",
                "gemini",
                Placement::Header(HeaderName::from_static("x-goog-api-key")),
            ),
            (
                "gemini-query",
                "gemini-query",
                Placement::Query("key".into()),
            ),
            (
                "azure",
                "azure",
                Placement::Header(HeaderName::from_static("api-key")),
            ),
            ("mistral", "mistral", Placement::Bearer),
            ("cohere", "cohere", Placement::Bearer),
            ("huggingface", "huggingface", Placement::Bearer),
            ("bearer", "bearer", Placement::Bearer),
            ("BEARER", "bearer", Placement::Bearer),
            (
                "header:X-Custom-Key",
                "custom",
                Placement::Header(HeaderName::from_static("x-custom-key")),
            ),
            (
                "query:api_key",
                "custom",
                Placement::Query("api_key".into()),
            ),
        ];
        for (text, name, placement) in cases {
            let provider: Provider = text.parse().unwrap();
            assert_eq!(
                (provider.name(), provider.placement()),
                (name, &placement),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_anything_else_and_says_what_it_takes() {
        for bad in [
            "",
            "openia",
            "header:",
            "header:bad name",
            "query:",
            "cookie:x",
            "openai:x",
        ] {
            let err = bad.parse::<Provider>().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "unknown upstream provider `{bad}`: expected openai, anthropic, gemini, \
                     gemini-query, azure, mistral, cohere, huggingface, bearer, header:NAME or \
                     query:NAME"
                )
            );
        }
    }

    #[test]
    fn a_query_param_set_twice_keeps_the_last_value() {
        let p = Provider::azure()
            .api_version("2024-02-01")
            .api_version("2024-10-21");
        assert_eq!(p.query_params().len(), 1);
        assert_eq!(&*p.query_params()[0].1, "2024-10-21");
    }
}
