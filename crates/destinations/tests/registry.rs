//! Every kind enabled by a Cargo feature is registered, both at link time and explicitly.

#[test]
fn every_enabled_kind_is_registered() {
    let mut expected: Vec<&str> = Vec::new();
    if cfg!(feature = "http") {
        expected.push("http");
    }
    if cfg!(feature = "s3") {
        expected.push("s3");
    }
    if cfg!(feature = "email") {
        expected.push("email");
    }
    if cfg!(feature = "sse") {
        expected.push("sse");
    }
    if cfg!(feature = "emit") {
        expected.push("emit");
    }
    expected.sort_unstable();
    assert_eq!(
        destinations::Registry::linked().kinds(),
        expected,
        "link-time (inventory) registration"
    );
    assert_eq!(
        destinations::registry().kinds(),
        expected,
        "the facade's registry"
    );
}
