//! The agent's main, built inside this package so its tests can kill -9 a real agent process.

fn main() -> std::process::ExitCode {
    sov_agent::cli::main()
}
