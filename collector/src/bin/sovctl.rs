//! `sovctl`: see `sov_collector::sovctl`.

fn main() -> std::process::ExitCode {
    sov_collector::sovctl::main()
}
