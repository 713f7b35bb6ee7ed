//! `sov-collector`: see the library crate for everything.

fn main() -> std::process::ExitCode {
    sov_collector::cli::main()
}
