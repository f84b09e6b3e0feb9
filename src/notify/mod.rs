//! Delivery of what the lifecycle code put in the outbox.
//!
//! [`access`] relays tenant access changes to the `byok.access` exchange. [`outbox`] delivers
//! tenant notifications: it leases due email and webhook rows, hands each to [`email`]
//! (SMTP via lettre, or .eml files) or [`webhook`] (Standard Webhooks over reqwest, behind an
//! SSRF guard), logs every attempt and decides, through [`DeliveryError::verdict`] alone,
//! whether a failure is retried, is final, or disables the endpoint. [`render`] turns a
//! notification into an email's subject, text and HTML from `templates/`. [`catalog`] is
//! every notification byokd sends, and the only way one enters the outbox.

pub mod access;
pub mod catalog;
pub mod email;
pub mod outbox;
pub mod render;
pub mod webhook;

use std::time::Duration;

/// Why one delivery attempt failed. Messages never contain secrets: URLs are shown without
/// their query, SMTP credentials never reach an error.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The peer did not answer within the per-request timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection could not be made or broke.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The webhook endpoint answered with a non-2xx, non-3xx status.
    #[error("endpoint answered HTTP {status}{}", body_suffix(.body))]
    Http {
        /// Status code.
        status: u16,
        /// The `Retry-After` it asked for, if any.
        retry_after: Option<Duration>,
        /// The start of the response body.
        body: String,
    },
    /// The endpoint redirected; redirects are not followed (the target was never checked by
    /// the SSRF guard, and the Standard Webhooks spec counts 3xx as failure).
    #[error("endpoint redirected (HTTP {0}); redirects are not followed")]
    Redirect(u16),
    /// The SSRF guard refused the address before any connection was made.
    #[error("refused before connecting: {0}")]
    Blocked(String),
    /// The SMTP server answered with an error reply.
    #[error("SMTP server replied {}: {message}", code.map_or("without a code".to_owned(), |c| c.to_string()))]
    Smtp {
        /// Reply code.
        code: Option<u16>,
        /// Reply text or error description.
        message: String,
        /// 5xx: the server will never accept this message.
        permanent: bool,
    },
    /// The endpoint was disabled or deleted.
    #[error("webhook endpoint {0}")]
    EndpointGone(&'static str),
    /// The notification cannot be turned into a message (bad address, template, secret).
    #[error("cannot build the message: {0}")]
    Invalid(String),
}

fn body_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

/// What a failed attempt means for the notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try again on the schedule; the peer may have asked for a minimum delay.
    Retry {
        /// Peer's `Retry-After`.
        at_least: Option<Duration>,
    },
    /// Never going to work: the notification is dead.
    Dead,
    /// The endpoint says it is gone for good (HTTP 410): dead, and the endpoint is disabled.
    DisableEndpoint,
}

impl DeliveryError {
    /// The one place that decides retry vs dead.
    pub fn verdict(&self) -> Verdict {
        match self {
            DeliveryError::Timeout(_) | DeliveryError::Connect(_) | DeliveryError::Redirect(_) => {
                Verdict::Retry { at_least: None }
            }
            DeliveryError::Http { status: 410, .. } => Verdict::DisableEndpoint,
            DeliveryError::Http {
                status: 429 | 502 | 503 | 504,
                retry_after,
                ..
            } => Verdict::Retry {
                at_least: *retry_after,
            },
            // Standard Webhooks / Svix: any other non-2xx is worth retrying.
            DeliveryError::Http { .. } => Verdict::Retry { at_least: None },
            DeliveryError::Smtp {
                permanent: true, ..
            } => Verdict::Dead,
            DeliveryError::Smtp { .. } => Verdict::Retry { at_least: None },
            // An operator can allowlist the range and retry by hand; retrying on a schedule
            // cannot change the answer.
            DeliveryError::Blocked(_)
            | DeliveryError::EndpointGone(_)
            | DeliveryError::Invalid(_) => Verdict::Dead,
        }
    }

    /// The HTTP status or SMTP code to log with the attempt.
    pub fn status_code(&self) -> Option<u16> {
        match self {
            DeliveryError::Http { status, .. } => Some(*status),
            DeliveryError::Redirect(status) => Some(*status),
            DeliveryError::Smtp { code, .. } => *code,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16) -> DeliveryError {
        DeliveryError::Http {
            status,
            retry_after: Some(Duration::from_secs(7)),
            body: String::new(),
        }
    }

    #[test]
    fn verdicts() {
        let seven = Some(Duration::from_secs(7));
        assert_eq!(http(410).verdict(), Verdict::DisableEndpoint);
        for s in [429, 502, 503, 504] {
            assert_eq!(http(s).verdict(), Verdict::Retry { at_least: seven });
        }
        for s in [400, 404, 500] {
            assert_eq!(http(s).verdict(), Verdict::Retry { at_least: None });
        }
        assert_eq!(
            DeliveryError::Redirect(302).verdict(),
            Verdict::Retry { at_least: None }
        );
        assert_eq!(
            DeliveryError::Blocked("10.0.0.1".into()).verdict(),
            Verdict::Dead
        );
        let smtp = |permanent| DeliveryError::Smtp {
            code: Some(if permanent { 550 } else { 451 }),
            message: String::new(),
            permanent,
        };
        assert_eq!(smtp(true).verdict(), Verdict::Dead);
        assert_eq!(smtp(false).verdict(), Verdict::Retry { at_least: None });
        assert_eq!(
            DeliveryError::Timeout(Duration::from_secs(1)).verdict(),
            Verdict::Retry { at_least: None }
        );
    }
}
