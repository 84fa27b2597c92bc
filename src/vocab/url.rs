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

    /// The upstream URL for a request's path and query.
    pub fn join(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = pq.map_or("/", PathAndQuery::as_str);
        let path_and_query = if self.prefix.is_empty() {
            PathAndQuery::try_from(pq)?
        } else {
            PathAndQuery::try_from(format!("{}{pq}", self.prefix))?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_joins_paths_and_prefixes() {
        let b = BaseUrl::parse("https://api.openai.com").unwrap();
        let pq = PathAndQuery::from_static("/v1/models?limit=2");
        assert_eq!(
            b.join(Some(&pq)).unwrap().to_string(),
            "https://api.openai.com/v1/models?limit=2"
        );
        let b = BaseUrl::parse("http://127.0.0.1:9/openai/").unwrap();
        assert_eq!(
            b.join(Some(&pq)).unwrap().to_string(),
            "http://127.0.0.1:9/openai/v1/models?limit=2"
        );
        assert!(BaseUrl::parse("ftp://x").is_err());
        let b = BaseUrl::parse("https://user:sk-secret@example.com/v").unwrap();
        assert!(b.credentials);
        let joined = b.join(Some(&pq)).unwrap().to_string();
        assert_eq!(joined, "https://example.com/v/v1/models?limit=2");
        assert!(BaseUrl::parse("/v1").is_err());
    }
}
