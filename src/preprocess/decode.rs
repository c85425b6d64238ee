//! Image decoding to 8-bit RGB the way PIL's `Image.open(f).convert("RGB")` does it.
//!
//! HF's processor is fed PIL images; stock transformers 4.45.1 even refuses L, P and RGBA, so users (and the
//! goldens) call `convert("RGB")` first. Per source type (checked against Pillow 10.4):
//! - RGB: as is. L (grey, incl. 1/2/4-bit, which PNG and PIL both scale to 0..255): copied to R, G, B.
//! - P (palette, PNG/GIF/BMP): palette lookup.
//! - RGBA / LA / transparency chunks: alpha is **dropped, not composited** (the colour under a transparent
//!   pixel is kept).
//! - 16-bit RGB, RGBA and LA PNG: PIL unpacks them with its `;16B` raw modes, i.e. keeps the **high byte**
//!   (`v >> 8`, truncation, not the rounded `v / 257`).
//! - 16-bit greyscale PNG: PIL opens it as mode `I;16` and its `I;16 -> RGB` conversion **clips** the value to
//!   0..=255 (so anything above 255 becomes white; a typical 16-bit photo comes out almost all white). We
//!   reproduce that for parity with the HF path, since the point of this module is to feed the model exactly
//!   what HF would; a runtime wanting a sensible picture should convert such images itself beforehand.
//!   This also applies with a tRNS chunk (still `I;16` in PIL), which is why the PNG header is read here.
//! - JPEG is decoded with libjpeg-turbo (the `turbojpeg` crate, built from source), the library Pillow links,
//!   with Pillow's settings (islow IDCT, fancy upsampling): bit-identical pixels for baseline, progressive,
//!   4:2:0 / 4:2:2 / 4:4:4, grey, restart markers (the fixtures in tests/preprocess.rs). Other decoders are
//!   not: jpeg-decoder was up to 3 levels off, the image crate's zune-jpeg 9 (edge replication).
//! - CMYK / YCCK JPEG: Pillow reads every 4-component JPEG as Adobe-inverted `CMYK;I`, then `cmyk2rgb`:
//!   `R = (255 - K) - round(C * (255 - K) / 255)`; libjpeg hands back the stored (inverted) values, YCCK
//!   converted to CMYK, so they are inverted and the same formula is applied.
//! - A JPEG that libjpeg decodes only with a warning (corrupt entropy data, extraneous bytes) is refused with
//!   libjpeg's message; Pillow ignores such warnings (a truncated file is an error in both).
//! - WebP (lossless and lossy), BMP (24/32-bit, 8-bit palette, grey, 1-bit) and GIF (palette, grey,
//!   transparent index, animated): identical to PIL on the PIL-written test files that were checked.
//! - GIF: first frame, palette colours (also under the transparent index). Where the first frame does not
//!   cover the logical screen, the image crate leaves black, while PIL fills with the transparent index's
//!   colour (or palette entry 0).
//! - EXIF orientation is **not** applied (neither PIL's `open` nor HF applies it), ICC profiles are ignored.
//!
//! Guards ([`ImageLimits`]): the width and height, and with them what decoding (and, when the caller says to
//! what size, resizing) will cost, are read and checked from the header before any pixel is decoded: an image
//! with a zero side, more than `max_pixels` pixels, a peak working memory above `max_bytes` or a resize above
//! `max_resize_ops` multiply-adds is refused with an error naming the image, its size and the limit. The large
//! buffers we allocate ourselves use `try_reserve`, so a failed allocation is an error, not an abort.

use std::collections::TryReserveError;
use std::io::Cursor;
use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{ColorType, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

use super::resize::resize_cost;

/// PIL's default `Image.MAX_IMAGE_PIXELS` (about 0.25 GiB of 24-bit pixels; PIL warns above it and raises
/// `DecompressionBombError` above twice that). We refuse anything above it.
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// What an image may cost before it is decoded: checked from its header (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Width x height.
    pub max_pixels: u64,
    /// Peak working memory in bytes: the decoder's buffers (its output at its own bit depth, its internal
    /// planes / canvas / coefficients, estimated from the format and header), our 8-bit RGB copy, and, when
    /// a resize target is given, the decoded RGB image plus the resize's working memory
    /// ([`resize_cost`](super::resize::resize_cost)) plus the f32 `pixel_values`. The larger of the decode and
    /// the resize phases counts (the decoder's buffers are freed before the resize). The encoded bytes
    /// themselves are not counted.
    pub max_bytes: u64,
    /// Multiply-adds of the bicubic resize to the target size (both passes, 3 channels).
    pub max_resize_ops: u64,
}

impl Default for ImageLimits {
    /// - `max_pixels`: [`MAX_IMAGE_PIXELS`], PIL's.
    /// - `max_bytes`: 1.25 GiB. A MAX_IMAGE_PIXELS RGB(A) 8-bit PNG peaks at about 0.63 GB (RGBA buffer + RGB
    ///   copy), a 16-bit RGBA one at 0.98 GB, a baseline JPEG at 0.27 GB (estimated), a progressive JPEG of
    ///   that size (libjpeg keeps its 16-bit coefficients for the whole decode) at about 0.81 GB: all accepted,
    ///   as PIL accepts them. Thin strips whose resize needs a huge intermediate (1 x 10,000,000 to 384 x 384: 11.5 GB) are
    ///   refused. A
    ///   9459 x 9459 photo to 384 x 384 peaks at 0.28 GB in the resize phase.
    /// - `max_resize_ops`: 2e9. A 9459 x 9459 photo (MAX_IMAGE_PIXELS) to 384 x 384 takes 1.11e9, 4000 x 3000
    ///   1.6e8; 1 x 10,000,000 takes 5.8e10 (and 11.5 GB). Measured here (release, one core; time per
    ///   multiply-add depends on the shape: the vertical pass over a tall image is cache-bound): the 9459 x 9459
    ///   resize takes 0.23 s (0.2 ns each), 4000 x 3000 0.06 s, while a limit-sized thin strip, 1 x 340,000
    ///   (1.95e9), takes 3.4 s (1.75 ns each): the limit bounds a resize to about 3.5 s.
    fn default() -> Self {
        ImageLimits { max_pixels: MAX_IMAGE_PIXELS, max_bytes: 1280 << 20, max_resize_ops: 2_000_000_000 }
    }
}

/// The formats we decode (JPEG through libjpeg-turbo, the others through the `image` features enabled in
/// Cargo.toml).
const FORMATS: &[ImageFormat] =
    &[ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP, ImageFormat::Bmp, ImageFormat::Gif];

/// Reads and decodes an image file to 8-bit RGB (see the module docs for the conversion rules), within the
/// default [`ImageLimits`].
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = read_file(path)?;
    load_rgb_from_memory(&bytes, &path.display().to_string())
}

/// `std::fs::read` with the error naming the file.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{}: cannot read the image file", path.display()))
}

/// Decodes an encoded image held in memory, within the default [`ImageLimits`]; `name` (a file name, URL,
/// request id...) names it in errors.
pub fn load_rgb_from_memory(bytes: &[u8], name: &str) -> Result<RgbImage> {
    load_rgb_limited(bytes, name, &ImageLimits::default(), None)
}

/// Decodes an encoded image held in memory to 8-bit RGB, refusing it from its header when it would exceed
/// `limits`. With `resize_to` = (w, h), the cost of then resizing it to w x h (and normalising that to f32
/// `pixel_values`) is checked too, as [`preprocess_bytes_limited`](super::preprocess_bytes_limited) does.
pub fn load_rgb_limited(
    bytes: &[u8],
    name: &str,
    limits: &ImageLimits,
    resize_to: Option<(u32, u32)>,
) -> Result<RgbImage> {
    let format = image::guess_format(bytes)
        .ok()
        .filter(|f| FORMATS.contains(f))
        .with_context(|| format!("{name}: not a supported image (JPEG, PNG, WebP, BMP or GIF expected)"))?;

    if format == ImageFormat::Jpeg {
        return decode_jpeg(bytes, name, limits, resize_to);
    }

    if format == ImageFormat::Png {
        check_png_palette(bytes, name)?;
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // Our header check is the real limit; this only keeps the crate's own 512 MiB default from refusing
    // images PIL accepts (the largest allowed image as 16-bit RGBA is ~683 MiB) before our check runs.
    let mut crate_limits = Limits::default();
    crate_limits.max_alloc = Some(limits.max_bytes.max(MAX_IMAGE_PIXELS * 8 + (64 << 20)));
    reader.limits(crate_limits);
    let decoder = reader.into_decoder().with_context(|| format!("{name}: corrupt or unreadable {format:?} image"))?;

    // Header only so far: check the size and the costs before decoding any pixel data.
    let (w, h) = decoder.dimensions();
    let color = decoder.color_type();
    let out_bytes = decoder.total_bytes();
    // The decoder's internal buffers: GIF reads a frame smaller than the screen into an RGBA frame buffer
    // first (at most another `out_bytes`); WebP lossy decodes to YUV planes (1.5 B/px), lossless to ARGB
    // (up to 4 B/px); PNG and BMP work row by row (PNG: the previous and current raw rows and a transformed
    // one).
    let internal = match format {
        ImageFormat::Gif | ImageFormat::WebP => out_bytes.max((w as u64).saturating_mul(h as u64).saturating_mul(4)),
        _ => (w as u64).saturating_mul(color.bytes_per_pixel() as u64).saturating_mul(3),
    };
    let rgb_copy = if color == ColorType::Rgb8 { 0 } else { rgb_bytes(w, h) };
    let decode_bytes = out_bytes.saturating_add(internal).saturating_add(rgb_copy);
    check_header(name, &Header { width: w, height: h, decode_bytes }, limits, resize_to)?;

    let corrupt = || format!("{name}: corrupt or unreadable {format:?} image");
    let mut raw = try_zeroed(out_bytes).map_err(|e| oom(name, w, h, e))?;
    // A decoder that panics on a malformed file (as png 0.18.1 did, below) is an error for this image, not the
    // end of the program or of the request's worker.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decoder.read_image(&mut raw)))
        .map_err(|_| anyhow::anyhow!("{name}: the {format:?} decoder failed on this file (malformed image)"))?
        .with_context(corrupt)?;
    let gray16_png = format == ImageFormat::Png && png_is_gray16(bytes);
    to_rgb_like_pil(color, raw, w, h, gray16_png)
        .map_err(|e| e.context(format!("{name}: cannot convert the {format:?} image to RGB")))
}

/// Refuses a PNG whose palette (PLTE) is not 1 to 256 RGB entries, as libpng does ("invalid palette length"):
/// png 0.18.1 panics (a slice out of range) expanding a palette whose length is not a multiple of 3. Found by the
/// `image` fuzz target; tests/fuzz/image/ keeps the file. Walks the chunk headers only: O(chunks).
fn check_png_palette(bytes: &[u8], name: &str) -> Result<()> {
    let mut at = 8usize;
    while let Some(head) = at.checked_add(8).and_then(|end| bytes.get(at..end)) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        match &head[4..8] {
            b"PLTE" if len % 3 != 0 || !(3..=768).contains(&len) => {
                bail!("{name}: invalid PNG: a palette (PLTE) of {len} bytes, not 1 to 256 RGB entries")
            }
            b"IDAT" | b"IEND" => break,
            _ => {}
        }
        // Length, type, data, CRC.
        at = match len.checked_add(12).and_then(|n| at.checked_add(n)) {
            Some(next) => next,
            None => break,
        };
    }
    Ok(())
}

/// What the header says, for [`check_header`].
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub width: u32,
    pub height: u32,
    /// Peak bytes while decoding to 8-bit RGB: the decoder's output and internal buffers (estimated from the
    /// format and header) plus our RGB copy where one is made.
    pub decode_bytes: u64,
}

/// The checks every format goes through once its header is read, before any pixel is decoded: zero size,
/// `max_pixels`, `max_bytes` (the decode phase, and with `resize_to` the resize phase: decoded RGB + resize
/// working memory + f32 `pixel_values`), and `max_resize_ops`. The error names the image, its size and the
/// limit it exceeds.
pub fn check_header(name: &str, hd: &Header, limits: &ImageLimits, resize_to: Option<(u32, u32)>) -> Result<()> {
    let (w, h) = (hd.width, hd.height);
    if w == 0 || h == 0 {
        bail!("image {name}: the image has zero size ({w}x{h})");
    }
    let pixels = w as u64 * h as u64;
    if pixels > limits.max_pixels {
        let pil = if limits.max_pixels == MAX_IMAGE_PIXELS { " (PIL's MAX_IMAGE_PIXELS)" } else { "" };
        bail!(
            "image {name}: {w}x{h} = {pixels} pixels exceeds the limit of {}{pil}: refusing a possible \
             decompression bomb",
            limits.max_pixels
        );
    }
    if hd.decode_bytes > limits.max_bytes {
        bail!(
            "image {name}: {w}x{h} needs {} to decode (limit {}): the image is too large",
            fmt_bytes(hd.decode_bytes),
            fmt_bytes(limits.max_bytes)
        );
    }
    let Some((tw, th)) = resize_to else { return Ok(()) };
    let cost = resize_cost(w, h, tw, th);
    // After decoding, the RGB image, the resize's working memory and then the f32 pixel_values.
    let pixel_values = (tw as u64).saturating_mul(th as u64).saturating_mul(3 * 4);
    let resize_bytes = rgb_bytes(w, h).saturating_add(cost.bytes).saturating_add(pixel_values);
    let why = if w.max(h) as u64 >= 32 * w.min(h) as u64 {
        "the aspect ratio is too extreme"
    } else {
        "the image is too large"
    };
    if resize_bytes > limits.max_bytes {
        bail!(
            "image {name}: {w}x{h} needs {} to resize to {tw}x{th} (limit {}): {why}",
            fmt_bytes(resize_bytes),
            fmt_bytes(limits.max_bytes)
        );
    }
    if cost.ops > limits.max_resize_ops {
        bail!(
            "image {name}: {w}x{h} needs {:.2e} multiply-adds to resize to {tw}x{th} (limit {:.2e}): {why}",
            cost.ops as f64,
            limits.max_resize_ops as f64
        );
    }
    Ok(())
}

/// Bytes of a packed 8-bit RGB image.
fn rgb_bytes(w: u32, h: u32) -> u64 {
    (w as u64).saturating_mul(h as u64).saturating_mul(3)
}

/// "1.5 GiB", "300.0 MiB", "12.0 KiB", "17 B".
fn fmt_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    UNITS
        .iter()
        .find(|(_, u)| n >= *u)
        .map_or_else(|| format!("{n} B"), |(name, u)| format!("{:.1} {name}", n as f64 / *u as f64))
}

/// A zero-filled buffer of `n` bytes, or the allocation error instead of an abort.
fn try_zeroed(n: u64) -> Result<Vec<u8>, TryReserveError> {
    let mut v = Vec::new();
    v.try_reserve_exact(usize::try_from(n).unwrap_or(usize::MAX))?;
    v.resize(n as usize, 0);
    Ok(v)
}

/// An empty buffer with room for `n` bytes, or the allocation error.
fn try_with_capacity(n: usize) -> Result<Vec<u8>, TryReserveError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)?;
    Ok(v)
}

fn oom(name: &str, w: u32, h: u32, e: TryReserveError) -> anyhow::Error {
    anyhow::anyhow!("image {name}: out of memory decoding the {w}x{h} image ({e})")
}

/// libjpeg-turbo's limit on the scans of a progressive JPEG: a real one has about 10, a hostile one can hold
/// thousands of tiny scans, each a pass over the whole image's coefficients (libjpeg-turbo's own advice for
/// untrusted input).
const MAX_JPEG_SCANS: u32 = 500;

/// JPEG through libjpeg-turbo, the library Pillow links, with Pillow's settings (its defaults: accurate
/// "islow" integer IDCT, fancy upsampling, no DCT scaling), so pixels are bit-identical to Pillow's: grey and
/// YCbCr / RGB to RGB, CMYK / YCCK as Pillow does (below).
fn decode_jpeg(bytes: &[u8], name: &str, limits: &ImageLimits, resize_to: Option<(u32, u32)>) -> Result<RgbImage> {
    use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat};
    let corrupt = |e: turbojpeg::Error| anyhow::anyhow!("{name}: corrupt or unreadable JPEG image ({e})");
    let mut decoder = Decompressor::new().map_err(corrupt)?;
    // Markers up to the frame header only.
    let info = decoder.read_header(bytes).map_err(corrupt)?;
    let (w, h) = (u32::try_from(info.width).unwrap_or(u32::MAX), u32::try_from(info.height).unwrap_or(u32::MAX));
    if info.is_lossless {
        // Pillow reads through libjpeg's 8-bit API and refuses lossless (and 12-bit) JPEG too.
        bail!("{name}: lossless JPEG is not supported");
    }
    // Pillow opens every 4-component JPEG as Adobe-inverted CMYK (`CMYK;I`) and converts that with `cmyk2rgb`;
    // libjpeg hands back the stored C, M, Y, K (YCCK converted to CMYK).
    let cmyk = matches!(info.colorspace, Colorspace::CMYK | Colorspace::YCCK);
    let (format, px_bytes) = if cmyk { (PixelFormat::CMYK, 4u64) } else { (PixelFormat::RGB, 3) };
    // libjpeg's buffers: a baseline JPEG is decoded a row of MCUs at a time (per component up to 3 MCU rows of
    // 16 lines for the upsampler's context, at full width: an upper bound), a progressive one also keeps the
    // 16-bit coefficients of the whole image (bounded as if no component were subsampled); plus our output and,
    // for CMYK, the RGB copy.
    let comps = if cmyk { 4 } else { 3 };
    let padded_w = (w as u64).div_ceil(16) * 16;
    let padded = padded_w * ((h as u64).div_ceil(16) * 16);
    let strips = comps * padded_w * 48;
    let coeffs = if info.is_progressive { 2 * comps * padded } else { 0 };
    let out = (w as u64).saturating_mul(h as u64).saturating_mul(px_bytes);
    let rgb_copy = if cmyk { rgb_bytes(w, h) } else { 0 };
    let decode_bytes = (strips + coeffs + out).max(out + rgb_copy);
    check_header(name, &Header { width: w, height: h, decode_bytes }, limits, resize_to)?;

    decoder.set_scan_limit(MAX_JPEG_SCANS).map_err(corrupt)?;
    let mut px = try_zeroed(out).map_err(|e| oom(name, w, h, e))?;
    let pitch = info.width * px_bytes as usize;
    let image = Image { pixels: px.as_mut_slice(), width: info.width, pitch, height: info.height, format };
    decoder.decompress(bytes, image).map_err(corrupt)?;
    // Frees libjpeg's buffers (a progressive image's coefficients) before the conversion.
    drop(decoder);
    if !cmyk {
        return RgbImage::from_raw(w, h, px).context("internal error: RGB buffer size");
    }
    let mut rgb = try_with_capacity(rgb_bytes(w, h) as usize).map_err(|e| oom(name, w, h, e))?;
    rgb.extend(px.chunks_exact(4).flat_map(|p| cmyk_to_rgb([255 - p[0], 255 - p[1], 255 - p[2], 255 - p[3]])));
    RgbImage::from_raw(w, h, rgb).context("internal error: RGB buffer size")
}

/// Pillow's `cmyk2rgb`: `nk = 255 - K; R = nk - MULDIV255(C, nk)` where `MULDIV255(a, b)` is the exactly
/// rounded `a * b / 255` computed as `t = a * b + 128; ((t >> 8) + t) >> 8`.
fn cmyk_to_rgb(p: [u8; 4]) -> [u8; 3] {
    let nk = 255 - p[3] as i32;
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    [0, 1, 2].map(|c| (nk - muldiv255(p[c] as i32, nk)).clamp(0, 255) as u8)
}

/// True when the PNG's IHDR says 16-bit greyscale (colour type 0), which PIL opens as `I;16`. The image crate
/// reports such an image as `Luma16`, or `LumaA16` when a tRNS chunk is present, and only the header tells the
/// latter apart from a real 16-bit grey+alpha PNG (colour type 4, which PIL treats like the other 16-bit modes).
fn png_is_gray16(bytes: &[u8]) -> bool {
    // 8-byte signature, then the IHDR chunk: length (4), "IHDR", width (4), height (4), bit depth, colour type.
    bytes.len() >= 26 && &bytes[12..16] == b"IHDR" && bytes[24] == 16 && bytes[25] == 0
}

/// PIL `convert("RGB")` on what the image crate decoded: `raw` is the decoder's buffer in `color` (16-bit
/// samples native-endian, as `ImageDecoder::read_image` writes them). Alpha is dropped, not composited.
fn to_rgb_like_pil(color: ColorType, raw: Vec<u8>, w: u32, h: u32, gray16_png: bool) -> Result<RgbImage> {
    if color == ColorType::Rgb8 {
        return RgbImage::from_raw(w, h, raw).context("internal error: RGB buffer size");
    }
    let n = w as usize * h as usize;
    let mut out = try_with_capacity(n * 3).with_context(|| format!("out of memory converting {w}x{h} to RGB"))?;
    let s16 = |b: &[u8]| u16::from_ne_bytes([b[0], b[1]]);
    match color {
        ColorType::Rgba8 => raw.chunks_exact(4).for_each(|p| out.extend_from_slice(&p[..3])),
        ColorType::L8 => raw.iter().for_each(|&v| out.extend_from_slice(&[v; 3])),
        ColorType::La8 => raw.chunks_exact(2).for_each(|p| out.extend_from_slice(&[p[0]; 3])),
        ColorType::Rgb16 => raw.chunks_exact(2).for_each(|s| out.push(high_byte(s16(s)))),
        ColorType::Rgba16 => raw.chunks_exact(8).for_each(|p| out.extend((0..3).map(|c| high_byte(s16(&p[2 * c..]))))),
        // 16-bit grey PNG (PIL `I;16`): clipped, see the module docs.
        ColorType::L16 => raw.chunks_exact(2).for_each(|s| out.extend_from_slice(&[clip_u16(s16(s)); 3])),
        ColorType::La16 => {
            let conv = if gray16_png { clip_u16 } else { high_byte };
            raw.chunks_exact(4).for_each(|p| out.extend_from_slice(&[conv(s16(p)); 3]))
        }
        other => bail!("unsupported pixel format {other:?}"),
    }
    RgbImage::from_raw(w, h, out).context("internal error: RGB buffer size")
}

/// PIL's `;16B` unpackers keep the most significant byte.
fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

/// PIL's `I;16 -> RGB` (and `I;16 -> L`) conversion clips to 255.
fn clip_u16(v: u16) -> u8 {
    v.min(255) as u8
}
