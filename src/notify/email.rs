//! Email delivery: one pooled lettre SMTP transport (`BYOKD_SMTP_URL`, `smtp://` with
//! optional `?tls=required` for STARTTLS, `smtps://` for implicit TLS, credentials from the
//! URL), or .eml files in `BYOKD_MAIL_DIR` when no SMTP server is configured.
//!
//! Every send is wrapped in a timeout because lettre's own only covers the connection (lettre
//! #1027). SMTP has no idempotency key, so each email carries a Message-ID derived from the
//! outbox row id: a retry after an ambiguous failure (a timeout after DATA) repeats the same
//! Message-ID, which mail systems and readers use to drop duplicates.

use super::DeliveryError;
use super::render::Rendered;
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::{ExposeSecret, SecretString};
use std::path::Path;
use std::time::Duration;
use uuid::Uuid;

/// The mailer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MailerError {
    /// The SMTP URL is unusable (the URL itself is not repeated: it holds the password).
    #[error("BYOKD_SMTP_URL is not a usable smtp:// or smtps:// URL: {0}")]
    Url(String),
    /// The sender address does not parse.
    #[error("BYOKD_MAIL_FROM {0:?} is not an email address")]
    From(String),
    /// The mail directory cannot be created.
    #[error("cannot create BYOKD_MAIL_DIR {0:?}: {1}")]
    Dir(String, std::io::Error),
}

#[derive(Clone)]
enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Files(AsyncFileTransport<Tokio1Executor>),
}

/// Sends rendered notifications.
#[derive(Clone)]
pub struct Mailer {
    transport: Transport,
    from: Mailbox,
    /// Right-hand side of Message-IDs.
    domain: String,
    timeout: Duration,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.transport {
            Transport::Smtp(_) => "smtp",
            Transport::Files(_) => "files",
        };
        f.debug_struct("Mailer")
            .field("transport", &kind)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

/// What the server said when it accepted a message.
#[derive(Debug, Clone)]
pub struct MailReceipt {
    /// SMTP reply code (250), none for files.
    pub code: Option<u16>,
    /// Reply text or the file written.
    pub detail: String,
}

impl Mailer {
    /// An SMTP mailer when `smtp_url` is set, else one writing .eml files to `mail_dir`.
    pub fn new(
        smtp_url: Option<&SecretString>,
        from: &str,
        mail_dir: &Path,
        timeout: Duration,
        pool_size: u32,
    ) -> Result<Mailer, MailerError> {
        let from: Mailbox = from
            .parse()
            .map_err(|_| MailerError::From(from.to_owned()))?;
        let domain = from.email.domain().to_owned();
        let transport = match smtp_url {
            Some(url) => {
                let url = url.expose_secret();
                if !(url.starts_with("smtp://") || url.starts_with("smtps://")) {
                    return Err(MailerError::Url("scheme must be smtp or smtps".into()));
                }
                let builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .map_err(|e| MailerError::Url(e.to_string()))?;
                Transport::Smtp(
                    builder
                        .timeout(Some(timeout))
                        .pool_config(PoolConfig::new().max_size(pool_size))
                        .build(),
                )
            }
            None => {
                std::fs::create_dir_all(mail_dir)
                    .map_err(|e| MailerError::Dir(mail_dir.display().to_string(), e))?;
                Transport::Files(AsyncFileTransport::new(mail_dir))
            }
        };
        Ok(Mailer {
            transport,
            from,
            domain,
            timeout,
        })
    }

    /// The Message-ID of notification `id`: the same on every attempt.
    pub fn message_id(&self, id: Uuid) -> String {
        format!("<{id}@{}>", self.domain)
    }

    /// Sends notification `id` to `to`.
    pub async fn send(
        &self,
        id: Uuid,
        to: &str,
        content: &Rendered,
    ) -> Result<MailReceipt, DeliveryError> {
        let to: Mailbox = to
            .parse()
            .map_err(|_| DeliveryError::Invalid(format!("{to:?} is not an email address")))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(content.subject.clone())
            .message_id(Some(self.message_id(id)))
            .multipart(MultiPart::alternative_plain_html(
                content.text.clone(),
                content.html.clone(),
            ))
            .map_err(|e| DeliveryError::Invalid(e.to_string()))?;
        match &self.transport {
            Transport::Smtp(smtp) => {
                let sent = tokio::time::timeout(self.timeout, smtp.send(message))
                    .await
                    .map_err(|_| DeliveryError::Timeout(self.timeout))?;
                match sent {
                    Ok(response) => Ok(MailReceipt {
                        code: response.code().to_string().parse().ok(),
                        detail: response.first_line().unwrap_or_default().to_owned(),
                    }),
                    Err(e) => Err(smtp_error(&e)),
                }
            }
            Transport::Files(files) => {
                let written = tokio::time::timeout(self.timeout, files.send(message))
                    .await
                    .map_err(|_| DeliveryError::Timeout(self.timeout))?;
                match written {
                    Ok(file_id) => Ok(MailReceipt {
                        code: None,
                        detail: format!("written as {file_id}.eml"),
                    }),
                    Err(e) => Err(DeliveryError::Connect(format!("cannot write .eml: {e}"))),
                }
            }
        }
    }
}

/// 4xx replies are transient, 5xx permanent (RFC 5321 4.2.1); anything without a reply
/// (network, TLS, timeout) is transient.
fn smtp_error(e: &lettre::transport::smtp::Error) -> DeliveryError {
    let code = e.status().and_then(|c| c.to_string().parse().ok());
    if e.is_permanent() || e.is_transient() {
        return DeliveryError::Smtp {
            code,
            message: e.to_string(),
            permanent: e.is_permanent(),
        };
    }
    if e.is_timeout() {
        return DeliveryError::Connect(format!("SMTP timed out: {e}"));
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    DeliveryError::Connect(format!("SMTP: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The pooled transport spawns its reaper on the runtime.
    #[tokio::test]
    async fn bad_urls_do_not_echo_the_password() {
        let url = SecretString::from("http://user:hunter22@mail:25");
        let err = Mailer::new(
            Some(&url),
            "byokd@example.com",
            Path::new("/nonexistent"),
            Duration::from_secs(1),
            2,
        )
        .expect_err("refused");
        assert!(!err.to_string().contains("hunter22"));
        let mailer = Mailer::new(
            Some(&SecretString::from("smtp://user:hunter22@mail:2525")),
            "byokd@example.com",
            Path::new("/nonexistent"),
            Duration::from_secs(1),
            2,
        )
        .expect("parses");
        assert!(!format!("{mailer:?}").contains("hunter22"));
        assert_eq!(
            mailer.message_id(Uuid::nil()),
            "<00000000-0000-0000-0000-000000000000@example.com>"
        );
    }
}
