//! `asagi-gguf convert MODEL_DIR`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Result;
use asagi_convert::{LlmType, MmprojType, Options};

/// Flags of `convert` (see ../shared/spec/cli.md).
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Hugging Face Asagi checkpoint folder (config.json, *.safetensors, tokenizer files).
    pub model_dir: PathBuf,
    /// Language-model type: f32 f16 bf16 q8_0 q6_k q5_k_m q5_0 q4_k_m q4_k_s q4_0.
    #[arg(long, default_value = "q4_k_m", value_parser = parse_llm_type)]
    pub outtype: LlmType,
    /// Vision encoder + projector type: f32 f16 bf16 q8_0 q5_0 q4_0.
    #[arg(long, default_value = "q8_0", value_parser = parse_mmproj_type)]
    pub mmproj_outtype: MmprojType,
    /// Language-model output file [default: <model-name>-<TYPE>.gguf].
    #[arg(short = 'o', long)]
    pub outfile: Option<PathBuf>,
    /// mmproj output file [default: mmproj-<model-name>-<TYPE>.gguf].
    #[arg(long)]
    pub mmproj_outfile: Option<PathBuf>,
    /// Overwrite existing output files.
    #[arg(long)]
    pub force: bool,
    /// Print the plan (tensors, shapes, types, sizes) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Worker threads [default: physical cores].
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

fn parse_llm_type(s: &str) -> Result<LlmType, String> {
    LlmType::parse(s).ok_or_else(|| {
        format!("unknown type {s:?}; one of: {}", LlmType::all().map(|t| t.name()).collect::<Vec<_>>().join(" "))
    })
}

fn parse_mmproj_type(s: &str) -> Result<MmprojType, String> {
    MmprojType::parse(s).ok_or_else(|| {
        format!("unknown type {s:?}; one of: {}", MmprojType::all().map(|t| t.name()).collect::<Vec<_>>().join(" "))
    })
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let opts = Options {
        model_dir: args.model_dir,
        outtype: args.outtype,
        mmproj_outtype: args.mmproj_outtype,
        outfile: args.outfile,
        mmproj_outfile: args.mmproj_outfile,
        force: args.force,
        threads: args.threads.unwrap_or_else(num_cpus::get_physical),
        progress: std::io::stderr().is_terminal(),
    };
    let t0 = std::time::Instant::now();
    let conversion = asagi_convert::plan(&opts)?;
    if args.dry_run {
        print!("{}", asagi_convert::describe(&conversion));
        return Ok(());
    }
    // Ctrl-C stops the conversion between chunks; the .part files are removed on the way out.
    let written = asagi_convert::write(&conversion, &opts, crate::interrupt::flag())?;
    for w in &written {
        eprintln!("wrote {} ({:.1} MiB, {:.1} s)", w.path.display(), w.bytes as f64 / 1048576.0, w.seconds);
    }
    eprintln!("converted in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
