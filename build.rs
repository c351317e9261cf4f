// `sqlx::migrate!` embeds the migration files at compile time: rebuild when one is added or
// changed (cargo does not track directories the macro reads on its own).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
