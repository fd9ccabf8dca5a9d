//! A tiervec deployment on loopback, as the demo and `bench e2e` run it: certificates made on
//! the fly, `tiervec-cloud` bulk-loaded with the dataset and serving HTTP and QUIC, and
//! `tiervec-edge` processes serving their snapshots over local HTTP with the cloud as fallback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use tiervec_cloud::certs::CertDir;
use tiervec_edge::config::{CloudLinkConfig, EdgeConfig};
use tiervec_edge::link::LinkConfig;
use tiervec_shared::CollectionId;
use tiervec_shared::confidence::ConfidenceRule;

use crate::dataset::Dataset;
use crate::measure::recall_at_10;
use crate::procs::{self, Process};

/// The collection the dataset is loaded into.
pub const COLLECTION: &str = "wordnet";
/// The cloud `ef` ladder tried for its own recall ≥ 0.99.
const CLOUD_EF_LADDER: [usize; 6] = [64, 96, 128, 160, 192, 256];
const CLOUD_RECALL_TARGET: f64 = 0.99;

/// A running cloud process and how to reach it.
pub struct Cloud {
    pub process: Process,
    pub http_base: String,
    pub quic_addr: SocketAddr,
    pub certs: CertDir,
    pub dir: PathBuf,
    /// `serve`'s arguments, for [`Cloud::restart`].
    serve_args: Vec<String>,
}

/// What [`start_cloud_with`] loads and how the cloud serves.
#[derive(Debug, Clone, Default)]
pub struct CloudSpec {
    /// Load only the first this many base vectors (`None`: all of them).
    pub rows: Option<usize>,
    /// More `--set key=value` settings for `serve` (e.g. push knobs).
    pub settings: Vec<String>,
}

/// Makes certificates for `edges`, bulk-loads the dataset into a fresh data directory under
/// `dir` with `tiervec-cloud load`, and starts `tiervec-cloud serve` (HTTP and QUIC, one tokio
/// worker). It builds its graph in the background: see [`Cloud::wait_indexed`].
pub fn start_cloud(dir: &Path, ds: &Dataset, edges: &[String]) -> anyhow::Result<Cloud> {
    start_cloud_with(dir, ds, edges, &CloudSpec::default())
}

/// [`start_cloud`] with a corpus of `spec.rows` and `spec.settings` added to `serve`'s.
pub fn start_cloud_with(
    dir: &Path,
    ds: &Dataset,
    edges: &[String],
    spec: &CloudSpec,
) -> anyhow::Result<Cloud> {
    let certs = CertDir {
        dir: dir.join("certs"),
        deployment: "tiervec-testbed".into(),
    };
    certs.ensure_ca()?;
    certs.issue_server(&["localhost".into()])?;
    for name in edges {
        certs.issue_edge(name)?;
    }
    let data_dir = dir.join("cloud-data");
    let _ = std::fs::remove_dir_all(&data_dir);
    let t = Instant::now();
    let rows = spec.rows.unwrap_or(ds.base.rows()).min(ds.base.rows());
    let load = std::process::Command::new(procs::binary("tiervec-cloud")?)
        .arg("load")
        .args(["--collection", COLLECTION])
        .arg("--fvecs")
        .arg(ds.dir.join("base.fvecs"))
        .arg("--jsonl")
        .arg(ds.dir.join("base.jsonl"))
        .args(["--limit", &rows.to_string()])
        .arg("--data-dir")
        .arg(&data_dir)
        .stderr(std::process::Stdio::null())
        .status()
        .context("running tiervec-cloud load")?;
    anyhow::ensure!(load.success(), "tiervec-cloud load failed");
    eprintln!(
        "  cloud: loaded {rows} vectors durably in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let quic_addr: SocketAddr = format!("127.0.0.1:{}", procs::free_udp_port()?).parse()?;
    let acl = edges
        .iter()
        .map(|n| format!("\"{n}\" = [\"{COLLECTION}\"]"))
        .collect::<Vec<_>>()
        .join(", ");
    let addr_file = dir.join("cloud.addr");
    let mut args: Vec<String> = [
        "serve".to_owned(),
        "--set".into(),
        format!("data_dir={:?}", data_dir.to_string_lossy()),
        "--set".into(),
        "http_addr=\"127.0.0.1:0\"".into(),
        "--set".into(),
        format!("quic_addr=\"{quic_addr}\""),
        "--set".into(),
        format!("certs_dir={:?}", certs.dir.to_string_lossy()),
        "--set".into(),
        format!("edges={{ {acl} }}"),
        "--set".into(),
        "worker_threads=1".into(),
        "--addr-file".into(),
        addr_file.to_string_lossy().into_owned(),
    ]
    .into();
    for setting in &spec.settings {
        args.extend(["--set".to_owned(), setting.clone()]);
    }
    let (process, http_base) = serve(dir, &args)?;
    Ok(Cloud {
        process,
        http_base,
        quic_addr,
        certs,
        dir: dir.to_owned(),
        serve_args: args,
    })
}

/// How a cloud node joins a cluster ([`start_cluster_node`]).
pub struct ClusterSpec<'a> {
    /// The NATS servers' client URLs.
    pub nats: &'a [String],
    /// This node's name in the cluster.
    pub node: &'a str,
    /// Its QUIC address (edges list every node's).
    pub quic_addr: SocketAddr,
    /// More `--set key=value` settings (membership timings, replication).
    pub settings: Vec<String>,
}

/// Starts a `tiervec-cloud serve` node of a cluster on the NATS servers of `spec`, its data in
/// `dir/cloud-data` (made empty first), serving HTTP and QUIC with the certificates of `certs`
/// (issued beforehand) to `edges`.
pub fn start_cluster_node(
    dir: &Path,
    certs: &CertDir,
    edges: &[String],
    spec: &ClusterSpec,
) -> anyhow::Result<Cloud> {
    std::fs::create_dir_all(dir)?;
    let data_dir = dir.join("cloud-data");
    let _ = std::fs::remove_dir_all(&data_dir);
    let acl = edges
        .iter()
        .map(|n| format!("\"{n}\" = [\"{COLLECTION}\"]"))
        .collect::<Vec<_>>()
        .join(", ");
    let urls: Vec<String> = spec.nats.iter().map(|u| format!("{u:?}")).collect();
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--set".into(),
        format!("data_dir={:?}", data_dir.to_string_lossy()),
        "--set".into(),
        "http_addr=\"127.0.0.1:0\"".into(),
        "--set".into(),
        format!("quic_addr=\"{}\"", spec.quic_addr),
        "--set".into(),
        format!("certs_dir={:?}", certs.dir.to_string_lossy()),
        "--set".into(),
        format!("edges={{ {acl} }}"),
        "--set".into(),
        "worker_threads=1".into(),
        "--set".into(),
        format!("cluster.nats=[{}]", urls.join(",")),
        "--set".into(),
        format!("cluster.node={:?}", spec.node),
        "--set".into(),
        "cluster.prefix=\"DEMO\"".into(),
        "--addr-file".into(),
        dir.join("cloud.addr").to_string_lossy().into_owned(),
    ];
    for setting in &spec.settings {
        args.extend(["--set".to_owned(), setting.clone()]);
    }
    let (process, http_base) = serve(dir, &args)?;
    Ok(Cloud {
        process,
        http_base,
        quic_addr: spec.quic_addr,
        certs: CertDir {
            dir: certs.dir.clone(),
            deployment: certs.deployment.clone(),
        },
        dir: dir.to_owned(),
        serve_args: args,
    })
}

/// Creates the dataset's collection (of `shards` shards) at `bases[0]` and loads the first
/// `count` base vectors with their texts over HTTP, in batches of 1,000 spread over `bases`;
/// vectors a second.
pub async fn load_over_http(
    http: &reqwest::Client,
    bases: &[String],
    ds: &Dataset,
    texts: &[String],
    count: usize,
    shards: u32,
) -> anyhow::Result<f64> {
    let create = serde_json::json!({"name": COLLECTION, "dim": ds.base.dim, "metric": "cosine", "shards": shards});
    let r = http
        .post(format!("{}/v1/collections", bases[0]))
        .json(&create)
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "create: {}", r.text().await?);
    let t = Instant::now();
    for (b, start) in (0..count).step_by(1_000).enumerate() {
        let points: Vec<serde_json::Value> = (start..(start + 1_000).min(count))
            .map(|i| serde_json::json!({"id": i, "vector": ds.base.row(i), "payload": {"text": texts[i]}}))
            .collect();
        let r = http
            .put(format!(
                "{}/v1/collections/{COLLECTION}/points",
                bases[b % bases.len()]
            ))
            .json(&serde_json::json!({ "points": points }))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "load: {}", r.text().await?);
    }
    Ok(count as f64 / t.elapsed().as_secs_f64())
}

/// Starts `tiervec-cloud serve args…` and waits for the HTTP address it writes.
fn serve(dir: &Path, args: &[String]) -> anyhow::Result<(Process, String)> {
    let addr_file = dir.join("cloud.addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut process = Process::start(
        "tiervec-cloud",
        &procs::binary("tiervec-cloud")?,
        args,
        None,
        &dir.join("cloud.log"),
    )?;
    let http = procs::wait_addr_file(&addr_file, &mut process)?;
    Ok((process, format!("http://{http}")))
}

impl Cloud {
    /// Starts `serve` again on the same data directory, QUIC address and certificates (after
    /// the process was killed, or killing it first); its HTTP port is new.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        (self.process, self.http_base) = serve(&self.dir, &self.serve_args)?;
        Ok(())
    }

    /// Starts `serve` again on an empty data directory (a node of a cluster replays what it
    /// holds from the cluster's streams), killing it first if it runs.
    pub fn restart_empty(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        let _ = std::fs::remove_dir_all(self.dir.join("cloud-data"));
        (self.process, self.http_base) = serve(&self.dir, &self.serve_args)?;
        Ok(())
    }

    /// Waits until the cloud has recovered and its graph covers every point.
    pub async fn wait_indexed(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        procs::wait_http_ok(
            http,
            &format!("{}/readyz", self.http_base),
            Duration::from_secs(120),
        )
        .await?;
        wait_indexed(http, &self.http_base, &mut self.process).await
    }

    /// The smallest `ef` of the ladder at which the cloud's own recall@10 on `queries`
    /// (with their exact top-10 `truth`) reaches 0.99, measured through its HTTP API.
    pub async fn pick_ef(
        &self,
        http: &reqwest::Client,
        queries: &[&[f32]],
        truth: &[(&[u64], &[f32])],
    ) -> anyhow::Result<(usize, f64)> {
        let mut last = (0, 0.0);
        for ef in CLOUD_EF_LADDER {
            let mut recall = 0.0;
            for (q, (ids, distances)) in queries.iter().zip(truth) {
                let r: serde_json::Value = http
                    .post(format!(
                        "{}/v1/collections/{COLLECTION}/search",
                        self.http_base
                    ))
                    .json(&serde_json::json!({"vector": q, "k": 10, "ef": ef}))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                recall += recall_at_10(&hits_of(&r)?, ids, distances);
            }
            last = (ef, recall / queries.len().max(1) as f64);
            if last.1 >= CLOUD_RECALL_TARGET {
                break;
            }
        }
        Ok(last)
    }

    /// The identity of the dataset's collection in this cloud (waiting up to a minute for it
    /// to recover): edge snapshots must carry it, or the edges set them aside as belonging to
    /// another incarnation.
    pub async fn collection_id(&mut self, http: &reqwest::Client) -> anyhow::Result<CollectionId> {
        let url = format!("{}/v1/collections/{COLLECTION}", self.http_base);
        let deadline = Instant::now() + Duration::from_secs(60);
        let d: serde_json::Value = loop {
            let answer = match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => Some(r.json().await?),
                _ => None,
            };
            if let Some(d) = answer {
                break d;
            }
            self.process.check_alive()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "{url} did not answer within a minute"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let text = d["id"].as_str().context("collection without an id")?;
        let hex: String = text.chars().filter(|c| *c != '-').collect();
        Ok(CollectionId::from_u128(
            u128::from_str_radix(&hex, 16)
                .with_context(|| format!("collection id `{text}` is not a UUID"))?,
        ))
    }

    /// The LSN of each of `ids` in the dataset's collection (the write that last changed it),
    /// asked of the cloud 32 at a time: what an edge snapshot of those points must claim.
    pub async fn lsns(
        &self,
        http: &reqwest::Client,
        ids: impl IntoIterator<Item = u64>,
    ) -> anyhow::Result<std::collections::HashMap<u64, u64>> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(ids)
            .map(|id| async move {
                let point: serde_json::Value = http
                    .get(format!(
                        "{}/v1/collections/{COLLECTION}/points/{id}",
                        self.http_base
                    ))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                let lsn = point["lsn"].as_u64().context("point without an LSN")?;
                anyhow::Ok((id, lsn))
            })
            .buffer_unordered(32)
            .try_collect()
            .await
    }

    /// The link configuration of edge `name` (for an edge inside this process).
    pub fn link(&self, name: &str) -> LinkConfig {
        LinkConfig::new(
            self.quic_addr,
            "localhost",
            self.certs.ca_cert(),
            Some((self.certs.edge_cert(name), self.certs.edge_key(name))),
            name,
        )
    }
}

/// Waits until the graph of the dataset's collection on the (recovered) cloud at `base` covers
/// every point, failing if `cloud` exits.
pub async fn wait_indexed(
    http: &reqwest::Client,
    base: &str,
    cloud: &mut Process,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        cloud.check_alive()?;
        let d: serde_json::Value = http
            .get(format!("{base}/v1/collections/{COLLECTION}"))
            .send()
            .await?
            .json()
            .await?;
        if d["indexed_points"] == d["points"] {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cloud's graph took over 15 min"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How one edge process runs.
pub struct EdgeSpec<'a> {
    pub name: &'a str,
    /// The cache snapshot; it need not exist (a cold cache the cloud fills).
    pub snapshot: &'a Path,
    pub confidence: ConfidenceRule,
    /// The cache's byte budget (what the cloud may push).
    pub budget_bytes: u64,
    pub edge_ef: usize,
    pub cloud_ef: usize,
    pub deadline_ms: u64,
    /// `taskset` CPU list, if pinned.
    pub cpus: Option<&'a str>,
    /// Ask the cloud for certificates with its anchors.
    pub certify: bool,
    /// Answer local searches with this WASM guest (`serve --engine wasm`); `None`: native.
    pub wasm_guest: Option<&'a Path>,
    /// The QUIC addresses of the cloud's other nodes, failed over to in this order.
    pub other_clouds: &'a [SocketAddr],
    /// The embedding model's folder: the edge then takes questions as text.
    pub model_dir: Option<&'a Path>,
}

/// A running edge process and its applications' endpoint.
pub struct Edge {
    pub process: Process,
    pub url: String,
    /// How it was started, for [`Edge::restart`]: arguments, CPU list and log file.
    args: Vec<String>,
    cpus: Option<String>,
    log: PathBuf,
}

/// Starts `tiervec-edge serve` (one tokio worker) with a config written next to the cloud's
/// files, linked to `cloud`.
pub fn start_edge(cloud: &Cloud, spec: &EdgeSpec) -> anyhow::Result<Edge> {
    start_edge_via(cloud, spec, cloud.quic_addr)
}

/// [`start_edge`] with the edge told to reach the cloud at `cloud_addr` (a relay in front of
/// it).
pub fn start_edge_via(
    cloud: &Cloud,
    spec: &EdgeSpec,
    cloud_addr: SocketAddr,
) -> anyhow::Result<Edge> {
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = EdgeConfig {
        name: spec.name.to_owned(),
        snapshot: spec.snapshot.to_owned(),
        collection: COLLECTION.into(),
        http_addr: format!("127.0.0.1:{http_port}").parse()?,
        confidence: spec.confidence,
        budget_bytes: spec.budget_bytes,
        deadline_ms: spec.deadline_ms,
        default_ef: spec.edge_ef,
        cloud_ef: spec.cloud_ef as u32,
        worker_threads: Some(1),
        certify: spec.certify,
        model_dir: spec.model_dir.map(Path::to_owned),
        cloud: Some(CloudLinkConfig {
            addr: cloud_addr,
            other_addrs: spec.other_clouds.to_vec(),
            idle_timeout_ms: 3_000,
            server_name: "localhost".into(),
            ca_cert: cloud.certs.ca_cert(),
            cert: cloud.certs.edge_cert(spec.name),
            key: cloud.certs.edge_key(spec.name),
        }),
        ..EdgeConfig::default()
    };
    let config_path = cloud.dir.join(format!("{}.toml", spec.name));
    std::fs::write(&config_path, toml::to_string(&config)?)?;
    let mut args = vec![
        "serve".into(),
        "--config".into(),
        config_path.to_string_lossy().into_owned(),
    ];
    if let Some(guest) = spec.wasm_guest {
        args.extend([
            "--engine".into(),
            "wasm".into(),
            "--guest".into(),
            guest.to_string_lossy().into_owned(),
        ]);
    }
    let log = cloud.dir.join(format!("{}.log", spec.name));
    let process = Process::start(
        spec.name,
        &procs::binary("tiervec-edge")?,
        &args,
        spec.cpus,
        &log,
    )?;
    Ok(Edge {
        process,
        url: format!("http://127.0.0.1:{http_port}"),
        args,
        cpus: spec.cpus.map(str::to_owned),
        log,
    })
}

impl Edge {
    /// Starts the edge again with the same configuration and files (after the process was
    /// killed, or killing it first).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        self.process = Process::start(
            &self.process.name.clone(),
            &procs::binary("tiervec-edge")?,
            &self.args,
            self.cpus.as_deref(),
            &self.log,
        )?;
        Ok(())
    }

    /// Waits until the edge serves HTTP and its link to the cloud is up.
    pub async fn wait_linked(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        procs::wait_http_ok(
            http,
            &format!("{}/healthz", self.url),
            Duration::from_secs(30),
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.process.check_alive()?;
            let text = self.metrics(http).await?;
            if text.lines().any(|l| l.trim() == "tiervec_edge_link_up 1") {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}: no link to the cloud within 30 s",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The edge's Prometheus exposition (`GET /metrics`).
    pub async fn metrics(&self, http: &reqwest::Client) -> anyhow::Result<String> {
        Ok(http
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .text()
            .await?)
    }

    /// The applications' search URL.
    pub fn search_url(&self) -> String {
        format!("{}/v1/collections/{COLLECTION}/search", self.url)
    }
}

/// The `(id, distance)` hits of a search response (cloud or edge).
pub fn hits_of(response: &serde_json::Value) -> anyhow::Result<Vec<(u64, f32)>> {
    response["hits"]
        .as_array()
        .context("response without hits")?
        .iter()
        .map(|h| {
            Ok((
                h["id"].as_u64().context("hit without id")?,
                h["distance"].as_f64().context("hit without distance")? as f32,
            ))
        })
        .collect()
}
