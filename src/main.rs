//! The `asagi-gguf` command line (see ../shared/spec/cli.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "asagi-gguf", version, about = "Converter and ggml runtime for the Asagi vision-language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More logging (ggml's info and debug messages).
    #[arg(short, long, global = true)]
    verbose: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Speed and memory on a model: prefill, decode, image encode, time to first token, beam step, bandwidth bound.
    Bench(asagi_gguf::bench_cmd::BenchArgs),
    /// HTTP server with an OpenAI-style chat completions API (images as data URLs).
    Serve(asagi_gguf::serve::ServeArgs),
    /// Interactive multi-turn conversation, images attached with /image; the KV cache is kept between turns.
    Chat(asagi_gguf::chat_cmd::ChatArgs),
    /// Convert a Hugging Face Asagi checkpoint to a language-model GGUF and an mmproj GGUF.
    Convert(asagi_gguf::convert_cmd::ConvertArgs),
    /// Fill the image cache ahead of time: each image's embeddings and its prompt prefix's KV cells.
    Encode(asagi_gguf::encode_cmd::EncodeArgs),
    /// The whole pipeline on a generated tiny checkpoint, no downloads: synth, convert, run with an image.
    Demo(asagi_gguf::demo_cmd::DemoArgs),
    /// Answer one question (with images) as the model card decodes: beam sample, 5 beams; flags override.
    Run(asagi_gguf::run_cmd::RunArgs),
    /// ggml's RPC server on this machine's devices, for --rpc on another machine (trusted networks only).
    RpcServer(asagi_gguf::rpc_server_cmd::RpcServerArgs),
    /// Print the token ids of a text.
    Tokenize(asagi_gguf::tokenize_cmd::TokenizeArgs),
    /// Write a random-weight Hugging Face Asagi checkpoint of a real size (or a tiny one), for benchmarks and demos.
    Synth {
        /// 2b, 4b, 8b, 14b, tiny, micro or fullwidth.
        #[arg(long, default_value = "tiny")]
        size: String,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write into a non-empty folder.
        #[arg(long)]
        force: bool,
        /// Largest shard in MB (more shards and model.safetensors.index.json above it, as the hub's).
        #[arg(long, default_value_t = 4096)]
        shard_mb: usize,
    },
    /// Print a GGUF file's metadata and tensor table.
    Info {
        /// The GGUF file.
        file: PathBuf,
    },
    /// Print the ggml version, the CPU features it uses and the compute devices of this build.
    SystemInfo,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    ggml::log_to_stderr(cli.verbose);
    match cli.command {
        Command::Convert(args) => asagi_gguf::convert_cmd::run(args)?,
        Command::Run(args) => asagi_gguf::run_cmd::run(args)?,
        Command::Chat(args) => asagi_gguf::chat_cmd::run(args)?,
        Command::Bench(args) => asagi_gguf::bench_cmd::run(args)?,
        Command::Serve(args) => asagi_gguf::serve::run(args)?,
        Command::Demo(args) => asagi_gguf::demo_cmd::run(args)?,
        Command::Encode(args) => asagi_gguf::encode_cmd::run(args)?,
        Command::RpcServer(args) => asagi_gguf::rpc_server_cmd::run(args)?,
        Command::Tokenize(args) => asagi_gguf::tokenize_cmd::run(args)?,
        Command::Synth { size, out, seed, force, shard_mb } => {
            let t0 = std::time::Instant::now();
            let s = asagi_gguf::synth::size(&size)?;
            let bytes = asagi_gguf::synth::write_sharded(&s, &out, seed, force, shard_mb.max(1) << 20)?;
            eprintln!(
                "wrote {} ({} bf16 checkpoint, {:.2} GB) in {:.1} s",
                out.display(),
                s.name,
                bytes as f64 / 1e9,
                t0.elapsed().as_secs_f64()
            );
        }
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
    // llama.cpp spells the GPU-layer flag `-ngl`; clap's short flags are one letter, so map it to the long form.
    let args = std::env::args_os().map(|a| if a == "-ngl" { "--n-gpu-layers".into() } else { a });
    match run(Cli::parse_from(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
