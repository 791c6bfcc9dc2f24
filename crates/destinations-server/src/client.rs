//! The CLI's side of the API: `send`, `status`, `dlq`.

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// A running server's API.
pub(crate) struct Api {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// Which dead letters (the server's filters).
#[derive(Default)]
pub(crate) struct Selection {
    pub(crate) destination: Option<String>,
    pub(crate) since: Option<String>,
    pub(crate) until: Option<String>,
}

impl Selection {
    fn is_empty(&self) -> bool {
        self.destination.is_none() && self.since.is_none() && self.until.is_none()
    }

    fn query(&self) -> Vec<(&'static str, &str)> {
        [
            ("destination", self.destination.as_deref()),
            ("since", self.since.as_deref()),
            ("until", self.until.as_deref()),
        ]
        .into_iter()
        .filter_map(|(key, value)| Some((key, value?)))
        .collect()
    }
}

/// Ids replayed per call (the server's cap).
const PER_CALL: usize = 1000;

fn print(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

impl Api {
    pub(crate) fn new(base: &str, token: Option<&str>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(90))
            .build()
            .context("cannot build an HTTP client")?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.map(str::to_owned),
            http,
        })
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request
            .send()
            .await
            .context("cannot reach the server (is `destinations serve` running? see --server)")?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let message = body["error"]["message"]
                .as_str()
                .unwrap_or("no error message");
            bail!("{status}: {message}");
        }
        Ok(body)
    }

    pub(crate) async fn send(&self, destination: &str, payload: &str) -> anyhow::Result<()> {
        serde_json::from_str::<Value>(payload).context("the payload is not valid JSON")?;
        let request = self
            .http
            .post(format!("{}/v1/send/{destination}", self.base))
            .header("content-type", "application/json")
            .body(payload.to_owned());
        print(&self.call(request).await?);
        Ok(())
    }

    pub(crate) async fn status(&self, id: &str, wait: Option<&str>) -> anyhow::Result<()> {
        let mut request = self.http.get(format!("{}/v1/events/{id}", self.base));
        if let Some(wait) = wait {
            request = request.query(&[("wait", wait)]);
        }
        print(&self.call(request).await?);
        Ok(())
    }

    async fn dlq_page(
        &self,
        selection: &Selection,
        limit: usize,
        after: Option<&str>,
    ) -> anyhow::Result<Value> {
        let limit = limit.to_string();
        let mut query = selection.query();
        query.push(("limit", &limit));
        if let Some(after) = after {
            query.push(("after", after));
        }
        let request = self
            .http
            .get(format!("{}/v1/dead-letters", self.base))
            .query(&query);
        self.call(request).await
    }

    /// Print dead letters: `limit` of them, or every page with `all`.
    pub(crate) async fn dlq_list(
        &self,
        selection: &Selection,
        limit: usize,
        all: bool,
    ) -> anyhow::Result<()> {
        if !all {
            print(&self.dlq_page(selection, limit, None).await?);
            return Ok(());
        }
        let mut letters = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.dlq_page(selection, PER_CALL, after.as_deref()).await?;
            letters.extend(page["dead_letters"].as_array().cloned().unwrap_or_default());
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => {
                    print(&json!({"dead_letters": letters, "evicted": page["evicted"]}));
                    return Ok(());
                }
            }
        }
    }

    /// How many dead letters `selection` matches.
    async fn dlq_count(&self, selection: &Selection) -> anyhow::Result<u64> {
        let mut count = 0;
        let mut after: Option<String> = None;
        loop {
            let page = self.dlq_page(selection, PER_CALL, after.as_deref()).await?;
            count += page["dead_letters"].as_array().map_or(0, Vec::len) as u64;
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => return Ok(count),
            }
        }
    }

    /// Replay dead letters: those named, or those `selection` matches (all when it is empty),
    /// a thousand per call, with a progress bar when there are many.
    pub(crate) async fn dlq_replay(
        &self,
        ids: &[String],
        selection: &Selection,
    ) -> anyhow::Result<()> {
        if !ids.is_empty() && !selection.is_empty() {
            bail!("give ids or --destination/--since/--until, not both");
        }
        let total = if ids.is_empty() {
            self.dlq_count(selection).await?
        } else {
            ids.len() as u64
        };
        let bar = indicatif::ProgressBar::new(total);
        if total > PER_CALL as u64 {
            bar.set_style(
                indicatif::ProgressStyle::with_template("replaying {bar:40} {pos}/{len} ({eta})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
        } else {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let mut replayed: Vec<Value> = Vec::new();
        if ids.is_empty() {
            loop {
                let mut body = serde_json::Map::new();
                for (key, value) in selection.query() {
                    body.insert(key.to_owned(), json!(value));
                }
                body.insert("limit".to_owned(), json!(PER_CALL));
                let answer = self.replay_call(&Value::Object(body)).await?;
                let done = answer["replayed"].as_array().cloned().unwrap_or_default();
                bar.inc(done.len() as u64);
                let progress = !done.is_empty();
                replayed.extend(done);
                // Stop when nothing more matches, or when nothing more could be replayed (letters
                // of instances this server does not have).
                if !answer["more"].as_bool().unwrap_or(false) || !progress {
                    break;
                }
            }
        } else {
            for chunk in ids.chunks(PER_CALL) {
                let answer = self.replay_call(&json!({ "ids": chunk })).await?;
                let done = answer["replayed"].as_array().cloned().unwrap_or_default();
                bar.inc(done.len() as u64);
                replayed.extend(done);
            }
        }
        bar.finish_and_clear();
        print(&json!({ "replayed": replayed }));
        Ok(())
    }

    async fn replay_call(&self, body: &Value) -> anyhow::Result<Value> {
        let request = self
            .http
            .post(format!("{}/v1/dead-letters/replay", self.base))
            .json(body);
        self.call(request).await
    }
}
