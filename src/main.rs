//! The `migrations-gate` binary: everything lives in the library; see `migrations_gate::main_entry`.

fn main() {
    std::process::exit(migrations_gate::main_entry());
}
