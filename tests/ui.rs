//! The dashboard end to end, in headless Chromium driven through
//! ChromeDriver (Debian's `chromium` and `chromium-driver`, installed by
//! `scripts/install-chromium.sh`): the page loads for a running fleet and
//! shows its agents; a replica killed through the chaos API shows up as a
//! restart and as events without the page being reloaded; the page fits a
//! phone's width.
//!
//! With `FLOTILLA_UI_SCREENSHOT=PATH` the test also saves a screenshot of
//! the dashboard there (the one in the README comes from this).

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use support::*;

const TOKEN: &str = "dashboard-token-5a6b7c8d";

/// ChromeDriver on a free loopback port, in its own process group so that
/// the browsers it starts die with it.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start(chromedriver: &std::path::Path) -> Self {
        use std::os::unix::process::CommandExt;
        let mut child = die_with_parent(&mut Command::new(chromedriver))
            .args(["--port=0", "--allowed-ips=127.0.0.1"])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("chromedriver starts");
        // It prints "ChromeDriver was started successfully on port N."
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("on port ").nth(1)
                    && line.contains("started successfully")
                {
                    let _ = sender.send(rest.trim_end_matches('.').parse::<u16>().ok());
                }
            }
        });
        let port = receiver
            .recv_timeout(Duration::from_secs(20))
            .ok()
            .flatten()
            .expect("chromedriver says which port it listens on within 20 s");
        Self { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A headless Chromium session with a fresh profile, with no traffic to
/// anything but loopback (this machine's network is closed).
async fn browser(driver: &Driver, chromium: &std::path::Path, profile: &std::path::Path) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    tokio::time::timeout(
        Duration::from_secs(60),
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", driver.port)),
    )
    .await
    .expect("a browser session within 60 s")
    .expect("a browser session")
}

/// Evaluates `expression` in the page.
async fn eval(client: &Client, expression: &str) -> Value {
    client
        .execute(&format!("return {expression};"), vec![])
        .await
        .unwrap_or_else(|error| panic!("evaluating {expression}: {error}"))
}

/// Waits until `expression` is true in the page; panics with `what` and
/// the page's text otherwise.
async fn wait_for(client: &Client, limit: Duration, what: &str, expression: &str) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if eval(client, expression).await == Value::Bool(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = eval(client, "document.body.innerText").await;
    panic!(
        "timed out after {limit:?} waiting for {what}; the page says:\n{}",
        text.as_str().unwrap_or_default()
    );
}

/// The cells of the replicas table, one array of texts per row.
const ROWS: &str = "Array.from(document.querySelectorAll('#replicas tbody tr')).map(r => Array.from(r.cells).map(c => c.textContent))";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_killed_replica_restart_live() {
    let test = "the_dashboard_shows_a_killed_replica_restart_live";
    let Some(chromium) = tool(
        test,
        "chromium",
        "FLOTILLA_CHROMIUM",
        "scripts/install-chromium.sh",
    ) else {
        return;
    };
    let Some(chromedriver) = tool(
        test,
        "chromedriver",
        "FLOTILLA_CHROMEDRIVER",
        "scripts/install-chromium.sh",
    ) else {
        return;
    };
    let fleet = Fleet::new(&format!(
        r#"[chaos]
enabled = true

[agents.coder]
command = {coder}
replicas = {{ min = 2 }}

[agents.reviewer]
command = {reviewer}
retry = {{ max_deliver = 1 }}
breaker = {{ enabled = false }}
"#,
        coder = example_agent(&["--work-ms", "50"]),
        reviewer = example_agent(&["--work-ms", "1", "--error-rate", "1.0"]),
    ));
    fleet.set_token(TOKEN);
    let daemon = fleet.start().await;
    let address = daemon.http_address().unwrap();
    daemon
        .queue()
        .submit(numbered_tasks("coder", 40, "feature").0)
        .await
        .unwrap();
    daemon
        .queue()
        .submit(numbered_tasks("reviewer", 2, "review").0)
        .await
        .unwrap();

    let driver = Driver::start(&chromedriver);
    let client = browser(&driver, &chromium, &fleet.path("chromium-profile")).await;
    client
        .goto(&format!("http://{address}/ui"))
        .await
        .expect("the page loads");
    // Without the token the page may read nothing: it says so.
    wait_for(
        &client,
        Duration::from_secs(20),
        "the page to ask for the token",
        "document.getElementById('error').textContent.length > 0",
    )
    .await;
    // The operator types the token; the page follows from then on.
    let token = client.find(Locator::Css("#token")).await.unwrap();
    token.send_keys(TOKEN).await.unwrap();
    client
        .execute(
            "document.getElementById('token').dispatchEvent(new Event('change'))",
            vec![],
        )
        .await
        .unwrap();
    wait_for(
        &client,
        Duration::from_secs(20),
        "both agents, two ready coder replicas and the dead letters",
        "(() => { const agents = document.querySelector('#agents tbody').innerText; \
         const replicas = document.querySelector('#replicas tbody').innerText; \
         const dlq = document.querySelector('#dlq tbody').innerText; \
         return agents.includes('coder') && agents.includes('reviewer') && agents.includes('2/2') \
         && replicas.includes('coder/0') && replicas.includes('coder/1') && dlq.includes('review-00001'); })()",
    )
    .await;
    let rows = eval(&client, ROWS).await;
    let restarts_before: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row[0].as_str().unwrap_or_default().starts_with("coder/"))
        .map(|row| row[4].as_str().unwrap())
        .collect();
    assert_eq!(restarts_before, ["0", "0"], "{rows}");
    // A mark on this page: it is gone if the page ever reloads.
    eval(&client, "(window.flotillaTestMark = 'same page', true)").await;

    let killed = reqwest::Client::new()
        .post(format!("http://{address}/api/v1/chaos/kill"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(json!({"agent": "coder", "mode": "one"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(killed.status().as_u16(), 200);

    wait_for(
        &client,
        Duration::from_secs(30),
        "the chaos action and the restart in the event feed, and one restart in the replicas table",
        "(() => { const feed = document.getElementById('feed').innerText; \
         const restarted = Array.from(document.querySelectorAll('#replicas tbody tr')) \
           .filter(r => r.cells[0].textContent.startsWith('coder/') && r.cells[4].textContent === '1'); \
         return feed.includes('chaos: chaos kill on agent coder') \
           && /replica_restarted: coder\\/[01] restarting/.test(feed) && restarted.length === 1; })()",
    )
    .await;
    assert_eq!(
        eval(&client, "window.flotillaTestMark").await,
        json!("same page"),
        "the page was reloaded"
    );
    // Both replicas ready again, and the restart still counted.
    wait_for(
        &client,
        Duration::from_secs(20),
        "the coder back at 2/2 ready",
        "document.querySelector('#agents tbody').innerText.includes('2/2')",
    )
    .await;
    if let Some(path) = std::env::var_os("FLOTILLA_UI_SCREENSHOT") {
        // Some load first, for the sparklines to show.
        for batch in 0..4 {
            daemon
                .queue()
                .submit(numbered_tasks("coder", 100, &format!("load{batch}")).0)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let png = client.screenshot().await.unwrap();
        std::fs::write(&path, png).unwrap();
        eprintln!("saved the dashboard to {}", path.to_string_lossy());
    }

    // Readable on a phone: nothing wider than the screen but the tables,
    // which scroll inside their own boxes.
    client.set_window_size(390, 844).await.unwrap();
    wait_for(
        &client,
        Duration::from_secs(5),
        "the page to fit a phone's width",
        "document.documentElement.scrollWidth <= window.innerWidth",
    )
    .await;

    client.close().await.unwrap();
    drop(driver);
    daemon.stop().await;
}
