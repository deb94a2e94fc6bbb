//! Secrets out of messages: the one redaction of a database URL that every message, log line and
//! error uses.

/// A database URL with its password replaced by `***`: the password of the user info
/// (`postgres://bob:s3cret@db/fleet`) and every query parameter whose name holds "pass"
/// (`?password=…`, `&sslpassword=…`).
pub fn url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => base.to_string(),
            },
            None => base.to_string(),
        },
        None => base.to_string(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.to_ascii_lowercase().contains("pass") => format!("{k}=***"),
                _ => p.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn passwords_are_redacted_wherever_they_are() {
        assert_eq!(
            url("postgres://bob:s3cret@db:5432/fleet"),
            "postgres://bob:***@db:5432/fleet"
        );
        assert_eq!(
            url("postgres://bob:pa/ss@db/fleet"),
            "postgres://bob:***@db/fleet"
        );
        assert_eq!(url("postgres://bob@db/fleet"), "postgres://bob@db/fleet");
        assert_eq!(url("sqlite://./fleet.db"), "sqlite://./fleet.db");
        assert_eq!(
            url("postgres://db/fleet?user=bob&password=s3cret&sslmode=require"),
            "postgres://db/fleet?user=bob&password=***&sslmode=require"
        );
        assert_eq!(
            url("postgres://bob:x@db/f?sslpassword=y"),
            "postgres://bob:***@db/f?sslpassword=***"
        );
        assert!(!url("postgresql://u:hunter2@h/d?password=hunter2").contains("hunter2"));
    }
}
