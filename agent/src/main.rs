//! `sov-agent`: see the library crate for everything.

fn main() -> std::process::ExitCode {
    sov_agent::cli::main()
}
