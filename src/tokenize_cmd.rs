//! `asagi-gguf tokenize -m LLM.gguf TEXT`.

use std::path::PathBuf;

use anyhow::Result;
use ggml::gguf::GgufFile;

use crate::tokenizer::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct TokenizeArgs {
    /// Language-model GGUF.
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
    /// Do not add BOS.
    #[arg(long)]
    pub no_bos: bool,
    pub text: String,
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let f = GgufFile::open(&a.model)?;
    let (tok, _) = Tokenizer::from_gguf(&f)?;
    let ids = tok.encode(&a.text, !a.no_bos)?;
    if a.json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        for id in ids {
            println!("{id:>6} {:?}", tok.decode(&[id], false)?);
        }
    }
    Ok(())
}
