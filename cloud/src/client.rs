//! A small client of the HTTP/JSON API, used by `tiervec-cloud load`, the tests and the
//! benchmarks.

use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::transport::http::{
    CollectionDescription, CreateCollection, ErrorBody, PointIn, PointOut, SearchRequest,
    SearchResponse, UpsertPoints, WriteAck,
};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("request failed: {0}")]
    Transport(#[from] reqwest::Error),
    #[error("server answered {status}: {code}: {message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
}

/// The error an unsuccessful response is: its status and the API's error body (code and
/// message), or `unknown` where the body is not one.
async fn refusal(resp: reqwest::Response) -> ClientError {
    let status = resp.status();
    let body: ErrorBody = resp.json().await.unwrap_or(ErrorBody {
        code: "unknown".into(),
        message: String::new(),
    });
    ClientError::Api {
        status,
        code: body.code,
        message: body.message,
    }
}

/// An API client bound to one server and (optionally) one API key.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    /// `base` is like `http://127.0.0.1:6380`.
    pub fn new(base: &str, key: Option<String>) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            key,
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let req = match &self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        };
        let resp = req.send().await?;
        if resp.status().is_success() {
            return Ok(resp.json().await?);
        }
        Err(refusal(resp).await)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn create_collection(
        &self,
        req: &CreateCollection,
    ) -> Result<CollectionDescription, ClientError> {
        self.post("/v1/collections", req).await
    }

    pub async fn collection(&self, name: &str) -> Result<CollectionDescription, ClientError> {
        self.send(self.http.get(self.url(&format!("/v1/collections/{name}"))))
            .await
    }

    pub async fn upsert(&self, name: &str, points: Vec<PointIn>) -> Result<WriteAck, ClientError> {
        self.send(
            self.http
                .put(self.url(&format!("/v1/collections/{name}/points")))
                .json(&UpsertPoints { points }),
        )
        .await
    }

    pub async fn delete(&self, name: &str, ids: Vec<u64>) -> Result<WriteAck, ClientError> {
        self.post(
            &format!("/v1/collections/{name}/points/delete"),
            &crate::transport::http::DeletePoints { ids },
        )
        .await
    }

    /// The stored point `id`, or `None` where the collection has none.
    pub async fn point(&self, name: &str, id: u64) -> Result<Option<PointOut>, ClientError> {
        let got = self
            .send(
                self.http
                    .get(self.url(&format!("/v1/collections/{name}/points/{id}"))),
            )
            .await;
        match got {
            Err(ClientError::Api { status, code, .. })
                if status == StatusCode::NOT_FOUND && code == "point_not_found" =>
            {
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    pub async fn search(
        &self,
        name: &str,
        req: &SearchRequest,
    ) -> Result<SearchResponse, ClientError> {
        self.post(&format!("/v1/collections/{name}/search"), req)
            .await
    }

    /// A first snapshot file for an edge of collection `name`: at most `max_vectors` (the
    /// server's default when `None`), carrying the collection's identity.
    pub async fn edge_snapshot(
        &self,
        name: &str,
        max_vectors: Option<usize>,
    ) -> Result<Vec<u8>, ClientError> {
        let mut req = self
            .http
            .get(self.url(&format!("/v1/collections/{name}/snapshot")));
        if let Some(n) = max_vectors {
            req = req.query(&[("max_vectors", n)]);
        }
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await?;
        if resp.status().is_success() {
            return Ok(resp.bytes().await?.to_vec());
        }
        Err(refusal(resp).await)
    }

    pub async fn ready(&self) -> bool {
        matches!(self.http.get(self.url("/readyz")).send().await, Ok(r) if r.status().is_success())
    }
}
