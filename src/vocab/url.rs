//! The upstream's base URL, split once at startup so each request only appends
//! its path; shown with any password redacted.

use http::uri::{Authority, PathAndQuery, Scheme, Uri};

/// `base_url` split once at startup so each request only appends its path.
#[derive(Debug, Clone)]
pub struct BaseUrl {
    scheme: Scheme,
    authority: Authority,
    /// Path prefix without a trailing slash ("" for none).
    prefix: String,
    /// The configured URL named a user or password, which penstock drops.
    pub credentials: bool,
}

impl BaseUrl {
    pub fn parse(raw: &str) -> Result<BaseUrl, String> {
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
    pub fn redact(s: &str) -> String {
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

    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    /// The scheme and authority alone: where connections go.
    pub fn origin(&self) -> Uri {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_default()
    }

    /// `Host` for requests to it: the authority, its default port left out.
    pub fn host(&self) -> http::HeaderValue {
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
    pub fn path(&self, pq: Option<&PathAndQuery>) -> Result<PathAndQuery, http::Error> {
        let root = PathAndQuery::from_static("/");
        let pq = pq.unwrap_or(&root);
        if self.prefix.is_empty() {
            return Ok(pq.clone());
        }
        Ok(PathAndQuery::try_from(format!("{}{pq}", self.prefix))?)
    }

    /// The absolute URL of an upstream path (from [`BaseUrl::path`]).
    pub fn absolute(&self, path: PathAndQuery) -> Uri {
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
}
