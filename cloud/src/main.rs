//! `tiervec-cloud`: serve the cloud tier, bulk-load vectors, inspect the data directory.
//! Thin glue over the `tiervec_cloud` library.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::value::RawValue;
use tiervec_cloud::client::{Client, ClientError};
use tiervec_cloud::config::CloudConfig;
use tiervec_cloud::http::{CreateCollection, PointIn};
use tiervec_cloud::load::{Progress, Record, read_jsonl, read_vectors};
use tiervec_cloud::service::Service;
use tiervec_shared::hnsw::HnswParams;
use tiervec_shared::vecs::Matrix;
use tiervec_shared::{Metric, ModelIdentity};

#[derive(Parser)]
#[command(name = "tiervec-cloud", version, about = "tiervec cloud tier")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP/JSON API over the data directory.
    Serve {
        /// TOML configuration file (fields: see docs/cloud.md); env TIERVEC_CLOUD_<FIELD> and
        /// --set override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one field, e.g. `--set http_addr="127.0.0.1:0"` (TOML value syntax).
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        overrides: Vec<String>,
        /// Write the bound address here once listening (for scripts and tests).
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Bulk-load a user's data into a collection — JSON lines whose texts are embedded, or
    /// vectors (.fvecs, .npy) with or without JSON lines for ids and payloads — through a
    /// running server's API, or directly into a stopped server's data directory; an
    /// interrupted load goes on where it stopped.
    Load {
        #[arg(long)]
        collection: String,
        /// JSON lines, one point each: its `--id-field` is the point's id (line numbers when no
        /// line has one), the whole object its payload, its `--text-field` the text embedded
        /// when no `--vectors` are given.
        #[arg(long)]
        jsonl: Option<PathBuf>,
        /// Vectors, row i for line i of `--jsonl` (ids 0, 1, … without it): `.fvecs`, or
        /// `.npy` (a float32 array of shape (rows, dimension)).
        #[arg(long, alias = "fvecs")]
        vectors: Option<PathBuf>,
        #[arg(long, default_value = "id")]
        id_field: String,
        #[arg(long, default_value = "text")]
        text_field: String,
        /// The embedding model's folder, to embed the texts (the cloud must run the same
        /// model, `model_dir`, for text searches).
        #[arg(long, env = "TIERVEC_MODEL")]
        model: Option<PathBuf>,
        /// Server URL (API mode).
        #[arg(long, default_value = "http://127.0.0.1:6380")]
        url: String,
        #[arg(long, env = "TIERVEC_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Write straight into this data directory instead (the server must be stopped; the
        /// directory lock refuses a second writer).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The metric of the collection, when the load creates it.
        #[arg(long, default_value = "cosine")]
        metric: Metric,
        /// Points per write (and texts per embedding call).
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Load only the first N records.
        #[arg(long)]
        limit: Option<usize>,
        /// Load from the first record, not from where an interrupted load of the same input
        /// into the same collection stopped (`.tiervec-load/<collection>.<input>.loaded`).
        #[arg(long)]
        restart: bool,
    },
    /// Make a deployment's certificates: a CA (kept if it exists), the server certificate, one
    /// client certificate per edge (the edge id is its Common Name), and one per cluster node
    /// for the QUIC between nodes, for mutual TLS.
    Certs {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Name of the deployment, part of the CA's subject.
        #[arg(long, default_value = "default")]
        deployment: String,
        /// DNS names or IP addresses of the cloud (repeat); none keeps the server certificate.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Cluster node names to issue certificates for, for the QUIC between nodes (repeat).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Edge ids to issue certificates for (repeat).
        #[arg(long = "edge")]
        edges: Vec<String>,
    },
    /// Write an edge's first snapshot of a collection, from a running server: it carries the
    /// collection's identity (so the cloud accepts the edge) and the points edges ask for most,
    /// then the others in the order they were written.
    Snapshot {
        #[arg(long)]
        collection: String,
        /// The snapshot file to write (atomically); an edge's `snapshot` setting.
        #[arg(long)]
        out: PathBuf,
        /// Most vectors in it (default 10,000; at most 50,000).
        #[arg(long)]
        max_vectors: Option<usize>,
        /// Server URL.
        #[arg(long, default_value = "http://127.0.0.1:6380")]
        url: String,
        #[arg(long, env = "TIERVEC_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// Print the checkpoints and WAL segments of a data directory (read-only).
    Inspect {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Rewrite the WAL segments a server refuses to start on (damaged before their last
    /// flush) with every record that reads back whole; the originals are set aside as
    /// `*.log.damaged`. The server must be stopped.
    Repair {
        #[arg(long)]
        data_dir: PathBuf,
        /// Only report what would be kept and lost.
        #[arg(long)]
        dry_run: bool,
    },
}

/// How long `load` waits for a server that is starting to become ready.
const SERVER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            config,
            overrides,
            addr_file,
        } => {
            let config = CloudConfig::load(config.as_deref(), &overrides)?;
            init_logs(config.json_logs);
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = config.worker_threads {
                rt.worker_threads(n);
            }
            rt.enable_all()
                .build()?
                .block_on(tiervec_cloud::server::serve(
                    config,
                    move |addr| {
                        if let Some(path) = addr_file {
                            let _ = tiervec_shared::durable::write_atomic(
                                &path,
                                addr.to_string().as_bytes(),
                                false,
                            );
                        }
                    },
                    shutdown_signal(),
                ))?;
            Ok(())
        }
        Command::Snapshot {
            collection,
            out,
            max_vectors,
            url,
            api_key,
        } => {
            let bytes = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(Client::new(&url, api_key).edge_snapshot(&collection, max_vectors))?;
            // Checked as the edge will open it before it replaces anything.
            let mut aligned = tiervec_shared::snapshot::AlignedBytes::with_capacity(bytes.len());
            aligned.extend_from_slice(&bytes);
            let snapshot = tiervec_shared::snapshot::Snapshot::open(aligned)
                .context("the server's snapshot does not validate")?;
            let header = snapshot.header();
            tiervec_shared::durable::write_atomic(&out, &bytes, true)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {}: {} vectors of `{collection}` (dimension {}, identity {}), {} bytes",
                out.display(),
                header.count,
                header.spec.dim,
                header.spec.collection,
                bytes.len()
            );
            Ok(())
        }
        Command::Load {
            collection,
            jsonl,
            vectors,
            id_field,
            text_field,
            model,
            url,
            api_key,
            data_dir,
            metric,
            batch,
            limit,
            restart,
        } => {
            init_logs(false);
            let source = Source::open(
                jsonl.as_deref(),
                vectors.as_deref(),
                &id_field,
                &text_field,
                model.as_deref(),
                limit,
            )?;
            let input = jsonl.or(vectors).expect("Source::open needs an input");
            let progress = Progress::new(Path::new(".tiervec-load"), &input, &collection);
            let sink = match data_dir {
                Some(dir) => Sink::Direct(Box::new(Service::open(CloudConfig {
                    data_dir: dir,
                    ..CloudConfig::default()
                })?)),
                None => Sink::Api(
                    Client::new(&url, api_key),
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?,
                ),
            };
            let identity = sink.prepare(&collection, source.dim(), metric, source.model())?;
            let from = if restart {
                0
            } else {
                progress.done(&identity)?.min(source.len())
            };
            if from > 0 {
                eprintln!(
                    "resuming after {from} records already loaded ({}; --restart loads from the start)",
                    progress.path().display()
                );
            }
            let bar = ProgressBar::new(source.len() as u64).with_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} points {per_sec} eta {eta}")
                    .expect("valid template"),
            );
            bar.set_position(from as u64);
            let started = Instant::now();
            let mut done = from;
            while done < source.len() {
                let end = (done + batch.max(1)).min(source.len());
                let points = source.points(done..end)?;
                sink.upsert(&collection, points)?;
                done = end;
                progress.record(&identity, done)?;
                bar.set_position(done as u64);
            }
            bar.finish();
            eprintln!(
                "loaded {} points into `{collection}` in {:.1} s",
                source.len() - from,
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Inspect { data_dir } => {
            tiervec_cloud::inspect::report(&data_dir, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Repair { data_dir, dry_run } => {
            let _lock = tiervec_cloud::service::lock_data_dir(&data_dir)?;
            let repaired = tiervec_cloud::storage::wal::repair(&data_dir, dry_run)?;
            if repaired.is_empty() {
                println!(
                    "every WAL segment in {} reads back; nothing to repair",
                    data_dir.display()
                );
            }
            for r in &repaired {
                let lost: u64 = r.lost.iter().map(|(a, b)| b - a).sum();
                println!(
                    "{}: {} {} records; {lost} damaged bytes in {} ranges {:?}; LSNs missing between kept records: {:?}{}",
                    r.path.display(),
                    if dry_run { "would keep" } else { "kept" },
                    r.kept,
                    r.lost.len(),
                    r.lost,
                    r.lsn_gaps,
                    r.set_aside
                        .as_ref()
                        .map(|p| format!("; original set aside as {}", p.display()))
                        .unwrap_or_default(),
                );
            }
            Ok(())
        }
        Command::Certs {
            dir,
            deployment,
            server_names,
            nodes,
            edges,
        } => {
            let certs = tiervec_cloud::certs::CertDir { dir, deployment };
            if certs.ensure_ca()? {
                eprintln!("created CA {}", certs.ca_cert().display());
            }
            if !server_names.is_empty() {
                certs.issue_server(&server_names)?;
                eprintln!(
                    "issued {} for {}",
                    certs.server_cert().display(),
                    server_names.join(", ")
                );
            }
            for node in &nodes {
                certs.issue_node(node)?;
                eprintln!("issued {} for node {node}", certs.node_cert(node).display());
            }
            for edge in &edges {
                certs.issue_edge(edge)?;
                eprintln!("issued {} for edge {edge}", certs.edge_cert(edge).display());
            }
            Ok(())
        }
    }
}

#[allow(clippy::too_many_arguments)]
/// What a load reads: records and vectors, or records whose texts it embeds.
struct Source {
    records: Option<Vec<Record>>,
    vectors: Option<Matrix<f32>>,
    #[cfg(feature = "embed")]
    embedder: Option<tiervec_embed::Embedder>,
    len: usize,
}

impl Source {
    fn open(
        jsonl: Option<&Path>,
        vectors: Option<&Path>,
        id_field: &str,
        text_field: &str,
        model: Option<&Path>,
        limit: Option<usize>,
    ) -> anyhow::Result<Source> {
        let limit = limit.unwrap_or(usize::MAX);
        let mut records = jsonl
            .map(|p| read_jsonl(p, id_field, text_field))
            .transpose()?;
        let vectors = vectors.map(read_vectors).transpose()?;
        if let Some(r) = &mut records {
            r.truncate(limit);
        }
        let len = match (&records, &vectors) {
            (Some(r), Some(v)) => {
                anyhow::ensure!(
                    v.rows() >= r.len(),
                    "{} records but {} vectors: row i is the vector of line i",
                    r.len(),
                    v.rows()
                );
                r.len()
            }
            (Some(r), None) => {
                if let Some(i) = r.iter().position(|r| r.text.is_none()) {
                    anyhow::bail!(
                        "record {i} has no `{text_field}` to embed; give every record one, or --vectors"
                    );
                }
                r.len()
            }
            (None, Some(v)) => v.rows().min(limit),
            (None, None) => anyhow::bail!("nothing to load: give --jsonl, --vectors, or both"),
        };
        let embeds = vectors.is_none();
        #[cfg(feature = "embed")]
        let embedder = match (embeds, model) {
            (false, _) => None,
            (true, Some(dir)) => Some(tiervec_embed::Embedder::open(dir)?),
            (true, None) => anyhow::bail!(
                "the texts need the embedding model's folder: --model DIR (or TIERVEC_MODEL)"
            ),
        };
        #[cfg(not(feature = "embed"))]
        {
            let _ = model;
            anyhow::ensure!(
                !embeds,
                "this build has no embedder (cargo feature `embed`): give --vectors"
            );
        }
        Ok(Source {
            records,
            vectors,
            #[cfg(feature = "embed")]
            embedder,
            len,
        })
    }

    fn len(&self) -> usize {
        self.len
    }

    fn dim(&self) -> usize {
        match &self.vectors {
            Some(v) => v.dim,
            None => self.model().map_or(0, |m| m.dim as usize),
        }
    }

    /// The model the texts are embedded with, when they are.
    fn model(&self) -> Option<&ModelIdentity> {
        #[cfg(feature = "embed")]
        {
            self.embedder.as_ref().map(|e| e.identity())
        }
        #[cfg(not(feature = "embed"))]
        {
            None
        }
    }

    /// The points of records `range`: their vectors read or embedded.
    fn points(&self, range: std::ops::Range<usize>) -> anyhow::Result<Vec<PointIn>> {
        let vectors: Vec<Vec<f32>> = match &self.vectors {
            Some(v) => range.clone().map(|i| v.row(i).to_vec()).collect(),
            None => self.embed(range.clone())?,
        };
        range
            .zip(vectors)
            .map(|(i, vector)| {
                let (id, payload) = match &self.records {
                    Some(r) => (r[i].id, Some(RawValue::from_string(r[i].payload.clone())?)),
                    None => (i as u64, None),
                };
                Ok(PointIn {
                    id,
                    vector,
                    payload,
                })
            })
            .collect()
    }

    #[cfg(feature = "embed")]
    fn embed(&self, range: std::ops::Range<usize>) -> anyhow::Result<Vec<Vec<f32>>> {
        let (Some(records), Some(embedder)) = (&self.records, &self.embedder) else {
            anyhow::bail!("no texts to embed");
        };
        let texts: Vec<&str> = records[range]
            .iter()
            .map(|r| r.text.as_deref().unwrap_or_default())
            .collect();
        texts
            .chunks(tiervec_embed::MAX_BATCH_TEXTS)
            .map(|chunk| embedder.embed_batch(chunk))
            .try_fold(Vec::new(), |mut all, part| {
                all.extend(part?);
                Ok(all)
            })
    }

    #[cfg(not(feature = "embed"))]
    fn embed(&self, _: std::ops::Range<usize>) -> anyhow::Result<Vec<Vec<f32>>> {
        anyhow::bail!("this build has no embedder (cargo feature `embed`)")
    }
}

/// Where a load writes: a running cloud's API, or a stopped cloud's data directory.
enum Sink {
    Api(Client, tokio::runtime::Runtime),
    Direct(Box<Service>),
}

impl Sink {
    /// Creates the collection if it does not exist (recording `model` when the texts are
    /// embedded), and checks that one that does exist records the same model; returns the
    /// collection's identity.
    fn prepare(
        &self,
        collection: &str,
        dim: usize,
        metric: Metric,
        model: Option<&ModelIdentity>,
    ) -> anyhow::Result<String> {
        let (identity, recorded) = match self {
            Sink::Api(client, rt) => rt.block_on(async {
                // A server started a moment ago may still be binding or recovering.
                let deadline = Instant::now() + SERVER_WAIT;
                while !client.ready().await {
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "the server is not ready (GET /readyz) after {SERVER_WAIT:?}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                let description = match client.collection(collection).await {
                    Ok(d) => d,
                    Err(ClientError::Api { status, .. })
                        if status == reqwest::StatusCode::NOT_FOUND =>
                    {
                        client
                            .create_collection(&CreateCollection {
                                name: collection.to_owned(),
                                dim,
                                metric,
                                m: None,
                                ef_construction: None,
                                shards: None,
                                model: model.map(|m| m.name.clone()),
                            })
                            .await?
                    }
                    Err(e) => return Err(anyhow::Error::from(e)),
                };
                Ok((description.id, description.model.map(|m| m.checksum)))
            })?,
            Sink::Direct(svc) => {
                if svc.catalog().get(collection).is_none() {
                    svc.create_collection(collection, dim, metric, HnswParams::default())?;
                    if let Some(m) = model {
                        svc.set_model(collection, m)?;
                    }
                }
                let c = svc.collection(collection)?;
                let recorded = svc
                    .catalog()
                    .model(c.info.id.0)
                    .map(|m| format!("{:016x}", m.checksum));
                (c.info.id.to_string(), recorded)
            }
        };
        if let Some(m) = model {
            let ours = format!("{:016x}", m.checksum);
            anyhow::ensure!(
                recorded.as_deref() == Some(ours.as_str()),
                "collection `{collection}` records {} but the texts are embedded with {m}: load into a collection made with this model",
                recorded.map_or("no model".to_owned(), |c| format!("model checksum {c}"))
            );
        }
        Ok(identity)
    }

    /// Writes `points`; returns once they are durable.
    fn upsert(&self, collection: &str, points: Vec<PointIn>) -> anyhow::Result<()> {
        match self {
            Sink::Api(client, rt) => {
                rt.block_on(client.upsert(collection, points))?;
            }
            Sink::Direct(svc) => {
                svc.upsert(
                    collection,
                    points
                        .into_iter()
                        .map(|p| (p.id, p.vector, p.payload.map(|r| r.get().to_owned())))
                        .collect(),
                )?;
            }
        }
        Ok(())
    }
}

fn init_logs(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
