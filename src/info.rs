//! `asagi-gguf info FILE.gguf`: metadata and tensor table of a GGUF file.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use ggml::gguf::{Array, GgufFile, Value};

/// How many array elements to show before eliding.
const ARRAY_PREVIEW: usize = 8;

fn preview<T: std::fmt::Debug>(v: &[T]) -> String {
    let shown: Vec<String> = v.iter().take(ARRAY_PREVIEW).map(|x| format!("{x:?}")).collect();
    let more = if v.len() > ARRAY_PREVIEW { format!(", ... ({} total)", v.len()) } else { String::new() };
    format!("[{}{more}]", shown.join(", "))
}

/// A one-line rendering of a metadata value (long strings and arrays are shortened).
pub fn render_value(v: &Value) -> String {
    match v {
        Value::Str(s) if s.chars().count() > 120 => {
            format!("{:?}... ({} bytes)", s.chars().take(100).collect::<String>(), s.len())
        }
        Value::Str(s) => format!("{s:?}"),
        Value::Array(a) => match a {
            Array::U8(v) => preview(v),
            Array::I8(v) => preview(v),
            Array::U16(v) => preview(v),
            Array::I16(v) => preview(v),
            Array::U32(v) => preview(v),
            Array::I32(v) => preview(v),
            Array::U64(v) => preview(v),
            Array::I64(v) => preview(v),
            Array::F32(v) => preview(v),
            Array::F64(v) => preview(v),
            Array::Bool(v) => preview(v),
            Array::Str(v) => preview(v),
        },
        Value::U8(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        Value::Bool(x) => x.to_string(),
    }
}

/// The report `info` prints.
pub fn report(path: &Path) -> Result<String> {
    let file = GgufFile::open(path)?;
    let mut out = String::new();
    let infos = file.tensor_infos();
    let keys = file.keys();
    writeln!(
        out,
        "{}: GGUF v{}, {} keys, {} tensors, alignment {}",
        path.display(),
        file.version(),
        keys.len(),
        infos.len(),
        file.alignment()
    )?;
    writeln!(out, "\nmetadata:")?;
    let width = keys.iter().map(|k| k.len()).max().unwrap_or(0);
    for key in &keys {
        let v = file.get(key).expect("listed key");
        writeln!(out, "  {key:<width$}  {:<9}  {}", v.type_name(), render_value(&v))?;
    }
    writeln!(out, "\ntensors:")?;
    let width = infos.iter().map(|t| t.name.len()).max().unwrap_or(0);
    let mut total = 0usize;
    for t in infos {
        let shape = t.ne.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" x ");
        writeln!(out, "  {:<width$}  {:<6}  {:<20}  {:>12}", t.name, t.ty.name(), shape, t.size)?;
        total += t.size;
    }
    writeln!(out, "\ntotal tensor bytes: {total} ({:.2} MiB)", total as f64 / (1024.0 * 1024.0))?;
    Ok(out)
}
