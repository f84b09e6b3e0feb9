//! Email delivery through a real SMTP server (maildev): every notification kind with its
//! headers and both parts; SMTP down then up (through a cutting proxy) with every email
//! arriving exactly once; 4xx vs 5xx replies; and the .eml file fallback.
//! Every test runs on PostgreSQL and on SQLite.

mod common;

use common::Backend;

use byokd::store::Channel;
use chrono::{Duration as Chrono, Utc};
use common::notify::{NotifyEnv, emails_to, ensure_maildev, mailbox};
use common::proxy::Proxy;
use secrecy::SecretString;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

on_both_backends!(every_kind_arrives_with_headers_and_both_parts);
async fn every_kind_arrives_with_headers_and_both_parts(backend: Backend) {
    ensure_maildev().await;
    let env = NotifyEnv::new_on(backend).await;
    let kinds = [
        ("tenant.inaccessible", "is inaccessible"),
        ("tenant.restored", "accessible again"),
        ("key.expired", "has expired"),
        ("key.expiring", "expires in 14 days"),
        ("key.rotated", "rotated"),
        ("key.replaced", "now uses key key-mailco"),
        ("key.rewrap_failed", "could not be re-wrapped"),
        ("key.unreachable", "is unreachable since"),
        ("key.destroyed_with_deks", "42 data keys are unrecoverable"),
    ];
    env.tenant("mailco", &[], &[]).await;
    let mut sent = Vec::new();
    for (kind, subject_has) in kinds {
        let to = mailbox(&kind.replace('.', "-"));
        let id = env.enqueue("mailco", Channel::Email, &to, kind).await;
        sent.push((kind, subject_has, to, id));
    }
    let d = env.dispatcher(|_| {});
    let report = d.run_once(Utc::now()).await.expect("step");
    assert_eq!(report.delivered, kinds.len(), "{report:?}");

    for (kind, subject_has, to, id) in &sent {
        let mails = emails_to(to).await;
        assert_eq!(mails.len(), 1, "{kind}: exactly one email");
        let m = &mails[0];
        let subject = m["subject"].as_str().expect("subject");
        assert!(subject.contains(subject_has), "{kind}: {subject}");
        assert!(
            subject.contains("mailco"),
            "{kind}: subject names the tenant: {subject}"
        );
        assert_eq!(
            m["headers"]["message-id"],
            format!("<{id}@platform.example>")
        );
        assert_eq!(m["from"][0]["address"], "byokd@platform.example");
        assert_eq!(m["to"][0]["address"], to.as_str());
        let text = m["text"].as_str().expect("text part");
        let html = m["html"].as_str().expect("html part");
        for part in [text, html] {
            assert!(part.contains("key-mailco"), "{kind}: names the key: {part}");
            assert!(
                part.contains("What to do"),
                "{kind}: says what to do: {part}"
            );
        }
        assert!(html.contains("<html"), "{kind}");
        let log = env.attempts(*id).await;
        assert_eq!((log[0].0.as_str(), log[0].1), ("delivered", Some(250)));
    }
    // The expiry email says by when and both ways to recover.
    let expiring = emails_to(&sent[3].2).await;
    let text = expiring[0]["text"].as_str().expect("text");
    assert!(text.contains("12 December 2026"), "{text}");
    assert!(text.contains("14 days left"), "{text}");
    assert!(
        text.contains("Extend the key's expiry") && text.contains("register a new key"),
        "{text}"
    );
    env.cleanup().await;
}

on_both_backends!(smtp_down_then_up_delivers_each_email_exactly_once);
async fn smtp_down_then_up_delivers_each_email_exactly_once(backend: Backend) {
    ensure_maildev().await;
    let env = NotifyEnv::new_on(backend).await;
    let proxy = Proxy::start(&common::notify::maildev_smtp()).await;
    proxy.set_down(true);
    env.tenant("downco", &[], &[]).await;
    let mut rows = Vec::new();
    for i in 0..5 {
        let to = mailbox(&format!("down{i}"));
        rows.push((
            env.enqueue("downco", Channel::Email, &to, "tenant.inaccessible")
                .await,
            to,
        ));
    }
    let proxied = format!("smtp://{}", proxy.addr);
    let d = env.dispatcher(|c| c.smtp_url = Some(SecretString::from(proxied)));
    let t0 = Utc::now();
    let report = d.run_once(t0).await.expect("step");
    assert_eq!(report.retried, 5, "{report:?}");
    for (id, _) in &rows {
        let row = env.row(*id).await;
        assert_eq!(row.status, "pending");
        assert!(row.last_error.expect("error").contains("SMTP"));
    }

    proxy.set_down(false);
    let report = d.run_once(t0 + Chrono::seconds(10)).await.expect("step");
    assert_eq!(report.delivered, 5, "{report:?}");
    // Later steps find nothing more to send.
    assert_eq!(
        d.run_once(t0 + Chrono::days(2))
            .await
            .expect("step")
            .claimed,
        0
    );
    for (id, to) in &rows {
        assert_eq!(env.row(*id).await.status, "delivered");
        assert_eq!(emails_to(to).await.len(), 1, "{to}: exactly once");
    }
    env.cleanup().await;
}

/// A scripted SMTP responder. maildev accepts every message, so it cannot produce 4xx/5xx
/// replies; this fake exists only for that fault and answers RCPT TO with `rcpt_reply`.
async fn fake_smtp(rcpt_reply: &'static str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 fake ESMTP\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line.split_whitespace().next().unwrap_or("").to_uppercase();
                    let reply = match verb.as_str() {
                        "EHLO" | "HELO" => "250 fake\r\n".to_owned(),
                        "MAIL" | "RSET" | "NOOP" => "250 ok\r\n".to_owned(),
                        "RCPT" => format!("{rcpt_reply}\r\n"),
                        "QUIT" => {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        _ => "502 not implemented\r\n".to_owned(),
                    };
                    if write.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

on_both_backends!(smtp_4xx_retries_and_5xx_is_permanent);
async fn smtp_4xx_retries_and_5xx_is_permanent(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    env.tenant("replyco", &[], &[]).await;
    for (reply, status, code) in [
        ("451 4.3.0 try again later", "pending", 451),
        ("550 5.1.1 no such user", "dead", 550),
    ] {
        let addr = fake_smtp(reply).await;
        let id = env
            .enqueue("replyco", Channel::Email, &mailbox("reply"), "key.expired")
            .await;
        let url = format!("smtp://{addr}");
        let d = env.dispatcher(|c| c.smtp_url = Some(SecretString::from(url)));
        d.run_once(Utc::now()).await.expect("step");
        let row = env.row(id).await;
        assert_eq!(row.status, status, "{reply}: {row:?}");
        let log = env.attempts(id).await;
        assert_eq!(log[0].1, Some(code), "{reply}: {log:?}");
    }
    env.cleanup().await;
}

on_both_backends!(without_smtp_emails_are_written_as_eml_files);
async fn without_smtp_emails_are_written_as_eml_files(backend: Backend) {
    let env = NotifyEnv::new_on(backend).await;
    env.tenant("fileco", &[], &[]).await;
    let to = mailbox("file");
    let id = env
        .enqueue("fileco", Channel::Email, &to, "key.expiring")
        .await;
    let d = env.dispatcher(|c| c.smtp_url = None);
    assert_eq!(d.run_once(Utc::now()).await.expect("step").delivered, 1);
    let files: Vec<_> = std::fs::read_dir(&env.mail_dir)
        .expect("mail dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .collect();
    assert_eq!(files.len(), 1);
    let eml = std::fs::read_to_string(files[0].path()).expect("eml");
    assert!(
        eml.contains(&format!("Message-ID: <{id}@platform.example>")),
        "{eml}"
    );
    assert!(eml.contains(&format!("To: {to}")), "{eml}");
    assert!(
        eml.contains("text/plain") && eml.contains("text/html"),
        "{eml}"
    );
    env.cleanup().await;
}

on_both_backends!(an_unreachable_smtp_server_times_out_instead_of_hanging);
async fn an_unreachable_smtp_server_times_out_instead_of_hanging(backend: Backend) {
    // A listener that accepts and never speaks: lettre's own timeout does not cover this
    // (lettre #1027), the send timeout does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let env = NotifyEnv::new_on(backend).await;
    env.tenant("silentco", &[], &[]).await;
    let id = env
        .enqueue(
            "silentco",
            Channel::Email,
            &mailbox("silent"),
            "key.expired",
        )
        .await;
    let url = format!("smtp://{addr}");
    let d = env.dispatcher(|c| {
        c.smtp_url = Some(SecretString::from(url));
        c.notify.smtp_timeout_ms = 500;
    });
    let started = std::time::Instant::now();
    assert_eq!(d.run_once(Utc::now()).await.expect("step").retried, 1);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(env.row(id).await.status, "pending");
    silent.abort();
    env.cleanup().await;
}
