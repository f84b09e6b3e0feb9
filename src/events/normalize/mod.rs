//! Normalization of every supported event format into one [`LifecycleEvent`].
//!
//! Every error here is permanent: the same bytes will never parse, so the consumer
//! dead-letters the message with [`NormalizeError`]'s text as the reason.

pub mod canonical;

use crate::domain::LifecycleEvent;

/// Why a message is not a lifecycle event byokd can apply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NormalizeError {
    /// Larger than the configured limit; not even parsed.
    #[error("message of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// The message size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// Not valid JSON.
    #[error("message is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but of no format byokd knows.
    #[error("unknown event format: {0}")]
    UnknownFormat(String),
    /// A known format with a missing or invalid field.
    #[error("invalid {format} event: {detail}")]
    Schema {
        /// The format it was recognized as.
        format: &'static str,
        /// What is wrong, naming the field.
        detail: String,
    },
}

/// Parses `body` in whichever supported format it is in.
pub fn normalize(body: &[u8], limit: usize) -> Result<LifecycleEvent, NormalizeError> {
    if body.len() > limit {
        return Err(NormalizeError::TooLarge {
            size: body.len(),
            limit,
        });
    }
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| NormalizeError::NotJson(e.to_string()))?;
    let Some(object) = value.as_object() else {
        return Err(NormalizeError::UnknownFormat(
            "expected a JSON object".to_owned(),
        ));
    };
    if object.contains_key("specversion") {
        return canonical::parse(value);
    }
    Err(NormalizeError::UnknownFormat(
        "not a CloudEvents envelope (no \"specversion\")".to_owned(),
    ))
}
