//! Masking secrets in what is printed (`sluice config`, logs): credentials inside URLs,
//! and every setting whose name says it holds a secret, wherever it sits (a sink's
//! section or a pass-through librdkafka property such as `sasl.password`).

/// What replaces a secret.
pub const MASK: &str = "***";

/// Mask the credentials of a connection string:
/// - a URL's password: `scheme://user:secret@host/...` → `scheme://user:***@host/...`
///   (the credentials end at the authority's last `@`, as a password may hold `@`);
/// - a URL's secret query parameters: `?sslpassword=x&password=y` → `=***`;
/// - libpq's `key=value` form: `host=h password='p w'` → `host=h password=***`.
///
/// Anything without a secret is returned as it is.
pub fn url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return conninfo(url);
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{MASK}@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    format!("{scheme}://{authority}{}", query(tail))
}

/// A URL's path, query and fragment with the values of secret-named parameters masked.
fn query(tail: &str) -> String {
    let Some((path, rest)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let (params, fragment) = match rest.split_once('#') {
        Some((q, f)) => (q, format!("#{f}")),
        None => (rest, String::new()),
    };
    let params: Vec<String> = params
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if is_secret_key(k) => format!("{k}={MASK}"),
            _ => p.to_string(),
        })
        .collect();
    format!("{path}?{}{fragment}", params.join("&"))
}

/// libpq's `key = value` connection string with secret values masked. A value is a word
/// or single-quoted with backslash escapes (libpq's rules).
fn conninfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(eq) = rest.find('=') {
        let (before, after) = rest.split_at(eq);
        let key = before
            .trim_end()
            .rsplit(char::is_whitespace)
            .next()
            .unwrap_or("");
        out.push_str(before);
        out.push('=');
        let after = &after[1..];
        let spaces = after.len() - after.trim_start().len();
        out.push_str(&after[..spaces]);
        let value = &after[spaces..];
        let end = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let close = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    close
                })
                .map_or(value.len(), |(i, _)| i + 2)
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        if is_secret_key(key) {
            out.push_str(MASK);
        } else {
            out.push_str(&value[..end]);
        }
        rest = &value[end..];
    }
    out.push_str(rest);
    out
}

/// Whether a setting named `key` holds a secret.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "api_key",
        "apikey",
        "credential",
    ]
    .iter()
    .any(|s| k.contains(s))
        || k == "key"
        || k.ends_with(".key")
        || k.ends_with(".key.pem")
}

/// Mask, in place, every secret of a configuration as a TOML value: the values of
/// secret-named keys, and the passwords of URLs anywhere.
pub fn toml_value(value: &mut toml::Value) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                if is_secret_key(k) && !matches!(v, toml::Value::Table(_) | toml::Value::Array(_)) {
                    *v = toml::Value::String(MASK.into());
                } else {
                    toml_value(v);
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(toml_value),
        toml::Value::String(s) if s.contains("://") || s.contains('=') => *s = url(s),
        _ => {}
    }
}

/// Write a settings struct for `Debug` as its redacted TOML (see [`toml_value`]): such
/// structs hold URLs with passwords and librdkafka properties such as `sasl.password`,
/// and a derived `Debug` printed them into any log or panic that showed one.
pub fn debug<T: serde::Serialize>(
    name: &str,
    value: &T,
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    match toml::Value::try_from(value) {
        Ok(mut v) => {
            toml_value(&mut v);
            let text = toml::to_string(&v).unwrap_or_default();
            write!(f, "{name} {{ {} }}", text.trim().replace('\n', ", "))
        }
        Err(_) => write!(f, "{name} {{ .. }}"),
    }
}

/// `impl Debug` through [`debug`] for settings structs.
#[macro_export]
macro_rules! redacted_debug {
    ($($t:ty),+ $(,)?) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                $crate::redact::debug(stringify!($t), self, f)
            }
        }
    )+};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_masked_even_with_an_at_sign() {
        assert_eq!(
            url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            url("postgres://u:p@ss@h/db?x=1"),
            "postgres://u:***@h/db?x=1"
        );
        assert_eq!(
            url("http://h/a@b"),
            "http://h/a@b",
            "an @ in the path is no credential"
        );
        assert_eq!(url("postgres://h/db"), "postgres://h/db");
        assert_eq!(
            url("https://user@h"),
            "https://user@h",
            "no password, nothing to mask"
        );
        assert_eq!(url("not a url"), "not a url");
    }

    #[test]
    fn secret_query_parameters_and_libpq_strings_are_masked() {
        assert_eq!(
            url("postgres://h/db?sslmode=require&password=pw&sslpassword=k#x"),
            "postgres://h/db?sslmode=require&password=***&sslpassword=***#x"
        );
        assert_eq!(
            url("host=db port=5432 password=s3cret dbname=x"),
            "host=db port=5432 password=*** dbname=x"
        );
        assert_eq!(
            url(r"host=db password = 'it\'s a pw' user=u"),
            "host=db password = *** user=u"
        );
        assert_eq!(url("host=db user=u"), "host=db user=u");
        assert_eq!(url("a=b=c"), "a=b=c");
    }

    #[test]
    fn secrets_are_masked_wherever_they_sit() {
        let mut v: toml::Value = toml::from_str(
            r#"
            [kafka.properties]
            "sasl.password" = "kafka-pw"
            "ssl.key.pem" = "-----BEGIN"
            "bootstrap.servers" = "b:9092"
            [elasticsearch]
            url = "https://elastic:es-pw@es:9200"
            api_key = "es-key"
            [enrich]
            tenants_url = "postgres://t:t@pw@db/x"
            [timescale]
            url = "host=db password=libpq-pw"
            replica = "postgres://db/x?password=query-pw"
            [[ingest.api_keys]]
            tenant = "acme"
            key = "ingest-key"
            "#,
        )
        .unwrap();
        toml_value(&mut v);
        let text = toml::to_string(&v).unwrap();
        for secret in [
            "kafka-pw",
            "-----BEGIN",
            "es-pw",
            "es-key",
            "t@pw",
            "ingest-key",
            "libpq-pw",
            "query-pw",
        ] {
            assert!(!text.contains(secret), "{secret} shows in {text}");
        }
        assert!(text.contains("b:9092") && text.contains("acme"), "{text}");
    }
}
