//! The `asagi-gguf` command line (see ../shared/spec/cli.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "asagi-gguf", version, about = "Converter and ggml runtime for the Asagi vision-language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a Hugging Face Asagi checkpoint to a language-model GGUF and an mmproj GGUF.
    Convert(asagi_gguf::convert_cmd::ConvertArgs),
    /// Print a GGUF file's metadata and tensor table.
    Info {
        /// The GGUF file.
        file: PathBuf,
    },
    /// Print the ggml version, the CPU features it uses and the compute devices of this build.
    SystemInfo,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Convert(args) => asagi_gguf::convert_cmd::run(args)?,
        Command::Info { file } => print!("{}", asagi_gguf::info::report(&file)?),
        Command::SystemInfo => {
            println!("ggml {}", ggml::version());
            println!("CPU features: {}", ggml::cpu_features());
            for d in ggml::devices() {
                println!(
                    "device {}: {} ({}, {:?}, {} MiB free of {} MiB)",
                    d.index,
                    d.name,
                    d.description,
                    d.kind,
                    d.memory_free >> 20,
                    d.memory_total >> 20
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
