//! The collector's main, built inside this package so its tests can kill -9 a real collector.

fn main() -> std::process::ExitCode {
    sov_collector::cli::main()
}
