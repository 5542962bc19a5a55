//! The proxy the HTTP client goes through to reach an endpoint, decided as
//! reqwest decides it (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and
//! `NO_PROXY`, upper or lower case), so that a failed connection names the
//! proxy instead of blaming the endpoint. Never shows the proxy's
//! credentials.

/// The proxy for `endpoint` as `scheme://host:port`, if one applies.
pub fn through(endpoint: &str) -> Option<String> {
    let uri: http::Uri = endpoint.parse().ok()?;
    let matcher = hyper_util::client::proxy::matcher::Matcher::from_env();
    Some(shown(matcher.intercept(&uri)?.uri()))
}

/// `scheme://host[:port]` of a proxy address, without its user and password.
fn shown(uri: &http::Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("http");
    let host = uri.host().unwrap_or("?");
    match uri.port_u16() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_is_shown_without_its_credentials() {
        let uri: http::Uri = "http://ops:s3cret@proxy.internal:3128/".parse().unwrap();
        assert_eq!(shown(&uri), "http://proxy.internal:3128");
        let uri: http::Uri = "http://proxy.internal".parse().unwrap();
        assert_eq!(shown(&uri), "http://proxy.internal");
    }
}
