//! Markers of a half-applied migration, named, never changed: after a failed or abandoned
//! attempt the schema may be between two versions, and only a person can tell which. The holder
//! logs one line per marker (the tool, the version, the tool's documented way out) before it
//! runs the migration again.
//!
//! | tool | marker | way out |
//! |---|---|---|
//! | golang-migrate | `schema_migrations.dirty` is true | fix the schema, then `migrate force V` |
//! | Flyway | a `flyway_schema_history` row with `success = false` | `flyway repair` |
//! | Prisma | a `_prisma_migrations` row neither finished nor rolled back | `prisma migrate resolve` |
//!
//! Rails and dbmate also keep a `schema_migrations` table, without `dirty`: it is skipped.

use tracing::warn;

use super::{ToolTable, find};
use crate::sql::{Cols, lit, query};

/// A tool's marker: its table, a query of the half-applied versions (one text column), and what
/// to say.
struct Marker {
    tool: &'static str,
    table: &'static str,
    /// The column the table must have to be this tool's.
    column: &'static str,
    /// The statement of the half-applied versions in a table (quoted).
    versions: fn(&str) -> String,
    /// The tool's way out, with `{v}` for the version.
    way_out: &'static str,
}

const MARKERS: [Marker; 3] = [
    Marker {
        tool: "golang-migrate",
        table: "schema_migrations",
        column: "dirty",
        versions: |t| format!("SELECT version::text FROM {t} WHERE dirty"),
        way_out: "version {v} is dirty (it failed halfway): fix the schema by hand, then `migrate force V` with the version the schema is really at",
    },
    Marker {
        tool: "Flyway",
        table: "flyway_schema_history",
        column: "success",
        versions: |t| {
            format!(
                "SELECT coalesce(version, description) FROM {t} WHERE NOT success ORDER BY installed_rank"
            )
        },
        way_out: "migration {v} is recorded failed: fix the schema by hand, then `flyway repair`",
    },
    Marker {
        tool: "Prisma",
        table: "_prisma_migrations",
        column: "rolled_back_at",
        versions: |t| {
            format!(
                "SELECT migration_name FROM {t} WHERE finished_at IS NULL AND rolled_back_at IS NULL ORDER BY started_at"
            )
        },
        way_out: "migration {v} started but did not finish: fix the schema by hand, then `prisma migrate resolve --rolled-back {v}` (or `--applied {v}`)",
    },
];

/// Logs (WARN) each known tool's marker of a half-applied migration in the database; returns
/// the lines, for the attempt's record. Errors are logged, never fatal: this only informs.
pub(crate) async fn report_dirty(conn: &mut sqlx::PgConnection) -> Vec<String> {
    let names: Vec<&str> = MARKERS.iter().map(|m| m.table).collect();
    let found = match find(conn, &names).await {
        Ok(found) => found,
        Err(e) => {
            warn!(error = %e, "could not look for migration tools' markers of a half-applied migration");
            return Vec::new();
        }
    };
    let mut lines = Vec::new();
    for table in found {
        for marker in MARKERS.iter().filter(|m| m.table == table.name) {
            match versions(conn, marker, &table).await {
                Ok(versions) => {
                    for v in versions {
                        let line = format!(
                            "{} in {}: {}",
                            marker.tool,
                            table.shown(),
                            marker.way_out.replace("{v}", &v)
                        );
                        warn!(
                            tool = marker.tool,
                            table = table.shown(),
                            version = v,
                            "{line}; the gate runs the migration again as it is"
                        );
                        lines.push(line);
                    }
                }
                Err(e) => {
                    warn!(error = %e, table = table.shown(), "could not read {}'s marker", marker.tool)
                }
            }
        }
    }
    lines
}

/// The half-applied versions `marker` finds in `table`; none when the table lacks the tool's
/// column (another tool's table of the same name).
async fn versions(
    conn: &mut sqlx::PgConnection,
    marker: &Marker,
    table: &ToolTable,
) -> Result<Vec<String>, sqlx::Error> {
    let has_column = has_column_statement(marker, table);
    let rows = query(conn, has_column).await?;
    if rows
        .first()
        .map(|r| Cols(r).text(0))
        .transpose()?
        .as_deref()
        != Some("true")
    {
        return Ok(Vec::new());
    }
    query(conn, versions_statement(marker, table))
        .await?
        .iter()
        .map(|r| Cols(r).text(0))
        .collect()
}

/// The first statement of [`versions`]: whether `table` has `marker`'s column.
fn has_column_statement(marker: &Marker, table: &ToolTable) -> String {
    format!(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = {}::regclass AND attname = {} AND NOT attisdropped)::text",
        lit(&table.sql()),
        lit(marker.column)
    )
}

/// The second statement of [`versions`]: the half-applied versions `marker` finds in `table`.
fn versions_statement(marker: &Marker, table: &ToolTable) -> String {
    (marker.versions)(&table.sql())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Effect: tests/recovery.rs (golang-migrate's dirty marker is named after a failed attempt);
    /// Flyway's and Prisma's markers have no effect test.
    #[test]
    fn marker_statements() {
        for marker in &MARKERS {
            let table = ToolTable {
                schema: "public".into(),
                name: marker.table.into(),
            };
            insta::assert_snapshot!(
                format!("has_column_{}", marker.tool),
                crate::sql::pretty(&has_column_statement(marker, &table))
            );
            insta::assert_snapshot!(
                format!("versions_{}", marker.tool),
                crate::sql::pretty(&versions_statement(marker, &table))
            );
        }
    }
}
