//! A login role of one test, with no right but PUBLIC's, dropped (with everything it owns or
//! was granted in the test's database) on drop, also when the test fails.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{PASSWORD, TestDb, sql};

static ROLES: AtomicUsize = AtomicUsize::new(0);

pub struct Role {
    pub name: String,
    pub password: String,
    /// The superuser's URL of the test's database, to grant and to drop.
    pub admin_url: String,
    /// The test's database as this role.
    pub url: String,
}

impl Role {
    /// A new role with LOGIN and a password, and no other right than PUBLIC's; `what` goes
    /// into its name.
    pub fn create(db: &TestDb, what: &str) -> Role {
        let n = ROLES.fetch_add(1, Ordering::SeqCst);
        let name = format!("mg_{what}_{}_{n}", std::process::id());
        let password = format!("pw-{what}-{}-{n}-Zq7", std::process::id());
        sql(
            &db.url,
            &format!("CREATE ROLE {name} LOGIN PASSWORD '{password}'"),
        );
        let url = db.url.replacen(
            &format!("postgres:{PASSWORD}@"),
            &format!("{name}:{password}@"),
            1,
        );
        assert_ne!(url, db.url);
        Role {
            name,
            password,
            admin_url: db.url.clone(),
            url,
        }
    }

    /// A `migrations-gate` command run as this role: the gate, its migration and the app all
    /// use the role's URL.
    pub fn gate(&self, db: &TestDb) -> Command {
        let mut c = db.gate();
        c.env("MIGRATIONS_GATE_DATABASE_URL", &self.url)
            .env("DATABASE_URL", &self.url);
        c
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        // Not `sql()` bare: it panics, and a panic while a failed test unwinds would abort.
        let r = &self.name;
        let admin = self.admin_url.clone();
        let drop_sql = format!("DROP OWNED BY {r}; DROP ROLE {r};");
        if std::panic::catch_unwind(|| sql(&admin, &drop_sql)).is_err() {
            eprintln!("could not drop role {r}");
        }
    }
}
