//! Quantization and dequantization of rows through ggml (`ggml_quantize_chunk`, type traits' `to_float`).

use crate::{sys, Error, Result, Type};

/// Quantizes `src` (rows of `n_per_row` floats) to `ty`. `imatrix` (one weight per column) is required by the
/// types that `Type::requires_imatrix` names and optional otherwise.
pub fn quantize(ty: Type, src: &[f32], n_per_row: usize, imatrix: Option<&[f32]>) -> Result<Vec<u8>> {
    let row_size = ty.row_size(n_per_row).ok_or(Error::Quantize(format!(
        "rows of {n_per_row} values are not a multiple of {ty}'s block of {}",
        ty.block_size()
    )))?;
    if n_per_row == 0 || src.len() % n_per_row != 0 {
        return Err(Error::Quantize(format!("{} values are not whole rows of {n_per_row}", src.len())));
    }
    if matches!(ty, Type::I8 | Type::I16 | Type::I32 | Type::I64 | Type::F64) {
        return Err(Error::Quantize(format!("{ty} is not a quantization target")));
    }
    match imatrix {
        None if ty.requires_imatrix() => return Err(Error::Quantize(format!("{ty} needs an importance matrix"))),
        Some(m) if m.len() != n_per_row => {
            return Err(Error::Quantize(format!("importance matrix has {} values for rows of {n_per_row}", m.len())))
        }
        _ => {}
    }
    let nrows = src.len() / n_per_row;
    let mut dst = vec![0u8; nrows * row_size];
    // SAFETY: src holds nrows*n_per_row floats; dst holds nrows rows of row_size bytes, exactly what ggml writes
    // for this type; the imatrix, when given, has n_per_row values; start 0 is a multiple of everything.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            ty.to_sys(),
            src.as_ptr(),
            dst.as_mut_ptr().cast(),
            0,
            nrows as i64,
            n_per_row as i64,
            imatrix.map_or(std::ptr::null(), |m| m.as_ptr()),
        )
    };
    debug_assert_eq!(written, dst.len());
    Ok(dst)
}

/// Converts `n` values stored as `ty` in `src` to f32.
pub fn dequantize(ty: Type, src: &[u8], n: usize) -> Result<Vec<f32>> {
    let bytes = ty.row_size(n).ok_or(Error::Quantize(format!("{n} values are not whole blocks of {ty}")))?;
    if src.len() != bytes {
        return Err(Error::Quantize(format!("{} bytes given, {n} {ty} values take {bytes}", src.len())));
    }
    if ty == Type::F32 {
        return Ok(src.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
    }
    // SAFETY: ggml's static type-traits table; `to_float` reads n values (whole blocks, checked) from src, whose
    // length matches, and writes n floats into out.
    unsafe {
        let traits = &*sys::ggml_get_type_traits(ty.to_sys());
        let to_float = traits.to_float.ok_or(Error::Quantize(format!("{ty} has no conversion to f32")))?;
        let mut out = vec![0f32; n];
        to_float(src.as_ptr().cast(), out.as_mut_ptr(), n as i64);
        Ok(out)
    }
}
