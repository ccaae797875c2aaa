//! The crate's own types that a flag takes as one of a few words, made parseable by clap here:
//! `clap::ValueEnum` is written by hand instead of derived, so that clap parses straight into
//! the type the rest of the crate uses and nothing below the command line depends on clap.
//! Each value's `--help` line lives here, once (the types' own docs only point to it).

use clap::ValueEnum;
use clap::builder::PossibleValue;

use crate::holding::OtherReleases;
use crate::lock::Scope;
use crate::preflight::{OnMismatch, Preset};

/// `--lock-scope`.
impl ValueEnum for Scope {
    fn value_variants<'a>() -> &'a [Self] {
        &[Scope::Auto, Scope::Session, Scope::Transaction]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Scope::Auto => PossibleValue::new("auto").help(
                "Decide once per gate, on its first connection that needs it: session on a direct \
                 connection, transaction when a pooler or proxy sits between",
            ),
            Scope::Session => PossibleValue::new("session").help(
                "`pg_try_advisory_lock`, held by the session: no open transaction while migrating, \
                 so `CREATE INDEX CONCURRENTLY` in the migration never waits for us. Needs a direct \
                 connection or session pooling",
            ),
            Scope::Transaction => PossibleValue::new("transaction").help(
                "`pg_try_advisory_xact_lock` inside a transaction kept open (with heartbeats) until \
                 the ledger row commits: correct behind transaction pooling, where a session lock \
                 would leak onto a pooled server connection and never be released",
            ),
        })
    }
}

/// `--other-releases`.
impl ValueEnum for OtherReleases {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            OtherReleases::Wait,
            OtherReleases::Fail,
            OtherReleases::Ignore,
        ]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            OtherReleases::Wait => PossibleValue::new("wait").help(
                "Wait until they have disconnected (bounded by --wait-timeout), then migrate",
            ),
            OtherReleases::Fail => PossibleValue::new("fail")
                .help("Refuse (exit 78): record the attempt failed and free the lock"),
            OtherReleases::Ignore => PossibleValue::new("ignore")
                .help("Migrate anyway (migrations that old releases survive)"),
        })
    }
}

/// `--on-mismatch`.
impl ValueEnum for OnMismatch {
    fn value_variants<'a>() -> &'a [Self] {
        &[OnMismatch::Fail, OnMismatch::Warn]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            OnMismatch::Fail => PossibleValue::new("fail").help("Refuse to start the app: exit 78"),
            OnMismatch::Warn => PossibleValue::new("warn").help("Log a warning and start the app"),
        })
    }
}

/// `--preset`: a value is the preset's own name ([`Preset::name`]).
impl ValueEnum for Preset {
    fn value_variants<'a>() -> &'a [Self] {
        &[Preset::OpenWebui]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Preset::OpenWebui => {
                PossibleValue::new(self.name()).help("Open WebUI's multi-replica checklist")
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value reads back as itself: the words and the variants agree.
    #[test]
    fn each_value_parses_back_to_its_variant() {
        fn round_trips<T: ValueEnum + PartialEq + std::fmt::Debug>() {
            for v in T::value_variants() {
                let word = v.to_possible_value().expect("no value is skipped");
                assert_eq!(T::from_str(word.get_name(), false).as_ref(), Ok(v));
            }
        }
        round_trips::<Scope>();
        round_trips::<OtherReleases>();
        round_trips::<OnMismatch>();
        round_trips::<Preset>();
        assert_eq!(
            Preset::OpenWebui.to_possible_value().unwrap().get_name(),
            "open-webui"
        );
    }
}
