//! JPEG inside DICOM: marker parsing, and a sequential-Huffman decoder for the grey
//! 12-bit (and 8-bit) JPEG that DICOM's "JPEG Extended (Process 2 & 4)" carries.
//!
//! 8-bit JPEG is decoded by libjpeg-turbo (the `mozjpeg` crate, as for ordinary JPEG files,
//! see `image.rs`), but that build, like the pure-Rust decoders, handles 8-bit samples only.
//! This decoder reproduces IJG libjpeg 6b built for 12 bits (the decoder inside GDCM and, with
//! the same arithmetic, libjpeg-turbo 3's 12-bit path): Huffman decoding, dequantisation, the
//! accurate integer IDCT (`jidctint.c`: 13-bit constants, one extra bit after the column pass
//! for 12-bit samples, two for 8-bit) and libjpeg's range-limiting table, so its samples equal
//! GDCM's exactly. Like IJG it ignores a sequential scan's spectral selection (`Ss`/`Se`),
//! which some DICOM encoders write wrong. Unlike IJG it refuses data that ends early instead
//! of padding it with zeros.
//!
//! Supported: baseline and extended sequential Huffman (SOF0/SOF1), one component, 8 or 12
//! bits, restart intervals, 8- and 16-bit quantisation tables.

use anyhow::{anyhow, bail, ensure, Result};

/// What the headers before the first scan say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JpegInfo {
    /// The start-of-frame marker's code (0xC0..=0xCF, not 0xC4/0xC8/0xCC).
    pub sof: u8,
    pub precision: u8,
    pub width: u16,
    pub height: u16,
    /// Component identifiers, in frame order.
    pub component_ids: Vec<u8>,
    /// Whether an APP0 "JFIF" marker came before the frame.
    pub jfif: bool,
    /// The Adobe APP14 marker's transform flag, when there is one.
    pub adobe_transform: Option<u8>,
}

/// Reads the markers up to the first scan.
pub fn info(data: &[u8]) -> Result<JpegInfo> {
    let mut jfif = false;
    let mut adobe_transform = None;
    for seg in Segments::new(data)? {
        let (marker, body) = seg?;
        match marker {
            0xE0 if body.starts_with(b"JFIF\0") => jfif = true,
            0xEE if body.starts_with(b"Adobe") => adobe_transform = body.get(11).copied(),
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                let frame = Frame::parse(marker, body)?;
                return Ok(JpegInfo {
                    sof: marker,
                    precision: frame.precision,
                    width: frame.width,
                    height: frame.height,
                    component_ids: frame.components.iter().map(|c| c.id).collect(),
                    jfif,
                    adobe_transform,
                });
            }
            0xDA => break,
            _ => {}
        }
    }
    bail!("corrupt JPEG: no frame header (SOF marker) before the image data")
}

/// Decodes a one-component sequential Huffman JPEG to its samples, row by row
/// (`width * height` values in `0..2^precision`).
pub fn decode_grey(data: &[u8]) -> Result<(u32, u32, Vec<u16>)> {
    let mut qt: [Option<[u16; 64]>; 4] = [None; 4];
    let mut dc: [Option<Huffman>; 4] = Default::default();
    let mut ac: [Option<Huffman>; 4] = Default::default();
    let mut restart_interval = 0usize;
    let mut frame: Option<Frame> = None;
    let mut segments = Segments::new(data)?;
    while let Some(seg) = segments.next() {
        let (marker, body) = seg?;
        match marker {
            0xDB => parse_dqt(body, &mut qt)?,
            0xC4 => parse_dht(body, &mut dc, &mut ac)?,
            0xDD => {
                ensure!(body.len() >= 2, "corrupt JPEG: short DRI marker");
                restart_interval = usize::from(u16::from_be_bytes([body[0], body[1]]));
            }
            0xC0 | 0xC1 => {
                // The caller checked the first frame header's size against the DICOM
                // header; a second one would size the output instead (IJG refuses it too).
                ensure!(frame.is_none(), "corrupt JPEG: a second frame header (SOF)");
                frame = Some(Frame::parse(marker, body)?);
            }
            0xC2 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => bail!(
                "{} JPEG is not supported at {} bits (only sequential Huffman JPEG is)",
                process_name(marker),
                body.first().copied().unwrap_or(0)
            ),
            0xDA => {
                let frame = frame
                    .as_ref()
                    .ok_or_else(|| anyhow!("corrupt JPEG: scan before the frame header"))?;
                let entropy = &data[segments.pos..];
                return decode_scan(frame, body, entropy, &qt, &dc, &ac, restart_interval);
            }
            0xD9 => break,
            _ => {}
        }
    }
    bail!("corrupt JPEG: no image data (SOS marker)")
}

fn process_name(sof: u8) -> &'static str {
    match sof {
        0xC2 | 0xC6 | 0xCA | 0xCE => "progressive",
        0xC3 | 0xC7 | 0xCB | 0xCF => "lossless",
        _ => "arithmetic-coded",
    }
}

/// The marker segments of a JPEG stream, up to and including the first SOS (whose body is
/// the scan header; the entropy-coded data starts at `pos` after it).
struct Segments<'a> {
    data: &'a [u8],
    pos: usize,
    done: bool,
}

impl<'a> Segments<'a> {
    fn new(data: &'a [u8]) -> Result<Self> {
        ensure!(
            data.len() >= 2 && data[0] == 0xFF && data[1] == 0xD8,
            "not a JPEG stream (no SOI marker)"
        );
        Ok(Self {
            data,
            pos: 2,
            done: false,
        })
    }
}

impl<'a> Iterator for Segments<'a> {
    type Item = Result<(u8, &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let d = self.data;
        // Markers may be preceded by any number of 0xFF fill bytes.
        while self.pos < d.len() && d[self.pos] == 0xFF {
            self.pos += 1;
        }
        if self.pos >= d.len() || d[self.pos - 1] != 0xFF {
            self.done = true;
            return Some(Err(anyhow!(
                "corrupt or truncated JPEG: expected a marker at byte {}",
                self.pos
            )));
        }
        let marker = d[self.pos];
        self.pos += 1;
        if matches!(marker, 0xD0..=0xD9 | 0x01) {
            if marker == 0xD9 {
                self.done = true;
            }
            return Some(Ok((marker, &[])));
        }
        if self.pos + 2 > d.len() {
            self.done = true;
            return Some(Err(anyhow!(
                "truncated JPEG: the file ends inside a marker"
            )));
        }
        let len = usize::from(u16::from_be_bytes([d[self.pos], d[self.pos + 1]]));
        if len < 2 || self.pos + len > d.len() {
            self.done = true;
            return Some(Err(anyhow!("corrupt or truncated JPEG: bad marker length")));
        }
        let body = &d[self.pos + 2..self.pos + len];
        self.pos += len;
        if marker == 0xDA {
            self.done = true;
        }
        Some(Ok((marker, body)))
    }
}

#[derive(Debug, Clone)]
struct Component {
    id: u8,
    tq: usize,
}

#[derive(Debug, Clone)]
struct Frame {
    precision: u8,
    width: u16,
    height: u16,
    components: Vec<Component>,
}

impl Frame {
    fn parse(marker: u8, body: &[u8]) -> Result<Self> {
        ensure!(body.len() >= 6, "corrupt JPEG: short frame header");
        let n = usize::from(body[5]);
        ensure!(
            n >= 1 && body.len() >= 6 + 3 * n,
            "corrupt JPEG: bad frame header (SOF{:X})",
            marker & 0x0F
        );
        let components = (0..n)
            .map(|i| {
                let c = &body[6 + 3 * i..9 + 3 * i];
                Component {
                    id: c[0],
                    tq: usize::from(c[2] & 3),
                }
            })
            .collect();
        Ok(Self {
            precision: body[0],
            height: u16::from_be_bytes([body[1], body[2]]),
            width: u16::from_be_bytes([body[3], body[4]]),
            components,
        })
    }
}

fn parse_dqt(mut body: &[u8], qt: &mut [Option<[u16; 64]>; 4]) -> Result<()> {
    while !body.is_empty() {
        let (pq, tq) = (body[0] >> 4, usize::from(body[0] & 3));
        let size = if pq == 0 { 64 } else { 128 };
        ensure!(body.len() > size, "corrupt JPEG: short quantisation table");
        let mut table = [0u16; 64];
        for (k, &zz) in ZIGZAG.iter().take(64).enumerate() {
            table[zz] = if pq == 0 {
                u16::from(body[1 + k])
            } else {
                u16::from_be_bytes([body[1 + 2 * k], body[2 + 2 * k]])
            };
        }
        qt[tq] = Some(table);
        body = &body[1 + size..];
    }
    Ok(())
}

/// A Huffman table in the form of the standard's DECODE procedure (F.2.2.3).
#[derive(Debug, Clone, Default)]
struct Huffman {
    maxcode: [i32; 17],
    valptr: [i32; 17],
    mincode: [i32; 17],
    values: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8], values: &[u8]) -> Result<Self> {
        let mut h = Self {
            maxcode: [-1; 17],
            values: values.to_vec(),
            ..Default::default()
        };
        let mut code = 0i32;
        let mut k = 0i32;
        for len in 1..=16 {
            let n = i32::from(counts[len - 1]);
            if n > 0 {
                h.valptr[len] = k;
                h.mincode[len] = code;
                code += n;
                k += n;
                h.maxcode[len] = code - 1;
            }
            ensure!(code <= 1 << len, "corrupt JPEG: bad Huffman table");
            code <<= 1;
        }
        Ok(h)
    }

    fn decode(&self, bits: &mut Bits) -> Result<u8> {
        let mut code = bits.bit()?;
        for len in 1..=16 {
            if code <= self.maxcode[len] {
                let i = self.valptr[len] + code - self.mincode[len];
                return self
                    .values
                    .get(i as usize)
                    .copied()
                    .ok_or_else(|| anyhow!("corrupt JPEG: bad Huffman code"));
            }
            code = (code << 1) | bits.bit()?;
        }
        bail!("corrupt JPEG: bad Huffman code")
    }
}

fn parse_dht(
    mut body: &[u8],
    dc: &mut [Option<Huffman>; 4],
    ac: &mut [Option<Huffman>; 4],
) -> Result<()> {
    while !body.is_empty() {
        ensure!(body.len() >= 17, "corrupt JPEG: short Huffman table");
        let (tc, th) = (body[0] >> 4, usize::from(body[0] & 3));
        let counts = &body[1..17];
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        ensure!(
            total <= 256 && body.len() >= 17 + total,
            "corrupt JPEG: short Huffman table"
        );
        let table = Huffman::new(counts, &body[17..17 + total])?;
        if tc == 0 {
            dc[th] = Some(table);
        } else {
            ac[th] = Some(table);
        }
        body = &body[17 + total..];
    }
    Ok(())
}

/// Bit reader over entropy-coded data: byte stuffing removed, stops at any marker.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    byte: u8,
    left: u8,
}

impl<'a> Bits<'a> {
    fn bit(&mut self) -> Result<i32> {
        if self.left == 0 {
            let b = *self
                .data
                .get(self.pos)
                .ok_or_else(|| anyhow!("truncated JPEG: the image data ends early"))?;
            if b == 0xFF {
                match self.data.get(self.pos + 1) {
                    Some(0x00) => self.pos += 2,
                    _ => bail!("truncated or corrupt JPEG: a marker interrupts the image data"),
                }
            } else {
                self.pos += 1;
            }
            self.byte = b;
            self.left = 8;
        }
        self.left -= 1;
        Ok(i32::from((self.byte >> self.left) & 1))
    }

    fn receive(&mut self, s: u8) -> Result<i32> {
        let mut v = 0;
        for _ in 0..s {
            v = (v << 1) | self.bit()?;
        }
        Ok(v)
    }

    /// Skips to the restart marker that must come next (0xFF fill bytes allowed).
    fn restart(&mut self) -> Result<()> {
        self.left = 0;
        while self.data.get(self.pos) == Some(&0xFF) && self.data.get(self.pos + 1) == Some(&0xFF) {
            self.pos += 1;
        }
        match (self.data.get(self.pos), self.data.get(self.pos + 1)) {
            (Some(0xFF), Some(0xD0..=0xD7)) => {
                self.pos += 2;
                Ok(())
            }
            _ => bail!("corrupt JPEG: missing restart marker"),
        }
    }
}

/// `receive` + `extend` of F.2.2.1: an `s`-bit magnitude category to its signed value.
fn extend(v: i32, s: u8) -> i32 {
    if s == 0 {
        0
    } else if v < 1 << (s - 1) {
        v - (1 << s) + 1
    } else {
        v
    }
}

fn decode_scan(
    frame: &Frame,
    sos: &[u8],
    entropy: &[u8],
    qt: &[Option<[u16; 64]>; 4],
    dc: &[Option<Huffman>; 4],
    ac: &[Option<Huffman>; 4],
    restart_interval: usize,
) -> Result<(u32, u32, Vec<u16>)> {
    ensure!(
        frame.components.len() == 1,
        "{}-component {}-bit JPEG is not supported (only grey)",
        frame.components.len(),
        frame.precision
    );
    ensure!(
        matches!(frame.precision, 8 | 12),
        "unsupported JPEG sample precision {}",
        frame.precision
    );
    ensure!(
        frame.width > 0 && frame.height > 0,
        "JPEG without a height (DNL marker) or width is not supported"
    );
    ensure!(
        sos.len() >= 4 && sos[0] == 1,
        "corrupt JPEG: bad scan header"
    );
    let comp = &frame.components[0];
    ensure!(
        sos[1] == comp.id,
        "corrupt JPEG: the scan names an unknown component"
    );
    let (td, ta) = (usize::from(sos[2] >> 4), usize::from(sos[2] & 3));
    let dc = dc[td & 3]
        .as_ref()
        .ok_or_else(|| anyhow!("corrupt JPEG: missing DC Huffman table {td}"))?;
    let ac = ac[ta]
        .as_ref()
        .ok_or_else(|| anyhow!("corrupt JPEG: missing AC Huffman table {ta}"))?;
    let q = qt[comp.tq]
        .as_ref()
        .ok_or_else(|| anyhow!("corrupt JPEG: missing quantisation table {}", comp.tq))?;
    let idct = Idct::new(frame.precision);

    let (w, h) = (usize::from(frame.width), usize::from(frame.height));
    let (bw, bh) = (w.div_ceil(8), h.div_ceil(8));
    let mut out = vec![0u16; w * h];
    let mut bits = Bits {
        data: entropy,
        pos: 0,
        byte: 0,
        left: 0,
    };
    let mut pred = 0i32;
    let mut block = [0i16; 64];
    let mut samples = [0u16; 64];
    for n in 0..bw * bh {
        if restart_interval > 0 && n > 0 && n % restart_interval == 0 {
            bits.restart()?;
            pred = 0;
        }
        block.fill(0);
        // F.2.2.1: DC difference, then the AC run/size codes (IJG's decode_mcu).
        let t = dc.decode(&mut bits)?;
        ensure!(t <= 16, "corrupt JPEG: bad DC magnitude category");
        pred += extend(bits.receive(t)?, t);
        block[0] = pred as i16;
        let mut k = 1;
        while k < 64 {
            let rs = ac.decode(&mut bits)?;
            let (r, s) = (usize::from(rs >> 4), rs & 15);
            if s == 0 {
                if r != 15 {
                    break;
                }
                k += 16;
                continue;
            }
            k += r;
            // IJG's natural-order table maps overrunning positions to 63.
            block[ZIGZAG[k.min(79)]] = extend(bits.receive(s)?, s) as i16;
            k += 1;
        }
        idct.run(&block, q, &mut samples);
        let (bx, by) = (n % bw, n / bw);
        for y in 0..8 {
            let oy = by * 8 + y;
            if oy >= h {
                break;
            }
            for x in 0..8 {
                let ox = bx * 8 + x;
                if ox < w {
                    out[oy * w + ox] = samples[y * 8 + x];
                }
            }
        }
    }
    Ok((w as u32, h as u32, out))
}

/// Zigzag position -> natural (row-major) position, with IJG's 16 guard entries.
const ZIGZAG: [usize; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
    63, 63, 63, 63, 63, 63,
];

/// IJG's `jpeg_idct_islow` with its range-limiting table, for 8- or 12-bit samples.
struct Idct {
    pass1_bits: u32,
    /// MAXJSAMPLE + 1.
    levels: i64,
}

const CONST_BITS: u32 = 13;
const FIX_0_298631336: i64 = 2446;
const FIX_0_390180644: i64 = 3196;
const FIX_0_541196100: i64 = 4433;
const FIX_0_765366865: i64 = 6270;
const FIX_0_899976223: i64 = 7373;
const FIX_1_175875602: i64 = 9633;
const FIX_1_501321110: i64 = 12299;
const FIX_1_847759065: i64 = 15137;
const FIX_1_961570560: i64 = 16069;
const FIX_2_053119869: i64 = 16819;
const FIX_2_562915447: i64 = 20995;
const FIX_3_072711026: i64 = 25172;

fn descale(x: i64, n: u32) -> i64 {
    (x + (1 << (n - 1))) >> n
}

/// The even and odd halves of one 8-point IDCT (jidctint.c), returning the 8 outputs before
/// descaling, in order 0..8.
fn idct8(v: [i64; 8]) -> [i64; 8] {
    let z1 = (v[2] + v[6]) * FIX_0_541196100;
    let tmp2 = z1 + v[6] * -FIX_1_847759065;
    let tmp3 = z1 + v[2] * FIX_0_765366865;
    let tmp0 = (v[0] + v[4]) << CONST_BITS;
    let tmp1 = (v[0] - v[4]) << CONST_BITS;
    let (tmp10, tmp13) = (tmp0 + tmp3, tmp0 - tmp3);
    let (tmp11, tmp12) = (tmp1 + tmp2, tmp1 - tmp2);

    let (t0, t1, t2, t3) = (v[7], v[5], v[3], v[1]);
    let z1 = t0 + t3;
    let z2 = t1 + t2;
    let z3 = t0 + t2;
    let z4 = t1 + t3;
    let z5 = (z3 + z4) * FIX_1_175875602;
    let t0 = t0 * FIX_0_298631336;
    let t1 = t1 * FIX_2_053119869;
    let t2 = t2 * FIX_3_072711026;
    let t3 = t3 * FIX_1_501321110;
    let z1 = z1 * -FIX_0_899976223;
    let z2 = z2 * -FIX_2_562915447;
    let z3 = z3 * -FIX_1_961570560 + z5;
    let z4 = z4 * -FIX_0_390180644 + z5;
    let t0 = t0 + z1 + z3;
    let t1 = t1 + z2 + z4;
    let t2 = t2 + z2 + z3;
    let t3 = t3 + z1 + z4;
    [
        tmp10 + t3,
        tmp11 + t2,
        tmp12 + t1,
        tmp13 + t0,
        tmp13 - t0,
        tmp12 - t1,
        tmp11 - t2,
        tmp10 - t3,
    ]
}

impl Idct {
    fn new(precision: u8) -> Self {
        Self {
            pass1_bits: if precision == 8 { 2 } else { 1 },
            levels: 1 << precision,
        }
    }

    /// libjpeg's `range_limit[x & RANGE_MASK]` for an IDCT output `x` (centred on 0).
    fn limit(&self, x: i64) -> u16 {
        let n = self.levels;
        let center = n / 2;
        let idx = x & (4 * n - 1);
        let v = if idx < center {
            center + idx
        } else if idx < 2 * n {
            n - 1
        } else if idx < 4 * n - center {
            0
        } else {
            idx + center - 4 * n
        };
        v as u16
    }

    fn run(&self, coef: &[i16; 64], q: &[u16; 64], out: &mut [u16; 64]) {
        let p1 = self.pass1_bits;
        let mut ws = [0i64; 64];
        for col in 0..8 {
            let v: [i64; 8] =
                std::array::from_fn(|r| i64::from(coef[r * 8 + col]) * i64::from(q[r * 8 + col]));
            let o = idct8(v);
            for r in 0..8 {
                // The work array is C `int`.
                ws[r * 8 + col] = i64::from(descale(o[r], CONST_BITS - p1) as i32);
            }
        }
        for row in 0..8 {
            let v: [i64; 8] = std::array::from_fn(|c| ws[row * 8 + c]);
            let o = idct8(v);
            for c in 0..8 {
                out[row * 8 + c] = self.limit(descale(o[c], CONST_BITS + p1 + 3));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_limit_clamps_like_libjpeg() {
        let idct = Idct::new(12);
        assert_eq!(idct.limit(0), 2048);
        assert_eq!(idct.limit(-2048), 0);
        assert_eq!(idct.limit(-3000), 0);
        assert_eq!(idct.limit(2047), 4095);
        assert_eq!(idct.limit(5000), 4095);
        let idct8 = Idct::new(8);
        assert_eq!(idct8.limit(-1), 127);
        assert_eq!(idct8.limit(127), 255);
        assert_eq!(idct8.limit(300), 255);
        assert_eq!(idct8.limit(-300), 0);
    }

    #[test]
    fn dc_only_block_is_flat() {
        let idct = Idct::new(12);
        let mut coef = [0i16; 64];
        coef[0] = 100;
        let q = [2u16; 64];
        let mut out = [0u16; 64];
        idct.run(&coef, &q, &mut out);
        // 100 * 2 / 8 = 25 above the centre.
        assert!(out.iter().all(|&v| v == 2048 + 25), "{out:?}");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(info(b"").is_err());
        assert!(decode_grey(&[0xFF, 0xD8, 0xFF]).is_err());
        assert!(decode_grey(&[0xFF, 0xD8, 0xFF, 0xD9]).is_err());
    }

    /// A frame header checked by `info` (8x8) followed by another claiming 65535x65535
    /// must not size the output.
    #[test]
    fn second_frame_header_is_refused() {
        let sof = |w: u16, h: u16| {
            let mut v = vec![0xFF, 0xC0, 0, 11, 8];
            v.extend_from_slice(&h.to_be_bytes());
            v.extend_from_slice(&w.to_be_bytes());
            v.extend_from_slice(&[1, 1, 0x11, 0]);
            v
        };
        let data = [
            vec![0xFF, 0xD8],
            sof(8, 8),
            sof(65535, 65535),
            vec![0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 63, 0, 0, 0, 0xFF, 0xD9],
        ]
        .concat();
        assert_eq!(
            (info(&data).unwrap().width, info(&data).unwrap().height),
            (8, 8)
        );
        let err = decode_grey(&data).unwrap_err().to_string();
        assert!(err.contains("second frame header"), "{err}");
    }
}
