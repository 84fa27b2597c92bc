//! The upstream's base URL, split once at startup so each request only appends
//! its path; shown with any password redacted. And the allow-list of webhook
//! URLs a request may name: compared by scheme, host, port and path segments,
//! never as text.

use http::uri::{Authority, PathAndQuery, Scheme, Uri};

/// `base_url` split once at startup so each request only appends its path.
#[derive(Debug, Clone)]
pub(crate) struct BaseUrl {
    scheme: Scheme,
    authority: Authority,
    /// Path prefix without a trailing slash ("" for none).
    prefix: String,
    /// The configured URL named a user or password, which penstock drops.
    pub(crate) credentials: bool,
}

impl BaseUrl {
    pub(crate) fn parse(raw: &str) -> Result<BaseUrl, String> {
        // Errors show the URL without its password.
        let s = &BaseUrl::redact(raw);
        let uri: Uri = raw.parse().map_err(|e| {
            format!("{s:?} is not a URL ({e}); expected like \"https://api.openai.com\"")
        })?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            _ => return Err(format!("{s:?}: expected an http:// or https:// URL")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{s:?}: expected a host"))?;
        // `user:password@` is never sent nor logged: requests carry the host.
        let credentials = authority.as_str().contains('@');
        let host_port = authority.as_str().rsplit('@').next().unwrap_or("");
        let authority =
            Authority::try_from(host_port).map_err(|e| format!("{s:?}: expected a host ({e})"))?;
        if uri.query().is_some() {
            return Err(format!("{s:?}: a query string cannot be a base URL"));
        }
        Ok(BaseUrl {
            scheme,
            authority,
            prefix: uri.path().trim_end_matches('/').to_string(),
            credentials,
        })
    }

    /// The URL with any `user:password@` removed, for display.
    pub(crate) fn redact(s: &str) -> String {
        match s.split_once("://") {
            Some((scheme, rest)) => {
                let host_end = rest.find('/').unwrap_or(rest.len());
                match rest[..host_end].rfind('@') {
                    Some(at) => format!("{scheme}://[redacted]@{}", &rest[at + 1..]),
                    None => s.to_string(),
                }
            }
            None => s.to_string(),
        }
    }

    pub(crate) fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    /// The scheme and authority alone: where connections go.
    pub(crate) fn origin(&self) -> Uri {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_default()
    }

    /// `Host` for requests to it: the authority, its default port left out.
    pub(crate) fn host(&self) -> http::HeaderValue {
        let default = if self.is_https() { 443 } else { 80 };
        let host = match self.authority.port_u16() {
            Some(p) if p != default => self.authority.as_str(),
            _ => self.authority.host(),
        };
        // An authority is valid header text.
        http::HeaderValue::from_str(host).unwrap_or(http::HeaderValue::from_static("localhost"))
    }

    /// The upstream's path and query for a request's: the base URL's path
    /// prefix put before it (taken as it is when there is none).
    pub(crate) fn path(&self, pq: Option<&PathAndQuery>) -> Result<PathAndQuery, http::Error> {
        let root = PathAndQuery::from_static("/");
        let pq = pq.unwrap_or(&root);
        if self.prefix.is_empty() {
            return Ok(pq.clone());
        }
        Ok(PathAndQuery::try_from(format!("{}{pq}", self.prefix))?)
    }

    /// The absolute URL of an upstream path (from [`BaseUrl::path`]).
    pub(crate) fn absolute(&self, path: PathAndQuery) -> Uri {
        Uri::from_parts({
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(self.scheme.clone());
            parts.authority = Some(self.authority.clone());
            parts.path_and_query = Some(path);
            parts
        })
        // Scheme, authority and path are each valid, and so is their sum.
        .unwrap_or_default()
    }
}

/// An allowed webhook URL prefix: a request's URL is under it when its
/// scheme, host and port are the prefix's exactly and its path is the
/// prefix's path or below it (at a `/`). A URL with a user or password, a
/// dot segment or a backslash in its path is under no prefix: as text,
/// `https://hooks.example.com@evil.net/` and `https://hooks.example.com.evil.net/`
/// both start with `https://hooks.example.com`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlPrefix {
    https: bool,
    host: String,
    port: u16,
    path: String,
}

/// The parts of an absolute http(s) URL a prefix compares: `None` for
/// anything else, or anything ambiguous.
fn parts(raw: &str) -> Option<(bool, String, u16, String)> {
    let uri: Uri = raw.parse().ok()?;
    let https = match uri.scheme_str()? {
        "https" => true,
        "http" => false,
        _ => return None,
    };
    let authority = uri.authority()?;
    if authority.as_str().contains('@') {
        return None;
    }
    let host = authority.host().to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri.path();
    let lowered = path.to_ascii_lowercase();
    let dotted = path.split('/').any(|seg| seg == "." || seg == "..")
        || lowered.contains("%2e")
        || lowered.contains("%2f")
        || lowered.contains("%5c")
        || path.contains('\\');
    if dotted {
        return None;
    }
    Some((https, host, port, path.to_string()))
}

impl UrlPrefix {
    pub fn parse(raw: &str) -> Result<UrlPrefix, String> {
        let (https, host, port, path) = parts(raw).ok_or_else(|| {
            format!(
                "{:?}: expected an http:// or https:// URL with a host, no user or password, and no dot segments",
                BaseUrl::redact(raw)
            )
        })?;
        if raw.contains('?') || raw.contains('#') {
            return Err(format!("{raw:?}: a prefix has no query or fragment"));
        }
        Ok(UrlPrefix {
            https,
            host,
            port,
            path,
        })
    }

    /// Whether `url` is at or under this prefix.
    pub fn allows(&self, url: &str) -> bool {
        let Some((https, host, port, path)) = parts(url) else {
            return false;
        };
        if https != self.https || host != self.host || port != self.port {
            return false;
        }
        let base = self.path.as_str();
        if base.is_empty() || base == "/" || base.ends_with('/') {
            return path.starts_with(base) || (base == "/" && path.is_empty());
        }
        path == base
            || path
                .strip_prefix(base)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_joins_paths_and_prefixes() {
        let b = BaseUrl::parse("https://api.openai.com").unwrap();
        assert_eq!(b.host(), "api.openai.com");
        assert_eq!(
            BaseUrl::parse("http://127.0.0.1:80").unwrap().host(),
            "127.0.0.1"
        );
        assert_eq!(BaseUrl::parse("https://h:8443/x").unwrap().host(), "h:8443");
        let pq = PathAndQuery::from_static("/v1/models?limit=2");
        assert_eq!(
            b.absolute(b.path(Some(&pq)).unwrap()).to_string(),
            "https://api.openai.com/v1/models?limit=2"
        );
        let b = BaseUrl::parse("http://127.0.0.1:9/openai/").unwrap();
        assert_eq!(
            b.absolute(b.path(Some(&pq)).unwrap()).to_string(),
            "http://127.0.0.1:9/openai/v1/models?limit=2"
        );
        assert!(BaseUrl::parse("ftp://x").is_err());
        let b = BaseUrl::parse("https://user:sk-secret@example.com/v").unwrap();
        assert!(b.credentials);
        let joined = b.absolute(b.path(Some(&pq)).unwrap()).to_string();
        assert_eq!(joined, "https://example.com/v/v1/models?limit=2");
        assert!(BaseUrl::parse("/v1").is_err());
    }

    #[test]
    fn a_webhook_prefix_compares_scheme_host_port_and_path_segments() {
        let p = UrlPrefix::parse("https://hooks.example.com").unwrap();
        for ok in [
            "https://hooks.example.com",
            "https://hooks.example.com/",
            "https://HOOKS.example.com/penstock?x=1",
            "https://hooks.example.com:443/a/b",
        ] {
            assert!(p.allows(ok), "{ok}");
        }
        for bad in [
            "https://hooks.example.com@evil.net/",
            "https://hooks.example.com.evil.net/",
            "https://hooks.example.com:1234/",
            "http://hooks.example.com/",
            "https://user:pw@hooks.example.com/",
            "https://hooks.example.com/a/../../admin",
            "https://hooks.example.com/%2e%2e/admin",
            "ftp://hooks.example.com/",
            "hooks.example.com/",
            "",
        ] {
            assert!(!p.allows(bad), "{bad}");
        }
        let p = UrlPrefix::parse("https://hooks.example.com/penstock").unwrap();
        assert!(p.allows("https://hooks.example.com/penstock"));
        assert!(p.allows("https://hooks.example.com/penstock/jobs"));
        assert!(!p.allows("https://hooks.example.com/penstockevil"));
        assert!(!p.allows("https://hooks.example.com/"));
        let p = UrlPrefix::parse("http://127.0.0.1:8000/hooks/").unwrap();
        assert!(p.allows("http://127.0.0.1:8000/hooks/1"));
        assert!(!p.allows("http://127.0.0.1:8000/hooks"));
        assert!(UrlPrefix::parse("https://u:p@hooks.example.com/").is_err());
        assert!(UrlPrefix::parse("https://hooks.example.com/?a").is_err());
    }
}
