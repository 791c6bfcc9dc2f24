//! A small Server-Sent Events client for tests: real HTTP (reqwest, streaming), the
//! `text/event-stream` format parsed by hand.

use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};

/// One block of an event stream: an event, or comments only (keepalives).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseMessage {
    /// `id:`
    pub id: Option<String>,
    /// `event:`
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
    /// `:` comment lines, without the colon.
    pub comments: Vec<String>,
}

impl SseMessage {
    /// The data as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
    }

    /// Whether the block is comments only.
    pub fn is_comment(&self) -> bool {
        self.id.is_none() && self.event.is_none() && self.data.is_empty()
    }
}

/// A connected event stream.
pub struct SseClient {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: String,
}

impl SseClient {
    /// `GET url` with these headers; the status, and the stream when it is 200.
    pub async fn connect(
        client: &reqwest::Client,
        url: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Option<Self>) {
        let mut request = client.get(url).header("accept", "text/event-stream");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status().as_u16();
        if status != 200 {
            return (status, None);
        }
        let client = Self {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        };
        (status, Some(client))
    }

    /// Connect, failing the test unless the answer is 200.
    pub async fn open(client: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Self {
        match Self::connect(client, url, headers).await {
            (200, Some(stream)) => stream,
            (status, _) => panic!("GET {url} answered {status}"),
        }
    }

    /// The next block, or `None` when the stream ends.
    pub async fn next(&mut self) -> Option<SseMessage> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                return Some(parse_block(&block));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self
                    .buffer
                    .push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n")),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next event, skipping comment blocks; `None` when the stream ends.
    pub async fn next_event(&mut self) -> Option<SseMessage> {
        loop {
            let message = self.next().await?;
            if !message.is_comment() {
                return Some(message);
            }
        }
    }
}

fn parse_block(block: &str) -> SseMessage {
    let mut message = SseMessage::default();
    let mut data = Vec::new();
    for line in block.lines() {
        if let Some(comment) = line.strip_prefix(':') {
            message.comments.push(comment.trim_start().to_owned());
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => message.id = Some(value.to_owned()),
            "event" => message.event = Some(value.to_owned()),
            "data" => data.push(value.to_owned()),
            _ => {}
        }
    }
    message.data = data.join("\n");
    message
}
