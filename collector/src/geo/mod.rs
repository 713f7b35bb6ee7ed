//! Geolocation: a [`Verdict`] (country, ASN, organisation, and which database build said so)
//! for every remote address.
//!
//! Sources, each one file behind the [`GeoSource`] trait, asked in this order:
//! - [`overrides`]: CIDR blocks from `[[geo.override]]`, which win over everything;
//! - each file of `[geo] databases`, in config order, recognised by content ([`detect`]):
//!   [`mmdb`] (MaxMind format, country or ASN), [`delegated`] (the registries'
//!   `delegated-*-extended` files), [`csv`] (country or ASN ranges);
//! - [`embedded`]: the `iptocc` table, so that a fresh install works offline.
//!
//! One lookup asks countries until one source answers and ASNs until one answers. IPv4-mapped
//! and 6to4 IPv6 addresses are looked up as IPv4 ([`normalise`]). [`Geo`] swaps a database
//! whose file changed ([`Geo::reload_if_changed`]) without dropping a lookup, and keeps a
//! bounded cache of verdicts (`cache.rs`); [`reload_loop`] checks the files every
//! [`GEO_RELOAD_EVERY`]. `[geo]` is declared in [`config`]. `testutil` (tests and the
//! `testutil` feature only) writes MaxMind databases for tests and the `bench_geo` example.

mod cache;
pub mod config;
pub mod csv;
pub mod delegated;
pub mod detect;
pub mod embedded;
pub mod geofeed;
pub mod mmdb;
pub mod overrides;
pub mod physics;
mod ranges;
pub mod shapes;
#[cfg(any(test, feature = "testutil"))]
pub mod testutil;

use std::fs::File;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use sov_common::error::error_line;
use tokio_util::sync::CancellationToken;

use cache::Cache;
pub use config::{GeoConfig, GeoOverride};
use detect::Format;
use overrides::Overrides;

/// What kind of source gave an answer: how much weight a reader gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// `[[geo.override]]`: the operator placed the block; never second-guessed.
    Override,
    /// An RFC 8805 geofeed: the network's operator says where its prefixes are used.
    Geofeed,
    /// A commercial or community database (MaxMind format, CSV ranges).
    Database,
    /// The registries' data (delegated files, the embedded table): where the holder of the
    /// block is registered, which for a cloud or CDN block is often not where it is used.
    Registry,
}

impl SourceKind {
    /// The word used in stored answers and evidence.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Override => "override",
            SourceKind::Geofeed => "geofeed",
            SourceKind::Database => "database",
            SourceKind::Registry => "registry",
        }
    }
}

/// One source's answer for an address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Answer {
    /// The source's build, e.g. "mmdb:GeoLite2-Country@2026-11-01".
    pub source: String,
    /// ISO 3166-1 alpha-2 country it places the address in.
    pub country: String,
    /// What kind of source it is.
    pub kind: SourceKind,
}

/// Where one remote address is according to every source, and who operates it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Verdict {
    /// ISO 3166-1 alpha-2 country of the first answer in source order (override, databases
    /// and geofeeds in config order, the embedded table); "" when no source knows the address.
    pub country: String,
    /// Autonomous system number, when a source knows it.
    pub asn: Option<u32>,
    /// Organisation of the autonomous system; "" when unknown.
    pub org: String,
    /// Build of the source that gave the country, e.g. "override:10.0.0.0/8",
    /// "mmdb:GeoLite2-Country@2026-11-01", "delegated:delegated-ripencc-extended-latest@2026-11-01",
    /// "csv:dbip-country.csv", "embedded:iptocc-1.4.175"; "" when the country is unknown.
    pub source: String,
    /// Build of the source that gave the ASN and organisation; "" when unknown.
    pub asn_source: String,
    /// Every source that places the address, in source order (the first is `country`'s).
    pub answers: Vec<Answer>,
    /// True when the answers name more than one country and no override decides.
    pub contested: bool,
    /// Country where the operator of the address's autonomous system is registered (the
    /// registries' ASN records, or the override), "" when unknown.
    pub operator_country: String,
    /// Build of the source that gave `operator_country`.
    pub operator_source: String,
}

impl Verdict {
    /// The distinct countries the answers name, in source order.
    pub fn countries(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for a in &self.answers {
            if !out.contains(&a.country.as_str()) {
                out.push(&a.country);
            }
        }
        out
    }
}

/// One geolocation source. Implementations must answer quickly and never block.
pub trait GeoSource: Send + Sync + std::fmt::Debug {
    /// The build string recorded in [`Verdict::source`], e.g. "mmdb:GeoLite2-Country@2026-11-01".
    fn name(&self) -> &str;
    /// What kind of source this is.
    fn kind(&self) -> SourceKind {
        SourceKind::Database
    }
    /// Country (ISO 3166-1 alpha-2) of an already [`normalise`]d address, when known.
    fn country(&self, ip: IpAddr) -> Option<String>;
    /// Autonomous system number and organisation ("" when unknown), when known.
    fn asn(&self, _ip: IpAddr) -> Option<(u32, String)> {
        None
    }
    /// Country where an autonomous system's holder is registered, when known.
    fn asn_country(&self, _asn: u32) -> Option<String> {
        None
    }
}

/// Why a geolocation source could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    /// The file cannot be opened or read.
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The content is none of the recognised formats.
    #[error(
        "{} is not a recognised database (MaxMind .mmdb, delegated-*-extended, RFC 8805 geofeed, CSV ranges): it starts with {head}{hint}",
        .path.display()
    )]
    UnknownFormat {
        path: PathBuf,
        /// The first bytes, escaped.
        head: String,
        /// A hint such as "; it is gzip-compressed, decompress it first", or "".
        hint: &'static str,
    },
    /// The file has the MaxMind marker but the reader refuses it.
    #[error("{} is not a valid MaxMind database", .path.display())]
    Mmdb {
        path: PathBuf,
        #[source]
        source: maxminddb::MaxMindDbError,
    },
    /// A line of a text database is malformed (line 0: the file as a whole).
    #[error("{}:{line}: {message}", .path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A `[[geo.override]]` entry is invalid.
    #[error("geo.override[{index}] (cidr {cidr:?}): {message}")]
    Override {
        index: usize,
        cidr: String,
        message: String,
    },
}

/// Look IPv4-mapped (`::ffff:0:0/96`) and 6to4 (`2002::/16`) addresses up as the IPv4
/// address they carry; every other address is returned as it is.
pub fn normalise(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x2002 {
                let [a, b] = s[1].to_be_bytes();
                let [c, d] = s[2].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            ip
        }
    }
}

/// What a database file looked like when it was loaded: a change of any part means reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    mtime: Option<SystemTime>,
    len: u64,
    dev: u64,
    ino: u64,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let (dev, ino) = {
            use std::os::unix::fs::MetadataExt as _;
            (meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let (dev, ino) = (0, 0);
        Self {
            mtime: meta.modified().ok(),
            len: meta.len(),
            dev,
            ino,
        }
    }
}

/// Read, recognise and parse one database file: the one dispatch point over the formats.
fn load_file(path: &Path) -> Result<(Arc<dyn GeoSource>, Fingerprint), GeoError> {
    let read_err = |source| GeoError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    // Fingerprint the handle the bytes come from, so that a file replaced during the read
    // is seen as changed at the next check.
    let meta = file.metadata().map_err(read_err)?;
    let fingerprint = Fingerprint::of(&meta);
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut bytes).map_err(read_err)?;
    let source: Arc<dyn GeoSource> = match detect::detect(&bytes) {
        Some(Format::Mmdb) => Arc::new(mmdb::Mmdb::from_bytes(path, bytes)?),
        Some(Format::Delegated) => Arc::new(delegated::Delegated::parse(
            path,
            &bytes,
            fingerprint.mtime,
        )?),
        Some(Format::Csv) => Arc::new(csv::Csv::parse(path, &bytes)?),
        Some(Format::Geofeed) => {
            Arc::new(geofeed::Geofeed::parse(path, &bytes, fingerprint.mtime)?)
        }
        None => {
            return Err(GeoError::UnknownFormat {
                path: path.to_owned(),
                head: detect::head(&bytes),
                hint: detect::hint(&bytes),
            });
        }
    };
    Ok((source, fingerprint))
}

/// One configured database file and what the reloader knows of it.
#[derive(Debug)]
struct FileState {
    path: PathBuf,
    /// The file as last loaded.
    loaded: Fingerprint,
    /// The file as last refused (so that a bad file is logged once, not at every check).
    refused: Option<Fingerprint>,
    /// Whether "cannot stat" was already logged.
    missing: bool,
}

/// The sources in force and the cache of verdicts they gave; replaced as a whole on reload,
/// so a verdict computed from old sources can never land in the new cache.
#[derive(Debug)]
struct Snapshot {
    /// Databases in config order, then the embedded table.
    sources: Vec<Arc<dyn GeoSource>>,
    cache: Cache,
}

impl Snapshot {
    fn new(sources: Vec<Arc<dyn GeoSource>>) -> Arc<Self> {
        Arc::new(Self {
            sources,
            cache: Cache::new(cache::DEFAULT_CACHE_ENTRIES),
        })
    }
}

#[derive(Debug)]
struct Inner {
    overrides: Overrides,
    physics: physics::Physics,
    current: RwLock<Arc<Snapshot>>,
    /// One per database, in config order; the lock also serialises reloads.
    files: Mutex<Vec<FileState>>,
}

/// All sources in order: overrides first, then each database in config order, then the
/// embedded table. Cheap to clone (one `Arc`); lookups never wait for a reload.
#[derive(Clone, Debug)]
pub struct Geo {
    inner: Arc<Inner>,
}

impl Geo {
    /// Load the overrides and every database of `[geo]`; the first problem is the error
    /// (use [`validate`] for all of them).
    pub fn from_config(cfg: &GeoConfig) -> Result<Geo, GeoError> {
        let overrides = Overrides::from_config(&cfg.overrides)?;
        let mut sources = Vec::with_capacity(cfg.databases.len() + 1);
        let mut files = Vec::with_capacity(cfg.databases.len());
        for path in &cfg.databases {
            let (source, loaded) = load_file(path)?;
            tracing::info!(path = %path.display(), build = source.name(), "geo database loaded");
            sources.push(source);
            files.push(FileState {
                path: path.clone(),
                loaded,
                refused: None,
                missing: false,
            });
        }
        sources.push(Arc::new(embedded::Embedded));
        Ok(Geo {
            inner: Arc::new(Inner {
                overrides,
                physics: physics::Physics::default(),
                current: RwLock::new(Snapshot::new(sources)),
                files: Mutex::new(files),
            }),
        })
    }

    /// The embedded table alone: no overrides, no database files.
    pub fn embedded_only() -> Geo {
        Geo {
            inner: Arc::new(Inner {
                overrides: Overrides::default(),
                physics: physics::Physics::default(),
                current: RwLock::new(Snapshot::new(vec![Arc::new(embedded::Embedded)])),
                files: Mutex::new(Vec::new()),
            }),
        }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(
            &self
                .inner
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// The verdict for one address (normalised first); never fails: an address no source
    /// knows gets an empty country. Shared with the cache: cloning it is one `Arc`.
    pub fn lookup(&self, ip: IpAddr) -> Arc<Verdict> {
        let ip = normalise(ip);
        let snapshot = self.snapshot();
        if let Some(v) = snapshot.cache.get(&ip) {
            return v;
        }
        let v = Arc::new(self.resolve(&snapshot.sources, ip));
        snapshot.cache.insert(ip, Arc::clone(&v));
        v
    }

    /// The speed-of-light check (country geometry and its cache).
    pub fn physics(&self) -> &physics::Physics {
        &self.inner.physics
    }

    /// Ask every source, without the cache.
    fn resolve(&self, sources: &[Arc<dyn GeoSource>], ip: IpAddr) -> Verdict {
        let mut v = Verdict::default();
        let mut asn_known = false;
        let overridden = self.inner.overrides.find(ip);
        if let Some(o) = overridden {
            v.answers.push(Answer {
                source: o.source.clone(),
                country: o.country.clone(),
                kind: SourceKind::Override,
            });
            if o.asn.is_some() || o.org.is_some() {
                asn_known = true;
                v.asn = o.asn;
                v.org = o.org.clone().unwrap_or_default();
                v.asn_source.clone_from(&o.source);
            }
            if let Some(c) = &o.operator_country {
                v.operator_country.clone_from(c);
                v.operator_source.clone_from(&o.source);
            }
        }
        for s in sources {
            if let Some(c) = s.country(ip) {
                v.answers.push(Answer {
                    source: s.name().to_owned(),
                    country: c,
                    kind: s.kind(),
                });
            }
            if !asn_known && let Some((asn, org)) = s.asn(ip) {
                asn_known = true;
                v.asn = Some(asn);
                v.org = org;
                v.asn_source = s.name().to_owned();
            }
        }
        if let Some(first) = v.answers.first() {
            v.country.clone_from(&first.country);
            v.source.clone_from(&first.source);
        }
        v.contested = overridden.is_none() && v.countries().len() > 1;
        if v.operator_country.is_empty()
            && let Some(asn) = v.asn
            && let Some((c, s)) = sources
                .iter()
                .find_map(|s| s.asn_country(asn).map(|c| (c, s.name())))
        {
            v.operator_country = c;
            v.operator_source = s.to_owned();
        }
        v
    }

    /// Re-stat every database file and swap in those that changed (mtime, size or inode).
    /// A file that no longer parses keeps its previous build (and is logged once). True when
    /// something was swapped; the cache then starts empty.
    pub fn reload_if_changed(&self) -> bool {
        let mut files = self
            .inner
            .files
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if files.is_empty() {
            return false;
        }
        let mut sources = self.snapshot().sources.clone();
        let mut changed = false;
        for (i, f) in files.iter_mut().enumerate() {
            let now = match std::fs::metadata(&f.path) {
                Ok(meta) => {
                    f.missing = false;
                    Fingerprint::of(&meta)
                }
                Err(e) => {
                    if !f.missing {
                        tracing::warn!(path = %f.path.display(), error = %e,
                            "geo database cannot be checked; keeping the loaded build");
                        f.missing = true;
                    }
                    continue;
                }
            };
            if now == f.loaded || Some(now) == f.refused {
                continue;
            }
            match load_file(&f.path) {
                Ok((source, loaded)) => {
                    tracing::info!(path = %f.path.display(), build = source.name(),
                        previous = sources[i].name(), "geo database reloaded");
                    sources[i] = source;
                    f.loaded = loaded;
                    f.refused = None;
                    changed = true;
                }
                Err(e) => {
                    tracing::warn!(path = %f.path.display(), error = %error_line(&e),
                        build = sources[i].name(),
                        "geo database changed but cannot be loaded; keeping the loaded build");
                    f.refused = Some(now);
                }
            }
        }
        if changed {
            *self
                .inner
                .current
                .write()
                .unwrap_or_else(PoisonError::into_inner) = Snapshot::new(sources);
        }
        changed
    }

    /// Names of all sources in the order they are asked (overrides only when there are some).
    pub fn builds(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.inner.overrides.is_empty() {
            out.push(self.inner.overrides.name().to_owned());
        }
        out.extend(self.snapshot().sources.iter().map(|s| s.name().to_owned()));
        out
    }
}

/// Every problem in `[geo]` at once (for `--check-config`): bad overrides, unreadable files,
/// unrecognised formats, malformed lines. Each problem names the field.
pub fn validate(cfg: &GeoConfig) -> Vec<String> {
    let mut out: Vec<String> = Overrides::problems(&cfg.overrides)
        .iter()
        .map(|e| error_line(e))
        .collect();
    for (i, path) in cfg.databases.iter().enumerate() {
        if let Err(e) = load_file(path) {
            out.push(format!("geo.databases[{i}]: {}", error_line(&e)));
        }
    }
    out
}

/// How often geolocation database files are checked for changes.
pub const GEO_RELOAD_EVERY: Duration = Duration::from_secs(30);

/// Reload changed geolocation databases now and then (lookups continue meanwhile).
pub async fn reload_loop(geo: Geo, stop: CancellationToken) {
    let mut tick = tokio::time::interval(GEO_RELOAD_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let g = geo.clone();
        if let Ok(true) = tokio::task::spawn_blocking(move || g.reload_if_changed()).await {
            tracing::info!(sources = ?geo.builds(), "geolocation databases reloaded");
        }
    }
}

#[cfg(test)]
mod tests;
