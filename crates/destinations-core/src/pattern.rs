//! `*` patterns, as config and subscriptions write them: `*@example.com`, `p_*`.

/// Whether `text` matches `pattern`, where `*` matches any run of characters (none included)
/// and every other character matches itself. Works on the bytes, allocating nothing, in
/// O(pattern × text) at worst: `*` is one byte in UTF-8 and never part of another character,
/// so a match can only start on a character boundary.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut star_t) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            star_t = ti;
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            star_t += 1;
            ti = star_t;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_match_any_run() {
        assert!(glob_match("*", ""));
        assert!(glob_match("p_*", "p_orders"));
        assert!(glob_match("a*b*c", "aXXbYc"));
        assert!(!glob_match("a*b", "ab c"));
        assert!(!glob_match("p_*", "q_orders"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("é*ü", "éaaü"));
        assert!(glob_match("*ü", "üü"));
        assert!(!glob_match("*ü", "üa"));
        assert!(
            glob_match("a*", "a*"),
            "a star in the text is a plain character"
        );
        assert!(glob_match("**", "x"));
    }
}
