//! The published API description matches the server.

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::*;

/// Every operation in `/api/openapi.json` is routed (an unrouted path answers 404 `not_found`
/// with "no such endpoint", a wrong method 405).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (status, doc) = app.get("/api/openapi.json", &Auth::None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 19, "only {} paths documented", paths.len());
    let mut checked = 0;
    for (path, ops) in paths {
        let concrete = path.replace("{id}", "00000000-0000-0000-0000-000000000000");
        for method in ops.as_object().unwrap().keys() {
            let url = app.url(&concrete);
            let req = match method.as_str() {
                "get" => app.client.get(&url),
                "post" => app.client.post(&url).body("{}"),
                "delete" => app.client.delete(&url),
                _ => continue,
            };
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(
                !(status == StatusCode::NOT_FOUND
                    && body["error"]["message"] == "no such endpoint"),
                "{method} {path} is documented but not routed"
            );
            checked += 1;
        }
    }
    assert!(checked >= 20);
    app.cleanup().await;
}
