//! `sovctl`: see the library crate for everything.

fn main() -> std::process::ExitCode {
    sovctl::main()
}
