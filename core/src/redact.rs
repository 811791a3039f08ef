//! Masking secrets in what is printed (`sluice config`, logs): credentials inside URLs,
//! and every setting whose name says it holds a secret, wherever it sits (a sink's
//! section or a pass-through librdkafka property such as `sasl.password`).

/// What replaces a secret.
pub const MASK: &str = "***";

/// `scheme://user:secret@host/...` → `scheme://user:***@host/...`. The credentials end at
/// the authority's last `@` (a password may hold `@` itself); a URL without a password
/// is returned as it is.
pub fn url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:{MASK}@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
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
        toml::Value::String(s) if s.contains("://") => *s = url(s),
        _ => {}
    }
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
        ] {
            assert!(!text.contains(secret), "{secret} shows in {text}");
        }
        assert!(text.contains("b:9092") && text.contains("acme"), "{text}");
    }
}
