//! Headless Chromium driven over the DevTools protocol, with just what the browser tests need:
//! open a page, evaluate JavaScript in it, wait for a condition, take a screenshot. Chromium
//! comes from the system (see `chromium.rs`); nothing is downloaded.

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A running headless Chromium and the one page the test drives.
pub struct Browser {
    _process: tokio::process::Child,
    _profile: tempfile::TempDir,
    socket: Socket,
    session: String,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium at `path` and opens `url` in a page of 1280×900.
    pub async fn open(path: &str, url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut process = tokio::process::Command::new(path)
            .args(crate::chromium::HEADLESS)
            .arg("--remote-debugging-port=0")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("Chromium starts");
        let mut lines = tokio::io::BufReader::new(process.stderr.take().unwrap()).lines();
        let endpoint = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("Chromium exited without a DevTools endpoint");
        })
        .await
        .expect("Chromium's DevTools endpoint within 30 s");
        // Keep reading its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (socket, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .unwrap();
        let mut browser = Browser {
            _process: process,
            _profile: profile,
            socket,
            session: String::new(),
            next_id: 0,
        };
        let target = browser
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = browser
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        browser
            .page(
                "Emulation.setDeviceMetricsOverride",
                json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
            )
            .await;
        browser.page("Page.enable", json!({})).await;
        browser.page("Page.navigate", json!({ "url": url })).await;
        browser
    }

    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let answer = self.answer(session, method, params).await;
        assert!(answer["error"].is_null(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// The whole answer to a command: its `result`, or its `error`.
    async fn answer(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.socket
            .send(Message::text(message.to_string()))
            .await
            .unwrap();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(60), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within 60 s"))
                .expect("the DevTools socket is open")
                .unwrap();
            let Message::Text(text) = next else { continue };
            let answer: Value = serde_json::from_str(&text).unwrap();
            if answer["id"] == id {
                return answer;
            }
        }
    }

    /// A command to the page's session.
    async fn page(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.call(Some(&session), method, params).await
    }

    /// The value of a JavaScript expression in the page (awaited when it is a promise).
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .page(
                "Runtime.evaluate",
                json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// Types `text` into the focused element, then presses Enter, as a person would.
    pub async fn type_and_enter(&mut self, text: &str) {
        self.page("Input.insertText", json!({ "text": text })).await;
        for kind in ["keyDown", "keyUp"] {
            self.page(
                "Input.dispatchKeyEvent",
                json!({ "type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r" }),
            )
            .await;
        }
    }

    /// Waits until `expression` is truthy in the page (checked every 50 ms, for up to 30 s).
    pub async fn wait_for(&mut self, expression: &str) {
        let wrapped =
            format!("(() => {{ try {{ return !!({expression}); }} catch {{ return false; }} }})()");
        for _ in 0..600 {
            // While the page navigates, its context may be gone: that is a "not yet".
            let session = self.session.clone();
            let answer = self
                .answer(
                    Some(&session),
                    "Runtime.evaluate",
                    json!({ "expression": wrapped, "returnByValue": true }),
                )
                .await;
            if answer["result"]["result"]["value"] == json!(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let page = self
            .eval("document.body ? document.body.innerText.slice(0, 2000) : ''")
            .await;
        panic!("the page never showed `{expression}`; it reads: {page}");
    }

    /// Writes a PNG of the page under `target/screenshots/` and returns its path.
    pub async fn screenshot(&mut self, name: &str) -> std::path::PathBuf {
        let shot = self
            .page("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join(format!("{name}.png"));
        std::fs::write(&path, bytes).unwrap();
        path
    }
}
