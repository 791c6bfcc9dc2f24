//! The OpenAPI document against the router it was made with (every route documented, every
//! documented operation served), and the README's examples against the document.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use destinations_testkit::TempDir;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::api;
use crate::config::ServerConfig;

/// The server's router on its embedded defaults (every kind of destination), and the
/// document it serves.
async fn served(dir: &TempDir) -> (axum::Router, Value, destinations::Hub) {
    let (config, _) =
        ServerConfig::load(None, Some(dir.path())).unwrap_or_else(|e| panic!("{e:#}"));
    let hub = config
        .build_hub(&destinations::Registry::linked(), crate::Role::All)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let state = Arc::new(api::AppState {
        hub: hub.clone(),
        prometheus: None,
        api_token: None,
        readiness: api::Readiness::new(Duration::from_secs(10)),
        max_request_bytes: config.max_request_bytes,
        openapi: OnceLock::new(),
        sessions: crate::dashboard::Sessions::default(),
        stopping: tokio::sync::watch::Sender::new(false),
    });
    let streams = destinations::sse::routes(&hub).unwrap_or_else(|e| panic!("{e}"));
    let subscriptions = destinations::emit::routes(&hub).unwrap_or_else(|e| panic!("{e}"));
    let router = api::router(&state, subscriptions, streams, true)
        .method_not_allowed_fallback(api::method_not_allowed);
    let document = state
        .openapi
        .get()
        .map(|json| serde_json::from_slice(json).unwrap_or_else(|e| panic!("{e}")))
        .unwrap_or_else(|| panic!("the router sets the document"));
    (router, document, hub)
}

/// The paths a router routes, read from its `Debug` form (`RouteId(3): "/v1/runs"`), its
/// fallback's left out.
fn routed_paths(router: &axum::Router) -> Vec<String> {
    let debug = format!("{router:?}");
    let routes = debug
        .split_once("fallback_router")
        .map_or(debug.as_str(), |(routes, _)| routes);
    let mut paths = Vec::new();
    for piece in routes.split("RouteId(").skip(1) {
        let Some(quoted) = piece.split_once("): \"").map(|(_, rest)| rest) else {
            continue;
        };
        if let Some((path, _)) = quoted.split_once('"')
            && !path.contains("__private__")
            && !paths.iter().any(|known| known == path)
        {
            paths.push(path.to_owned());
        }
    }
    paths
}

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "options"];

#[tokio::test]
async fn every_route_is_documented_and_every_documented_operation_is_served() {
    let dir = TempDir::new("openapi");
    let (router, document, hub) = served(&dir).await;
    assert_eq!(document["openapi"], "3.1.0");
    let routed = routed_paths(&router);
    assert!(
        routed.len() >= 17,
        "the router's paths were not read from its Debug form: {routed:?}"
    );
    let documented = document["paths"]
        .as_object()
        .unwrap_or_else(|| panic!("paths"));
    for path in &routed {
        assert!(
            documented.contains_key(path),
            "{path} is served but not in the OpenAPI document"
        );
    }
    let mut probed = 0;
    for (path, item) in documented {
        for method in METHODS.iter().filter(|m| item.get(**m).is_some()) {
            // Path parameters filled with something of the right shape.
            let uri = path
                .replace("{id}", &destinations::EventId::new().to_string())
                .replace(['{', '}'], "");
            let request = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&uri)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::empty())
                .unwrap_or_else(|e| panic!("{e}"));
            let response = router
                .clone()
                .oneshot(request)
                .await
                .unwrap_or_else(|e| match e {});
            let status = response.status();
            let body = if status.is_success() {
                String::new()
            } else {
                let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await;
                String::from_utf8_lossy(&bytes.unwrap_or_default()).into_owned()
            };
            assert_ne!(
                status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is documented but not served: {body}"
            );
            assert!(
                !(status == StatusCode::NOT_FOUND && body.contains("no such endpoint")),
                "{method} {path} is documented but not served: {body}"
            );
            probed += 1;
        }
    }
    assert!(probed >= 25, "only {probed} operations probed");
    // Descriptions are for people reading the document, not rustdoc link targets.
    let text = document.to_string();
    assert!(!text.contains("](crate::"), "a rustdoc link leaked");
    hub.shutdown().await;
}

/// A `curl` example of the README: method, path (with its query), JSON body, and whether the
/// README says it is refused.
struct Example {
    method: String,
    path: String,
    body: Option<Value>,
    refused: bool,
}

/// Every `curl` command to the server in the README (`localhost:8080`).
fn readme_examples() -> Vec<Example> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .unwrap_or_else(|e| panic!("README.md: {e}"));
    let lines: Vec<&str> = readme.lines().collect();
    let mut examples = Vec::new();
    let mut index = 0;
    while index < lines.len() {
        let line = lines[index].trim();
        index += 1;
        let Some(at) = line.find("localhost:8080") else {
            continue;
        };
        if !line.starts_with("curl") {
            continue;
        }
        let rest = &line[at + "localhost:8080".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '\'')
            .collect();
        let mut body = None;
        if let Some(start) = line.find("--json '") {
            let mut json = line[start + "--json '".len()..].to_owned();
            while !json.trim_end().ends_with('\'') && index < lines.len() {
                json.push('\n');
                json.push_str(lines[index]);
                index += 1;
            }
            let json = json.trim_end().trim_end_matches('\'');
            body =
                Some(serde_json::from_str(json).unwrap_or_else(|e| {
                    panic!("a README example's body is not JSON ({e}): {json}")
                }));
        }
        let method = if line.contains("-X POST") || body.is_some() {
            "post"
        } else if line.contains("-X DELETE") {
            "delete"
        } else {
            "get"
        };
        let refused = lines
            .get(index)
            .is_some_and(|next| next.trim().starts_with("# → 4"));
        examples.push(Example {
            method: method.to_owned(),
            path,
            body,
            refused,
        });
    }
    examples
}

/// The document's path item for a request path: the path itself, else a template matching it.
fn path_item<'a>(document: &'a Value, path: &str) -> Option<(&'a str, &'a Value)> {
    let paths = document["paths"].as_object()?;
    if let Some((name, item)) = paths.get_key_value(path) {
        return Some((name, item));
    }
    let parts: Vec<&str> = path.split('/').collect();
    paths.iter().find_map(|(template, item)| {
        let pattern: Vec<&str> = template.split('/').collect();
        let matches = pattern.len() == parts.len()
            && pattern
                .iter()
                .zip(&parts)
                .all(|(p, s)| p == s || (p.starts_with('{') && p.ends_with('}')));
        matches.then_some((template.as_str(), item))
    })
}

/// Whether `instance` is valid against the schema at `pointer` in the document.
fn check(document: &Value, pointer: &str, instance: &Value) -> Result<(), String> {
    let mut root = document.clone();
    root["$ref"] = json!(format!("#{pointer}"));
    let validator = jsonschema::validator_for(&root).map_err(|e| e.to_string())?;
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// `/` in a JSON pointer token.
fn token(text: &str) -> String {
    text.replace('~', "~0").replace('/', "~1")
}

#[tokio::test]
async fn the_readme_examples_validate_against_the_document() {
    let dir = TempDir::new("openapi-readme");
    let (_, document, hub) = served(&dir).await;
    let examples = readme_examples();
    let mut bodies = 0;
    for example in &examples {
        let (path, query) = example
            .path
            .split_once('?')
            .unwrap_or((example.path.as_str(), ""));
        let Some((template, item)) = path_item(&document, path) else {
            panic!("README: {} {path} is not in the document", example.method);
        };
        let operation = &item[example.method.as_str()];
        assert!(
            operation.is_object(),
            "README: {} {path} is not in the document",
            example.method
        );
        // Every query parameter the example passes is one the operation takes.
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let name = pair.split_once('=').map_or(pair, |(name, _)| name);
            let known = operation["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == name && p["in"] == "query");
            assert!(known, "README: `{name}` is not a parameter of {template}");
        }
        let (Some(body), false) = (&example.body, example.refused) else {
            continue;
        };
        let pointer = format!(
            "/paths/{}/{}/requestBody/content/application~1json/schema",
            token(template),
            example.method
        );
        check(&document, &pointer, body).unwrap_or_else(|e| {
            panic!("README: the body of {template} does not validate: {e}\n{body}")
        });
        bodies += 1;
        // A run's payloads, each against what its instance takes.
        for send in body["sends"].as_array().into_iter().flatten() {
            let instance = send["destination"].as_str().unwrap_or_default();
            let pointer = format!(
                "/paths/{}/post/requestBody/content/application~1json/schema",
                token(&format!("/v1/send/{instance}"))
            );
            check(&document, &pointer, &send["payload"]).unwrap_or_else(|e| {
                panic!("README: a payload for `{instance}` does not validate: {e}")
            });
            bodies += 1;
        }
    }
    assert!(
        bodies >= 8,
        "only {bodies} README bodies were checked; the examples were not found"
    );
    // And the document is strict enough to catch a mistake the README shows refused.
    let misspelt = json!({"url": "http://127.0.0.1:9000/", "body": "hi"});
    let pointer = "/paths/~1v1~1send~1http/post/requestBody/content/application~1json/schema";
    assert!(check(&document, pointer, &misspelt).is_err());
    hub.shutdown().await;
}
