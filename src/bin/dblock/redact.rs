//! Keeping database passwords out of everything dblock prints.
//!
//! Two layers: every `scheme://user:password@host` and every `password=...`
//! query parameter in a text is masked structurally, and the passwords of the
//! URLs dblock was given are remembered and masked wherever they appear
//! verbatim (a driver message could quote one out of its URL).

use std::sync::Mutex;

/// What replaces a password.
pub const MASK: &str = "***";

/// Query parameters that carry a password.
const SECRET_PARAMS: &[&str] = &["password", "sslpassword", "pass", "pwd"];

/// Secrets shorter than this are masked only structurally: masking every
/// `a` in a message would make it unreadable and hide nothing.
const MIN_VERBATIM: usize = 4;

static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Remembers the passwords in `text` (any URLs in it), so that [`scrub`]
/// masks them wherever they show up later.
pub fn remember(text: &str) {
    let mut found = Vec::new();
    for (start, end) in password_spans(text) {
        let raw = &text[start..end];
        found.push(raw.to_owned());
        found.push(percent_decode(raw));
    }
    found.retain(|s| s.len() >= MIN_VERBATIM);
    let mut secrets = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    for s in found {
        if !secrets.contains(&s) {
            secrets.push(s);
        }
    }
    // Longest first, so a secret containing another is masked whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `text` with every password masked: those in URLs and query parameters,
/// and any remembered password.
pub fn scrub(text: &str) -> String {
    let mut out = mask_spans(text);
    let secrets = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    for s in secrets.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), MASK);
        }
    }
    out
}

fn mask_spans(text: &str) -> String {
    let spans = password_spans(text);
    if spans.is_empty() {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end) in spans {
        out.push_str(&text[at..start]);
        out.push_str(MASK);
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

/// Where a character ends a URL embedded in prose.
fn ends_url(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>')
}

/// Byte ranges of the passwords in `text`, in order, not overlapping.
fn password_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    // user:password@ after each "://".
    let mut from = 0;
    while let Some(i) = text[from..].find("://") {
        let start = from + i + 3;
        let rest = &text[start..];
        let url_end = rest.find(ends_url).unwrap_or(rest.len());
        let url = &rest[..url_end];
        // The authority normally ends at the first '/', '?' or '#'. A
        // password that was not percent-encoded may contain those (or '@'),
        // so if the authority has no '@', fall back to the last '@' of the
        // URL when what precedes it looks like `user:...` and not like a
        // query (an '@' in a query parameter is not userinfo).
        let authority = &url[..url.find(['/', '?', '#']).unwrap_or(url.len())];
        let at = authority.rfind('@').or_else(|| {
            let at = url.rfind('@')?;
            let colon = url[..at].find(':')?;
            (!url[..colon].contains('/') && !url[..at].contains(['?', '#'])).then_some(at)
        });
        let Some(authority_end) = at else {
            from = start;
            continue;
        };
        let userinfo = &url[..authority_end];
        if let Some(colon) = userinfo.find(':') {
            if colon + 1 < userinfo.len() {
                spans.push((start + colon + 1, start + userinfo.len()));
            }
        }
        from = start + authority_end + 1;
    }
    // password=... query parameters, anywhere.
    let lower = text.to_ascii_lowercase();
    for param in SECRET_PARAMS {
        let needle = format!("{param}=");
        let mut from = 0;
        while let Some(i) = lower[from..].find(&needle) {
            let at = from + i;
            let preceded_ok =
                at == 0 || matches!(lower.as_bytes()[at - 1], b'?' | b'&' | b';' | b' ' | b'\t');
            let start = at + needle.len();
            let rest = &text[start..];
            let end = start + rest.find(|c| c == '&' || ends_url(c)).unwrap_or(rest.len());
            if preceded_ok && end > start {
                spans.push((start, end));
            }
            from = start;
        }
    }
    spans.sort();
    // Merge overlaps so masking stays well-formed.
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// Decodes `%XX` escapes; anything malformed is kept as it is.
fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_userinfo_passwords() {
        assert_eq!(
            mask_spans("postgres://app:s3cret@db.example:5432/app"),
            "postgres://app:***@db.example:5432/app"
        );
        assert_eq!(
            mask_spans("cannot reach mysql://root:p%40ss@10.0.0.1/test: refused"),
            "cannot reach mysql://root:***@10.0.0.1/test: refused"
        );
        // An unencoded '@' in the password.
        assert_eq!(
            mask_spans("postgres://u:p@ss@host/db"),
            "postgres://u:***@host/db"
        );
        // An unencoded '/' in the password.
        assert_eq!(
            mask_spans("postgres://u:a/b@host/db"),
            "postgres://u:***@host/db"
        );
        // An '@' in the query is not userinfo.
        assert_eq!(
            mask_spans("postgres://host:5432/db?application_name=a@b"),
            "postgres://host:5432/db?application_name=a@b"
        );
        assert_eq!(mask_spans("postgres://u@host/db"), "postgres://u@host/db");
        assert_eq!(mask_spans("postgres://host/db"), "postgres://host/db");
        assert_eq!(mask_spans("sqlite:dblock.db"), "sqlite:dblock.db");
        assert_eq!(
            mask_spans("a postgres://a:b@h/x and mysql://c:d@h/y"),
            "a postgres://a:***@h/x and mysql://c:***@h/y"
        );
    }

    #[test]
    fn masks_password_parameters() {
        assert_eq!(
            mask_spans("postgres://h/db?user=u&password=hunter22&sslmode=require"),
            "postgres://h/db?user=u&password=***&sslmode=require"
        );
        assert_eq!(
            mask_spans("postgres:///db?PASSWORD=x"),
            "postgres:///db?PASSWORD=***"
        );
        assert_eq!(
            mask_spans("password authentication failed for user \"u\""),
            "password authentication failed for user \"u\""
        );
    }

    #[test]
    fn remembered_secrets_are_masked_verbatim() {
        remember("postgres://u:Tr0ub%40dor@h/db");
        assert_eq!(scrub("server said: bad Tr0ub@dor"), "server said: bad ***");
        assert_eq!(scrub("raw Tr0ub%40dor"), "raw ***");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%40b%2Fc"), "a@b/c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
