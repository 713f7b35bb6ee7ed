//! Removals that follow inventory chunks: a full weight inventory that spans several reports
//! (chunks `0..=N` of one generation, `sovereign.v1.InventoryChunk`) marks the node's other
//! files removed once, when every chunk of the generation is held, whatever order the
//! chunks came in and however often one was sent again.
//!
//! Per chunk, in the transaction that derives its report: the generation's row (how many
//! chunks once the last one came, whether a chunk withheld weight files without naming them,
//! when its first chunk arrived), the chunk's index, and every path it names (its files and
//! the paths it withheld) are kept. When the generation holds `N + 1` distinct chunks, every
//! file of the node not named by any of them and not seen since the generation's first chunk
//! arrived is marked removed; then the generation is the node's applied one and its rows
//! (and those of every older generation) go. A generation older than the applied one changes
//! nothing (it came late: the newer inventory already spoke). A generation missing a chunk,
//! or one that withheld files without naming them, removes nothing: a stale row is better
//! than a hidden copy. Generations abandoned that way go after [`ABANDONED_AFTER_MS`].
//!
//! The statements use `$n` parameters and SQL both SQLite and PostgreSQL run, so each backend
//! executes these same texts ([`super::sqlite`], [`super::postgres`]).

/// A generation still incomplete this long after its first chunk is dropped (its chunks will
/// not come any more; the next full inventory speaks instead).
pub(crate) const ABANDONED_AFTER_MS: i64 = 86_400_000;

/// `(epoch, generation)` applied last for node `$1`.
pub(crate) const APPLIED: &str =
    "SELECT epoch, generation FROM weight_generation_applied WHERE node = $1";

/// Note one chunk's generation: `$1..$6` = node, epoch, generation, chunk count (NULL unless
/// this is the last chunk), unnamed (0/1), the report's arrival.
pub(crate) const NOTE_GENERATION: &str = "INSERT INTO weight_generations
        (node, epoch, generation, chunk_count, unnamed, started_ms)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (node, epoch, generation) DO UPDATE SET
        chunk_count = COALESCE(excluded.chunk_count, weight_generations.chunk_count),
        unnamed = CASE WHEN excluded.unnamed > weight_generations.unnamed
                       THEN excluded.unnamed ELSE weight_generations.unnamed END,
        started_ms = CASE WHEN excluded.started_ms < weight_generations.started_ms
                          THEN excluded.started_ms ELSE weight_generations.started_ms END";

/// Note one chunk: `$1..$4` = node, epoch, generation, index.
pub(crate) const NOTE_CHUNK: &str = "INSERT INTO weight_generation_chunks
        (node, epoch, generation, idx) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";

/// Note one path of a chunk: `$1..$4` = node, epoch, generation, path.
pub(crate) const NOTE_PATH: &str = "INSERT INTO weight_generation_paths
        (node, epoch, generation, path) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";

/// A generation's chunk count (NULL until its last chunk came), chunks held, unnamed flag
/// and first arrival: `$1..$3` = node, epoch, generation.
pub(crate) const STATE: &str = "SELECT g.chunk_count,
        (SELECT COUNT(*) FROM weight_generation_chunks k
          WHERE k.node = g.node AND k.epoch = g.epoch AND k.generation = g.generation),
        g.unnamed, g.started_ms
     FROM weight_generations g WHERE g.node = $1 AND g.epoch = $2 AND g.generation = $3";

/// Mark removed, at `$1`, every file of node `$2` not seen since `$3` (the generation's first
/// chunk) that generation (`$4`, `$5`) does not name. (SQLite numbers `$n` parameters in the
/// order they first appear: every statement here names them in order.)
pub(crate) const REMOVE_UNNAMED_BY_GENERATION: &str = "UPDATE weight_files SET removed_ms = $1
     WHERE node = $2 AND removed_ms IS NULL AND last_seen_ms < $3
       AND path NOT IN (SELECT path FROM weight_generation_paths
                        WHERE node = $2 AND epoch = $4 AND generation = $5)";

/// Make (`$2`, `$3`) the applied generation of node `$1`.
pub(crate) const SET_APPLIED: &str =
    "INSERT INTO weight_generation_applied (node, epoch, generation)
     VALUES ($1, $2, $3)
     ON CONFLICT (node) DO UPDATE SET epoch = excluded.epoch, generation = excluded.generation";

/// Forget node `$1`'s generations up to (`$2`, `$3`) and those whose first chunk came before
/// `$4`: the paths, the chunks, then the generations.
pub(crate) const FORGET: [&str; 3] = [
    "DELETE FROM weight_generation_paths WHERE node = $1 AND (epoch, generation) IN
        (SELECT epoch, generation FROM weight_generations WHERE node = $1
          AND (epoch < $2 OR (epoch = $2 AND generation <= $3) OR started_ms < $4))",
    "DELETE FROM weight_generation_chunks WHERE node = $1 AND (epoch, generation) IN
        (SELECT epoch, generation FROM weight_generations WHERE node = $1
          AND (epoch < $2 OR (epoch = $2 AND generation <= $3) OR started_ms < $4))",
    "DELETE FROM weight_generations WHERE node = $1
        AND (epoch < $2 OR (epoch = $2 AND generation <= $3) OR started_ms < $4)",
];
