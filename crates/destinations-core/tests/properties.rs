//! Properties of the pattern matcher, the strict parser and durations, over generated input.

use destinations_core::{glob_match, parse_strict};
use proptest::prelude::*;

/// A plain recursive matcher to check the fast one against.
fn reference(pattern: &[char], text: &[char]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some(('*', rest)) => (0..=text.len()).any(|skip| reference(rest, &text[skip..])),
        Some((c, rest)) => text.first() == Some(c) && reference(rest, &text[1..]),
    }
}

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Shape {
    name: String,
    count: u32,
}

proptest! {
    /// The byte-wise matcher agrees with the plain definition, on ASCII and beyond.
    #[test]
    fn glob_match_agrees_with_the_definition(
        pattern in "[ab*é]{0,8}",
        text in "[abé*]{0,10}",
    ) {
        let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
        prop_assert_eq!(glob_match(&pattern, &text), reference(&p, &t), "{} ~ {}", pattern, text);
    }

    /// The strict parser never panics, takes objects only, and whatever it refuses it names:
    /// a field when the fault is in one.
    #[test]
    fn strict_parsing_refuses_with_a_reason(input in "[ -~]{0,40}") {
        match parse_strict::<Shape>(input.as_bytes()) {
            Ok(_) => prop_assert!(input.trim_start().starts_with('{'), "{:?}", input),
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
    }

    /// Durations read from config never panic and round-trip through their written form.
    #[test]
    fn durations_round_trip(seconds in 0u64..(100 * 365 * 24 * 3600)) {
        let written = humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string();
        #[derive(serde::Deserialize)]
        struct D {
            #[serde(with = "destinations_core::config::duration_text")]
            d: std::time::Duration,
        }
        let read: D = serde_json::from_value(serde_json::json!({"d": written}))
            .unwrap_or_else(|e| panic!("{written}: {e}"));
        prop_assert_eq!(read.d.as_secs(), seconds);
    }

    /// Any text as a duration: a value or a refusal, never a panic.
    #[test]
    fn any_duration_text_is_read_or_refused(text in "\\PC{0,20}", number in any::<f64>()) {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct D {
            #[serde(with = "destinations_core::config::duration_text")]
            d: std::time::Duration,
        }
        let _ = serde_json::from_value::<D>(serde_json::json!({"d": text}));
        let _ = serde_json::from_value::<D>(serde_json::json!({"d": number}));
    }
}
