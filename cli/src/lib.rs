//! The `fleetbench` command-line client as a library: the gRPC client, the subcommands, job files and
//! output. The binary (`src/main.rs`) only parses arguments; tests drive the same code.

// Output goes through `outln!`, never `println!`: see `output::write_stdout`.
#![deny(clippy::print_stdout)]

/// `println!` for the CLI: prints to standard output through [`output::write_stdout`], which ends
/// the process by SIGPIPE where the reader has gone rather than panicking.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub mod client;
pub mod commands;
pub mod jobspec;
pub mod optimize;
pub mod output;
pub mod testdata;
pub mod transfer;
