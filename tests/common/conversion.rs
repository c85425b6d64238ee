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

/// The F32 files of the base fixture (language model, mmproj) converted into `out`: the model the end-to-end tests
/// of the CLI and the server run.
pub fn base_f32(out: &Path) -> (PathBuf, PathBuf) {
    convert(&crate::common::fixtures::model_dir("base-default-f32"), out, LlmType::F32, MmprojType::F32).unwrap()
}

/// A fixture variant converted into a temporary folder, both files opened with their weights mapped.
pub struct Converted {
    pub llm: ggml::gguf::GgufFile,
    pub mmproj: ggml::gguf::GgufFile,
    _dir: tempfile::TempDir,
}

pub fn converted(variant: &str, ty: LlmType, mm: MmprojType) -> Converted {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(&crate::common::fixtures::model_dir(variant), dir.path(), ty, mm).unwrap();
    let (mut llm, mut mmproj) =
        (ggml::gguf::GgufFile::open(&llm).unwrap(), ggml::gguf::GgufFile::open(&mmproj).unwrap());
    llm.map_weights().unwrap();
    mmproj.map_weights().unwrap();
    Converted { llm, mmproj, _dir: dir }
}
