//! `shardmesh-hook` binary: see the library docs. Exit 2 on usage errors; `install` exits 1 when
//! the copy fails (the init container must fail visibly); `wait-drained` always exits 0.

use std::process::ExitCode;

use shardmesh_hook::{install, parse, wait_drained, Command, USAGE};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args) {
        Err(e) => {
            eprintln!("shardmesh-hook: {e}\n{USAGE}");
            ExitCode::from(2)
        }
        Ok(Command::Help) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Command::Install(dir)) => match install(&dir) {
            Ok(dest) => {
                eprintln!("shardmesh-hook: installed {}", dest.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "shardmesh-hook: install: cannot copy this binary into {}: {e}",
                    dir.display()
                );
                ExitCode::from(1)
            }
        },
        Ok(Command::WaitDrained { admin, timeout }) => {
            if let Some(line) = wait_drained(admin, timeout).message(admin, timeout) {
                eprintln!("{line}");
            }
            // A preStop hook must never hold termination up or fail it.
            ExitCode::SUCCESS
        }
    }
}
