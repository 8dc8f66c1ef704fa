//! [`TokenUsage`]: what one response cost, in tokens, the same way for every provider.

use serde::ser::{Serialize, SerializeStruct, Serializer};

/// The tokens one response used, normalized across providers so that the same field means
/// the same thing whoever answered.
///
/// | field | OpenAI chat | OpenAI Responses | Anthropic | Gemini |
/// |---|---|---|---|---|
/// | [`prompt`](Self::prompt) | `prompt_tokens` | `input_tokens` | `input_tokens` + `cache_creation_input_tokens` + `cache_read_input_tokens` | `promptTokenCount` + `toolUsePromptTokenCount` |
/// | [`completion`](Self::completion) | `completion_tokens` | `output_tokens` | `output_tokens` | `candidatesTokenCount` + `thoughtsTokenCount` |
/// | [`total`](Self::total) | `total_tokens` | `total_tokens` | (none: prompt + completion) | `totalTokenCount` |
/// | [`cached`](Self::cached) | `prompt_tokens_details.cached_tokens` | `input_tokens_details.cached_tokens` | `cache_read_input_tokens` | `cachedContentTokenCount` |
/// | [`reasoning`](Self::reasoning) | `completion_tokens_details.reasoning_tokens` | `output_tokens_details.reasoning_tokens` | (none) | `thoughtsTokenCount` |
/// | [`cache_creation`](Self::cache_creation) | (none) | (none) | `cache_creation_input_tokens` | (none) |
///
/// So [`prompt`](Self::prompt) is every input token, cached ones included (OpenAI and
/// Gemini count them that way; Anthropic's `input_tokens` leaves cache reads and writes
/// out, so they are added back), and [`completion`](Self::completion) every output token,
/// reasoning included (Gemini's `candidatesTokenCount` leaves thoughts out). A field the
/// provider did not send is 0. Sums saturate at `u64::MAX`.
///
/// Serialized (for logs and the management API) as
/// `{"prompt_tokens":…,"completion_tokens":…,"total_tokens":…,"cached_tokens":…,"reasoning_tokens":…,"cache_creation_tokens":…}`,
/// with `total_tokens` the value of [`total`](Self::total).
///
/// ```
/// use tower_gateway_auth::tokens::TokenUsage;
///
/// let usage = TokenUsage::new(120, 30).with_cached(100);
/// assert_eq!(usage.total(), 150);
/// assert_eq!(usage.with_total(151).total(), 151);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TokenUsage {
    prompt: u64,
    completion: u64,
    total: Option<u64>,
    cached: u64,
    reasoning: u64,
    cache_creation: u64,
}

impl TokenUsage {
    /// `prompt` input and `completion` output tokens, nothing else reported.
    pub const fn new(prompt: u64, completion: u64) -> Self {
        TokenUsage {
            prompt,
            completion,
            total: None,
            cached: 0,
            reasoning: 0,
            cache_creation: 0,
        }
    }

    /// With the total the provider reported.
    pub const fn with_total(mut self, total: u64) -> Self {
        self.total = Some(total);
        self
    }

    /// With this many of the input tokens read from the provider's prompt cache.
    pub const fn with_cached(mut self, cached: u64) -> Self {
        self.cached = cached;
        self
    }

    /// With this many of the output tokens spent on reasoning (thinking).
    pub const fn with_reasoning(mut self, reasoning: u64) -> Self {
        self.reasoning = reasoning;
        self
    }

    /// With this many input tokens written to the provider's prompt cache (Anthropic).
    pub const fn with_cache_creation(mut self, cache_creation: u64) -> Self {
        self.cache_creation = cache_creation;
        self
    }

    /// Input tokens, cached ones included.
    pub const fn prompt(&self) -> u64 {
        self.prompt
    }

    /// Output tokens, reasoning included.
    pub const fn completion(&self) -> u64 {
        self.completion
    }

    /// The total the provider reported, or [`prompt`](Self::prompt) +
    /// [`completion`](Self::completion) when it reported none (Anthropic never does).
    pub const fn total(&self) -> u64 {
        match self.total {
            Some(total) => total,
            None => self.prompt.saturating_add(self.completion),
        }
    }

    /// The total exactly as the provider reported it, if it did.
    pub const fn reported_total(&self) -> Option<u64> {
        self.total
    }

    /// Input tokens read from the provider's prompt cache (part of [`prompt`](Self::prompt)).
    pub const fn cached(&self) -> u64 {
        self.cached
    }

    /// Output tokens spent on reasoning (part of [`completion`](Self::completion)).
    pub const fn reasoning(&self) -> u64 {
        self.reasoning
    }

    /// Input tokens written to the prompt cache (part of [`prompt`](Self::prompt); Anthropic).
    pub const fn cache_creation(&self) -> u64 {
        self.cache_creation
    }
}

impl Serialize for TokenUsage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("TokenUsage", 6)?;
        st.serialize_field("prompt_tokens", &self.prompt)?;
        st.serialize_field("completion_tokens", &self.completion)?;
        st.serialize_field("total_tokens", &self.total())?;
        st.serialize_field("cached_tokens", &self.cached)?;
        st.serialize_field("reasoning_tokens", &self.reasoning)?;
        st.serialize_field("cache_creation_tokens", &self.cache_creation)?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_falls_back_to_the_sum() {
        assert_eq!(TokenUsage::new(3, 4).total(), 7);
        assert_eq!(TokenUsage::new(3, 4).reported_total(), None);
        assert_eq!(TokenUsage::new(3, 4).with_total(9).total(), 9);
        assert_eq!(TokenUsage::new(u64::MAX, 4).total(), u64::MAX);
        assert_eq!(TokenUsage::default().total(), 0);
    }

    #[test]
    fn serializes_with_the_effective_total() {
        let usage = TokenUsage::new(10, 5)
            .with_cached(4)
            .with_reasoning(2)
            .with_cache_creation(1);
        assert_eq!(
            serde_json::to_string(&usage).unwrap(),
            r#"{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"cached_tokens":4,"reasoning_tokens":2,"cache_creation_tokens":1}"#
        );
    }
}
