//! Standard Webhooks signatures: `webhook-id`, `webhook-timestamp`, and `webhook-signature:
//! v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one signature per secret for rotation.

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// Signs request bodies with one or more `whsec_` secrets.
#[derive(Clone)]
pub struct WebhookSigner {
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for WebhookSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebhookSigner({} secrets)", self.keys.len())
    }
}

/// A secret that is not a Standard Webhooks secret.
#[derive(Debug, thiserror::Error)]
#[error("signing secret #{index} {problem}; expected `whsec_` followed by base64")]
pub struct InvalidSecret {
    index: usize,
    problem: &'static str,
}

impl WebhookSigner {
    /// A signer for these secrets (`whsec_<base64>`); the first is the current one, the rest
    /// are still accepted by receivers during a rotation.
    pub fn new<S: AsRef<str>>(secrets: &[S]) -> Result<Self, InvalidSecret> {
        let keys = secrets
            .iter()
            .enumerate()
            .map(|(index, secret)| {
                let encoded = secret
                    .as_ref()
                    .strip_prefix("whsec_")
                    .ok_or(InvalidSecret {
                        index,
                        problem: "does not start with `whsec_`",
                    })?;
                let bytes = STANDARD.decode(encoded).map_err(|_| InvalidSecret {
                    index,
                    problem: "is not valid base64 after `whsec_`",
                })?;
                if bytes.len() < 16 {
                    return Err(InvalidSecret {
                        index,
                        problem: "is shorter than 16 bytes",
                    });
                }
                Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { keys })
    }

    /// The `webhook-signature` value for this message.
    pub fn signature(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut message = Vec::with_capacity(id.len() + 24 + body.len());
        message.extend_from_slice(id.as_bytes());
        message.push(b'.');
        message.extend_from_slice(timestamp.to_string().as_bytes());
        message.push(b'.');
        message.extend_from_slice(body);
        let signatures: Vec<String> = self
            .keys
            .iter()
            .map(|key| format!("v1,{}", STANDARD.encode(hmac::sign(key, &message).as_ref())))
            .collect();
        signatures.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_malformed_secrets() {
        assert!(WebhookSigner::new(&["nope"]).is_err());
        assert!(WebhookSigner::new(&["whsec_!!!"]).is_err());
        assert!(WebhookSigner::new(&["whsec_c2hvcnQ="]).is_err());
    }

    /// The Standard Webhooks specification's published test vector (review T5).
    #[test]
    fn matches_the_specifications_test_vector() {
        let s = WebhookSigner::new(&["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            s.signature(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn one_signature_per_secret() {
        let s = WebhookSigner::new(&[
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let sig = s.signature("msg_1", 1_700_000_000, b"{}");
        let parts: Vec<_> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
    }
}
