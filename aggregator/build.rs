//! `sqlx::migrate!` embeds `migrations/postgres` at compile time but does not
//! tell cargo to watch it: without this, a migration added to a built tree
//! would silently be left out of the next build.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
