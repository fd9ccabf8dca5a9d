//! The instance pool and its journal: [`WasmHost`] keeps long-lived instances, one per
//! concurrent request, and a journal of what every instance must hold (the snapshot, the
//! changes since, the rule); an instance catches up with the journal before its next call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tiervec_shared::confidence::ConfidenceRule;
use tiervec_shared::guest_abi::{self, SearchResponse};
use tiervec_shared::push::Delta;
use tracing::{debug_span, warn};
use wasmtime::{Engine, InstancePre};

use super::abi::{self, GuestInstance, GuestState};
use super::config::WasmConfig;
use super::error::WasmError;
use super::limits::{Ticker, engine};
use super::module_cache::{ModuleSource, load_module};

/// What every instance must hold: the snapshot, the changes since, and the rule.
#[derive(Default)]
struct Journal {
    /// Bumped when the snapshot is replaced (instances of an older one are remade).
    generation: u64,
    snapshot: Option<Arc<[u8]>>,
    /// Changes since the snapshot, in order.
    entries: Vec<JournalEntry>,
    rule: ConfidenceRule,
    rule_generation: u64,
}

/// One change to the cache after its snapshot, replayed into every instance.
#[derive(Clone)]
enum JournalEntry {
    /// A delta's bytes (`Delta::to_bytes`) and whether its certificates are taken.
    Delta {
        bytes: Arc<[u8]>,
        accept_certificates: bool,
    },
    /// The certificates in force from here on (`guest_abi::encode_certificates`).
    Certificates(Arc<[u8]>),
}

/// A guest's answer to a search.
pub type GuestAnswer = SearchResponse;

/// Instances not in use, and how many exist.
struct Pool {
    idle: Vec<GuestInstance>,
    live: usize,
}

/// The WASM host: engine, module, journal and the pool of instances.
pub struct WasmHost {
    config: Arc<WasmConfig>,
    engine: Engine,
    pre: InstancePre<GuestState>,
    module_source: ModuleSource,
    module_took: Duration,
    journal: Mutex<Journal>,
    /// Serialises writers (snapshot loads and deltas) so deltas are journalled in order.
    writer: Mutex<()>,
    pool: Mutex<Pool>,
    returned: Condvar,
    _ticker: Ticker,
}

impl WasmHost {
    /// Loads the module (from the cache when possible) and starts the epoch ticker; instances
    /// are made on demand, holding the snapshot given by [`WasmHost::load_snapshot`] (none:
    /// an empty cache that deltas fill).
    pub fn start(config: WasmConfig) -> Result<WasmHost, WasmError> {
        let engine = engine()?;
        let loaded = load_module(&engine, &config.module, &config.cache_dir)?;
        let pre = abi::prepare(&engine, &loaded.module, &config)?;
        let ticker = Ticker::start(engine.clone(), config.tick).map_err(|e| {
            WasmError::Runtime(format!("cannot start the epoch ticker thread: {e}"))
        })?;
        let host = WasmHost {
            engine,
            pre,
            module_source: loaded.source,
            module_took: loaded.took,
            journal: Mutex::new(Journal::default()),
            writer: Mutex::new(()),
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                live: 0,
            }),
            returned: Condvar::new(),
            _ticker: ticker,
            config: Arc::new(config),
        };
        // One instance now: the module's imports and ABI version are checked at start.
        let first = host.instantiate()?;
        host.put_back(first);
        Ok(host)
    }

    /// Whether the module came from the cache or was compiled, and how long that took.
    pub fn module_source(&self) -> (ModuleSource, Duration) {
        (self.module_source, self.module_took)
    }

    /// Replaces the cache with a snapshot file's bytes: validated by the guest (a refusal is
    /// [`WasmError::Guest`] with [`status::SNAPSHOT_REFUSED`] and changes nothing), then every
    /// instance holds it before its next request, with no deltas.
    pub fn load_snapshot(&self, bytes: &[u8]) -> Result<(), WasmError> {
        let _span = debug_span!("wasm_load_snapshot", bytes = bytes.len()).entered();
        let _writer = self.writer.lock();
        // The probe is not counted in the pool until it joins it.
        let mut probe = self.new_instance()?;
        probe.load_snapshot(bytes)?;
        let mut journal = self.journal.lock();
        journal.generation += 1;
        journal.snapshot = Some(Arc::from(bytes));
        journal.entries.clear();
        probe.generation = journal.generation;
        probe.applied = 0;
        probe.rule_generation = u64::MAX;
        drop(journal);
        // The probe joins the pool; the idle instances hold the old snapshot and would each be
        // remade at their next request, so they go now, and their memory with them.
        let mut pool = self.pool.lock();
        let stale = std::mem::take(&mut pool.idle);
        pool.live = pool.live - stale.len() + 1;
        drop(pool);
        drop(stale);
        self.put_back(probe);
        Ok(())
    }

    /// Empties the cache every instance holds: no snapshot, no deltas (a reset cache).
    pub fn clear(&self) {
        let _writer = self.writer.lock();
        let mut journal = self.journal.lock();
        journal.generation += 1;
        journal.snapshot = None;
        journal.entries.clear();
    }

    /// Applies a pushed delta (checked by the guest against its manifest; a refusal changes
    /// nothing); every instance applies it before its next request. With
    /// `accept_certificates` false its certificates are not taken (a superseded connection's).
    pub fn apply_delta(&self, delta: &Delta, accept_certificates: bool) -> Result<(), WasmError> {
        let _span = debug_span!("wasm_apply_delta", version = delta.version).entered();
        self.record(JournalEntry::Delta {
            bytes: Arc::from(delta.to_bytes()),
            accept_certificates,
        })
    }

    /// Makes `certificates` (anchor id, radius) the ones in force in every instance; every
    /// other anchor is uncertified (`&[]` drops them all).
    pub fn set_certificates(&self, certificates: &[(u64, f32)]) -> Result<(), WasmError> {
        let _span = debug_span!("wasm_set_certificates", count = certificates.len()).entered();
        let mut bytes = Vec::new();
        guest_abi::encode_certificates(certificates, &mut bytes);
        self.record(JournalEntry::Certificates(Arc::from(bytes)))
    }

    /// Applies `entry` in one instance (brought up to date first) and, if the guest takes it,
    /// journals it for the others; a refusal changes nothing.
    fn record(&self, entry: JournalEntry) -> Result<(), WasmError> {
        let _writer = self.writer.lock();
        let mut instance = self.checkout()?;
        let outcome = self
            .sync(&mut instance)
            .and_then(|()| apply_entry(&mut instance, &entry));
        match outcome {
            Ok(()) => {
                let mut journal = self.journal.lock();
                journal.entries.push(entry);
                instance.applied = journal.entries.len();
                drop(journal);
                self.put_back(instance);
                Ok(())
            }
            Err(e @ WasmError::Guest { .. }) => {
                self.put_back(instance);
                Err(e)
            }
            Err(e) => {
                self.discard(instance);
                Err(e)
            }
        }
    }

    /// Sets the confidence rule every instance decides with.
    pub fn configure(&self, rule: ConfidenceRule) {
        let mut journal = self.journal.lock();
        journal.rule = rule;
        journal.rule_generation += 1;
    }

    /// Searches in a guest within the deadline. A guest past it is stopped and discarded
    /// ([`WasmError::DeadlineExceeded`]); a new instance replaces it on demand.
    pub fn search(&self, query: &[f32], k: usize, ef: usize) -> Result<GuestAnswer, WasmError> {
        self.search_within(query, k, ef, self.config.deadline)
    }

    /// [`WasmHost::search`] with its own deadline.
    pub fn search_within(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        deadline: Duration,
    ) -> Result<GuestAnswer, WasmError> {
        let _span = debug_span!("wasm_search", k, ef).entered();
        let mut instance = self.checkout()?;
        let outcome = self
            .sync(&mut instance)
            .and_then(|()| instance.search(query, k, ef, deadline));
        match outcome {
            Ok(answer) => {
                self.put_back(instance);
                Ok(answer)
            }
            Err(e @ WasmError::Guest { .. }) => {
                self.put_back(instance);
                Err(e)
            }
            Err(e) => {
                warn!(error = %e, "guest instance discarded");
                self.discard(instance);
                Err(e)
            }
        }
    }

    /// Instances waiting for a request: at most `max_instances`, each holding its linear
    /// memory (a 4 GiB reservation) and a copy of the snapshot.
    pub fn idle_instances(&self) -> usize {
        self.pool.lock().idle.len()
    }

    /// Bytes of linear memory of an idle instance after it has followed the journal (the
    /// snapshot copy, the overlay and the guest's buffers): the memory one instance costs.
    pub fn memory_per_instance(&self) -> Result<usize, WasmError> {
        let mut instance = self.checkout()?;
        let outcome = self.sync(&mut instance);
        let bytes = instance.memory_size();
        match outcome {
            Ok(()) => {
                self.put_back(instance);
                Ok(bytes)
            }
            Err(e) => {
                self.discard(instance);
                Err(e)
            }
        }
    }

    /// Makes a new instance, empty (test and measurement hook: the cost of instantiation).
    pub fn instantiate_empty(&self) -> Result<Duration, WasmError> {
        let started = Instant::now();
        let instance = self.new_instance()?;
        let took = started.elapsed();
        drop(instance);
        Ok(took)
    }

    /// Calls the guest's `tv_test_spin` export (only guests built with the `test-exports`
    /// feature have it) for `iterations` rounds within `deadline`, the way a search is called,
    /// so a guest that runs too long can be shown stopped. Exists only for the deadline tests
    /// of `edge/tests/wasm_guest.rs`; nothing in the edge calls it.
    pub fn spin_within(&self, iterations: u64, deadline: Duration) -> Result<u64, WasmError> {
        let mut instance = self.checkout()?;
        let outcome = instance.spin(iterations, deadline);
        match outcome {
            Ok(v) => {
                self.put_back(instance);
                Ok(v)
            }
            Err(e) => {
                self.discard(instance);
                Err(e)
            }
        }
    }

    /// An idle instance, or a new one while fewer than `max_instances` exist; otherwise waits.
    fn checkout(&self) -> Result<GuestInstance, WasmError> {
        let mut pool = self.pool.lock();
        loop {
            if let Some(instance) = pool.idle.pop() {
                return Ok(instance);
            }
            if pool.live < self.config.max_instances.max(1) {
                pool.live += 1;
                drop(pool);
                return self.new_instance().inspect_err(|_| {
                    self.pool.lock().live -= 1;
                    self.returned.notify_one();
                });
            }
            self.returned.wait(&mut pool);
        }
    }

    /// A new instance counted in the pool (for [`WasmHost::start`]).
    fn instantiate(&self) -> Result<GuestInstance, WasmError> {
        self.pool.lock().live += 1;
        self.new_instance()
            .inspect_err(|_| self.pool.lock().live -= 1)
    }

    /// Returns an instance to the pool, or drops it while more than `max_instances` exist (a
    /// snapshot load adds its probe while others are in use).
    fn put_back(&self, instance: GuestInstance) {
        let mut pool = self.pool.lock();
        if pool.live > self.config.max_instances.max(1) {
            pool.live -= 1;
            drop(pool);
            drop(instance);
        } else {
            pool.idle.push(instance);
        }
        self.returned.notify_one();
    }

    /// Drops an instance that trapped or is out of date; another is made on demand.
    fn discard(&self, instance: GuestInstance) {
        drop(instance);
        let mut pool = self.pool.lock();
        pool.live = pool.live.saturating_sub(1);
        drop(pool);
        self.returned.notify_one();
    }

    /// A new instance of the module, not counted in the pool.
    fn new_instance(&self) -> Result<GuestInstance, WasmError> {
        GuestInstance::new(&self.engine, &self.pre, &self.config)
    }

    /// Brings an instance up to the journal: the current snapshot (a new instance if it holds
    /// an older one), the changes it has not applied, the rule.
    fn sync(&self, instance: &mut GuestInstance) -> Result<(), WasmError> {
        let (generation, snapshot, pending, rule) = {
            let journal = self.journal.lock();
            let remake = instance.generation != journal.generation;
            let from = if remake { 0 } else { instance.applied };
            (
                journal.generation,
                remake.then(|| journal.snapshot.clone()),
                journal.entries[from.min(journal.entries.len())..].to_vec(),
                (instance.rule_generation != journal.rule_generation)
                    .then_some((journal.rule, journal.rule_generation)),
            )
        };
        if let Some(snapshot) = snapshot {
            let _span = debug_span!("wasm_resync", generation).entered();
            let mut fresh = self.new_instance()?;
            if let Some(bytes) = snapshot {
                fresh.load_snapshot(&bytes)?;
            }
            fresh.generation = generation;
            *instance = fresh;
        }
        for entry in &pending {
            apply_entry(instance, entry)?;
            instance.applied += 1;
        }
        if let Some((rule, rule_generation)) = rule {
            instance.configure(rule)?;
            instance.rule_generation = rule_generation;
        }
        Ok(())
    }
}

/// Applies one journal entry in `instance`.
fn apply_entry(instance: &mut GuestInstance, entry: &JournalEntry) -> Result<(), WasmError> {
    match entry {
        JournalEntry::Delta {
            bytes,
            accept_certificates,
        } => instance.apply_delta(bytes, *accept_certificates),
        JournalEntry::Certificates(bytes) => instance.set_certificates(bytes),
    }
}
