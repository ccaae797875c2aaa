//! Turning the flags and a preset's rules into the list of what this replica compares, before
//! the gate connects: the preset's local rules are judged here, so that a replica that would
//! break on its own environment is refused (78) without costing the database anything.

use tracing::warn;

use super::presets::{Condition, Context, Level, Mode, Preset, broken};
use super::{Compared, Preflight, SHARED_DIR, Settings, budget, names, shared_dir};
use crate::error::{Error, Result};

impl Preflight {
    /// Checks the flags and the presets' local rules: a failing rule is an error (78) before
    /// the gate connects; warnings are logged.
    pub(crate) fn new(args: &Settings, mode: Mode, release: Option<&str>) -> Result<Preflight> {
        let cx = Context {
            vars: Box::new(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())),
            mode,
        };
        Preflight::with_context(args, &cx, release)
    }

    pub(super) fn with_context(
        args: &Settings,
        cx: &Context,
        release: Option<&str>,
    ) -> Result<Preflight> {
        let mut compared: Vec<Compared> = Vec::new();
        for name in &args.same_env {
            let name = name.trim();
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(Error::Usage(format!(
                    "--same-env {name:?} is not a valid environment variable name"
                )));
            }
            if !compared.iter().any(|c| c.name == name) {
                compared.push(Compared {
                    name: name.to_string(),
                    level: Level::Fail,
                    rule: None,
                    shared_dir: None,
                });
            }
        }
        let mut failures = Vec::new();
        if let Some(preset) = args.preset {
            for rule in preset.rules() {
                if let Condition::Same = rule.condition {
                    for var in rule.vars {
                        match compared.iter_mut().find(|c| c.name == *var) {
                            // An explicit --same-env or a stricter rule keeps its level.
                            Some(c) => {
                                if rule.level == Level::Fail {
                                    c.level = Level::Fail;
                                }
                            }
                            None => compared.push(Compared {
                                name: var.to_string(),
                                level: rule.level,
                                rule: Some((preset.name(), rule)),
                                shared_dir: None,
                            }),
                        }
                    }
                    continue;
                }
                let Some(broken) = broken(rule, cx) else {
                    continue;
                };
                let line = format!(
                    "preset {}: wants {} but {broken}: {}",
                    preset.name(),
                    rule.wants,
                    rule.why
                );
                match rule.level {
                    Level::Fail => failures.push(line),
                    Level::Warn => warn!(preset = preset.name(), "{line}"),
                }
            }
        }
        if !failures.is_empty() {
            return Err(Error::Config(failures.join("; ")));
        }
        let shared = match (&args.shared_dir, args.preset) {
            (Some(dir), _) => Some((dir.clone(), None)),
            (None, Some(Preset::OpenWebui)) => {
                shared_dir::open_webui_data_dir(&|n| cx.var(n)).map(|dir| (dir, Some(())))
            }
            (None, None) => None,
        };
        if let Some((dir, _)) = shared {
            if release.is_none() {
                return Err(Error::Usage(format!(
                    "--shared-dir {} needs --release or --release-from: the first replica of each release \
                     leaves the marker the others must see",
                    dir.display()
                )));
            }
            compared.push(Compared {
                // One name whatever the path: replicas may mount the volume elsewhere.
                name: SHARED_DIR.to_string(),
                level: if args.require_shared_dir {
                    Level::Fail
                } else {
                    Level::Warn
                },
                rule: None,
                shared_dir: Some(dir),
            });
        }
        if !compared.is_empty() && release.is_none() {
            return Err(Error::Usage(format!(
                "--same-env {} (or a preset that compares variables) needs --release or --release-from: \
                 the first replica of each release sets the values the others must match",
                names(&compared)
            )));
        }
        let budget = args
            .preset
            .map(|Preset::OpenWebui| budget::open_webui(&|n| cx.var(n)));
        Ok(Preflight {
            compared,
            budget,
            allow_older: args.allow_older_release,
            on_mismatch: args.on_mismatch,
        })
    }
}
