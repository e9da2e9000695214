//! `sluice`, the CNI plugin binary: environment and stdin in, a result or
//! the spec's error object out on stdout, logs on stderr. Without
//! CNI_COMMAND (a user at a shell), the `status`/`wait`/`observe` CLI.
use std::io::{Read, Write};
use std::process::ExitCode;

use sluice_cni::cmd::{self, Output};
use sluice_cni::version::{LATEST, Version};
use sluice_cni::{Error, Result, env};

fn main() -> ExitCode {
    // Set but empty or unknown stays a CNI error (4), as runtimes expect.
    if std::env::var_os("CNI_COMMAND").is_none() {
        return sluice_cni::cli::main(std::env::args_os().skip(1));
    }
    let lookup = |k: &str| std::env::var(k).ok();
    let mut served = LATEST;
    let outcome = run(&lookup, &mut served);
    let mut out = std::io::stdout().lock();
    let (text, code) = match outcome {
        Ok(None) => return ExitCode::SUCCESS,
        Ok(Some(text)) => (text, ExitCode::SUCCESS),
        Err(e) => {
            let cni = e.to_cni(served.as_str());
            if cni.details.is_empty() {
                eprintln!("sluice: {}", cni.msg);
            } else {
                eprintln!("sluice: {}: {}", cni.msg, cni.details);
            }
            let text = serde_json::to_string(&cni).unwrap_or_else(|_| {
                format!(
                    r#"{{"cniVersion":"{served}","code":{},"msg":"error"}}"#,
                    cni.code
                )
            });
            (text, ExitCode::FAILURE)
        }
    };
    if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
        return ExitCode::FAILURE;
    }
    code
}

fn run(lookup: &dyn Fn(&str) -> Option<String>, served: &mut Version) -> Result<Output> {
    let command = env::command(lookup)?;
    let mut stdin = Vec::new();
    std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(Error::Stdin)?;
    cmd::run(command, &stdin, lookup, served)
}
