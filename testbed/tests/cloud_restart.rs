//! A cloud killed (SIGKILL) and restarted on the same address and certificates: the edges'
//! connections to the process that died end at the first packet the new one receives, by a
//! QUIC stateless reset the edge accepts (the reset key is derived from the server key, so it
//! survives the restart), not after the edge's idle timeout.

use std::time::{Duration, Instant};

use tiervec_edge::link::CloudLink;
use tiervec_testbed::dataset::Dataset;
use tiervec_testbed::deployment::{CloudSpec, start_cloud_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_cloud_resets_the_connections_of_the_process_that_died() {
    let ds = Dataset::load_default().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = CloudSpec {
        rows: Some(200),
        settings: Vec::new(),
    };
    let mut cloud = start_cloud_with(dir.path(), &ds, &["edge-r".into()], &spec).unwrap();
    let http = reqwest::Client::new();
    cloud.wait_indexed(&http).await.unwrap();
    let mut config = cloud.link("edge-r");
    // Long enough that only a reset can end the connection within the test's wait.
    config.idle_timeout = Duration::from_secs(60);
    let link = CloudLink::connect(&config).await.unwrap();

    cloud.restart().unwrap();
    let restarted = Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(20), link.closed())
        .await
        .expect("the connection to the dead process outlived 20 s: no stateless reset");
    assert!(
        matches!(reason, quinn::ConnectionError::Reset),
        "ended by {reason}, not a stateless reset"
    );
    eprintln!(
        "reset {:.0} ms after the restart began",
        restarted.elapsed().as_secs_f64() * 1e3
    );
}
