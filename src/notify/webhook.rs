//! Webhook delivery per Standard Webhooks v1, behind an SSRF guard.
//!
//! Signing: `webhook-signature: v1,<base64 HMAC-SHA256("{id}.{timestamp}.{body}")>` keyed
//! with the base64-decoded part of the `whsec_` secret; `webhook-id` is the outbox row id
//! (stable across retries, the receiver's idempotency key), `webhook-timestamp` the attempt.
//!
//! SSRF: an endpoint URL is only text until it is resolved, so the guard applies to the
//! addresses actually connected to. An IP literal is checked before the request; a host name
//! goes through [`GuardedResolver`], which resolves it, refuses the whole name if any address
//! is loopback, private, link-local, shared, multicast or otherwise non-global (unless
//! allowlisted), and hands the checked addresses to the connector, so a DNS answer cannot
//! change between the check and the connection. Redirects are never followed.
//!
//! Of an error answer's body only a bounded prefix is read (for the attempt log), so an
//! endpoint answering with a huge or endless body holds neither memory nor a delivery slot.

use super::DeliveryError;
use base64::Engine;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// Most response-body characters kept in the attempt log.
const BODY_SNIPPET: usize = 200;
/// Most response-body bytes read: [`BODY_SNIPPET`] characters of any UTF-8 text.
const BODY_PREFIX: usize = 4 * BODY_SNIPPET;

/// A signing secret that is not `whsec_` + base64.
#[derive(Debug, thiserror::Error)]
#[error("webhook secret is not whsec_ followed by base64")]
pub struct BadSecret;

/// The `webhook-signature` value for one attempt.
pub fn sign(
    secret: &SecretString,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, BadSecret> {
    let encoded = secret
        .expose_secret()
        .strip_prefix("whsec_")
        .ok_or(BadSecret)?;
    let key = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| BadSecret)?,
    );
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).map_err(|_| BadSecret)?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// An address the guard refuses.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0} is a loopback, private, link-local or otherwise internal address; \
     allowlist its range in BYOKD_WEBHOOK_ALLOW_CIDRS to deliver there"
)]
pub struct Blocked(pub IpAddr);

/// Which addresses webhooks may reach: global ones, plus operator-allowlisted ranges.
#[derive(Debug, Clone, Default)]
pub struct AddressGuard {
    allow: Vec<IpNet>,
}

impl AddressGuard {
    /// Parses a comma-separated list of CIDR ranges (a bare address counts as /32 or /128).
    pub fn parse(cidrs: &str) -> Result<AddressGuard, String> {
        Ok(AddressGuard {
            allow: crate::config::parse_cidrs(cidrs)?,
        })
    }

    /// Refuses non-global addresses that no allowlisted range contains.
    pub fn check(&self, ip: IpAddr) -> Result<(), Blocked> {
        let ip = canonical(ip);
        if is_internal(ip) && !self.allow.iter().any(|net| net.contains(&ip)) {
            return Err(Blocked(ip));
        }
        Ok(())
    }
}

/// IPv4-mapped IPv6 addresses are the IPv4 address as far as routing goes.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => is_internal_v6(v6),
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16, incl. cloud metadata 169.254.169.254
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // 100.64/10 carrier-grade NAT
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // 192.0.0/24 IETF protocol assignments
        || (a == 192 && b == 88 && ip.octets()[2] == 99) // 192.88.99/24 6to4 relay anycast
        || (a == 198 && (b == 18 || b == 19)) // 198.18/15 benchmarking
        || a >= 240 // reserved
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // fc00::/7 unique local (incl. fd00:ec2::254 metadata)
        || (first & 0xffc0) == 0xfe80 // fe80::/10 link-local
        || (first & 0xffc0) == 0xfec0 // fec0::/10 site-local (deprecated)
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
        // 64:ff9b::/32, NAT64 (the well-known 64:ff9b::/96 and local-use 64:ff9b:1::/48):
        // the translator can reach IPv4 internals.
        || (first == 0x0064 && ip.segments()[1] == 0xff9b)
        // 2002::/16, 6to4: whatever relay answers reaches the embedded IPv4 address. The
        // whole range, not only internal embedded addresses: 6to4 is deprecated (RFC 7526),
        // so no webhook endpoint has reason to be there.
        || first == 0x2002
        || ip.to_ipv4().is_some_and(|v4| ip.segments()[..6] == [0; 6] && is_internal_v4(v4))
}

/// A reqwest resolver that resolves with the system resolver and refuses internal answers.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    guard: Arc<AddressGuard>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err(format!("{host} has no addresses").into());
            }
            // Refuse the whole name if any answer is internal: a mixed answer is how a
            // rebinding attack gets a second chance.
            for addr in &addrs {
                guard.check(addr.ip())?;
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// What a successful delivery returned.
#[derive(Debug, Clone)]
pub struct WebhookReceipt {
    /// The 2xx status.
    pub status: u16,
}

/// The shared HTTP client for webhook deliveries.
#[derive(Debug, Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    guard: Arc<AddressGuard>,
    timeout: Duration,
}

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the webhook HTTP client: {0}")]
pub struct ClientError(String);

impl WebhookClient {
    /// A client with `timeout` per request and the guard's allowlist.
    pub fn new(guard: AddressGuard, timeout: Duration) -> Result<WebhookClient, ClientError> {
        // reqwest is built without a default crypto provider (avoids aws-lc-sys); use ring,
        // which rustls already has through lapin. Installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let guard = Arc::new(guard);
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver {
                guard: guard.clone(),
            }))
            .no_proxy()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("byokd-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError(e.to_string()))?;
        Ok(WebhookClient {
            http,
            guard,
            timeout,
        })
    }

    /// POSTs `body` to `url`, signed with each of `secrets` (the current one first; more
    /// while the tenant rotates its secret), as message `msg_id`.
    pub async fn deliver(
        &self,
        url: &str,
        secrets: &[SecretString],
        msg_id: &str,
        timestamp: i64,
        body: Vec<u8>,
    ) -> Result<WebhookReceipt, DeliveryError> {
        let parsed = url::Url::parse(url)
            .map_err(|_| DeliveryError::Invalid("endpoint URL does not parse".into()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(DeliveryError::Invalid("endpoint URL is not http(s)".into()));
        }
        match parsed.host() {
            Some(url::Host::Ipv4(ip)) => self.check(IpAddr::V4(ip))?,
            Some(url::Host::Ipv6(ip)) => self.check(IpAddr::V6(ip))?,
            Some(url::Host::Domain(_)) => {} // checked by the resolver, on the resolved addresses
            None => return Err(DeliveryError::Invalid("endpoint URL has no host".into())),
        }
        let signature = secrets
            .iter()
            .map(|secret| sign(secret, msg_id, timestamp, &body))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DeliveryError::Invalid(e.to_string()))?
            .join(" ");
        let response = self
            .http
            .post(parsed)
            .header("content-type", "application/json")
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(WebhookReceipt { status });
        }
        if response.status().is_redirection() {
            return Err(DeliveryError::Redirect(status));
        }
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        Err(DeliveryError::Http {
            status,
            retry_after,
            body: body_snippet(response).await,
        })
    }

    fn check(&self, ip: IpAddr) -> Result<(), DeliveryError> {
        self.guard
            .check(ip)
            .map_err(|e| DeliveryError::Blocked(e.to_string()))
    }

    fn classify(&self, e: reqwest::Error) -> DeliveryError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            if let Some(blocked) = err.downcast_ref::<Blocked>() {
                return DeliveryError::Blocked(blocked.to_string());
            }
            source = err.source();
        }
        if e.is_timeout() {
            return DeliveryError::Timeout(self.timeout);
        }
        // Without the URL: a query string may carry a token.
        let e = e.without_url();
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(err) = source {
            text.push_str(": ");
            text.push_str(&err.to_string());
            source = err.source();
        }
        DeliveryError::Connect(text)
    }
}

/// The start of an error answer's body for the attempt log, `…` marking a cut. Reads at
/// most [`BODY_PREFIX`] bytes, chunk by chunk, then drops the response, which closes the
/// connection. The client's request timeout also bounds the reading: a body that trickles
/// keeps what arrived in time.
async fn body_snippet(mut response: reqwest::Response) -> String {
    let mut prefix = Vec::new();
    let mut cut = false;
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = BODY_PREFIX - prefix.len();
        prefix.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() >= room {
            cut = true;
            break;
        }
    }
    let text = String::from_utf8_lossy(&prefix);
    let mut snippet: String = text.chars().take(BODY_SNIPPET).collect();
    if cut || snippet.len() < text.len() {
        snippet.push('…');
    }
    snippet
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published Standard Webhooks test vector (libraries/rust `test_sign`).
    #[test]
    fn standard_webhooks_test_vector() {
        let secret = SecretString::from("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD");
        let sig = sign(
            &secret,
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        )
        .expect("valid secret");
        assert_eq!(sig, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn bad_secrets_are_refused_without_echoing_them() {
        for s in ["C2FVsBQIhrscChlQIMV", "whsec_%%%not-base64"] {
            let err = sign(&SecretString::from(s), "m", 1, b"{}").expect_err("refused");
            assert!(!err.to_string().contains(s));
        }
    }

    #[test]
    fn guard_refuses_internal_addresses_unless_allowlisted() {
        let guard = AddressGuard::default();
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.3.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",    // NAT64 well-known prefix, 10.0.0.1
            "64:ff9b:1::a00:1",  // NAT64 local-use prefix
            "64:ff9b:1:ffff::1", // anywhere in 64:ff9b:1::/48
            "2002:c0a8:101::1",  // 6to4 of 192.168.1.1
            "2002:5db8:d822::1", // 6to4 of a global address: the range is refused whole
            "192.88.99.1",       // 6to4 relay anycast
            "192.88.99.255",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert!(guard.check(ip).is_err(), "{ip} allowed");
        }
        for ip in [
            "93.184.216.34",
            "2606:4700::1111",
            "8.8.8.8",
            "192.88.98.1",
            "192.88.100.1",
            "2003::1",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert!(guard.check(ip).is_ok(), "{ip} refused");
        }
        let guard = AddressGuard::parse("127.0.0.0/8, ::1").expect("parses");
        assert!(guard.check("127.0.0.1".parse().expect("ip")).is_ok());
        assert!(guard.check("::1".parse().expect("ip")).is_ok());
        assert!(guard.check("10.0.0.1".parse().expect("ip")).is_err());
        assert!(AddressGuard::parse("10.0.0.0/33").is_err());
        assert!(AddressGuard::parse("nonsense").is_err());
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc2822();
        let d = parse_retry_after(&soon).expect("date");
        assert!(
            d <= Duration::from_secs(60) && d >= Duration::from_secs(55),
            "{d:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
