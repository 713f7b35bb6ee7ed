//! sovctl's main, built inside this package so its tests can run the real command line.

fn main() -> std::process::ExitCode {
    sovctl::main()
}
