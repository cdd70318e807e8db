//! A walk over a DICOM file's element structure before dicom-rs parses it, so that hostile
//! structure is refused while refusing is still possible:
//!
//! - **Depth.** dicom-rs builds nested sequences recursively (`build_object` ->
//!   `build_sequence` -> `build_object`...), and a stack overflow cannot be caught: it aborts
//!   the process, every other request of a server included. This walk is iterative (an
//!   explicit stack of open sequences and items) and refuses more than [`MAX_DEPTH`] nested
//!   sequences before dicom-rs sees the file.
//! - **Lengths.** dicom-rs allocates (and zero-fills) an element's declared length before it
//!   reads the value, so a 484-byte file claiming a 4 GB string costs 4 GB. Here every
//!   declared length (element, sequence, item, fragment) must fit in the bytes actually
//!   present, and inside its enclosing sequence or item.
//! - **Inflation.** A deflated data set is inflated as a stream (nothing kept) and refused
//!   past [`MAX_INFLATED`] bytes.
//!
//! The walk follows dicom-rs' own reading rules (`DataSetReader` in dicom-parser 0.10, the
//! VR of implicit data from the same dictionary), so that the structure it measures is the
//! one dicom-rs will build; where dicom-rs would also fail it may fail earlier, with a
//! clearer message. It also collects what the memory estimate ([`super::decode_cost`])
//! needs: the top-level image attributes, the pixel data's layout, and an upper bound of
//! the memory of dicom-rs' in-memory object.

use std::io::Read;

use anyhow::{anyhow, bail, ensure, Result};
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::VR;
use dicom_dictionary_std::{uids, StandardDataDictionary};
use dicom_encoding::transfer_syntax::{Codec, Endianness, TransferSyntaxIndex};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use flate2::read::DeflateDecoder;

/// Most sequences nested in one another (a sequence in an item of a sequence... counts 2).
/// Real files nest a few levels (enhanced multi-frame functional groups: 3; deep structured
/// reports: a few dozen). dicom-rs spends a few hundred bytes of stack per level (see
/// `max_depth_fits_a_small_stack` in the tests), so this many levels fit a 2 MiB thread
/// with a wide margin, in debug builds too.
pub const MAX_DEPTH: usize = 128;

/// Largest deflated data set inflated. Deflate expands up to ~1000x, so a request-sized
/// file can claim gigabytes; a real deflated image (they are rare: the syntax is meant for
/// structured reports) is far below this, which is twice the 16-bit pixels of the largest
/// picture accepted (`MAX_IMAGE_PIXELS`), rounded up.
pub const MAX_INFLATED: u64 = 512 << 20;

/// Upper bounds of what dicom-rs' in-memory object costs per part, beyond the value bytes:
/// an element (its `InMemElement` in a B-tree node, nodes at least half full), an item (an
/// `InMemDicomObject` in a sequence's growable vector), one value of a multi-valued string
/// (a `String` in a growable vector, plus its heap block), a fragment (a `Vec<u8>`).
const ELEMENT_COST: u64 = 256;
const ITEM_COST: u64 = 160;
const STRING_VALUE_COST: u64 = 96;
const FRAGMENT_COST: u64 = 64;

/// How the data set is encoded, from the file meta group (or guessed for a bare data set).
#[derive(Debug, Clone)]
pub struct Layout {
    /// Where the data set starts in the file.
    pub start: usize,
    /// The transfer syntax UID, trimmed.
    pub ts_uid: String,
    implicit: bool,
    big_endian: bool,
    deflated: bool,
}

impl Layout {
    /// The transfer syntax as dicom-rs knows it.
    pub fn transfer_syntax(&self) -> Result<&'static dicom_encoding::TransferSyntax> {
        TransferSyntaxRegistry
            .get(&self.ts_uid)
            .ok_or_else(|| anyhow!("unknown DICOM transfer syntax UID {}", self.ts_uid))
    }
}

/// The pixel data element at the top level of the data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PixelData {
    /// Native: the value's length.
    Native { len: u64 },
    /// Encapsulated: the number of (non-empty) fragments and their total length.
    Encapsulated { fragments: u64, bytes: u64 },
}

/// Top-level attributes that size the decoded picture, as the walk reads them (first
/// value; binary in the data set's byte order, or a decimal string).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Top {
    pub rows: Option<u64>,
    pub cols: Option<u64>,
    pub bits_allocated: Option<u64>,
    pub samples: Option<u64>,
    pub frames: Option<u64>,
    /// Photometric Interpretation, trimmed and upper case.
    pub pi: Option<String>,
}

/// What the walk found.
#[derive(Debug, Clone)]
pub struct Walk {
    /// Deepest sequence nesting (0: no sequence).
    pub depth: usize,
    /// Upper bound of the memory of dicom-rs' object for this data set.
    pub model: u64,
    pub top: Top,
    pub pixel: Option<PixelData>,
}

/// "DICM" after the 128-byte preamble, or at the very start (dicom-rs looks in that order).
fn magic_at(bytes: &[u8]) -> Option<usize> {
    if bytes.len() >= 132 && &bytes[128..132] == b"DICM" {
        Some(132)
    } else if bytes.starts_with(b"DICM") {
        Some(4)
    } else {
        None
    }
}

/// Reads the file meta group (as dicom-rs' `FileMetaTable` reads it: explicit VR little
/// endian, elements until the group length is used up), or guesses the encoding of a bare
/// data set (explicit when the first element has an upper-case VR, as `dicom::open` does).
pub fn layout(bytes: &[u8]) -> Result<Layout> {
    let Some(magic_end) = magic_at(bytes) else {
        ensure!(
            bytes.len() >= 8 && bytes[0] == 0x08 && bytes[1] == 0x00,
            "not a DICOM file (no \"DICM\" marker at byte 128, and not a bare DICOM data set)"
        );
        let explicit = bytes[4].is_ascii_uppercase() && bytes[5].is_ascii_uppercase();
        return Ok(Layout {
            start: 0,
            ts_uid: if explicit {
                uids::EXPLICIT_VR_LITTLE_ENDIAN
            } else {
                uids::IMPLICIT_VR_LITTLE_ENDIAN
            }
            .to_owned(),
            implicit: !explicit,
            big_endian: false,
            deflated: false,
        });
    };
    let meta = Enc {
        implicit: false,
        big: false,
    };
    let mut src = Slice {
        data: bytes,
        pos: magic_end,
    };
    let first = element_header(&mut src, meta)?
        .ok_or_else(|| anyhow!("truncated DICOM file: it ends after the \"DICM\" marker"))?;
    ensure!(
        first.tag == (0x0002, 0x0000) && first.len == 4,
        "corrupt DICOM file meta group: it must start with its group length (0002,0000), \
         not {}",
        tag_name(first.tag)
    );
    let mut b = [0u8; 4];
    ensure!(
        src.read_up_to(&mut b)? == 4,
        "truncated DICOM file: it ends inside the file meta group"
    );
    let group_length = u64::from(u32::from_le_bytes(b));
    let mut used = 0u64;
    let mut ts_uid = None;
    while used < group_length {
        let h = element_header(&mut src, meta)?
            .ok_or_else(|| anyhow!("truncated DICOM file: it ends inside the file meta group"))?;
        ensure!(
            h.len != UNDEFINED,
            "corrupt DICOM file meta group: element {} has an undefined length",
            tag_name(h.tag)
        );
        let len = u64::from(h.len);
        check_fits(h.tag, len, src.left())?;
        if h.tag == (0x0002, 0x0010) {
            let mut uid = Vec::new();
            src.pass(len, &mut |piece| {
                uid.extend_from_slice(&piece[..piece.len().min(256 - uid.len().min(256))])
            })?;
            let uid = String::from_utf8_lossy(&uid);
            ts_uid = Some(
                uid.trim_end_matches(|c: char| c.is_whitespace() || c == '\0')
                    .to_owned(),
            );
        } else {
            src.pass(len, &mut |_| {})?;
        }
        used = used.saturating_add(h.size + len);
    }
    let ts_uid = ts_uid.ok_or_else(|| {
        anyhow!("corrupt DICOM file meta group: it has no Transfer Syntax UID (0002,0010)")
    })?;
    let (implicit, big_endian, deflated) = match TransferSyntaxRegistry.get(&ts_uid) {
        Some(ts) => (
            ts.uid() == uids::IMPLICIT_VR_LITTLE_ENDIAN,
            ts.endianness() == Endianness::Big,
            matches!(ts.codec(), Codec::Dataset(_)),
        ),
        // Unknown: refused by the caller before the data set is read.
        None => (false, false, false),
    };
    Ok(Layout {
        start: src.pos,
        ts_uid,
        implicit,
        big_endian,
        deflated,
    })
}

/// Walks the data set that `layout` locates in `bytes`.
pub fn walk(bytes: &[u8], layout: &Layout) -> Result<Walk> {
    let enc = Enc {
        implicit: layout.implicit,
        big: layout.big_endian,
    };
    let data = bytes.get(layout.start..).unwrap_or_default();
    if layout.deflated {
        let mut src = Inflate {
            inner: DeflateDecoder::new(data),
            pos: 0,
            scratch: vec![0; 64 << 10],
        };
        walk_source(&mut src, enc)
    } else {
        walk_source(&mut Slice { data, pos: 0 }, enc)
    }
}

const UNDEFINED: u32 = 0xFFFF_FFFF;

#[derive(Debug, Clone, Copy)]
struct Enc {
    implicit: bool,
    big: bool,
}

impl Enc {
    fn u16(self, b: &[u8]) -> u16 {
        let a = [b[0], b[1]];
        if self.big {
            u16::from_be_bytes(a)
        } else {
            u16::from_le_bytes(a)
        }
    }
    fn u32(self, b: &[u8]) -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        if self.big {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }
    }
}

fn tag_name((group, element): (u16, u16)) -> String {
    format!("({group:04X},{element:04X})")
}

/// The bytes a walk reads: in memory, or inflated as they are read.
trait Source {
    /// Bytes read so far.
    fn pos(&self) -> u64;
    /// Bytes left, when known without reading them (in memory).
    fn left(&self) -> Option<u64>;
    /// Fills `buf`, or fewer bytes at the end of the data; how many.
    fn read_up_to(&mut self, buf: &mut [u8]) -> Result<usize>;
    /// Hands the next `n` bytes to `f` in pieces; how many there were (fewer at the end).
    fn pass(&mut self, n: u64, f: &mut dyn FnMut(&[u8])) -> Result<u64>;
}

struct Slice<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Source for Slice<'_> {
    fn pos(&self) -> u64 {
        self.pos as u64
    }
    fn left(&self) -> Option<u64> {
        Some((self.data.len() - self.pos) as u64)
    }
    fn read_up_to(&mut self, buf: &mut [u8]) -> Result<usize> {
        let k = buf.len().min(self.data.len() - self.pos);
        buf[..k].copy_from_slice(&self.data[self.pos..self.pos + k]);
        self.pos += k;
        Ok(k)
    }
    fn pass(&mut self, n: u64, f: &mut dyn FnMut(&[u8])) -> Result<u64> {
        let k = n.min((self.data.len() - self.pos) as u64) as usize;
        f(&self.data[self.pos..self.pos + k]);
        self.pos += k;
        Ok(k as u64)
    }
}

/// A deflated data set, inflated into a fixed scratch buffer as it is walked.
struct Inflate<'a> {
    inner: DeflateDecoder<&'a [u8]>,
    pos: u64,
    scratch: Vec<u8>,
}

impl Inflate<'_> {
    fn read_some(&mut self, len: usize) -> Result<usize> {
        let room = MAX_INFLATED + 1 - self.pos;
        let want = len.min(self.scratch.len()).min(room as usize);
        let n = loop {
            match self.inner.read(&mut self.scratch[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => bail!("corrupt deflated DICOM data set: {e}"),
            }
        };
        self.pos += n as u64;
        ensure!(
            self.pos <= MAX_INFLATED,
            "the deflated DICOM data set inflates to more than {} MiB (a decompression bomb?)",
            MAX_INFLATED >> 20
        );
        Ok(n)
    }
}

impl Source for Inflate<'_> {
    fn pos(&self) -> u64 {
        self.pos
    }
    fn left(&self) -> Option<u64> {
        None
    }
    fn read_up_to(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            let n = self.read_some(buf.len() - got)?;
            if n == 0 {
                break;
            }
            buf[got..got + n].copy_from_slice(&self.scratch[..n]);
            got += n;
        }
        Ok(got)
    }
    fn pass(&mut self, n: u64, f: &mut dyn FnMut(&[u8])) -> Result<u64> {
        let mut done = 0u64;
        while done < n {
            let k = self.read_some((n - done).min(usize::MAX as u64) as usize)?;
            if k == 0 {
                break;
            }
            f(&self.scratch[..k]);
            done += k as u64;
        }
        Ok(done)
    }
}

#[derive(Debug, Clone, Copy)]
struct Header {
    tag: (u16, u16),
    vr: VR,
    len: u32,
    /// Bytes of the header itself.
    size: u64,
}

/// VRs whose explicit header has a 2-byte length (PS3.5 7.1.2), as dicom-rs lists them.
const SHORT_LENGTH: [VR; 21] = {
    use VR::*;
    [
        AE, AS, AT, CS, DA, DS, DT, FL, FD, IS, LO, LT, PN, SH, SL, SS, ST, TM, UI, UL, US,
    ]
};

/// An element header as dicom-rs' decoders read it; `None` when the data ends before a
/// whole tag (dicom-rs then ends the data set there).
fn element_header(src: &mut dyn Source, enc: Enc) -> Result<Option<Header>> {
    let mut b = [0u8; 12];
    if src.read_up_to(&mut b[..4])? < 4 {
        return Ok(None);
    }
    let tag = (enc.u16(&b[0..2]), enc.u16(&b[2..4]));
    let short = || {
        anyhow!(
            "truncated DICOM file: it ends inside the header of element {}",
            tag_name(tag)
        )
    };
    if enc.implicit || tag.0 == 0xFFFE {
        ensure!(src.read_up_to(&mut b[4..8])? == 4, short());
        let vr = if !enc.implicit {
            VR::UN
        } else if tag == (0x7FE0, 0x0010) || (tag.0 >> 8 == 0x60 && tag.1 == 0x3000) {
            VR::OW
        } else {
            StandardDataDictionary
                .by_tag(dicom_core::Tag(tag.0, tag.1))
                .map(|e| e.vr().relaxed())
                .unwrap_or(VR::UN)
        };
        return Ok(Some(Header {
            tag,
            vr,
            len: enc.u32(&b[4..8]),
            size: 8,
        }));
    }
    ensure!(src.read_up_to(&mut b[4..6])? == 2, short());
    let vr = VR::from_binary([b[4], b[5]]).unwrap_or(VR::UN);
    if SHORT_LENGTH.contains(&vr) {
        ensure!(src.read_up_to(&mut b[6..8])? == 2, short());
        Ok(Some(Header {
            tag,
            vr,
            len: u32::from(enc.u16(&b[6..8])),
            size: 8,
        }))
    } else {
        ensure!(src.read_up_to(&mut b[6..12])? == 6, short());
        Ok(Some(Header {
            tag,
            vr,
            len: enc.u32(&b[8..12]),
            size: 12,
        }))
    }
}

/// A declared length against the bytes left (where known): the check that keeps dicom-rs
/// from allocating what is not there.
fn check_fits(tag: (u16, u16), len: u64, left: Option<u64>) -> Result<()> {
    if let Some(left) = left {
        ensure!(
            len <= left,
            "corrupt or truncated DICOM file: element {} declares {len} bytes but only {left} \
             remain",
            tag_name(tag)
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sequence,
    /// Encapsulated pixel data; `items` read so far (the first is the offset table), `top`
    /// when it is the data set's own Pixel Data.
    PixelSequence {
        items: u64,
        top: bool,
    },
    Item {
        pixel: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct Open {
    kind: Kind,
    /// Where a defined length ends it.
    end: Option<u64>,
}

/// Memory of one primitive value in dicom-rs' object (`read_value_preserved`): strings are
/// split at backslashes into `String`s (text decoding may triple the bytes: one invalid
/// byte becomes U+FFFD), everything else is kept at its size.
fn value_cost(vr: VR, len: u64, backslashes: u64) -> u64 {
    use VR::*;
    if len == 0 {
        return 0;
    }
    match vr {
        AE | AS | PN | SH | LO | UC | UI | IS | DS | DA | TM | DT | CS => {
            (backslashes + 1) * STRING_VALUE_COST + 3 * len
        }
        UT | ST | UR | LT => STRING_VALUE_COST + 3 * len,
        _ => 32 + len,
    }
}

fn is_text(vr: VR) -> bool {
    use VR::*;
    matches!(
        vr,
        AE | AS | PN | SH | LO | UC | UI | IS | DS | DA | TM | DT | CS
    )
}

/// The first value of an attribute that sizes the picture: binary integers in the data
/// set's byte order, decimal strings parsed. `None` for anything else.
fn first_uint(vr: VR, b: &[u8], enc: Enc) -> Option<u64> {
    use VR::*;
    match vr {
        US | OW if b.len() >= 2 => Some(u64::from(enc.u16(b))),
        SS if b.len() >= 2 => u64::try_from(enc.u16(b) as i16).ok(),
        UL | OL if b.len() >= 4 => Some(u64::from(enc.u32(b))),
        SL if b.len() >= 4 => u64::try_from(enc.u32(b) as i32).ok(),
        _ if is_text(vr) => {
            let s = String::from_utf8_lossy(b);
            let first = s.split('\\').next().unwrap_or_default();
            first
                .trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .parse()
                .ok()
        }
        _ => None,
    }
}

fn walk_source(src: &mut dyn Source, enc: Enc) -> Result<Walk> {
    let mut stack: Vec<Open> = Vec::new();
    let mut depth = 0usize;
    let mut walk = Walk {
        depth: 0,
        // The walk's own stack and dicom-rs' reader state.
        model: 4096,
        top: Top::default(),
        pixel: None,
    };
    // Expecting an item header (or a sequence delimiter), as dicom-rs' `in_sequence`.
    let mut in_sequence = false;
    loop {
        // Containers whose defined length ends here close, innermost first.
        while let Some(open) = stack.last().copied() {
            if open.end != Some(src.pos()) {
                break;
            }
            stack.pop();
            match open.kind {
                Kind::Sequence => {
                    depth -= 1;
                    in_sequence = false;
                }
                Kind::PixelSequence { .. } => in_sequence = false,
                Kind::Item { .. } => in_sequence = true,
            }
        }
        // The innermost defined end bounds everything read next (a container's end was
        // checked against its parent's when it opened); the data's end bounds the rest.
        let end = stack.iter().rev().find_map(|o| o.end);
        let left = match (end, src.left()) {
            (Some(end), _) => Some(end - src.pos()),
            (None, left) => left,
        };

        if in_sequence {
            let Some(&open) = stack.last() else {
                bail!("internal error: DICOM walk in a sequence without one open");
            };
            let mut b = [0u8; 8];
            let got = src.read_up_to(&mut b)?;
            if got < 8 {
                // dicom-rs accepts encapsulated pixel data cut off after a fragment, at the
                // top level, where its explicit VR decoders read item headers (its implicit
                // VR decoder fails there with another error).
                ensure!(
                    matches!(open.kind, Kind::PixelSequence { .. })
                        && stack.len() == 1
                        && !enc.implicit,
                    "truncated DICOM file: it ends inside a sequence"
                );
                break;
            }
            if let Some(left) = left {
                ensure!(
                    left >= 8,
                    "corrupt DICOM file: an item header crosses the end of its sequence"
                );
            }
            let tag = (enc.u16(&b[0..2]), enc.u16(&b[2..4]));
            let len = enc.u32(&b[4..8]);
            match tag {
                (0xFFFE, 0xE000) => {
                    let left = left.map(|l| l - 8);
                    let item_end = if len == UNDEFINED {
                        None
                    } else {
                        check_fits(tag, u64::from(len), left)?;
                        Some(src.pos() + u64::from(len))
                    };
                    let pixel = match stack.last_mut().map(|o| &mut o.kind) {
                        Some(Kind::PixelSequence { items, .. }) => {
                            ensure!(
                                item_end.is_some(),
                                "corrupt DICOM file: an encapsulated pixel data fragment has \
                                 an undefined length"
                            );
                            *items += 1;
                            true
                        }
                        _ => {
                            walk.model += ITEM_COST;
                            false
                        }
                    };
                    stack.push(Open {
                        kind: Kind::Item { pixel },
                        end: item_end,
                    });
                    in_sequence = false;
                }
                (0xFFFE, 0xE0DD) => {
                    if let Some(Open {
                        kind: Kind::Sequence,
                        ..
                    }) = stack.pop()
                    {
                        depth -= 1;
                    }
                    in_sequence = false;
                }
                _ => bail!(
                    "corrupt DICOM file: {} where a sequence item was expected",
                    tag_name(tag)
                ),
            }
            continue;
        }

        if let Some(Open {
            kind: Kind::Item { pixel: true },
            end,
        }) = stack.last().copied()
        {
            // A fragment's bytes (or the basic offset table's, in the first item).
            let len = end.unwrap_or_default() - src.pos();
            let got = src.pass(len, &mut |_| {})?;
            ensure!(
                got == len,
                "truncated DICOM file: it ends inside the encapsulated pixel data"
            );
            let parent = stack.len().checked_sub(2).map(|i| stack[i].kind);
            if let Some(Kind::PixelSequence { items, top }) = parent {
                if items == 1 {
                    // Read as u32s into a vector reserved at one u32 per byte.
                    walk.model += FRAGMENT_COST + 4 * len;
                } else {
                    walk.model += FRAGMENT_COST + len;
                    if top {
                        if let Some(PixelData::Encapsulated { fragments, bytes }) = &mut walk.pixel
                        {
                            *fragments += 1;
                            *bytes += len;
                        }
                    }
                }
            }
            continue;
        }

        let Some(h) = element_header(src, enc)? else {
            // The end of the data: only the top level may end so.
            ensure!(
                stack.is_empty(),
                "truncated DICOM file: it ends inside a sequence"
            );
            break;
        };
        if let Some(left) = left {
            ensure!(
                h.size <= left,
                "corrupt DICOM file: element {} crosses the end of its item",
                tag_name(h.tag)
            );
        }
        let left = left.map(|l| l - h.size);
        let top_level = stack.is_empty();
        walk.model += ELEMENT_COST;
        // dicom-rs' order: VR SQ, then an item delimiter, then encapsulated pixel data, then
        // any other element of undefined length, which it reads as a sequence too.
        if h.tag == (0xFFFE, 0xE00D) && h.vr != VR::SQ {
            // The end of an item (dicom-rs ignores one outside any sequence).
            walk.model -= ELEMENT_COST;
            if let Some(open) = stack.pop() {
                if open.kind == Kind::Sequence {
                    depth -= 1;
                }
                in_sequence = true;
            }
            continue;
        }
        if h.tag == (0x7FE0, 0x0010) && h.len == UNDEFINED && h.vr != VR::SQ {
            // Encapsulated pixel data: fragments in items, without nesting.
            stack.push(Open {
                kind: Kind::PixelSequence {
                    items: 0,
                    top: top_level,
                },
                end: None,
            });
            if top_level {
                walk.pixel = Some(PixelData::Encapsulated {
                    fragments: 0,
                    bytes: 0,
                });
            }
            in_sequence = true;
            continue;
        }
        if h.vr == VR::SQ || h.len == UNDEFINED {
            depth += 1;
            ensure!(
                depth <= MAX_DEPTH,
                "DICOM sequences nested more than {MAX_DEPTH} deep are not supported (a \
                 corrupt or hostile file?)"
            );
            walk.depth = walk.depth.max(depth);
            let end = if h.len == UNDEFINED {
                None
            } else {
                check_fits(h.tag, u64::from(h.len), left)?;
                Some(src.pos() + u64::from(h.len))
            };
            stack.push(Open {
                kind: Kind::Sequence,
                end,
            });
            in_sequence = true;
            continue;
        }

        let len = u64::from(h.len);
        check_fits(h.tag, len, left)?;
        let wanted = top_level && h.tag.0 == 0x0028;
        let text = is_text(h.vr);
        let mut head = [0u8; 64];
        let mut kept = 0usize;
        let mut backslashes = 0u64;
        let got = src.pass(len, &mut |piece| {
            if wanted && kept < head.len() {
                let k = piece.len().min(head.len() - kept);
                head[kept..kept + k].copy_from_slice(&piece[..k]);
                kept += k;
            }
            if text {
                backslashes += piece.iter().filter(|&&c| c == b'\\').count() as u64;
            }
        })?;
        ensure!(
            got == len,
            "truncated DICOM file: element {} declares {len} bytes but the data ends after {got}",
            tag_name(h.tag)
        );
        walk.model += value_cost(h.vr, len, backslashes);
        if top_level {
            let v = || first_uint(h.vr, &head[..kept], enc);
            match h.tag {
                (0x0028, 0x0010) => walk.top.rows = v(),
                (0x0028, 0x0011) => walk.top.cols = v(),
                (0x0028, 0x0100) => walk.top.bits_allocated = v(),
                (0x0028, 0x0002) => walk.top.samples = v(),
                (0x0028, 0x0008) => walk.top.frames = v(),
                (0x0028, 0x0004) => {
                    let s = String::from_utf8_lossy(&head[..kept]);
                    let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
                    walk.top.pi = (!s.is_empty()).then(|| s.to_ascii_uppercase());
                }
                (0x7FE0, 0x0010) => walk.pixel = Some(PixelData::Native { len }),
                _ => {}
            }
        }
    }
    Ok(walk)
}
