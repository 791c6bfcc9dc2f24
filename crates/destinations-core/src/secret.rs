//! Bearer tokens: taking one from a request header and comparing it with the expected one
//! without telling an attacker how much of it was right.

use sha2::{Digest, Sha256};

/// The fewest characters an API or read token may have; shorter ones are refused when the
/// configuration is loaded, so "set but empty" never means "no token".
pub const MIN_TOKEN_CHARS: usize = 16;

/// The token of an `Authorization: Bearer <token>` header value; the scheme is matched without
/// regard to case (RFC 9110 §11.1).
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
        .filter(|token| !token.is_empty())
}

/// Whether `given` is `expected`, in time that depends on neither their contents nor their
/// lengths: both are hashed, and the digests compared without an early exit.
pub fn tokens_match(given: &str, expected: &str) -> bool {
    let given = Sha256::digest(given.as_bytes());
    let expected = Sha256::digest(expected.as_bytes());
    given
        .iter()
        .zip(expected.iter())
        .fold(0u8, |differ, (a, b)| differ | (a ^ b))
        == 0
}

/// Why a configured token cannot be used, if it cannot: empty, too short, or with characters
/// a header cannot carry.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(format!(
            "is {} characters long; a token needs at least {MIN_TOKEN_CHARS} (for instance `openssl rand -hex 32`)",
            token.chars().count()
        ));
    }
    if token.chars().any(|c| !c.is_ascii_graphic()) {
        return Err("may hold only visible ASCII characters (no spaces)".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_matched_without_regard_to_case() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(tokens_match("a-long-random-token", "a-long-random-token"));
        assert!(!tokens_match("a-long-random-token", "a-long-random-tokem"));
        assert!(!tokens_match("a-long-random", "a-long-random-token"));
        assert!(!tokens_match("", "a-long-random-token"));
    }

    #[test]
    fn short_empty_or_spaced_tokens_are_refused() {
        assert!(check_token("").is_err());
        assert!(check_token("short").is_err());
        assert!(check_token("sixteen chars ok").is_err(), "spaces");
        assert!(check_token("0123456789abcdef").is_ok());
    }
}
