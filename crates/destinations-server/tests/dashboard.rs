//! The dashboard in headless Chromium (Debian's, driven over WebDriver by its chromedriver):
//! a real server process, real sends, a real receiver. Screenshots of the main views go to
//! `target/dashboard-screenshots/` (the README's come from there).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

mod common;

use common::Server;
use destinations_testkit::{Receiver, Reply, TempDir, require_command};

/// How long the page may take to show something (generous: the machine is shared).
const PATIENCE: Duration = Duration::from_secs(20);

/// chromedriver on a free port, and a headless Chromium session through it.
struct Browser {
    driver: tokio::process::Child,
    client: Client,
    _profile: TempDir,
}

impl Browser {
    async fn open() -> Self {
        let chromedriver = require_command("chromedriver", "the dashboard's browser tests");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("{e}"));
        // A process group of its own: the browsers it starts go with it, whatever ends the test.
        let driver = tokio::process::Command::new(chromedriver)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start chromedriver: {e}"));
        let profile = TempDir::new("dashboard-chromium");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({"args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1440,1000", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                format!("--user-data-dir={}", profile.path().display()),
            ]}),
        );
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let client = loop {
            let mut builder =
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
            builder.capabilities(capabilities.clone());
            match builder.connect(&url).await {
                Ok(client) => break client,
                Err(error) if started.elapsed() < PATIENCE => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("chromedriver did not start a session: {error}"),
            }
        };
        Self {
            driver,
            client,
            _profile: profile,
        }
    }

    async fn close(self) {
        let _ = self.client.clone().close().await;
        // Drop ends chromedriver and its browsers.
    }

    /// Wait for the element `css` to be there.
    async fn element(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("`{css}` never appeared: {e}"))
    }

    /// The value of a script (`return ...`).
    async fn eval(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    /// Wait until the script returns true.
    async fn until(&self, what: &str, script: &str) {
        let started = Instant::now();
        while self.eval(script).await != json!(true) {
            assert!(
                started.elapsed() < PATIENCE,
                "{what}: not within {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn go(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }

    /// Click the element `css`, finding it again if the page replaced it meanwhile (the
    /// live updates rebuild rows).
    async fn click(&self, css: &str) {
        let started = Instant::now();
        loop {
            match self.element(css).await.click().await {
                Ok(()) => return,
                Err(error)
                    if error.to_string().contains("stale") && started.elapsed() < PATIENCE => {}
                Err(error) => panic!("clicking `{css}`: {error}"),
            }
        }
    }

    /// Save what the window shows as `target/dashboard-screenshots/NAME.png`.
    async fn screenshot(&self, name: &str) {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/dashboard-screenshots");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Wait for send `id` to be delivered (a replay the page asked for lands a moment after the
/// click; until then the send is still dead).
async fn delivered_eventually(server: &Server, id: &str) {
    let started = Instant::now();
    loop {
        let (_, status) = server.get(&format!("/v1/events/{id}?wait=5s")).await;
        if status["state"] == "delivered" {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{id} was not delivered: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Browser {
    /// chromedriver and every browser it started (its process group, by id), also when a
    /// test fails.
    fn drop(&mut self) {
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

/// A row of the table `table` for send `id`.
fn row_of(table: &str, id: &str) -> String {
    format!("return !!document.querySelector('#{table} tbody tr[data-id=\"{id}\"]')")
}

#[tokio::test]
async fn the_dashboard_shows_sends_live_filters_them_and_replays_dead_letters() {
    let accepting = Arc::new(AtomicBool::new(false));
    let flag = accepting.clone();
    let receiver = Receiver::scripted(move |request| {
        if request.uri.starts_with("/gone") && !flag.load(Ordering::SeqCst) {
            Reply::Full(410, vec![], "gone for now".into())
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let server = Server::start(None).await;
    let send = |path: &str, run: &str| {
        let (server, url) = (&server, receiver.url(path));
        let run = run.to_owned();
        async move {
            server
                .post_run(vec![
                    json!({"destination": "http", "payload": {"url": url, "data": {"order": 42}}}),
                ])
                .await
                .into_iter()
                .next()
                .map(|id| (id, run))
                .unwrap_or_else(|| panic!("no id"))
        }
    };
    let mut delivered = Vec::new();
    for _ in 0..8 {
        delivered.push(send("/ok", "checkout").await.0);
    }
    let (dead, _) = send("/gone", "checkout").await;
    assert_eq!(server.final_status(&dead).await["state"], "dead");
    let email = server
        .post(
            "/v1/send/email",
            &json!({"subject": "Order 42", "text": "thanks"}),
        )
        .await;
    assert_eq!(email.0, 202, "{}", email.1);

    let browser = Browser::open().await;
    // The overview: every destination with its counts, and the chart.
    browser.go(&format!("{}/", server.base)).await;
    browser
        .element("#destinations tbody tr[data-name='http']")
        .await;
    browser
        .until(
            "the live stream connects",
            "return document.querySelector('#live').classList.contains('on')",
        )
        .await;
    for _ in 0..8 {
        browser
            .until(
                "the counts arrive",
                "return document.querySelector('#stat-queued').textContent !== '–'",
            )
            .await;
        delivered.push(send("/ok", "checkout").await.0);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The http row counts every delivery made (one dead), and the rate saw them go.
    for id in &delivered {
        assert_eq!(server.final_status(id).await["state"], "delivered");
    }
    let cells = "document.querySelector('#destinations tbody tr[data-name=\"http\"]').cells";
    browser
        .until(
            "the http row counts the deliveries",
            &format!(
                "const c = {cells}; return Number(c[5].textContent.replace(/\\D/g, '')) === {} \
                 && c[6].textContent === '1' && c[8].textContent.includes('HTTP 410')",
                delivered.len()
            ),
        )
        .await;
    browser
        .until(
            "a delivery rate was drawn",
            "return window.__peakDelivered > 0",
        )
        .await;
    browser.screenshot("overview").await;

    // Sends: a send made now appears without a reload.
    browser.click("#tabs a[data-view='sends']").await;
    browser
        .element(&format!("#send-list tbody tr[data-id='{}']", delivered[0]))
        .await;
    browser.eval("window.notReloaded = true; return true").await;
    let made = Instant::now();
    let (fresh, _) = send("/ok", "live").await;
    browser
        .until("a new send shows up", &row_of("send-list", &fresh))
        .await;
    let appeared = made.elapsed();
    assert_eq!(
        browser.eval("return window.notReloaded === true").await,
        json!(true),
        "the page was not reloaded"
    );
    eprintln!("a send made with the API appeared on the page after {appeared:?}");

    // Filters: the dead one alone.
    browser
        .element("#f-state")
        .await
        .select_by_value("dead")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    browser.click("#filters button[type='submit']").await;
    browser
        .until(
            "only dead sends are listed",
            "const rows = [...document.querySelectorAll('#send-list tbody tr')]; \
             return rows.length > 0 && rows.every(r => r.querySelector('[data-state]').dataset.state === 'dead')",
        )
        .await;
    assert_eq!(browser.eval(&row_of("send-list", &dead)).await, json!(true));
    assert_eq!(
        browser.eval(&row_of("send-list", &fresh)).await,
        json!(false)
    );
    browser
        .element("#f-destination")
        .await
        .select_by_value("email")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    browser.click("#filters button[type='submit']").await;
    browser
        .until("no dead email", "return document.querySelectorAll('#send-list tbody tr').length === 0 && !document.querySelector('#send-empty').hidden")
        .await;
    browser.click("#filters button[type='reset']").await;
    browser
        .until("the filters cleared", &row_of("send-list", &fresh))
        .await;

    // A send's detail: every attempt, the answer, the payload of a dead letter; replay it.
    browser
        .click(&format!("#send-list tbody tr[data-id='{dead}']"))
        .await;
    browser.element("#detail #attempts").await;
    let detail = browser
        .eval("return document.querySelector('#detail').textContent")
        .await;
    let detail = detail.as_str().unwrap_or_default();
    assert!(
        detail.contains("410") && detail.contains("gone for now"),
        "{detail}"
    );
    assert!(
        detail.contains("\"order\": 42"),
        "the dead letter's payload is shown: {detail}"
    );
    browser.screenshot("send-detail").await;
    accepting.store(true, Ordering::SeqCst);
    browser.click("#detail-replay").await;
    browser
        .until(
            "the replayed send shows delivered",
            "return document.querySelector('#detail .head .badge')?.textContent === 'delivered'",
        )
        .await;
    assert_eq!(server.final_status(&dead).await["state"], "delivered");
    accepting.store(false, Ordering::SeqCst);

    // Dead letters: several, replayed by selection.
    let mut letters = Vec::new();
    for _ in 0..3 {
        let (id, _) = send("/gone", "nightly").await;
        assert_eq!(server.final_status(&id).await["state"], "dead");
        letters.push(id);
    }
    browser.click("#tabs a[data-view='dead']").await;
    for id in &letters {
        browser
            .element(&format!("#dead-list tbody tr[data-id='{id}']"))
            .await;
    }
    browser
        .click(&format!(
            "#dead-list tbody tr[data-id='{}'] input",
            letters[0]
        ))
        .await;
    browser
        .click(&format!(
            "#dead-list tbody tr[data-id='{}'] input",
            letters[1]
        ))
        .await;
    browser.screenshot("dead-letters").await;
    accepting.store(true, Ordering::SeqCst);
    browser.click("#replay-selected").await;
    browser
        .until(
            "the page says the letters are queued again",
            "return document.querySelector('#dead-message').textContent.startsWith('2 queued again')",
        )
        .await;
    for id in &letters[..2] {
        delivered_eventually(&server, id).await;
        browser
            .until(
                "a replayed letter leaves the list",
                &format!("return !document.querySelector('#dead-list tbody tr[data-id=\"{id}\"]')"),
            )
            .await;
    }
    assert_eq!(
        browser.eval(&row_of("dead-list", &letters[2])).await,
        json!(true),
        "the unselected one stays"
    );
    // All of a destination.
    browser
        .element("#replay-destination")
        .await
        .select_by_value("http")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    browser.click("#replay-all").await;
    delivered_eventually(&server, &letters[2]).await;
    browser
        .until(
            "the list empties",
            "return !document.querySelector('#dead-empty').hidden",
        )
        .await;

    // Endpoints: pause and resume the receiver's host.
    let target = receiver.addr().to_string();
    browser.click("#tabs a[data-view='endpoints']").await;
    let row = format!("#endpoint-list tbody tr[data-target='{target}']");
    browser.click(&format!("{row} button")).await;
    browser
        .until(
            "the host shows paused",
            &format!("return document.querySelector(\"{row} .badge\")?.textContent === 'paused'"),
        )
        .await;
    browser.screenshot("endpoints").await;
    browser.click(&format!("{row} button")).await;
    browser
        .until(
            "the host shows open",
            &format!("return document.querySelector(\"{row} .badge\")?.textContent === 'open'"),
        )
        .await;
    // The overview again, with the minute's traffic drawn.
    browser.click("#tabs a[data-view='overview']").await;
    browser
        .until(
            "the chart has points",
            "return document.querySelector('#stat-delivered').textContent !== '–'",
        )
        .await;
    browser.screenshot("overview").await;
    browser.close().await;
}

#[tokio::test]
async fn with_an_api_token_the_dashboard_asks_for_it_and_refuses_a_wrong_one() {
    const TOKEN: &str = "dashboard-token-for-tests-0001";
    let server = Server::start_with(None, &[("DESTINATIONS__API_TOKEN", TOKEN)]).await;
    let browser = Browser::open().await;
    browser.go(&format!("{}/", server.base)).await;
    browser
        .until(
            "the page asks for the token",
            "return !document.querySelector('#sign-in').hidden",
        )
        .await;
    assert_eq!(
        browser
            .eval("return document.querySelector('#tabs').hidden")
            .await,
        json!(true)
    );
    let token = browser.element("#token").await;
    token
        .send_keys("not-the-token-at-all-0000")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    browser.click("#sign-in-form button[type='submit']").await;
    browser
        .until("a wrong token is refused", "return document.querySelector('#sign-in-error').textContent.includes('not this server')")
        .await;
    browser.screenshot("sign-in").await;
    // Nothing behind the token opened for the browser.
    let status = browser
        .eval("return fetch('/v1/events').then(r => r.status)")
        .await;
    assert_eq!(status, json!(401));
    let token = browser.element("#token").await;
    token.clear().await.unwrap_or_else(|e| panic!("{e}"));
    token
        .send_keys(TOKEN)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    browser.click("#sign-in-form button[type='submit']").await;
    browser.until("signed in", "return !document.querySelector('#tabs').hidden && !document.querySelector('#overview').hidden").await;
    browser
        .until(
            "the live stream connects with the session",
            "return document.querySelector('#live').classList.contains('on')",
        )
        .await;
    browser
        .element("#destinations tbody tr[data-name='http']")
        .await;
    // The token is in no URL, and the session cookie is out of the page's reach.
    let url = browser
        .client
        .current_url()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!url.as_str().contains(TOKEN), "{url}");
    let cookies = browser.eval("return document.cookie").await;
    assert!(
        !cookies
            .as_str()
            .unwrap_or_default()
            .contains("destinations_session"),
        "{cookies}"
    );
    // Signing out ends the session on the server, not only in this browser.
    let cookies = browser
        .client
        .get_all_cookies()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let session = cookies
        .iter()
        .find(|c| c.name() == "destinations_session")
        .map(|c| format!("destinations_session={}", c.value()))
        .unwrap_or_else(|| panic!("no session cookie: {cookies:?}"));
    let with_cookie = || {
        server
            .http
            .get(format!("{}/v1/events", server.base))
            .header("cookie", session.clone())
            .send()
    };
    let before = with_cookie().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(before.status().as_u16(), 200, "the session opens the API");
    browser.click("#sign-out").await;
    browser
        .until(
            "asked again",
            "return !document.querySelector('#sign-in').hidden",
        )
        .await;
    let status = browser
        .eval("return fetch('/v1/events').then(r => r.status)")
        .await;
    assert_eq!(status, json!(401));
    let after = with_cookie().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        after.status().as_u16(),
        401,
        "the server closed the session"
    );
    browser.close().await;
}
