//! Converting fixture checkpoints in tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use asagi_convert::{LlmType, MmprojType, Options};

pub fn options(dir: &Path, out: &Path, ty: LlmType, mm: MmprojType) -> Options {
    Options {
        model_dir: dir.to_path_buf(),
        outtype: ty,
        mmproj_outtype: mm,
        outfile: Some(out.join(format!("llm-{}.gguf", ty.name()))),
        mmproj_outfile: Some(out.join(format!("mmproj-{}.gguf", mm.name()))),
        force: true,
        threads: 2,
        progress: false,
    }
}

pub fn convert(dir: &Path, out: &Path, ty: LlmType, mm: MmprojType) -> anyhow::Result<(PathBuf, PathBuf)> {
    let opts = options(dir, out, ty, mm);
    let c = asagi_convert::plan(&opts)?;
    asagi_convert::write(&c, &opts, &AtomicBool::new(false))?;
    Ok((opts.outfile.unwrap(), opts.mmproj_outfile.unwrap()))
}
